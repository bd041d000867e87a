"""Interventions that test a localisation: switch the found memories off or up and watch the answer.

For a set N of memories and a prompt with answer o, at the prediction position (the prompt's last token):

    suppress   m_i := 0        for (l, i) in N
    amplify    m_i := 2 m_i    for (l, i) in N

and report the change of P(o), absolute and relative ``(P_after - P_before) / P_before`` (Dai et al. report the
relative one), and the *flip rate*: how often the top-1 prediction changes. Each effect is measured on the fact's
own prompts, on unrelated facts (other relations) and, as the control, for random memories matched by layer
(the same number of memories in each layer).

:func:`ablation_curve` is the one ablation curve of ffkv: P(o) as the first k memories of a ranking are switched
off, for a grid of k (default 0..N), at the prediction position (Dai et al.'s suppression) or, with
``positions="all"``, at every position (``ffkv recall``'s storage strength). Every "switch these memories off" in
locate and recall is :func:`memories_off`, built from :func:`ffkv.models.hooks.switch_memories`.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import torch

from ..errors import FfkvError
from ..models.hooks import Intervention, intervene, switch_memories
from ..models.memory_id import MemoryId
from ..models.model import MemoryModel

OPS = {"suppress": ("off", None), "amplify": ("scale", 2.0)}
POSITIONS = ("last", "all")


def _by_layer(memories) -> dict[int, list[int]]:
    """{layer: [index, ...]} of memories given as MemoryIds, "L3.17", (layer, index) or (layer, index, score)."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for n in memories:
        mid = MemoryId.parse(n) if isinstance(n, (str, MemoryId)) else MemoryId(int(n[0]), int(n[1]))
        by_layer[mid.layer].append(mid.index)
    return dict(sorted(by_layer.items()))


def memories_off(memories, positions=None, row: int | None = None) -> list[Intervention]:
    """Switch ``memories`` off (``m_i := 0``) at ``positions`` (None: every position) of batch ``row`` (None:
    every row): one :func:`ffkv.models.hooks.switch_memories` per layer."""
    edits = []
    for layer, indices in _by_layer(memories).items():
        e = switch_memories(layer, indices, positions=positions)
        e.batch = None if row is None else [row]
        edits.append(e)
    return edits


def neuron_edits(neurons, op: str, position: int | None, row: int | None, factor: float | None = None
                 ) -> list[Intervention]:
    """Edits applying ``op`` ("suppress" / "amplify" / "scale") to the memories ``neurons`` at one position
    (None: every position) of one batch row (None: every row)."""
    if op == "suppress":
        return memories_off(neurons, None if position is None else [position], row)
    _, value = OPS.get(op, ("scale", factor))
    if factor is not None:
        value = factor
    return [Intervention("coef", l, "scale", value=value, indices=idx,
                         positions=None if position is None else [position], batch=None if row is None else [row])
            for l, idx in _by_layer(neurons).items()]


