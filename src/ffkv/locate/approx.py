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

Screen-then-verify: the ``verify`` cells of each kind with the largest estimate are then restored exactly with
:func:`ffkv.locate.trace.restore_states` (ROME's ``trace_with_patch``), and their scores are replaced by the
exact values (for hidden states, the last token's last layer, exact by definition, counts as verified);
:func:`verified_peaks` reads the best verified cell of each kind. Noise, answer and settings
follow :func:`ffkv.locate.trace.causal_trace` (the same ``noise_level`` / ``draw_noise`` / ``corruption``, so
the same seed gives the same corrupted runs).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FfkvError
from ..models.hooks import intervene
from ..models.model import MemoryModel
from ..models.engine import Cost
from .attribution import activation_gradients
from .result import LocateResult
from .trace import KINDS, SITE_OF_KIND, corruption, draw_noise, noise_level, restore_states, restored_layers

VERIFY = 3  # cells of each kind restored exactly after the screen


@torch.no_grad()
def _record(model: MemoryModel, ids: torch.Tensor, reads, cost: Cost):
    """The clean run: its states ``reads`` and P at the last position, (vocab,)."""
    with intervene(model, reads=reads) as rec:
        logits = model.hf(input_ids=ids).logits[0, -1]
    cost.add(1, ids.shape[1], model.n_layers)
    return rec, torch.softmax(logits.float(), -1)


def approx_trace(model: MemoryModel, prompt: str, subject: str, answer: str | int | None = None,
                 kinds=KINDS, noise: str | float = "s3", samples: int = 10, window: int = 10, seed: int = 0,
                 subjects: list[str] | None = None, verify: int = VERIFY, cost: Cost | None = None
                 ) -> LocateResult:
    """Approximate causal traces of ``kinds`` (default all three) from one forward and one backward pass of the
    ``samples`` corrupted rows, then ``verify`` cells per kind restored exactly.

    answer, noise, samples, window, seed, subjects: as :func:`ffkv.locate.trace.causal_trace`. Returns a
    :class:`~ffkv.locate.result.LocateResult` with one site per kind, ``scores[s, t, l]`` = the estimated
    restored probability (exact at verified cells); ``detail`` = ``{"estimate": (kinds, T, L) array,
    "verified": {kind: [(token, layer, exact p), ...]}}``.
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
    ids = model.encode(prompt)["input_ids"]
    T = ids.shape[1]
    s, e = model.find_subject(prompt, subject)
    sites = sorted({SITE_OF_KIND[k] for k in kinds})
    reads = [(site, l) for site in sites for l in range(L)]
    # The clean run: its states and p_clean (one forward pass without gradients).
    clean, probs = _record(model, ids, reads, cost)
    if answer is None:  # the top prediction among real tokens (a padded vocabulary's extra rows are no text)
        answer_id = int(probs[: min(model.tokenizer_vocab_size or probs.numel(), probs.numel())].argmax())
    elif isinstance(answer, int):
        answer_id = answer
    else:
        answer_id = model.answer_id(answer)
    high = float(probs[answer_id])
    level, mode = noise_level(model, noise, subjects)
    z = draw_noise(level, mode, samples, e - s, model.d_model, seed)
    low, corr, grads = activation_gradients(model, ids.expand(samples, T), answer_id, reads,
                                            edits=[corruption(z, (s, e), mode)], cost=cost)
    # First-order effect of restoring each single state: (site) -> (T, L).
    effect = {}
    for site in sites:
        eff = np.zeros((T, L))
        for l in range(L):
            d = clean[site, l][0].double() - corr[site, l].double()  # (S, T, d)
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
    # Same corrupted runs as the screen: pass the level itself when the noise is Gaussian.
    spec = level if mode == "gaussian" else noise
    for i, kind in enumerate(kinds):
        order = np.argsort(-est[i].reshape(-1), kind="stable")[:verify]
        # the last layer's hidden state at the last token is the clean output: exact without a run
        verified[kind] = [(T - 1, L - 1, high)] if kind == "hidden" else []
        for flat in order.tolist():
            t, l = divmod(flat, L)
            if kind == "hidden" and (t, l) == (T - 1, L - 1):
                continue
            states = [(t, j) for j in restored_layers(kind, l, L, window)]
            p = restore_states(model, prompt, subject, states, kind=kind, answer=answer_id, noise=spec,
                               samples=samples, seed=seed, subjects=subjects)
            cost.add(samples + 1, T, L)
            scores[i, t, l] = p
            verified[kind].append((t, l, p))
    tokens = [model.decode([int(i)]) for i in ids[0]]
    return LocateResult("approx-trace", prompt, subject, model.decode([answer_id]), answer_id, tokens, list(kinds),
                        scores, f"restored p({model.decode([answer_id]).strip()}), first-order estimate "
                        f"(top {verify} per kind exact)", (s, e), high, low,
                        {"kinds": list(kinds), "noise": noise, "noise_level": level, "samples": samples,
                         "window": window, "seed": seed, "verify": verify}, cost.as_dict(),
                        {"estimate": est, "verified": verified})


def verified_peaks(result: LocateResult) -> dict[str, tuple[int, int]]:
    """{kind: (token, layer)} of the verified cell with the largest exact restored probability."""
    return {kind: max(cells, key=lambda c: c[2])[:2] for kind, cells in result.detail["verified"].items() if cells}
