"""Attribution of a prediction to FFN memories: integrated gradients (Dai et al., ACL 2022) and one-pass screens.

:func:`integrated_gradients` is the one implementation of integrated gradients over memory coefficients in
ffkv (``ffkv neurons``, the KN edit, ground truth and ``ffkv recall`` all call it). Its defaults are Dai et al.'s
knowledge attribution except the quadrature (below): integrated gradients over the memory coefficients ``m^(l)``
of layer l at the prediction position, zero baseline, attribution of the answer probability ``P(o | prompt)``:

    IG_i^(l) = m_i^(l) * sum_k w_k dF(m^(l) := alpha_k m^(l)) / dm_i |_{alpha_k m^(l)}

with F = P(o | prompt). Only layer l is scaled; every other layer computes as usual. Completeness:

    sum_i IG_i^(l) = F(m^(l)) - F(m^(l) = 0)      (exactly for the integral; up to the quadrature error here)

Quadrature. Dai et al. use the left Riemann sum ``alpha_k = k / n``, ``w_k = 1 / n`` (k = 0..n-1, n = 20: their
``scaled_input``); :data:`DAI_IG` (``steps=20, rule="left"``) reproduces it exactly. Where a layer's path is
step-like (P jumps from ~0 to ~1 within a few percent of it: the testbed's layer 0) that sum is off by up to 0.82
of a probability, so ffkv's default departs from it on purpose: ``rule="adaptive"`` (composite Gauss-Legendre,
intervals halved until each matches the exact change of F over it, see :func:`_adaptive_paths`) keeps every
layer within ``tol`` (1 %) of completeness, bounded by ``max_steps`` gradient rows per layer.
:func:`completeness` measures the error of any attribution against the exact change.

Variants (named options; each a deliberate departure from Dai et al.; the quadrature default is one, above):

- ``rule``: "adaptive" (the default), "gauss" (Gauss-Legendre nodes and weights on [0, 1]), "left" (Dai et al.),
  "right" (``(k+1)/n``), "midpoint" (``(k+1/2)/n``), "linspace"
  (EleutherAI/knowledge-neurons' ``torch.linspace(0, 1, n)``: ``k/(n-1)``, weights ``1/n``), "geometric"
  (``K`` intervals with edges ``0, 10^-3, ..., 1`` log-spaced; alpha_k and w_k their midpoints and widths: a memory
  with a large coefficient saturates the final norm within the first percent of the path).
- ``target``: "prob" (F = P(o), Dai et al.) or "centered_logit" (F = z_o - mean(z), which does not saturate as
  P(o) -> 1; ``ffkv recall``'s storage strength).
- ``path``: "layer" (Dai et al.: one path per layer) or "joint" (one path that scales every layer of ``layers``
  at once: ``IG_i^(l) = m_i^(l) sum_k w_k dF(alpha_k m)/dm_i^(l)``, so that completeness holds for the whole
  network, ``sum_{l,i} IG ~= F(m) - F(0)``; a layer redundant with another is not missed).
- ``positions``: "last" (the prediction position, Dai et al.) or "all" (the coefficients of every prompt
  position are scaled, and a memory's attribution is summed over positions; needs ``path="joint"``).
- ``off``: memories switched off (``m_i := 0`` at every position) in every run, on the whole path.
- ``experts``: ``{layer: e}`` on a mixture-of-experts model: the path scales the routed coefficients
  ``m^(l,e)`` of expert e at the prediction position (an :class:`ffkv.models.moe.ExpertEdit` inside
  :func:`ffkv.models.moe.expert_intervene`) instead of the dense ones; the result is (n_layers, d_expert) with
  row l holding expert e's memories. Refused when the prediction token is not routed to e. Full-prompt runs
  (no tail run), one path per layer, rules as above (fixed or adaptive), no ``off``.

Multi-token answers (``model.answer_tokens``) are teacher-forced: the prompt is extended with the gold answer tokens
and the attribution is the mean over answer tokens j of the attribution of ``F(o_j | prompt, o_<j)`` at the
position that predicts o_j.

Dai et al.'s code runs, per prompt, ``L`` forward passes (one per layer, for the coefficients) and ``L`` batches of
``n`` scaled rows forward and backward, each over the whole prompt. With ``path="layer"`` the same numbers come
from rows for all layers in one batch (row block l scales layer l only; one backward gives every gradient), and
only the prediction position runs: scaling coefficients at the last token changes nothing at the earlier tokens,
so they come from the clean run's key/value cache, and the layers below l are not run either
(:func:`ffkv.models.engine.run_tail`). :func:`integrated_gradients_reference` is Dai et al.'s loop, for the test and
the benchmark.

As a locator (:func:`locate_attribution`, registry name "integrated-gradients"): the site "coef" with
``scores[0, T-1, l] = sum_i IG_i^(l)``, a layer's total attribution at the prediction position.

Screens (one forward and one backward pass): ``grad_x_activation`` = ``m_i dP/dm_i`` and ``attribution_patching``
= ``(0 - m_i) dP/dm_i``, the first-order estimate of the effect of zeroing memory i (Syed et al. 2023).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from ..errors import FfkvError
from ..models.hooks import Intervention, intervene, switch_memories
from ..models.memory_id import MemoryId, parse_memories
from ..models.model import MemoryModel
from ..models.moe import ExpertEdit, MoEModel, expert_intervene
from ..models.engine import Cost, reference_run, run, run_tail
from .result import LocateResult

RULES = ("left", "right", "midpoint", "linspace", "geometric", "gauss", "adaptive")
# The default quadrature: composite Gauss-Legendre (GAUSS_NODES per interval) refined until each interval's sum
# is within DEFAULT_TOL of the exact change of F over it. DAI_IG reproduces Dai et al. exactly.
DEFAULT_RULE = "adaptive"
DEFAULT_TOL = 0.01
DEFAULT_MAX_STEPS = 320
GAUSS_NODES = 4
FLOOR = 0.05  # layers changing F by less than this fraction of F(m) get an absolute budget of tol * FLOOR * F(m)
DAI_IG = {"steps": 20, "rule": "left"}
TARGETS = ("prob", "centered_logit")
PATHS = ("layer", "joint")
POSITIONS = ("last", "all")


def riemann_path(steps: int, rule: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, w)``, each (steps,): the scaling factors of the path and the weight of each step."""
    if steps < 1:
        raise FfkvError(f"steps must be at least 1, got {steps}", "use --steps 20 (Dai et al.'s default)")
    if rule not in RULES or rule == "adaptive":
        raise FfkvError(f"unknown Riemann rule {rule!r}", f"use one of {', '.join(RULES[:-1])}")
    if rule == "gauss":
        x, w = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)
    if rule == "geometric":
        edges = torch.cat([torch.zeros(1), torch.logspace(-3, 0, steps)])
        return (edges[1:] + edges[:-1]) / 2, edges[1:] - edges[:-1]
    k = torch.arange(steps, dtype=torch.float64)
    if rule == "linspace":
        alpha = torch.linspace(0, 1, steps, dtype=torch.float64)
    else:
        alpha = {"left": k, "right": k + 1, "midpoint": k + 0.5}[rule] / steps
    return alpha, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


