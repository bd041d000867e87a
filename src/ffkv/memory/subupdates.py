"""Sub-updates (Geva et al. 2022): an FFN update as a sum of value vectors scaled by their coefficients.

    o^l = sum_i m_i^l v_i^l (+ b^l)         sub-update i:  m_i v_i,  ranked by  |m_i| * ||v_i||

In post-norm families (Gemma-2/3, OLMo-2) the layer writes ``N(o^l)`` into the residual; ``v_i`` is then read
as it writes, ``g ⊙ v_i`` (:meth:`MemoryModel.write_values`), and the layer's own top tokens are those of the
write ``N(o^l)`` (:meth:`MemoryModel.write_from_ffn_out`).

Each sub-update is read through the vocabulary: ``E (m_i v_i)`` promotes the top tokens of ``E v_i``
when ``m_i > 0`` and its bottom tokens when ``m_i < 0``. Memories can be switched off (``m_i = 0``) or
forced on (``m_i = value``) at chosen positions or everywhere, also during generation, and the change
in the next-token distribution is reported.

Mixture-of-experts layers (:class:`~ffkv.models.moe.MoEModel`, docs/moe.md) add the FFNs of the experts the
token is routed to, weighted by the router, and (Qwen2-MoE) a shared expert scaled by its gate:

    o^l = sum_{e in topk(x)} w_e sum_i m_i^e v_i^e  [+ sigma(g . x) sum_i m_i^s v_i^s]

so the sub-update of memory i of expert e (``L3.E2.17``) is ``w_e m_i^e v_i^e``, ranked by
``|w_e m_i^e| * ||v_i^e||`` together with the shared expert's ``sigma(g . x) m_i^s v_i^s`` (``L3.17``). Only
the top-k experts of the token have sub-updates there: an expert the token is not routed to computed
nothing for it (its coefficients are not active, never 0). Expert coefficients are read, and expert memories
switched, through :func:`ffkv.models.moe.expert_intervene` (:class:`~ffkv.models.moe.ExpertEdit`, on the
routed tokens only); dense sites (the shared expert's ``coef``, the block's ``ffn_in`` / ``ffn_out``) through
:func:`ffkv.models.hooks.intervene`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import FfkvError
from ..models.hooks import intervene, switch_memories
from ..models.memory_id import MemoryId
from ..models.moe import ExpertEdit, MoEModel, expert_intervene
from .values import value_logits, write_values


def _decode(tok, ids) -> list[str]:
    return [tok.decode([int(i)]) for i in ids]


@torch.no_grad()
def sub_updates(model, prompt: str, top_n: int = 10, value_top: int = 5, position: int = -1,
                layers: Sequence[int] | None = None, norm: bool = False) -> dict:
    """The top-n sub-updates of every layer's FFN at one position of ``prompt`` (default: the last).

    Returns {"prompt", "position", "token", "prediction", "layers": [{"layer", "ffn_top_tokens",
    "sub_updates": [{"memory", "coef", "value_norm", "score", "promotes"}]}]}.
    """
    tok = model._require_tokenizer()
    batch = model.encode(prompt)
    T = int(batch["attention_mask"].sum())
    if T == 0:
        raise FfkvError("the prompt tokenizes to nothing", "pass a non-empty --prompt")
    if not -T <= position < T:
        raise FfkvError(f"position {position} is out of range for a {T}-token prompt", f"use 0..{T - 1} or -1")
    pos = position % T
    layers = list(range(model.n_layers)) if layers is None else [model.check_layer(l) for l in layers]
    if isinstance(model, MoEModel):
        return _moe_sub_updates(model, prompt, batch, pos, layers, top_n, value_top, norm)
    with intervene(model, reads=[(s, l) for l in layers for s in ("coef", "ffn_out")]) as rec:
        logits = model.hf(**batch).logits[0, pos]
    out = _prediction(tok, prompt, batch, pos, logits, value_top)
    for l in layers:
        m = rec["coef", l][0, pos].float()
        vnorm = model.write_values(l).float().norm(dim=0)
        score = m.abs() * vnorm
        best = score.topk(min(top_n, score.numel()))
        lg = value_logits(model, l, best.indices, norm=norm)
        signed = lg * torch.sign(m[best.indices])[:, None]
        write = model.write_from_ffn_out(l, rec["ffn_out", l][0, pos])
        ffn_top = model.unembed(write, norm=norm).float().topk(value_top).indices
        out["layers"].append({
            "layer": l, "ffn_top_tokens": _decode(tok, ffn_top),
            "sub_updates": [{"memory": str(MemoryId(l, i)), "layer": l, "index": i, "coef": float(m[i]),
                             "value_norm": float(vnorm[i]), "score": float(s),
                             "promotes": _decode(tok, signed[j].topk(value_top).indices)}
                            for j, (s, i) in enumerate(zip(best.values.tolist(), best.indices.tolist()))],
        })
    return out


@dataclass
class FFNTerms:
    """The sub-updates of one FFN of a layer at one token: ``scale * m_i * v_i`` for i in 0..F-1.

    expert      the routed expert e, or None for the shared expert / a dense layer's FFN
    coef        (F,) its coefficients m_i at the token (as the model used them)
    weight      w_e (routing weight), the shared expert's gate sigma(g . x), or None on a dense layer
    value_norm  (F,) ||v_i|| of the values as they write into the residual
    """

    expert: int | None
    coef: torch.Tensor
    weight: float | None
    value_norm: torch.Tensor

    @property
    def score(self) -> torch.Tensor:
        """(F,) ``|w m_i| * ||v_i||``: the norm of each sub-update."""
        scale = 1.0 if self.weight is None else abs(self.weight)
        return self.coef.float().abs() * scale * self.value_norm


def _moe_reads(model: MoEModel, layers) -> tuple[list, list]:
    """Dense-site reads and expert reads that give every FFN term of ``layers``."""
    dense, experts = [], []
    for l in layers:
        dense += [("ffn_out", l)]
        if model.is_moe_layer(l):
            experts.append(l)
            if model.has_shared_expert(l):
                dense += [("coef", l), ("ffn_in", l)]
        else:
            dense.append(("coef", l))
    return dense, experts


@contextlib.contextmanager
def _moe_recording(model: MoEModel, layers):
    """One forward pass's records for :func:`layer_terms`: yields ``(dense, experts)`` recordings."""
    dense, experts = _moe_reads(model, layers)
    with intervene(model, reads=dense) as drec, expert_intervene(model, reads=experts) as erec:
        yield drec, erec