@torch.no_grad()
def variant_probs(model: MemoryModel, prompt: str, answer: str | int, variants: list[list[Intervention]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """P(answer) and the top-1 token of ``prompt`` under each variant (a list of edits for row 0; the edits
    are re-targeted to the variant's row). One forward pass; returns ((V,), (V,))."""
    ids = model.encode(prompt)["input_ids"]
    a = answer if isinstance(answer, int) else model.answer_id(answer)
    V = len(variants)
    edits = []
    for r, var in enumerate(variants):
        for e in var:
            edits.append(Intervention(e.site, e.layer, e.op, e.value, e.positions, [r], e.indices))
    with intervene(model, edits=edits):
        logits = model.hf(input_ids=ids.expand(V, ids.shape[1])).logits[:, -1]
    probs = torch.softmax(logits.float(), -1)
    return probs[:, a].cpu().numpy(), probs.argmax(-1).cpu().numpy()


def random_matched(model: MemoryModel, neurons, seed: int = 0) -> list[tuple[int, int]]:
    """As many random memories per layer as ``neurons`` has, none of them in ``neurons``."""
    rng = random.Random(seed)
    found = {(int(n[0]), int(n[1])) for n in neurons}
    out = []
    by_layer = defaultdict(int)
    for n in neurons:
        by_layer[int(n[0])] += 1
    for l, k in sorted(by_layer.items()):
        pool = [i for i in range(model.d_ffn) if (l, i) not in found]
        out += [(l, i) for i in rng.sample(pool, min(k, len(pool)))]
    return out


def _summary(p0: np.ndarray, p1: np.ndarray, top0: np.ndarray, top1: np.ndarray) -> dict:
    rel = (p1 - p0) / np.maximum(p0, 1e-12)
    return {"prob_before": float(p0.mean()), "prob_after": float(p1.mean()),
            "change": float((p1 - p0).mean()), "relative_change": float(rel.mean()),
            "flip_rate": float((top0 != top1).mean()), "n": int(len(p0))}


def intervention_effects(model: MemoryModel, prompts: list[str], answer: str, neurons,
                         unrelated: list[tuple[str, str]] = (), random_trials: int = 3, seed: int = 0) -> dict:
    """Suppress / amplify ``neurons`` and report the effects on the fact's prompts, on ``unrelated`` (prompt,
    answer) pairs, and for random layer-matched memories (mean over ``random_trials`` draws).

    Returns ``{"own"|"unrelated": {"suppress"|"amplify": {"found"|"random": summary}}}``; a summary has
    prob_before, prob_after, change, relative_change, flip_rate, n.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    randoms = [random_matched(model, neurons, seed + k) for k in range(random_trials)] if neurons else []
    out = {}
    for name, cases in (("own", [(p, answer) for p in prompts]), ("unrelated", list(unrelated))):
        if not cases:
            continue
        rows = defaultdict(list)  # (op, which) -> list of (p0, p1, top0, top1)
        for prompt, ans in cases:
            last = model.encode(prompt)["input_ids"].shape[1] - 1
            variants = [[]]
            keys = []
            for op in OPS:
                variants.append(neuron_edits(neurons, op, last, 0))
                keys.append((op, "found"))
                for r in randoms:
                    variants.append(neuron_edits(r, op, last, 0))
                    keys.append((op, "random"))
            p, top = variant_probs(model, prompt, ans, variants)
            for k, (key) in enumerate(keys, start=1):
                rows[key].append((p[0], p[k], top[0], top[k]))
        out[name] = {}
        for op in OPS:
            out[name][op] = {}
            for which in ("found", "random"):
                vals = rows.get((op, which))
                if vals:
                    a = np.array(vals, dtype=np.float64)
                    out[name][op][which] = _summary(a[:, 0], a[:, 1], a[:, 2], a[:, 3])
    return out


def ablation_curve(model: MemoryModel, prompts: list[str] | str, answer: str | int, neurons, ks=None,
                   max_k: int | None = None, op: str = "suppress", positions: str = "last") -> list[dict]:
    """P(answer) and flip rate as the first k ``neurons`` (in the given order) are suppressed, for each k.

    ks: the grid of k (default 0..N, N = len(neurons) or max_k); ks larger than N are dropped. positions:
    "last" (the prediction position, Dai et al.) or "all" (every position). One forward pass per prompt: row r
    has the first ``ks[r]`` memories off. Returns ``[{"k", "prob", "relative_change", "flip_rate"}]``
    averaged over ``prompts``; relative change and flips are against the intact model.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise FfkvError("no prompts given", "pass at least one prompt")
    if positions not in POSITIONS:
        raise FfkvError(f"unknown ablation positions {positions!r}", f"use one of {', '.join(POSITIONS)}")
    neurons = list(neurons)
    N = len(neurons) if max_k is None else min(max_k, len(neurons))
    grid = list(range(N + 1)) if ks is None else [int(k) for k in ks if 0 <= int(k) <= N]
    probs, tops = [], []
    for prompt in prompts:
        last = None if positions == "all" else model.encode(prompt)["input_ids"].shape[1] - 1
        variants = [[]] + [neuron_edits(neurons[:k], op, last, 0) if k else [] for k in grid]
        p, top = variant_probs(model, prompt, answer, variants)
        probs.append(p)
        tops.append(top)
    P, Tp = np.stack(probs), np.stack(tops)
    return [{"k": k, "prob": float(P[:, j + 1].mean()),
             "relative_change": float(((P[:, j + 1] - P[:, 0]) / np.maximum(P[:, 0], 1e-12)).mean()),
             "flip_rate": float((Tp[:, j + 1] != Tp[:, 0]).mean())} for j, k in enumerate(grid)]