def riemann_alphas(steps: int, rule: str = "left") -> torch.Tensor:
    """Scaling factors of the Riemann sum, (steps,): left = k/n (Dai et al.), right = (k+1)/n, midpoint, ..."""
    return riemann_path(steps, rule)[0]


@dataclass
class _Targets:
    """A teacher-forced prompt: ids (1, T) and, per answer token, (position, token id)."""

    ids: torch.Tensor
    targets: list[tuple[int, int]]


def answer_targets(model: MemoryModel, prompt: str, answer: str | int) -> _Targets:
    """``prompt + answer[:-1]`` tokens and the (position, gold token) pairs the attribution explains.

    answer: a token id, or text tokenized by the model's answer rule (:meth:`MemoryModel.answer_tokens`).
    """
    ids = model.encode(prompt)["input_ids"]
    if isinstance(answer, int):
        if not 0 <= answer < model.vocab_size:
            raise FfkvError(f"answer token id {answer} is outside the vocabulary", "pass text or a valid id")
        gold = [answer]
    else:
        gold = model.answer_tokens(answer)
    T = ids.shape[1]
    if len(gold) > 1:
        ids = torch.cat([ids, torch.tensor([gold[:-1]], device=ids.device)], 1)
    return _Targets(ids, [(T - 1 + j, g) for j, g in enumerate(gold)])


def _layers(model: MemoryModel, layers) -> list[int]:
    if layers is None:
        return list(range(model.n_layers))
    return sorted({model.check_layer(int(l)) for l in layers})


