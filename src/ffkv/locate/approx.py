"""A fast approximate causal trace: attribution patching, then the top cells restored exactly.

Causal tracing (:func:`ffkv.locate.trace.causal_trace`) restores one state h at a time into the corrupted run
and reads ``p_*,clean(h)``. To first order in the restored change (Syed et al. 2023, "attribution patching";
Nanda 2023), for the noise samples k = 1..S of the corrupted run:

    p_*,clean(h(t, l)) ~= p_* + sum_k  dp_*/dh_k(t, l) . (h_clean(t, l) - h_k(t, l))

with ``p_* = mean_k P(o | corrupted_k)``: one forward pass of the S corrupted rows and one backward pass give
the estimate at every site (hidden = ``resid_post``, mlp = ``ffn_out``, attn = ``attn_out``), token and layer
at once. A window cell (mlp / attn: the layers :func:`ffkv.locate.trace.restored_layers`) is the sum of its
layers' first-order terms. Cells whose exact value is known without running are set as the exact trace sets
them (tokens before the subject: ``p_*``; the last layer's hidden state: ``p_clean`` at the last token, ``p_*``
elsewhere).

Screen-then-verify: the ``verify`` cells of each kind with the largest estimate are then restored exactly by the
exact tracer (:class:`ffkv.locate.trace.Tracer`, the same runs as :func:`ffkv.locate.trace.causal_trace`), and
their scores are replaced by the exact values (for hidden states, the last token's last layer, exact by
definition, counts as verified); :func:`verified_peaks` reads the best verified cell of each kind. The clean and
corrupted runs, noise (ROME's defaults: s3, ``RandomState(1)``), answer and settings are the exact tracer's, so
the same seed gives the same corrupted runs and the verified cells equal the exact trace's.

Cost: one clean run (1 row), one corrupted run (``samples`` rows, with its key/value cache), one forward and one
backward pass of the corrupted rows, and the verified cells' partial runs, for all kinds at once.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FfkvError
from ..models.engine import Cost
from ..models.model import MemoryModel
from ..progress import bar
from .attribution import activation_gradients
from .result import LocateResult
from .trace import DEFAULT_SEED, KINDS, SITE_OF_KIND, Tracer, corruption, restored_layers

VERIFY = 3  # cells of each kind restored exactly after the screen


def approx_trace(model: MemoryModel, prompt: str, subject: str, answer: str | int | None = None,
                 kinds=KINDS, noise: str | float = "s3", samples: int = 10, window: int = 10,
                 seed: int = DEFAULT_SEED, subjects=None, verify: int = VERIFY, cost: Cost | None = None,
                 progress: bool = False) -> LocateResult:
    """Approximate causal traces of ``kinds`` (default all three) from one forward and one backward pass of the
    ``samples`` corrupted rows, then ``verify`` cells per kind restored exactly.

    answer, noise, samples, window, seed, subjects: as :func:`ffkv.locate.trace.causal_trace`. progress: a bar
    (:mod:`ffkv.progress`). Returns a :class:`~ffkv.locate.result.LocateResult` with one site per kind,
    ``scores[s, t, l]`` = the estimated restored probability (exact at verified cells); ``detail`` =
    ``{"estimate": (kinds, T, L) array, "verified": {kind: [(token, layer, exact p), ...]}}``.
    """
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise FfkvError(f"unknown trace kind(s) {bad or kinds!r}", f"use some of {', '.join(KINDS)}")
    if samples < 1 or window < 1 or verify < 0:
        raise FfkvError(f"samples {samples} / window {window} / verify {verify} out of range",
                        "use samples >= 1, window >= 1, verify >= 0")
    cost = cost if cost is not None else Cost()
    L = model.n_layers
    with bar(total=2 + len(kinds), desc="approx trace", unit="step", enabled=progress) as b:
        tr = Tracer(model, prompt, subject, kinds, answer, noise, samples, window, seed, subjects, 400, cost)
        b.update(1)
        prep, low, high = tr.prep, tr.low, tr.prep.high_score
        T, (s, e) = tr.T, prep.subject_range
        sites = sorted({SITE_OF_KIND[k] for k in kinds})
        reads = [(site, l) for site in sites for l in range(L)]
        _, corr, grads = activation_gradients(model, prep.ids.expand(samples, T), prep.answer_id, reads,
                                              edits=[corruption(prep.noise, (s, e), prep.mode)], cost=cost)
        b.update(1)
        # First-order effect of restoring each single state: (site) -> (T, L).
        effect = {}
        for site in sites:
            eff = np.zeros((T, L))
            for l in range(L):
                d = prep.clean[site, l].double() - corr[site, l].double()  # (S, T, d)
                eff[:, l] = (grads[site, l].double() * d).sum((0, 2)).cpu().numpy()
            effect[site] = eff
        est = np.full((len(kinds), T, L), low, dtype=np.float64)
        for i, kind in enumerate(kinds):
            eff = effect[SITE_OF_KIND[kind]]
            for l in range(L):
                est[i, s:, l] = low + eff[s:, list(restored_layers(kind, l, L, window))].sum(1)
            if kind == "hidden":
                est[i, :, L - 1] = low
                est[i, T - 1, L - 1] = high
        scores = est.copy()
        verified: dict[str, list] = {}
        for i, kind in enumerate(kinds):
            order = [divmod(f, L) for f in np.argsort(-est[i].reshape(-1), kind="stable")[:verify].tolist()]
            # the last layer's hidden state at the last token is the clean output: exact without a run
            verified[kind] = [(T - 1, L - 1, high)] if kind == "hidden" else []
            cells = [c for c in order if not (kind == "hidden" and c == (T - 1, L - 1))]
            exact = tr.scores(kind, cells)
            for t, l in cells:
                scores[i, t, l] = exact[t, l]
                verified[kind].append((t, l, exact[t, l]))
            b.update(1)
    name = prep.answer.strip()
    return LocateResult("approx-trace", prompt, subject, prep.answer, prep.answer_id, prep.tokens, list(kinds),
                        scores, f"restored p({name}), first-order estimate (top {verify} per kind exact)", (s, e),
                        high, low, {"kinds": list(kinds), "noise": noise, "noise_level": prep.level,
                                    "noise_subjects": prep.source, "samples": samples, "window": window,
                                    "seed": seed, "verify": verify}, cost.as_dict(),
                        {"estimate": est, "verified": verified})


def verified_peaks(result: LocateResult) -> dict[str, tuple[int, int]]:
    """{kind: (token, layer)} of the verified cell with the largest exact restored probability."""
    return {kind: max(cells, key=lambda c: c[2])[:2] for kind, cells in result.detail["verified"].items() if cells}
