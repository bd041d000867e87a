"""Queries over an atlas: what triggers a memory, and what its value promotes."""

from __future__ import annotations

import torch

from ..models.memory_id import MemoryId
from .patterns import key_pattern
from .values import decode_tokens, value_logits


@torch.no_grad()
def describe_memory(atlas, layer: int, index: int, n: int = 25, top_tokens: int = 10, norm: bool = False) -> dict:
    """Memory ``L{layer}.{index}``: top and bottom trigger examples, value top tokens and ``max p``,
    the trigger pattern label, and whether the value's top token is the top trigger's next token."""
    layer, index = atlas.check_memory(layer, index)
    model = atlas.model
    tok = model.tokenizer
    trig = atlas.memory_triggers(layer, index, "top", n=n, tokenizer=tok)
    bottom = atlas.memory_triggers(layer, index, "bottom", n=n, tokenizer=tok)
    logits = value_logits(model, layer, [index], norm=norm)[0]
    p = torch.softmax(logits, -1)
    top = p.topk(min(top_tokens, p.numel()))
    low = logits.topk(min(top_tokens, p.numel()), largest=False).indices
    tm = atlas.trigger_matrix(layer, "top")
    prefixes = [atlas.prefix(u, q) for u, q in zip(tm["unit"][index], tm["position"][index]) if u >= 0]
    nxt = atlas.next_token(int(tm["unit"][index, 0]), int(tm["position"][index, 0])) if prefixes else -1
    return {"memory": str(MemoryId(layer, index)), "layer": layer, "index": index, "norm": norm,
            "value_top_tokens": decode_tokens(tok, top.indices), "value_top_p": top.values.tolist(),
            "value_bottom_tokens": decode_tokens(tok, low), "max_p": float(top.values[0]),
            "value_norm": float(model.write_values(layer)[:, index].float().norm()),
            "top_trigger_next_token": tok.decode([nxt]) if nxt >= 0 else None,
            "agrees": bool(nxt >= 0 and int(top.indices[0]) == nxt),
            "pattern": key_pattern(prefixes, lambda ids: tok.decode(list(ids))) if prefixes else None,
            "triggers": trig, "bottom_triggers": bottom}