def _chunks(layers: list[int], steps: int, max_rows: int, groups: int) -> list[list[int]]:
    """Consecutive groups of layers: ``groups`` of them (each pass starts at its group's lowest layer, so more
    groups run fewer layers but more passes), split further so that no pass has more than ``max_rows`` rows."""
    per = max(1, min(max_rows // steps, -(-len(layers) // max(1, groups))))
    return [layers[i:i + per] for i in range(0, len(layers), per)]


def _objective(logits: torch.Tensor, gold: int, target: str) -> torch.Tensor:
    """F per row of (B, vocab) logits: P(gold) or the centered logit ``z_gold - mean(z)``; (B,) float32."""
    z = logits.float()
    if target == "prob":
        return torch.softmax(z, -1)[:, gold]
    return z[:, gold] - z.mean(-1)


def off_edits(off: Iterable) -> list[Intervention]:
    """Interventions switching the memories ``off`` (MemoryIds, "L3.17" or (layer, index)) off at every
    position, one :func:`ffkv.models.hooks.switch_memories` per layer."""
    by_layer: dict[int, list[int]] = {}
    for mid in parse_memories(off):
        by_layer.setdefault(mid.layer, []).append(mid.index)
    return [switch_memories(layer, indices) for layer, indices in sorted(by_layer.items())]


def _check_options(rule: str, target: str, path: str, positions: str):
    for name, value, allowed in (("rule", rule, RULES), ("target", target, TARGETS), ("path", path, PATHS),
                                 ("positions", positions, POSITIONS)):
        if value not in allowed:
            raise FfkvError(f"unknown integrated-gradients {name} {value!r}", f"use one of {', '.join(allowed)}")
    if positions == "all" and path != "joint":
        raise FfkvError("integrated gradients over all positions need one joint path",
                        "pass path='joint' with positions='all'")


def integrated_gradients(model: MemoryModel, prompt: str, answer: str | int, steps: int = 20, layers=None,
                         rule: str = DEFAULT_RULE, target: str = "prob", path: str = "layer",
                         positions: str = "last", off: Iterable = (), tol: float = DEFAULT_TOL,
                         max_steps: int = DEFAULT_MAX_STEPS, max_rows: int = 256, groups: int = 4,
                         cost: Cost | None = None, experts: dict[int, int] | None = None) -> torch.Tensor:
    """Integrated gradients of the answer for every memory, (n_layers, d_ffn) float32 on CPU.

    Defaults: Dai et al.'s attribution (one path per layer, zero baseline, P(answer) at the prediction
    position) with the adaptive quadrature (``rule="adaptive"``, ``tol``, ``max_steps``: see the module
    docstring); ``**DAI_IG`` (20 left-Riemann steps) reproduces Dai et al.'s numbers exactly. Rows of layers not
    in ``layers`` are zero. max_rows bounds the batch (steps rows per layer) and groups is the number of layer
    groups (one forward and one backward pass each) of a fixed rule with ``path="layer"``.
    experts: ``{layer: expert}`` (MoE models): attribute the routed coefficients of that expert at each of
    those layers instead (``layers`` is then those layers); (n_layers, d_expert), see the module docstring.
    """
    _check_options(rule, target, path, positions)
    cost = cost if cost is not None else Cost()
    lays = _layers(model, layers)
    tg = answer_targets(model, prompt, answer)
    if experts is not None:
        return _expert_ig(model, tg, experts, layers, steps, rule, target, path, positions, off, tol, max_steps,
                          max_rows, cost)
    off = off_edits(off)
    if rule == "adaptive":
        if path != "layer":
            raise FfkvError("the adaptive rule integrates one path per layer",
                            "pass a fixed rule (e.g. rule='geometric') with path='joint'")
        if not 0 < tol < 1 or max_steps < steps:
            raise FfkvError(f"tol {tol} / max_steps {max_steps} out of range",
                            "use 0 < tol < 1 and max_steps >= steps")
    else:
        alphas, weights = riemann_path(steps, rule)
    if path == "joint":
        return _joint_path(model, tg, lays, alphas, weights, target, positions, off, cost)
    L = model.n_layers
    reads = [("coef", l) for l in range(L)] + [("resid_pre", l) for l in range(L)]
    _, rec, cache = reference_run(model, tg.ids, edits=off, reads=reads, cost=cost)
    out = torch.zeros(L, model.d_ffn, dtype=torch.float32)
    for pos, gold in tg.targets:
        if rule == "adaptive":
            out += _adaptive_paths(model, tg.ids, rec, cache, pos, gold, lays, steps, tol, max_steps, target, off,
                                   max_rows, cost)
            continue
        for chunk in _chunks(lays, steps, max_rows, groups):
            grads = _scaled_gradients(model, tg.ids, rec, cache, pos, gold, chunk, alphas, target, off, cost)
            for l, g in zip(chunk, grads):
                m = rec["coef", l][0, pos].float().cpu()
                out[l] += m * (g.float().cpu() * weights.float()[:, None]).sum(0)
    return out / len(tg.targets)


def _scaled_gradients(model, ids, rec, cache, pos, gold, chunk, alphas, target, off, cost) -> list[torch.Tensor]:
    """dF/dm at ``alpha_k m^(l)`` for each layer l of ``chunk``: a list of (steps, d_ffn) tensors."""
    return _scaled_run(model, ids, rec, cache, pos, gold, chunk, [alphas] * len(chunk), target, off, cost)


def _scaled_run(model, ids, rec, cache, pos, gold, chunk, alphas, target, off, cost, grad: bool = True
                ) -> list[torch.Tensor]:
    """At ``alphas[b]`` (n_b,) x m^(l) for each layer l = chunk[b]: dF/dm, (n_b, d_ffn) each (grad=True), or F,
    (n_b,) each (grad=False, no backward pass).

    One batch: row block b scales layer ``chunk[b]`` only. Only position ``pos`` and layers >= chunk[0] run;
    since layers below l are untouched, the coefficient of layer l in its rows is exactly ``alpha_k m^(l)``.
    """
    start = chunk[0]
    sizes = [len(a) for a in alphas]
    B = sum(sizes)
    leaves, edits, row = [], list(off), 0
    for l, a, n in zip(chunk, alphas, sizes):
        m = rec["coef", l][0, pos]
        x = a.to(m.device, m.dtype)[:, None] * m[None]
        if grad:
            x.requires_grad_(True)
        leaves.append(x)
        edits.append(Intervention("coef", l, "set", value=x[:, None, :], positions=[0],
                                  batch=list(range(row, row + n))))
        row += n
    resid = rec["resid_pre", start][:, pos:pos + 1].expand(B, 1, -1)
    with torch.set_grad_enabled(grad):
        logits, _ = run_tail(model, ids[:, pos:pos + 1].expand(B, 1), start, resid, cache, pos,
                             torch.zeros(B, dtype=torch.long), edits=edits, cost=cost, backward=grad)
        f = _objective(logits, gold, target)
        if not grad:
            return list(f.detach().double().cpu().split(sizes))
        return list(torch.autograd.grad(f.sum(), leaves))


def _row_chunks(lays: list[int], sizes: dict[int, int], max_rows: int) -> list[list[int]]:
    """Consecutive groups of layers holding at most ``max_rows`` rows (at least one layer each)."""
    out, cur, rows = [], [], 0
    for l in lays:
        if cur and rows + sizes[l] > max_rows:
            out.append(cur)
            cur, rows = [], 0
        cur.append(l)
        rows += sizes[l]
    return out + [cur] if cur else out


def _adaptive_paths(model, ids, rec, cache, pos, gold, lays, steps, tol, max_steps, target, off, max_rows,
                    cost, run=None, coef=None, width=None) -> torch.Tensor:
    """Integrated gradients of the layers ``lays`` at ``pos`` by adaptive composite Gauss-Legendre, (L, d_ffn).

    Each layer's path [0, 1] starts as ``steps // GAUSS_NODES`` equal intervals. Along the path
    ``dF(alpha m)/dalpha = m . grad F``, so an interval's sum ``Q_j = sum_i m_i sum_n w_n dF/dm_i`` must equal
    the exact change ``D_j = F(b m) - F(a m)`` (the fundamental theorem of calculus, forward passes only). An
    interval is kept when ``|Q_j - D_j| <= tol (b - a) max(|F(m) - F(0)|, FLOOR |F(m)|)`` and halved
    otherwise, so the layer's completeness error ``sum_j (Q_j - D_j)`` stays within ``tol |F(m) - F(0)|`` (within
    ``tol FLOOR |F(m)|`` for a layer that changes F by less than FLOOR of it); a layer stops refining
    once it has used ``max_steps`` gradient rows (its completeness is then reported as it is).

    run(chunk, alphas, grad) / coef(l) -> (d,) / width: the scaled runs, the clean coefficients and the output
    width (default: the dense tail runs of :func:`_scaled_run`, ``rec["coef", l][0, pos]``, d_ffn; the expert
    path passes its own).
    """
    if run is None:
        def run(chunk, alphas, grad):
            return _scaled_run(model, ids, rec, cache, pos, gold, chunk, alphas, target, off, cost, grad=grad)
    if coef is None:
        def coef(l):
            return rec["coef", l][0, pos]
    k = GAUSS_NODES
    x, w = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(k))
    x, w = (x + 1) / 2, w / 2
    n0 = max(1, steps // k)
    pending = {l: [(j / n0, (j + 1) / n0) for j in range(n0)] for l in lays}
    F: dict[int, dict[float, float]] = {l: {} for l in lays}
    used = {l: 0 for l in lays}
    delta: dict[int, float] = {}
    out = torch.zeros(model.n_layers, model.d_ffn if width is None else width, dtype=torch.float32)
    while pending:
        todo = sorted(pending)
        # F at the interval edges not yet known (forward passes only).
        edges = {l: sorted({e for iv in pending[l] for e in iv} - F[l].keys()) for l in todo}
        need = [l for l in todo if edges[l]]
        for chunk in _row_chunks(need, {l: len(edges[l]) for l in need}, max_rows):
            fs = run(chunk, [torch.tensor(edges[l], dtype=torch.float64) for l in chunk], False)
            for l, f in zip(chunk, fs):
                F[l].update(zip(edges[l], f.tolist()))
        for l in todo:
            delta.setdefault(l, F[l][1.0] - F[l][0.0])
        nodes = {l: torch.cat([a + (b - a) * x for a, b in pending[l]]) for l in todo}
        grads: dict[int, torch.Tensor] = {}
        for chunk in _row_chunks(todo, {l: len(nodes[l]) for l in todo}, max_rows):
            gs = run(chunk, [nodes[l] for l in chunk], True)
            grads.update(zip(chunk, gs))
        nxt = {}
        for l in todo:
            m = coef(l).double().cpu()
            g = grads[l].double().cpu().reshape(len(pending[l]), k, -1)
            used[l] += len(nodes[l])
            budget = tol * max(abs(delta[l]), FLOOR * abs(F[l][1.0]), 1e-9)
            split = []
            for j, (a, b) in enumerate(pending[l]):
                q = m * (g[j] * ((b - a) * w)[:, None]).sum(0)
                if abs(float(q.sum()) - (F[l][b] - F[l][a])) <= budget * (b - a) or \
                        used[l] + 2 * k * (len(split) + 1) > max_steps:
                    out[l] += q.float()
                else:
                    split += [(a, (a + b) / 2), ((a + b) / 2, b)]
            if split:
                nxt[l] = split
        pending = nxt
    return out


def _expert_block(model, edits):
    """expert_intervene with ``edits``, or nothing when there are none (a dense model)."""
    return expert_intervene(model, edits=edits) if edits else contextlib.nullcontext()


def _check_experts(model, experts, layers) -> dict[int, int]:
    """``{layer: expert}`` checked against the model (MoE layers, expert ids, one expert width)."""
    if not isinstance(model, MoEModel):
        raise FfkvError(f"{model.family} model has no experts", "attribute experts on a mixture-of-experts model")
    if not isinstance(experts, dict) or not experts:
        raise FfkvError(f"experts must be a non-empty {{layer: expert}} dict, got {experts!r}",
                        "pass e.g. experts={1: 2}")
    out = {}
    for l, e in experts.items():
        l = model.check_layer(int(l))
        if not model.is_moe_layer(l):
            raise FfkvError(f"layer {l} has no routed experts", f"use one of layers {model.moe_layers}")
        out[l] = model.check_expert(l, int(e))
    if layers is not None and set(_layers(model, layers)) != set(out):
        raise FfkvError(f"layers {sorted(_layers(model, layers))} differ from the expert layers {sorted(out)}",
                        "pass layers=None with experts")
    if len({model.d_expert(l, e) for l, e in out.items()}) > 1:
        raise FfkvError("the chosen experts have different widths", "attribute one width of expert per call")
    return dict(sorted(out.items()))


def _routed_coefficients(model, ids, experts, pos) -> dict[int, torch.Tensor]:
    """Clean ``m^(l,e)`` (d_expert,) at ``pos`` for each expert; FfkvError when ``pos`` is not routed to it."""
    with torch.no_grad(), expert_intervene(model, reads=list(experts)) as rec:
        model.hf(input_ids=ids)
    out = {}
    for l, e in experts.items():
        cap = rec[l, e]
        hit = (cap.position == pos).nonzero().reshape(-1)
        if not hit.numel():
            routed = sorted(int(x) for x in rec.routing[l][0][0, pos])
            raise FfkvError(f"the prediction token (position {pos}) is not routed to expert {e} of layer {l} "
                            f"(routed: {', '.join(f'E{x}' for x in routed)})", f"pass experts={{{l}: {routed[0]}}}")
        out[l] = cap.coef[int(hit[0])]
    return out


def _expert_run(model, ids, experts, m0, pos, gold, chunk, alphas, target, cost, grad: bool = True):
    """:func:`_scaled_run` for experts: row block b scales ``m^(l,e)`` of ``l = chunk[b]`` at ``pos`` to
    ``alphas[b] m0[l]``; full-prompt rows, so the block's rows are routed as the clean run below layer l."""
    sizes = [len(a) for a in alphas]
    B, T = sum(sizes), ids.shape[1]
    leaves, edits, row = [], [], 0
    for l, a, n in zip(chunk, alphas, sizes):
        x = a.to(m0[l].device, m0[l].dtype)[:, None] * m0[l][None]
        if grad:
            x.requires_grad_(True)
        leaves.append(x)
        # the block's rows are identical below layer l, so they share a top-k slot and come in batch order
        edits.append(ExpertEdit(l, experts[l], "fn", value=lambda cur, x=x: x, positions=[pos],
                                batch=list(range(row, row + n))))
        row += n
    with torch.set_grad_enabled(grad), expert_intervene(model, edits=edits, keep_grad=True):
        logits = model.hf(input_ids=ids.expand(B, T)).logits[:, pos]
        f = _objective(logits, gold, target)
        cost.add(B, T, model.n_layers, backward=grad)
        if not grad:
            return list(f.detach().double().cpu().split(sizes))
        return list(torch.autograd.grad(f.sum(), leaves))


def _expert_ig(model, tg: _Targets, experts, layers, steps, rule, target, path, positions, off, tol, max_steps,
               max_rows, cost) -> torch.Tensor:
    """Integrated gradients of the routed coefficients of ``experts`` ({layer: e}), (n_layers, d_expert)."""
    experts = _check_experts(model, experts, layers)
    if path != "layer" or positions != "last" or list(off):
        raise FfkvError("expert integrated gradients integrate one path per layer at the prediction position",
                        "pass path='layer', positions='last' and no off with experts")
    lays = list(experts)
    width = model.d_expert(lays[0], experts[lays[0]])
    out = torch.zeros(model.n_layers, width, dtype=torch.float32)
    clean = {pos: _routed_coefficients(model, tg.ids, experts, pos) for pos, _ in tg.targets}  # refuse first
    for pos, gold in tg.targets:
        m0 = clean[pos]

        def run(chunk, alphas, grad, pos=pos, gold=gold, m0=m0):
            return _expert_run(model, tg.ids, experts, m0, pos, gold, chunk, alphas, target, cost, grad)
        if rule == "adaptive":
            out += _adaptive_paths(model, tg.ids, None, None, pos, gold, lays, steps, tol, max_steps, target, (),
                                   max_rows, cost, run=run, coef=m0.__getitem__, width=width)
            continue
        alphas, weights = riemann_path(steps, rule)
        for chunk in _row_chunks(lays, {l: steps for l in lays}, max_rows):
            for l, g in zip(chunk, run(chunk, [alphas] * len(chunk), True)):
                out[l] += m0[l].float().cpu() * (g.float().cpu() * weights.float()[:, None]).sum(0)
    return out / len(tg.targets)


def _joint_path(model, tg: _Targets, lays, alphas, weights, target, positions, off, cost) -> torch.Tensor:
    """One path scaling every layer of ``lays`` at once: ``steps`` rows, one forward and one backward pass per
    answer token. Coefficients of the scaled positions are ``alpha_k m`` (m: the clean run's, with ``off``)."""
    L, T = model.n_layers, tg.ids.shape[1]
    steps = len(alphas)
    with torch.no_grad(), intervene(model, reads=[("coef", l) for l in lays], edits=off) as rec:
        model.hf(input_ids=tg.ids)
    cost.add(1, T, L)
    clean = {l: rec["coef", l] for l in lays}  # (1, T, d_ffn)
    a = alphas.to(model.device, model.dtype)[:, None, None]
    w = weights.to(model.device, torch.float32)[:, None, None]
    out = torch.zeros(L, model.d_ffn, dtype=torch.float32)
    for pos, gold in tg.targets:
        sel = slice(None) if positions == "all" else slice(pos, pos + 1)
        at = None if positions == "all" else [pos]
        edits = list(off) + [Intervention("coef", l, "set", value=a * m[:, sel], positions=at)
                             for l, m in clean.items()]
        with torch.enable_grad(), intervene(model, reads=[("coef", l) for l in lays], edits=edits,
                                            keep_grad=True) as crec:
            logits = model.hf(input_ids=tg.ids.expand(steps, T)).logits[:, pos]
            grads = torch.autograd.grad(_objective(logits, gold, target).sum(), [crec["coef", l] for l in lays])
        cost.add(steps, T, L, backward=True)
        for l, g in zip(lays, grads):
            m = clean[l][0, sel].float()
            out[l] += (m * (g[:, sel].float() * w).sum(0)).sum(0).cpu()
    return out / len(tg.targets)


def integrated_gradients_reference(model: MemoryModel, prompt: str, answer: str | int, steps: int = 20,
                                   layers=None, rule: str = "left", cost: Cost | None = None) -> torch.Tensor:
    """Dai et al.'s loop, written directly: per layer, one forward pass for the coefficients, then one batch of
    ``steps`` rows over the whole prompt with that layer's coefficients at the prediction position scaled,
    forward and backward. Same result as :func:`integrated_gradients` with its defaults, (n_layers, d_ffn)."""
    cost = cost if cost is not None else Cost()
    alphas, weights = riemann_path(steps, rule)
    tg = answer_targets(model, prompt, answer)
    L, T = model.n_layers, tg.ids.shape[1]
    out = torch.zeros(L, model.d_ffn, dtype=torch.float32)
    for pos, gold in tg.targets:
        for l in _layers(model, layers):
            with torch.no_grad(), intervene(model, reads=[("coef", l)]) as rec:
                model.hf(input_ids=tg.ids)
            cost.add(1, T, L)
            m = rec["coef", l][0, pos]
            x = (alphas.to(m.device, m.dtype)[:, None] * m[None]).requires_grad_(True)
            edit = Intervention("coef", l, "set", value=x[:, None, :], positions=[pos])
            with torch.enable_grad(), intervene(model, edits=[edit]):
                logits = model.hf(input_ids=tg.ids.expand(steps, T)).logits[:, pos]
                p = torch.softmax(logits.float(), -1)[:, gold]
                (g,) = torch.autograd.grad(p.sum(), [x])
            cost.add(steps, T, L, backward=True)
            out[l] += m.float().cpu() * (g.float().cpu() * weights.float()[:, None]).sum(0)
    return out / len(tg.targets)


def _coefficient_gradients(model: MemoryModel, prompt: str, answer, cost: Cost | None):
    """(m, dP/dm) at the prediction position(s), each (n_targets, n_layers, d_ffn): one forward, one backward
    (only the prediction positions run; the prompt comes from the cache)."""
    cost = cost if cost is not None else Cost()
    tg = answer_targets(model, prompt, answer)
    L = model.n_layers
    _, rec, cache = reference_run(model, tg.ids, reads=[("resid_pre", 0)], cost=cost)
    ms, gs = [], []
    for pos, gold in tg.targets:
        with torch.enable_grad():
            logits, crec = run_tail(model, tg.ids[:, pos:pos + 1], 0, rec["resid_pre", 0][:, pos:pos + 1], cache,
                                    pos, torch.zeros(1, dtype=torch.long),
                                    reads=[("coef", l) for l in range(L)], keep_grad=True, cost=cost, backward=True)
            coefs = [crec["coef", l] for l in range(L)]
            grads = torch.autograd.grad(_objective(logits, gold, "prob")[0], coefs)
        ms.append(torch.stack([c[0, 0].detach().float().cpu() for c in coefs]))
        gs.append(torch.stack([g[0, 0].float().cpu() for g in grads]))
    return torch.stack(ms), torch.stack(gs)


def grad_x_activation(model: MemoryModel, prompt: str, answer, cost: Cost | None = None) -> torch.Tensor:
    """``m_i dP(answer)/dm_i`` for every memory at the prediction position, (n_layers, d_ffn)."""
    m, g = _coefficient_gradients(model, prompt, answer, cost)
    return (m * g).mean(0)


def attribution_patching(model: MemoryModel, prompt: str, answer, cost: Cost | None = None) -> torch.Tensor:
    """First-order estimate of the change of P(answer) when memory i is zeroed: ``(0 - m_i) dP/dm_i``."""
    m, g = _coefficient_gradients(model, prompt, answer, cost)
    return (-m * g).mean(0)


def top_memories(attribution: torch.Tensor, k: int) -> list[MemoryId]:
    """The k memories with the largest attribution (n_layers, d_ffn), largest first."""
    flat = attribution.reshape(-1)
    idx = torch.topk(flat, min(k, flat.numel())).indices.tolist()
    return [MemoryId.from_flat(i, attribution.shape[1]) for i in idx]


def locate_attribution(model: MemoryModel, prompt: str, subject: str | None = None, answer: str | int | None = None,
                       **options) -> LocateResult:
    """Integrated gradients as a locator: site "coef", ``scores[0, T-1, l] = sum_i IG_i^(l)`` (the prediction
    position; NaN at other tokens and at layers not attributed). options: of :func:`integrated_gradients`.
    answer None: the model's top prediction. ``detail`` holds the (n_layers, d_ffn) attribution."""
    ids = model.encode(prompt)["input_ids"]
    p = model.next_token_probs(prompt)[0]
    if answer is None:
        answer = int(p.argmax())
    cost = options.pop("cost", None) or Cost()
    attr = integrated_gradients(model, prompt, answer, cost=cost, **options)
    answer_id = answer if isinstance(answer, int) else model.answer_id(answer)
    T, L = ids.shape[1], model.n_layers
    scores = torch.full((1, T, L), float("nan"), dtype=torch.float64)
    lays = _layers(model, options.get("layers"))
    scores[0, T - 1, lays] = attr[lays].sum(1).double()
    defaults = {k: v.default for k, v in inspect.signature(integrated_gradients).parameters.items()
                if v.default is not inspect.Parameter.empty and k not in ("max_rows", "groups", "cost", "off")}
    used = {**defaults, **{k: v for k, v in options.items() if k not in ("max_rows", "groups")}}
    return LocateResult("integrated-gradients", prompt, subject, answer if isinstance(answer, str)
                        else model.decode([answer_id]), answer_id, [model.decode([int(i)]) for i in ids[0]],
                        ["coef"], scores.numpy(), f"IG of p({model.decode([answer_id]).strip()}), sum over memories",
                        model.find_subject(prompt, subject) if subject else None, float(p[answer_id]), None,
                        {k: list(v) if isinstance(v, (tuple, range)) else v for k, v in used.items()},
                        cost.as_dict(), attr)


@torch.no_grad()
def completeness(model: MemoryModel, prompt: str, answer: str | int, attribution: torch.Tensor, layers=None,
                 target: str = "prob", path: str = "layer", positions: str = "last", off: Iterable = (),
                 experts: dict[int, int] | None = None) -> list[dict]:
    """How well ``attribution`` (n_layers, d_ffn) sums to the exact change it explains, one entry per path.

    path "layer": for each layer l of ``layers``, ``sum_i IG_i^(l)`` against the exact
    ``F(m) - F(m^(l) := 0)`` (layer l's coefficients zeroed where the path scales them); path "joint": one entry
    (layer None) for ``sum_{l,i} IG`` against ``F(m) - F(m := 0 on every layer of layers)``. Multi-token answers:
    the mean over answer tokens, as the attribution. One forward pass of ``1 + n_paths`` rows, with ``off``.
    Returns ``[{"layer", "attribution", "exact", "error", "relative_error"}]``; error = attribution - exact,
    relative_error = |error| / |exact| (None when |exact| < 1e-9).
    experts ``{layer: e}``: the exact change is ``F(m) - F(m^(l,e) := 0)`` (expert e's routed coefficients
    zeroed at the prediction position), as :func:`integrated_gradients` with the same ``experts``.
    """
    _check_options("left", target, path, positions)
    if experts is not None:
        experts = _check_experts(model, experts, layers)
        if path != "layer" or positions != "last" or list(off):
            raise FfkvError("expert completeness is one path per layer at the prediction position",
                            "pass path='layer', positions='last' and no off with experts")
    lays = _layers(model, layers) if experts is None else list(experts)
    tg = answer_targets(model, prompt, answer)
    T = tg.ids.shape[1]
    groups = [[l] for l in lays] if path == "layer" else [lays]
    exact = torch.zeros(len(groups), dtype=torch.float64)
    for pos, gold in tg.targets:
        at = None if positions == "all" else [pos]
        if experts is None:
            edits, moe_edits = list(off_edits(off)), []
        else:
            edits = []
            moe_edits = [ExpertEdit(l, experts[l], "off", positions=[pos], batch=[r])
                         for r, (l,) in enumerate(groups, start=1)]
        for r, group in enumerate(groups, start=1):
            if experts is None:
                edits += [Intervention("coef", l, "scale", value=0.0, positions=at, batch=[r]) for l in group]
        with intervene(model, edits=edits), _expert_block(model, moe_edits):
            logits = model.hf(input_ids=tg.ids.expand(1 + len(groups), T)).logits[:, pos]
        f = _objective(logits, gold, target).double().cpu()
        exact += f[0] - f[1:]
    exact /= len(tg.targets)
    out = []
    for group, ex in zip(groups, exact.tolist()):
        total = float(attribution[group].double().sum())
        err = total - ex
        out.append({"layer": group[0] if path == "layer" else None, "attribution": total, "exact": ex,
                    "error": err, "relative_error": abs(err) / abs(ex) if abs(ex) >= 1e-9 else None})
    return out


def activation_gradients(model: MemoryModel, input_ids: torch.Tensor, answer_id: int, reads, edits=(),
                         cost: Cost | None = None) -> tuple[float, dict, dict]:
    """``F = mean_b P(answer | row b)`` at the last position of a (B, T) run with ``edits``, the activations
    ``reads`` = [(site, layer)] and ``dF/d activation`` for each: one forward and one backward pass.

    Returns ``(F, {key: (B, T, d) activation}, {key: (B, T, d) gradient})``, detached, keyed as the reads.
    The screen of attribution patching (:mod:`ffkv.locate.approx`): ``grad . (clean - corrupted)``.
    """
    reads = list(reads)
    B, T = input_ids.shape
    with torch.enable_grad():
        out = run(model, input_ids, reads=reads, edits=edits, keep_grad=True, head="last")
        f = torch.softmax(out.logits.float(), -1)[:, answer_id].mean()
        acts = [out.rec[r] for r in reads]
        grads = torch.autograd.grad(f, acts, allow_unused=True)
    if cost is not None:
        cost.add(B, T, model.n_layers, backward=True)
    zero = torch.zeros(())
    return (float(f.detach()), {r: a.detach() for r, a in zip(reads, acts)},
            {r: (g if g is not None else zero.expand_as(a)).detach() for r, g, a in zip(reads, grads, acts)})
