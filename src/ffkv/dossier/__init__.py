"""A fact's dossier: tracing, memories, their subspace, storage strength, the recall verdict and edit safety
joined in one report (``ffkv dossier``; docs/dossier.md).

    from ffkv.dossier.build import build_dossier
    d = build_dossier(model, "Ana Boll was born in", "Ana Boll", "Paris")
    d["claims"]          # booleans a ground truth can check
    from ffkv.dossier.report import write_dossier
    write_dossier(d, "out/")   # out/dossier.json, out/dossier.html

Heavy imports happen on first use.
"""

from .._lazy import lazy_getattr

_LAZY = {
    "build_dossier": "ffkv.dossier.build",
    "SECTIONS": "ffkv.dossier.build",
    "write_dossier": "ffkv.dossier.report",
    "render_html": "ffkv.dossier.report",
}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr(_LAZY, __name__)
