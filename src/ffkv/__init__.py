"""ffkv: feed-forward layers as key-value memories.

    import ffkv
    model = ffkv.load_model("gpt2")                       # any supported Hugging Face causal LM
    with ffkv.intervene(model, reads=[("coef", 5)]) as rec:
        model(**model.encode("The Eiffel Tower is in"))
    m = rec["coef", 5]                                    # memory coefficients, (batch, tokens, d_ffn)

Heavy imports (torch, transformers) happen on first use so that ``ffkv --help`` is instant.
"""

from ._lazy import lazy_getattr

from ._version import __version__
from .errors import FfkvError

_LAZY = {
    "load_model": "ffkv.models.loading",
    "MemoryModel": "ffkv.models.model",
    "intervene": "ffkv.models.hooks",
    "Intervention": "ffkv.models.hooks",
    "Recording": "ffkv.models.hooks",
    "census": "ffkv.models.census",
    "get_spec": "ffkv.models.adapters",
}

__all__ = ["__version__", "FfkvError", *_LAZY]


__getattr__ = lazy_getattr(_LAZY, __name__)
