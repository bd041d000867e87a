"""Interventions that test a localisation: switch the found memories off or up and watch the answer.

For a set N of memories and a prompt with answer o, at the prediction position (the prompt's last token):

    suppress   m_i := 0        for (l, i) in N
    amplify    m_i := 2 m_i    for (l, i) in N

and report the change of P(o), absolute and relative ``(P_after - P_before) / P_before`` (Dai et al. report the
relative one), and the *flip rate*: how often the top-1 prediction changes. Each effect is measured on the fact's
own prompts, on unrelated facts (other relations) and, as the control, for random memories matched by layer
(the same number of memories in each layer); :func:`specificity` is that comparison for one neuron set, reported
with every :class:`ffkv.locate.neurons.NeuronsResult`.

:func:`ablation_curve` is the one ablation curve of ffkv: P(o) as the first k memories of a ranking are switched
off, for a grid of k (default 0..N, at most :data:`MAX_CURVE_POINTS` points spread over it), at the prediction position (Dai et al.'s suppression) or, with
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
from ..models.engine import run
from ..progress import track

OPS = {"suppress": ("off", None), "amplify": ("scale", 2.0)}
POSITIONS = ("last", "all")
# Default length of an ablation curve (points k): every k up to this, else this many spread over 0..N.
MAX_CURVE_POINTS = 21


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
        logits = model.hf(input_ids=ids.expand(V, ids.shape[1]), logits_to_keep=1).logits[:, -1]
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


def specificity(model: MemoryModel, cases: list[tuple[str, str | int]], neurons,
                unrelated: list[tuple[str, str | int]] = (), random_trials: int = 3, seed: int = 0) -> dict:
    """How specific a neuron set is: suppressing it (``m_i := 0`` at the prediction position) on the fact's
    own (prompt, answer) ``cases``, on ``unrelated`` facts, and suppressing ``random_trials`` draws of random
    memories of the same layers (same count per layer) on the fact's cases.

    Returns ``{"fact", "unrelated", "random"}``, each a summary (prob_before, prob_after, change,
    relative_change, flip_rate, n) or None (no unrelated facts given, no neurons). A specific set moves
    "fact" far more than "unrelated" and "random". One forward pass of ``2 + random_trials`` rows per case.
    """
    neurons = list(neurons)
    if not neurons:
        return {"fact": None, "unrelated": None, "random": None}
    randoms = [random_matched(model, neurons, seed + k) for k in range(random_trials)]
    rows: dict[str, list] = defaultdict(list)
    for which, pairs in (("fact", cases), ("unrelated", list(unrelated))):
        for prompt, ans in pairs:
            last = model.encode(prompt)["input_ids"].shape[1] - 1
            variants = [[], neuron_edits(neurons, "suppress", last, 0)]
            if which == "fact":
                variants += [neuron_edits(r, "suppress", last, 0) for r in randoms]
            p, top = variant_probs(model, prompt, ans, variants)
            rows[which].append((p[0], p[1], top[0], top[1]))
            rows["random"] += [(p[0], p[k], top[0], top[k]) for k in range(2, len(variants))]
    out = {}
    for which in ("fact", "unrelated", "random"):
        a = np.array(rows[which], dtype=np.float64) if rows[which] else None
        out[which] = None if a is None else _summary(a[:, 0], a[:, 1], a[:, 2], a[:, 3])
    return out


def curve_grid(n: int, max_points: int | None = MAX_CURVE_POINTS) -> list[int]:
    """The default k grid of an ablation curve over n memories: 0..n, or ``max_points`` values from 0 to n
    spread evenly (always holding 0, 1 and n) when there are more."""
    if max_points is None or n + 1 <= max_points:
        return list(range(n + 1))
    return sorted({0, 1, n} | {int(round(v)) for v in np.linspace(0, n, max(3, max_points) - 1)})


def _curve_masks(model: MemoryModel, neurons: list, grid: list[int], factor: float) -> dict[int, torch.Tensor]:
    """{layer: (V, 1, d_ffn)} multipliers: row 0 intact, row j+1 has the first grid[j] memories at ``factor``."""
    masks: dict[int, torch.Tensor] = {}
    V = len(grid) + 1
    for rank, n in enumerate(neurons):
        mid = MemoryId.parse(n) if isinstance(n, (str, MemoryId)) else MemoryId(int(n[0]), int(n[1]))
        rows = [j + 1 for j, k in enumerate(grid) if k > rank]
        if not rows:
            continue
        m = masks.setdefault(mid.layer, torch.ones(V, 1, model.d_ffn, dtype=model.dtype, device=model.device))
        m[rows, 0, mid.index] = factor
    return masks


def ablation_curve(model: MemoryModel, prompts: list[str] | str, answer: str | int, neurons, ks=None,
                   max_k: int | None = None, op: str = "suppress", positions: str = "last",
                   max_points: int | None = MAX_CURVE_POINTS, progress: bool = False) -> list[dict]:
    """P(answer) and flip rate as the first k ``neurons`` (in the given order) are suppressed, for each k.

    ks: the grid of k (default :func:`curve_grid`: 0..N, N = len(neurons) or max_k, at most ``max_points``
    points spread over 0..N; None: every k); ks larger than N are dropped. positions: "last" (the prediction
    position, Dai et al.) or "all" (every position). op: "suppress" (m_i := 0) or "amplify" (m_i := 2 m_i).
    One forward pass per prompt: row r has the first ``ks[r]`` memories changed, by one multiplier edit per
    layer. Returns ``[{"k", "prob", "relative_change", "flip_rate"}]`` averaged over ``prompts``; relative
    change and flips are against the intact model. progress: a bar over the prompts (:mod:`ffkv.progress`).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise FfkvError("no prompts given", "pass at least one prompt")
    if positions not in POSITIONS:
        raise FfkvError(f"unknown ablation positions {positions!r}", f"use one of {', '.join(POSITIONS)}")
    if op not in OPS:
        raise FfkvError(f"unknown ablation op {op!r}", f"use one of {', '.join(OPS)}")
    neurons = list(neurons)
    N = len(neurons) if max_k is None else min(max_k, len(neurons))
    grid = curve_grid(N, max_points) if ks is None else [int(k) for k in ks if 0 <= int(k) <= N]
    masks = _curve_masks(model, neurons[:N], grid, 0.0 if op == "suppress" else OPS[op][1])
    a = answer if isinstance(answer, int) else model.answer_id(answer)
    probs, tops = [], []
    for prompt in track(prompts, desc="ablation curve", unit="prompt", enabled=progress):
        ids = model.encode(prompt)["input_ids"]
        at = None if positions == "all" else [ids.shape[1] - 1]
        edits = [Intervention("coef", l, "scale", value=m, positions=at) for l, m in masks.items()]
        with torch.no_grad():
            # only the last position is unembedded: (rows, T, vocab) logits were what made long curves unbounded
            logits = run(model, ids.expand(len(grid) + 1, ids.shape[1]), edits=edits, head="last").logits
        p = torch.softmax(logits.float(), -1)
        probs.append(p[:, a].cpu().numpy())
        tops.append(p.argmax(-1).cpu().numpy())
    P, Tp = np.stack(probs), np.stack(tops)
    return [{"k": k, "prob": float(P[:, j + 1].mean()),
             "relative_change": float(((P[:, j + 1] - P[:, 0]) / np.maximum(P[:, 0], 1e-12)).mean()),
             "flip_rate": float((Tp[:, j + 1] != Tp[:, 0]).mean())} for j, k in enumerate(grid)]
