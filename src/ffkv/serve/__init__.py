"""The memory debugger: ``ffkv serve MODEL [--atlas DIR] [--port N]`` serves a web app on 127.0.0.1.

    from ffkv.serve import Backend, create_app
    app = create_app(Backend(ffkv.load_model(path), atlas="atlas/", state_dir="state/"))   # an ASGI app

Views: the prompt view (next-token distribution, per-layer logit lens before and after the FFN, top
sub-updates, memory switches with KL, changed tokens and continuations), memory pages, search, causal
traces with knowledge neurons, and ROME/MEMIT edits with an on-disk, undoable journal. Every call into
ffkv is in :mod:`ffkv.serve.backend`; see docs/serve.md.
"""

from .._lazy import lazy_getattr

_LAZY = {"Backend": "ffkv.serve.backend", "Limits": "ffkv.serve.backend", "create_app": "ffkv.serve.app",
         "run_server": "ffkv.serve.cli", "make_server": "ffkv.serve.cli"}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr(_LAZY, __name__)
