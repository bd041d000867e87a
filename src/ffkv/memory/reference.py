"""The atlas analyses computed directly, as ffkv computed them before its fast paths: the references that
``bench/bench_atlas.py`` and ``tests/test_values_fast.py`` check the fast ones against.

    reference_project_values   every value's float32 logits ``unembed(v_i)`` in chunks; top/bottom tokens,
                               logsumexp, ``max p``, the target's rank as ``sum_t [z_t > z_target]``
    reference_memory_tokens    ``argmax`` / ``argmin`` of those logits (composition's y_i)
    reference_composition      section 5 with the model's own LM head for the final prediction Y and one
                               float32 head product per layer, vector kind and prefix batch
    reference_removal          the removal experiment with one pass per prefix and variant (x, x without
                               its last token, x without its first token), in batches of 64 sequences

Same records and summary as :func:`ffkv.memory.composition.composition_and_refinement` (the shared
accumulation there), so a difference can only come from the predictions.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.engine import capture_coefficients
from ..models.hooks import intervene
from .composition import _accumulate, _active, _prefix_flags, _summary, activation_rule
from .corpus import Unit
from .miner import batches, encode_units
from .patterns import removal_items, removal_summary
from .values import value_logits, write_values


@torch.no_grad()
def reference_project_values(model, layer: int, norm: bool = False, top_n: int = 10, chunk: int = 1024,
                             targets: np.ndarray | None = None) -> dict:
    """:func:`ffkv.memory.values.project_values` (dense layers), computed directly; same keys."""
    norms = write_values(model, layer).float().norm(dim=0).cpu().numpy()
    d = norms.shape[0]
    top_n = min(top_n, model.vocab_size)
    out = {"top_ids": np.zeros((d, top_n), np.int64), "top_p": np.zeros((d, top_n), np.float32),
           "bottom_ids": np.zeros((d, top_n), np.int64), "max_p": np.zeros(d, np.float32),
           "lse": np.zeros(d, np.float32), "value_norm": norms.astype(np.float32),
           "target_rank": np.full(d, -1, np.int64)}
    for s in range(0, d, chunk):
        idx = torch.arange(s, min(s + chunk, d))
        logits = value_logits(model, layer, idx, norm=norm)
        lse = torch.logsumexp(logits, dim=-1)
        top = logits.topk(top_n, dim=-1)
        e = s + len(idx)
        out["top_ids"][s:e] = top.indices.cpu().numpy()
        out["top_p"][s:e] = (top.values - lse[:, None]).exp().cpu().numpy()
        out["max_p"][s:e] = out["top_p"][s:e, 0]
        out["bottom_ids"][s:e] = logits.topk(top_n, dim=-1, largest=False).indices.cpu().numpy()
        out["lse"][s:e] = lse.cpu().numpy()
        if targets is not None:
            t = torch.as_tensor(targets[s:e], device=logits.device)
            tl = logits.gather(1, t.clamp(min=0)[:, None])
            out["target_rank"][s:e] = torch.where(t >= 0, (logits > tl).sum(1), -1).cpu().numpy()
    return out


@torch.no_grad()
def reference_memory_tokens(model, norm: bool = False, chunk: int = 1024) -> dict:
    """Per layer, (d_ffn,) ``argmax`` and ``argmin`` of every value's float32 logits."""
    out = {}
    for l in range(model.n_layers):
        tops, bots = [], []
        for s in range(0, model.d_ffn, chunk):
            lg = value_logits(model, l, torch.arange(s, min(s + chunk, model.d_ffn)), norm=norm)
            tops.append(lg.argmax(-1))
            bots.append(lg.argmin(-1))
        out[l] = (torch.cat(tops), torch.cat(bots))
    return out


@torch.no_grad()
def reference_composition(model, units: list, norm: bool = False, active_threshold: float | None = None,
                          batch_tokens: int = 1024) -> dict:
    """:func:`ffkv.memory.composition.composition_and_refinement`, computed directly (module docstring)."""
    L = model.n_layers
    mem = reference_memory_tokens(model, norm=norm)
    rules = {l: activation_rule(model, l) for l in range(L)}
    tok = model._require_tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    stop_of_id: dict[int, bool] = {}
    acc = {l: {k: [] for k in ("active", "zero", "has_active", "res_is_out", "case")} for l in range(L)}
    stop_all, short_all = [], []
    reads = [(s, l) for l in range(L) for s in ("coef", "ffn_out", "resid_post")]
    if any(r == "gate" for r in rules.values()):
        reads += [("ffn_in", l) for l in range(L)]
    for batch in batches(iter(units), batch_tokens, max(len(u.tokens) for u in units)):
        ids, mask = encode_units(batch, pad, model.device)
        with intervene(model, reads=reads) as rec:
            logits = model.hf(input_ids=ids, attention_mask=mask).logits
        sel = _prefix_flags(ids, mask, tok, stop_of_id, stop_all, short_all)
        final = logits.reshape(-1, logits.shape[-1])[sel].argmax(-1)
        for l in range(L):
            take = lambda s: rec[s, l].reshape(-1, rec[s, l].shape[-1])[sel]  # noqa: E731
            m, y = take("coef").float(), take("resid_post")
            o = model.write_from_ffn_out(l, take("ffn_out"))
            active = _active(model, rules[l], l, m, lambda: take("ffn_in"), active_threshold)
            head = lambda x, n: model.unembed(x, norm=n).argmax(-1)  # noqa: E731
            _accumulate(acc[l], active, m, mem[l], head(o, norm), head(y - o, True), head(y, True), head(o, True),
                        final)
    return _summary(acc, stop_all, short_all, rules, active_threshold, len(units), norm)


@torch.no_grad()
def reference_removal(atlas, keys_per_layer: int = 64, triggers_per_key: int = 1, seed: int = 0,
                      batch_size: int = 64) -> dict:
    """:func:`ffkv.memory.patterns.removal_effects`, one pass per prefix and variant (module docstring)."""
    model = atlas.model
    items = removal_items(atlas, keys_per_layer, triggers_per_key, seed)
    variants = [(it, v) for it in items for x in [atlas.prefix(it[2], it[3])] for v in (x, x[:-1], x[1:])]
    coefs = np.zeros(len(variants), np.float32)
    tok = model.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    for s in range(0, len(variants), batch_size):
        chunk = variants[s: s + batch_size]
        ids, mask = encode_units([Unit(j, 0, v, -1, "") for j, (_, v) in enumerate(chunk)], pad, model.device)
        coef = capture_coefficients(model, ids, mask, sorted({it[0] for it, _ in chunk}))
        last = mask.sum(1) - 1
        for b, (it, _) in enumerate(chunk):
            coefs[s + b] = coef[it[0]][b, last[b], it[1]].float().item()
    return removal_summary(atlas, items, coefs.reshape(-1, 3), keys_per_layer, triggers_per_key)
