"""Attribution of a prediction to FFN memories: integrated gradients (Dai et al., ACL 2022) and one-pass screens.

Integrated gradients over the memory coefficients ``m^(l)`` of layer l at the prediction position, zero baseline,
attribution of the answer probability ``P(o | prompt)`` (Dai et al.'s knowledge attribution):

    IG_i^(l) = m_i^(l) * (1/n) * sum_{k=0}^{n-1} dP(o | m^(l) := alpha_k m^(l)) / dm_i |_{alpha_k m^(l)}

with ``alpha_k = k / n`` (Dai et al.'s ``scaled_input``: a left Riemann sum over [0, 1), n = 20). Only layer l is
scaled; every other layer computes as usual. Completeness (up to the Riemann-sum error):

    sum_i IG_i^(l) ~= P(o | m^(l)) - P(o | m^(l) = 0)

Dai et al.'s code runs, per prompt, ``L`` forward passes (one per layer, for the coefficients) and ``L`` batches of
``n`` scaled rows forward and backward, each over the whole prompt. :func:`integrated_gradients` computes the
same numbers with rows for all layers in one batch (row block l scales layer l only; one backward gives every
gradient), and runs only the prediction position: scaling coefficients at the last token changes nothing at the
earlier tokens, so they come from the clean run's key/value cache, and the layers below l are not run either
(:func:`ffkv.locate._run.run_tail`). :func:`integrated_gradients_reference` is Dai et al.'s loop, for the test and
the benchmark.

Screens (one forward and one backward pass): ``grad_x_activation`` = ``m_i dP/dm_i`` and ``attribution_patching``
= ``(0 - m_i) dP/dm_i``, the first-order estimate of the effect of zeroing memory i (Syed et al. 2023).

Multi-token answers are teacher-forced: the prompt is extended with the gold answer tokens and the attribution is
the mean over answer tokens j of the attribution of ``P(o_j | prompt, o_<j)`` at the position that predicts o_j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FfkvError
from ..models.hooks import Intervention, intervene
from ..models.model import MemoryModel
from ._run import Cost, reference_run, run_tail

RULES = ("left", "right", "midpoint")


def riemann_alphas(steps: int, rule: str = "left") -> torch.Tensor:
    """Scaling factors of the Riemann sum, (steps,): left = k/n (Dai et al.), right = (k+1)/n, midpoint."""
    if steps < 1:
        raise FfkvError(f"steps must be at least 1, got {steps}", "use --steps 20 (Dai et al.'s default)")
    if rule not in RULES:
        raise FfkvError(f"unknown Riemann rule {rule!r}", f"use one of {', '.join(RULES)}")
    k = torch.arange(steps, dtype=torch.float64)
    return {"left": k, "right": k + 1, "midpoint": k + 0.5}[rule] / steps


@dataclass
class _Targets:
    """A teacher-forced prompt: ids (1, T) and, per answer token, (position, token id)."""

    ids: torch.Tensor
    targets: list[tuple[int, int]]


def answer_targets(model: MemoryModel, prompt: str, answer: str | int) -> _Targets:
    """``prompt + answer[:-1]`` tokens and the (position, gold token) pairs the attribution explains."""
    ids = model.encode(prompt)["input_ids"]
    gold = [answer] if isinstance(answer, int) else model.token_ids(answer)
    if not gold:
        raise FfkvError(f"answer {answer!r} tokenizes to nothing", "give a non-empty answer, e.g. ' Paris'")
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


def integrated_gradients(model: MemoryModel, prompt: str, answer: str | int, steps: int = 20, layers=None,
                         rule: str = "left", max_rows: int = 256, groups: int = 4,
                         cost: Cost | None = None) -> torch.Tensor:
    """Dai et al.'s integrated gradients of P(answer) for every memory, (n_layers, d_ffn) float32 on CPU.

    Rows of layers not in ``layers`` are zero. max_rows bounds the batch (steps rows per layer); groups: layer
    groups, one forward and one backward pass each.
    """
    cost = cost if cost is not None else Cost()
    lays = _layers(model, layers)
    alphas = riemann_alphas(steps, rule)
    tg = answer_targets(model, prompt, answer)
    L = model.n_layers
    reads = [("coef", l) for l in range(L)] + [("resid_pre", l) for l in range(L)]
    _, rec, cache = reference_run(model, tg.ids, reads=reads, cost=cost)
    out = torch.zeros(L, model.d_ffn, dtype=torch.float32)
    for pos, gold in tg.targets:
        for chunk in _chunks(lays, steps, max_rows, groups):
            grads = _scaled_gradients(model, tg.ids, rec, cache, pos, gold, chunk, alphas, cost)
            for l, g in zip(chunk, grads):
                m = rec["coef", l][0, pos].float().cpu()
                out[l] += m * g.float().cpu().mean(0)
    return out / len(tg.targets)


def _scaled_gradients(model, ids, rec, cache, pos, gold, chunk, alphas, cost) -> list[torch.Tensor]:
    """dP(gold)/dm at ``alpha_k m^(l)`` for each layer l of ``chunk``: a list of (steps, d_ffn) tensors.

    One batch: row block b scales layer ``chunk[b]`` only. Only position ``pos`` and layers >= chunk[0] run;
    since layers below l are untouched, the coefficient of layer l in its rows is exactly ``alpha_k m^(l)``.
    """
    steps = len(alphas)
    start = chunk[0]
    B = steps * len(chunk)
    leaves, edits = [], []
    for b, l in enumerate(chunk):
        m = rec["coef", l][0, pos]
        x = (alphas.to(m.device, m.dtype)[:, None] * m[None]).requires_grad_(True)
        leaves.append(x)
        edits.append(Intervention("coef", l, "set", value=x[:, None, :], positions=[0],
                                  batch=list(range(b * steps, (b + 1) * steps))))
    resid = rec["resid_pre", start][:, pos:pos + 1].expand(B, 1, -1)
    with torch.enable_grad():
        logits, _ = run_tail(model, ids[:, pos:pos + 1].expand(B, 1), start, resid, cache, pos,
                             torch.zeros(B, dtype=torch.long), edits=edits, cost=cost, backward=True)
        p = torch.softmax(logits.float(), -1)[:, gold]
        return list(torch.autograd.grad(p.sum(), leaves))


def integrated_gradients_reference(model: MemoryModel, prompt: str, answer: str | int, steps: int = 20,
                                   layers=None, rule: str = "left", cost: Cost | None = None) -> torch.Tensor:
    """Dai et al.'s loop, written directly: per layer, one forward pass for the coefficients, then one batch of
    ``steps`` rows over the whole prompt with that layer's coefficients at the prediction position scaled,
    forward and backward. Same result as :func:`integrated_gradients`, (n_layers, d_ffn)."""
    cost = cost if cost is not None else Cost()
    alphas = riemann_alphas(steps, rule)
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
            out[l] += m.float().cpu() * g.float().cpu().mean(0)
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
            p = torch.softmax(logits.float(), -1)[0, gold]
            coefs = [crec["coef", l] for l in range(L)]
            grads = torch.autograd.grad(p, coefs)
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