def layer_terms(model: MoEModel, drec, erec, layer: int, b: int, t: int, norms: dict | None = None) \
        -> list[FFNTerms]:
    """Every FFN term of layer ``layer`` at token (b, t) of a recorded pass (:func:`_moe_recording`):
    the experts the token was routed to (in top-k order), then the shared expert; a dense layer's FFN.

    norms: a dict ``(layer, expert) -> ||v||`` reused across calls on the same weights."""
    norms = {} if norms is None else norms

    def vnorm(e):
        if (layer, e) not in norms:
            norms[layer, e] = write_values(model, layer, e).float().norm(dim=0)
        return norms[layer, e]

    if not model.is_moe_layer(layer):
        return [FFNTerms(None, drec["coef", layer][b, t].float(), None, vnorm(None))]
    out = []
    idx, _ = erec.routing[layer]
    for e in idx[b, t].tolist():
        cap = erec[layer, e]
        row = ((cap.batch == b) & (cap.position == t)).nonzero().reshape(-1)
        if row.numel() != 1:  # the routing says e was chosen: the capture must hold the token once
            raise FfkvError(f"layer {layer}: token {t} is routed to expert {e} but was not computed by it",
                            "report this model; its experts are not called with the routing")
        r = int(row[0])
        out.append(FFNTerms(e, cap.coef[r].float(), float(cap.weight[r]), vnorm(e)))
    if model.has_shared_expert(layer):
        gate = float(model.shared_gate(layer, drec["ffn_in", layer][b, t]).reshape(-1)[0])
        out.append(FFNTerms(None, drec["coef", layer][b, t].float(), gate, vnorm(None)))
    return out


def _prediction(tok, prompt, batch, pos, logits, value_top) -> dict:
    """The head of a sub-updates result: the prompt, the token read and the model's top predictions there."""
    top = torch.softmax(logits.float(), -1).topk(value_top)
    return {"prompt": prompt, "position": pos, "token": tok.decode(batch["input_ids"][0, pos: pos + 1]),
            "prediction": [{"token": t, "p": p} for t, p in zip(_decode(tok, top.indices), top.values.tolist())],
            "layers": []}


