"""The locator contract: ``(model, prompt, subject, answer, **options) -> LocateResult``.

A *locator* says where in the network a prompt's answer comes from, as scores over ``(site, token, layer)``:

    scores[s, t, l]     (n_sites, n_tokens, n_layers) float, NaN where the method gives no score

Causal tracing (:func:`locate_trace`) has one site, its kind ("hidden", "mlp" or "attn"), and scores the restored
probability of the answer, ``scores[0, t, l] = p_*,clean`` (ROME); it states the clean and corrupted
probabilities. Integrated-gradients attribution (:func:`ffkv.locate.attribution.locate_attribution`) has the site
"coef": ``scores[0, t, l] = sum_i IG_i^(l)`` at the prediction position t (NaN elsewhere), the attribution of
P(answer) summed over a layer's memories. :func:`ffkv.locate.plots.plot_locate` draws any result; the registry
:data:`ffkv.locate.registry.LOCATORS` names every locator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..models.model import MemoryModel
from .trace import SITE_OF_KIND, TraceResult, causal_trace


@dataclass
class LocateResult:
    """Scores of one (prompt, answer) over (site, token, layer); see the module docstring.

    clean / corrupted: P(answer) of the clean and of the corrupted run (None where the method has none).
    score: what a score is, in words (for figures and tables). detail: the method's own result (a
    :class:`~ffkv.locate.trace.TraceResult`, a (n_layers, d_ffn) attribution tensor), not serialised.
    """

    method: str
    prompt: str
    subject: str | None
    answer: str
    answer_id: int
    tokens: list[str]
    sites: list[str]
    scores: np.ndarray
    score: str
    subject_range: tuple[int, int] | None = None
    clean: float | None = None
    corrupted: float | None = None
    options: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    detail: Any = None

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64)
        shape = (len(self.sites), len(self.tokens))
        if self.scores.ndim != 3 or self.scores.shape[:2] != shape:
            raise ValueError(f"scores of shape {self.scores.shape} do not match (sites, tokens) {shape}")

    def peak(self) -> tuple[str, int, int]:
        """(site, token, layer) of the largest score (NaN cells ignored)."""
        s, t, l = np.unravel_index(int(np.nanargmax(self.scores)), self.scores.shape)
        return self.sites[s], int(t), int(l)

    def site_scores(self, site: str) -> np.ndarray:
        """(tokens, layers) scores of one site."""
        return self.scores[self.sites.index(site)]

    def to_json(self) -> dict:
        def clean(x):
            return None if x is None or (isinstance(x, float) and math.isnan(x)) else x

        return {"method": self.method, "prompt": self.prompt, "subject": self.subject, "answer": self.answer,
                "answer_id": self.answer_id, "tokens": self.tokens, "sites": self.sites,
                "subject_range": list(self.subject_range) if self.subject_range else None,
                "scores": [[[clean(float(v)) for v in row] for row in site] for site in self.scores],
                "score": self.score, "clean": self.clean, "corrupted": self.corrupted, "options": self.options,
                "cost": self.cost}


class Locator(Protocol):
    """``locator(model, prompt, subject, answer, **options) -> LocateResult``; answer None = the top prediction."""

    def __call__(self, model: MemoryModel, prompt: str, subject: str | None, answer: str | int | None = None,
                 **options) -> LocateResult: ...


def from_trace(r: TraceResult) -> LocateResult:
    """A causal trace as a :class:`LocateResult` (one site, the trace's kind)."""
    return LocateResult(f"trace-{r.kind}", r.prompt, r.subject, r.answer, r.answer_id, list(r.tokens), [r.kind],
                        np.asarray(r.scores)[None], f"restored p({r.answer.strip()}), {SITE_OF_KIND[r.kind]}",
                        tuple(r.subject_range), r.high_score, r.low_score,
                        {"kind": r.kind, "window": r.window, "noise": r.noise, "noise_level": r.noise_level,
                         "samples": r.samples, "seed": r.seed}, r.cost, r)


def locate_trace(model: MemoryModel, prompt: str, subject: str, answer: str | int | None = None,
                 kind: str = "hidden", **options) -> LocateResult:
    """Causal tracing as a locator: :func:`ffkv.locate.trace.causal_trace` (its options and defaults)."""
    return from_trace(causal_trace(model, prompt, subject, kind=kind, answer=answer, **options))
