"""Every locator by name: ``LOCATORS[name](model, prompt, subject, answer, **options) -> LocateResult``.

Adding a locator is one file (a function with the :class:`ffkv.locate.result.Locator` signature returning a
:class:`ffkv.locate.result.LocateResult`) and one line here; :func:`ffkv.locate.plots.plot_locate` draws it.
"""

from __future__ import annotations

from functools import partial

from ..errors import FfkvError
from .approx import approx_trace
from .attribution import locate_attribution
from .result import LocateResult, Locator, locate_trace

LOCATORS: dict[str, Locator] = {
    "trace-hidden": partial(locate_trace, kind="hidden"),  # ROME's causal trace of hidden states
    "trace-mlp": partial(locate_trace, kind="mlp"),  # ... of MLP outputs (window of layers)
    "trace-attn": partial(locate_trace, kind="attn"),  # ... of attention outputs
    "integrated-gradients": locate_attribution,  # Dai et al.'s attribution, summed over each layer's memories
    "approx-trace": approx_trace,  # attribution patching of all three kinds, top cells restored exactly
}


def get_locator(name: str) -> Locator:
    """The locator called ``name``; one FfkvError listing :data:`LOCATORS` for an unknown one."""
    if name not in LOCATORS:
        raise FfkvError(f"unknown locator {name!r}", f"use one of {', '.join(LOCATORS)}")
    return LOCATORS[name]


def locate(model, method: str, prompt: str, subject: str | None = None, answer: str | int | None = None,
           **options) -> LocateResult:
    """Run the locator ``method`` on one prompt (options: that locator's)."""
    return get_locator(method)(model, prompt, subject, answer, **options)