def _moe_sub_updates(model: MoEModel, prompt, batch, pos, layers, top_n, value_top, norm) -> dict:
    tok = model.require_tokenizer()
    with _moe_recording(model, layers) as (drec, erec):
        logits = model.hf(**batch).logits[0, pos]
    out = _prediction(tok, prompt, batch, pos, logits, value_top)
    for l in layers:
        terms = layer_terms(model, drec, erec, l, 0, pos)
        score = torch.cat([g.score for g in terms])
        owner = torch.cat([torch.full((g.coef.numel(),), k) for k, g in enumerate(terms)])
        local = torch.cat([torch.arange(g.coef.numel()) for g in terms])
        best = score.topk(min(top_n, score.numel()))
        rows = []
        for s_, j in zip(best.values.tolist(), best.indices.tolist()):
            g, i = terms[int(owner[j])], int(local[j])
            m = float(g.coef[i])
            scale = 1.0 if g.weight is None else g.weight
            lg = value_logits(model, l, [i], norm=norm, expert=g.expert)[0]
            signed = lg * (1.0 if m * scale >= 0 else -1.0)
            rows.append({"memory": str(MemoryId(l, i, g.expert)), "layer": l, "index": i, "expert": g.expert,
                         "coef": m, "weight": g.weight, "value_norm": float(g.value_norm[i]), "score": s_,
                         "promotes": _decode(tok, signed.topk(value_top).indices)})
        write = model.write_from_ffn_out(l, drec["ffn_out", l][0, pos])
        ffn_top = model.unembed(write, norm=norm).float().topk(value_top).indices
        out["layers"].append({"layer": l, "ffn_top_tokens": _decode(tok, ffn_top), "sub_updates": rows,
                              "experts": [{"expert": g.expert, "weight": g.weight} for g in terms
                                          if g.expert is not None],
                              "shared_gate": next((g.weight for g in terms if g.expert is None
                                                   and g.weight is not None), None)})
    return out


@torch.no_grad()
def memory_rank(model: MoEModel, prompt: str, memory) -> dict:
    """Memory ``memory``'s coefficient and sub-update rank among all sub-updates of its layer (every routed
    expert's and the shared expert's, as :func:`sub_updates` ranks them) at each token of ``prompt``.

    Returns {"memory", "coef", "weight", "score", "rank", "of", "routed", "per_position": [{"position",
    "token", "routed", "coef", "weight", "rank", "of"}]} for the last token and per position. At a token not
    routed to the memory's expert the memory was not computed: ``routed`` False, ``coef`` NaN, ``rank`` None.
    """
    mid = model.check_memory(memory)
    tok = model.require_tokenizer()
    batch = model.encode(prompt)
    T = int(batch["attention_mask"].sum())
    norms: dict = {}
    with _moe_recording(model, [mid.layer]) as (drec, erec):
        model.hf(**batch)
    rows = []
    for t in range(T):
        terms = layer_terms(model, drec, erec, mid.layer, 0, t, norms)
        score = torch.cat([g.score for g in terms])
        mine = [g for g in terms if g.expert == mid.expert]
        row = {"position": t, "token": tok.decode(batch["input_ids"][0, t: t + 1]), "routed": bool(mine),
               "coef": math.nan, "weight": None, "score": math.nan, "rank": None, "of": int(score.numel())}
        if mine:
            g = mine[0]
            s_ = float(g.score[mid.index])
            row.update(coef=float(g.coef[mid.index]), weight=g.weight, score=s_,
                       rank=int((score > s_).sum()) + 1)
        rows.append(row)
    last = rows[-1]
    return {"memory": str(mid), **{k: last[k] for k in ("coef", "weight", "score", "rank", "of", "routed")},
            "per_position": rows}


def _off_items(off) -> list[MemoryId]:
    return [MemoryId.parse(x) for x in off]


def _on_items(on) -> list[tuple[MemoryId, float]]:
    """``(layer, index, value)`` or ``(memory, value)`` (memory a MemoryId, ``"L3.17"`` or ``(3, 17)``)."""
    return [(MemoryId(x[0], x[1]), float(x[2])) if len(x) == 3 else (MemoryId.parse(x[0]), float(x[1])) for x in on]


def memory_interventions(off: Sequence = (), on: Sequence = (), positions=None) -> list:
    """Interventions for ``off=[memory, ...]`` and ``on=[(layer, index, value) | (memory, value), ...]``;
    a memory is a :class:`MemoryId`, ``"L3.17"`` or ``(3, 17)``. Dense memories only (expert memories:
    :func:`expert_interventions`; both: :func:`memory_switches`)."""
    edits = []
    for mid in _off_items(off):
        _dense_only(mid)
        edits.append(switch_memories(mid.layer, [mid.index], None, positions))
    for mid, v in _on_items(on):
        _dense_only(mid)
        edits.append(switch_memories(mid.layer, [mid.index], v, positions))
    return edits


