"""Sub-updates (Geva et al. 2022): an FFN update as a sum of value vectors scaled by their coefficients.

    o^l = sum_i m_i^l v_i^l (+ b^l)         sub-update i:  m_i v_i,  ranked by  |m_i| * ||v_i||

In post-norm families (Gemma-2/3, OLMo-2) the layer writes ``N(o^l)`` into the residual; ``v_i`` is then read
as it writes, ``g ⊙ v_i`` (:meth:`MemoryModel.write_values`), and the layer's own top tokens are those of the
write ``N(o^l)`` (:meth:`MemoryModel.write_from_ffn_out`).

Each sub-update is read through the vocabulary: ``E (m_i v_i)`` promotes the top tokens of ``E v_i``
when ``m_i > 0`` and its bottom tokens when ``m_i < 0``. Memories can be switched off (``m_i = 0``) or
forced on (``m_i = value``) at chosen positions or everywhere, also during generation, and the change
in the next-token distribution is reported.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import FfkvError
from ..models.hooks import intervene, switch_memories
from ..models.memory_id import MemoryId
from .values import value_logits


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
    with intervene(model, reads=[(s, l) for l in layers for s in ("coef", "ffn_out")]) as rec:
        logits = model.hf(**batch).logits[0, pos]
    probs = torch.softmax(logits.float(), -1)
    top = probs.topk(value_top)
    out = {"prompt": prompt, "position": pos, "token": tok.decode(batch["input_ids"][0, pos: pos + 1]),
           "prediction": [{"token": t, "p": p} for t, p in zip(_decode(tok, top.indices), top.values.tolist())],
           "layers": []}
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


def _off_items(off) -> list[MemoryId]:
    return [MemoryId.parse(x) for x in off]


def _on_items(on) -> list[tuple[MemoryId, float]]:
    """``(layer, index, value)`` or ``(memory, value)`` (memory a MemoryId, ``"L3.17"`` or ``(3, 17)``)."""
    return [(MemoryId(x[0], x[1]), float(x[2])) if len(x) == 3 else (MemoryId.parse(x[0]), float(x[1])) for x in on]


def memory_interventions(off: Sequence = (), on: Sequence = (), positions=None) -> list:
    """Interventions for ``off=[memory, ...]`` and ``on=[(layer, index, value) | (memory, value), ...]``;
    a memory is a :class:`MemoryId`, ``"L3.17"`` or ``(3, 17)``."""
    edits = []
    for mid in _off_items(off):
        edits.append(switch_memories(mid.layer, [mid.index], None, positions))
    for mid, v in _on_items(on):
        edits.append(switch_memories(mid.layer, [mid.index], v, positions))
    return edits


def _check(model, off, on):
    for mid in _off_items(off) + [m for m, _ in _on_items(on)]:
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
    with intervene(model, edits=memory_interventions(off, on, positions)):
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
    with intervene(model, edits=memory_interventions(off, on, None)):
        edited = model.hf.generate(**batch, **kw)
    n = batch["input_ids"].shape[1]
    return {"prompt": prompt, "before": tok.decode(base[0, n:]), "after": tok.decode(edited[0, n:])}
