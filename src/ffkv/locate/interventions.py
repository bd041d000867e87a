"""Interventions that test a localisation: switch the found memories off or up and watch the answer.

For a set N of memories and a prompt with answer o, at the prediction position (the prompt's last token):

    suppress   m_i := 0        for (l, i) in N
    amplify    m_i := 2 m_i    for (l, i) in N

and report the change of P(o), absolute and relative ``(P_after - P_before) / P_before`` (Dai et al. report the
relative one), and the *flip rate*: how often the top-1 prediction changes. Each effect is measured on the fact's
own prompts, on unrelated facts (other relations) and, as the control, for random memories matched by layer
(the same number of memories in each layer). :func:`ablation_curve` removes the top-k memories, k = 0..N.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import torch

from ..errors import FfkvError
from ..models.hooks import Intervention, intervene
from ..models.model import MemoryModel

OPS = {"suppress": ("off", None), "amplify": ("scale", 2.0)}


def neuron_edits(neurons, op: str, position: int, row: int, factor: float | None = None) -> list[Intervention]:
    """Edits applying ``op`` ("suppress" / "amplify" / "scale") to the memories ``[(l, i, ...)]`` at one
    position of one batch row."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for n in neurons:
        by_layer[int(n[0])].append(int(n[1]))
    kind, value = OPS.get(op, ("scale", factor))
    if kind == "scale" and factor is not None:
        value = factor
    return [Intervention("coef", l, kind, value=value, indices=idx, positions=[position], batch=[row])
            for l, idx in sorted(by_layer.items())]


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


def ablation_curve(model: MemoryModel, prompts: list[str] | str, answer: str, neurons, max_k: int | None = None,
                   op: str = "suppress") -> list[dict]:
    """P(answer) and flip rate as the top-k ``neurons`` (in the given order) are suppressed, k = 0..N.

    Returns ``[{"k", "prob", "relative_change", "flip_rate"}]`` averaged over ``prompts``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise FfkvError("no prompts given", "pass at least one prompt")
    N = len(neurons) if max_k is None else min(max_k, len(neurons))
    probs, tops = [], []
    for prompt in prompts:
        last = model.encode(prompt)["input_ids"].shape[1] - 1
        variants = [neuron_edits(neurons[:k], op, last, 0) if k else [] for k in range(N + 1)]
        p, top = variant_probs(model, prompt, answer, variants)
        probs.append(p)
        tops.append(top)
    P, Tp = np.stack(probs), np.stack(tops)
    return [{"k": k, "prob": float(P[:, k].mean()),
             "relative_change": float(((P[:, k] - P[:, 0]) / np.maximum(P[:, 0], 1e-12)).mean()),
             "flip_rate": float((Tp[:, k] != Tp[:, 0]).mean())} for k in range(N + 1)]