def _dense_only(mid: MemoryId):
    if mid.expert is not None:
        raise FfkvError(f"memory {mid} belongs to an expert", "switch it with ffkv.memory.subupdates."
                                                               "memory_switches (expert_intervene)")


def expert_interventions(off: Sequence = (), on: Sequence = (), positions=None) -> list[ExpertEdit]:
    """:class:`ExpertEdit`\ s for the expert memories among ``off`` / ``on`` (as in
    :func:`memory_interventions`): m_i^e = 0 or = value on the tokens routed to expert e (at ``positions``)."""
    edits = []
    for mid in _off_items(off):
        if mid.expert is not None:
            edits.append(ExpertEdit(mid.layer, mid.expert, "off", indices=[mid.index], positions=positions))
    for mid, v in _on_items(on):
        if mid.expert is not None:
            edits.append(ExpertEdit(mid.layer, mid.expert, "on", value=float(v), indices=[mid.index],
                                    positions=positions))
    return edits


@contextlib.contextmanager
def memory_switches(model, off: Sequence = (), on: Sequence = (), positions=None):
    """Every forward pass inside the block runs with the memories switched: dense ones through
    :func:`ffkv.models.hooks.intervene`, expert ones through :func:`ffkv.models.moe.expert_intervene`."""
    off_items, on_items = _off_items(off), _on_items(on)
    dense = memory_interventions([m for m in off_items if m.expert is None],
                                 [(m, v) for m, v in on_items if m.expert is None], positions)
    experts = expert_interventions(off_items, on_items, positions)
    with contextlib.ExitStack() as stack:
        stack.enter_context(intervene(model, edits=dense))
        if experts:
            stack.enter_context(expert_intervene(model, edits=experts))
        yield


def _check(model, off, on):
    for mid in _off_items(off) + [m for m, _ in _on_items(on)]:
        if isinstance(model, MoEModel):
            model.check_memory(mid)
        else:
            MemoryId(model.check_layer(mid.layer), mid.index, mid.expert).check(model.n_layers, model.d_ffn)


@torch.no_grad()
def switch_effect(model, prompt: str, off: Sequence = (), on: Sequence = (), positions=None,
                  top: int = 10) -> dict:
    """Next-token distribution of ``prompt`` before and after switching memories off / on.

    positions: None (all positions) or a list of token positions. Returns before/after top tokens, the
    KL divergence KL(before || after), and the tokens whose probability changed most.
    """
    _check(model, off, on)
    tok = model._require_tokenizer()
    before = model.next_token_probs(prompt)[0]
    with memory_switches(model, off, on, positions):
        after = model.next_token_probs(prompt)[0]
    kl = float((before * (before.clamp_min(1e-30).log() - after.clamp_min(1e-30).log())).sum())
    delta = after - before

    def tops(p):
        t = p.topk(top)
        return [{"token": s, "p": v} for s, v in zip(_decode(tok, t.indices), t.values.tolist())]

    up, down = delta.topk(top), (-delta).topk(top)
    return {"prompt": prompt, "off": [str(m) for m in _off_items(off)], "on": [f"{m}={v}" for m, v in _on_items(on)],
            "before": tops(before), "after": tops(after), "kl": kl,
            "increased": [{"token": s, "delta": v} for s, v in zip(_decode(tok, up.indices), up.values.tolist())],
            "decreased": [{"token": s, "delta": -v} for s, v in zip(_decode(tok, down.indices), down.values.tolist())]}


@torch.no_grad()
def generate_with_memories(model, prompt: str, off: Sequence = (), on: Sequence = (), max_new_tokens: int = 20) \
        -> dict:
    """Greedy continuations of ``prompt`` without and with the memory switches (applied at every step)."""
    _check(model, off, on)
    tok = model._require_tokenizer()
    batch = model.encode(prompt)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    base = model.hf.generate(**batch, **kw)
    with memory_switches(model, off, on, None):
        edited = model.hf.generate(**batch, **kw)
    n = batch["input_ids"].shape[1]
    return {"prompt": prompt, "before": tok.decode(base[0, n:]), "after": tok.decode(edited[0, n:])}
