"""The reference that mining is tested against: every coefficient of every prefix kept, then a full sort.

The coefficients are computed in the batches mining forms (``batching="mining"``: the same sort windows and
length-sorted batches, :func:`ffkv.memory.miner.length_batches`), because a matrix product's last bits may
change with the batch's shape; what the reference checks is the selection (top-k and bottom-k by
(coefficient, g), dedup, resumes), on exactly the numbers mining saw. ``batching="consecutive"`` forms
batches in corpus order instead (the ids then agree and the coefficients to rounding).
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.hooks import intervene
from ..models.memory_id import MemoryId
from ..models.moe import expert_intervene
from .corpus import Unit
from . import miner
from .miner import (POSITION_BITS, batch_coefficients, batches, encode_units, filled, window_batches,
                    mining_groups, sort_windows)


def reference_batches(units: list[Unit], batch_tokens: int, window: int, top_k: int, batching: str = "mining",
                      by_length: bool = True):
    """The batches the reference computes coefficients in (see the module docstring)."""
    if batching == "consecutive":
        return list(batches(iter(units), batch_tokens, max(len(u.tokens) for u in units)))
    out = []
    for wunits, _, _ in sort_windows(iter(units), miner.SORT_WINDOW_BATCHES * max(batch_tokens, window),
                                     max(1, ((1 << 31) - 1 - top_k) // window)):
        out += window_batches(wunits, batch_tokens, window, by_length)
    return out


@torch.no_grad()
def brute_force_triggers(model, units: list[Unit], top_k: int, batch_tokens: int = 2048, dedup: bool = True,
                         window: int = 64, batching: str = "mining") -> dict:
    """Reference: all coefficients of all prefixes kept, then a full sort per key (small corpora only).

    With ``dedup`` only the first occurrence of each distinct prefix (token sequence) takes part.
    ``window``: the mined corpus spec's window (it sizes mining's batches). Returns {layer: {"top": (d_ffn, k)
    gids, "bottom": ..., "top_coef": ..., "bottom_coef": ...}} with the order (coefficient desc, g asc) for
    top and (coefficient asc, g asc) for bottom.
    """
    tok = model.require_tokenizer()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    if mining_groups(model) is not None:
        return _brute_force_groups(model, units, top_k, batch_tokens, dedup, pad_id, window, batching)
    all_c, all_g = [], []
    for batch in reference_batches(units, batch_tokens, window, top_k, batching):
        run_units, n = filled(batch) if batching == "mining" else (batch, len(batch))
        ids, mask = encode_units(run_units, pad_id, model.device)
        select = mask.bool()
        select[n:] = False
        c, g = batch_coefficients(model, ids, mask, torch.tensor([u.unit for u in run_units]), select=select)
        all_c.append(torch.cat(c, dim=1).T.float().cpu().numpy())
        all_g.append(g.cpu().numpy())
    G = np.concatenate(all_g)
    order = np.argsort(G, kind="stable")  # corpus order, for the first-occurrence rule
    keep = np.array(_keep(units, set(), dedup))
    C = np.concatenate(all_c, axis=1)[:, order][:, keep] + 0.0  # (L*d, N)
    G = G[order][keep]
    out, d = {}, model.d_ffn
    for l in range(model.n_layers):
        res = {}
        for kind, sgn in (("top", -1.0), ("bottom", 1.0)):
            rows_g, rows_c = [], []
            for i in range(d):
                c = C[MemoryId(l, i).flat(d)]
                order = np.lexsort((G, sgn * c))[:top_k]
                rows_g.append(G[order])
                rows_c.append(c[order])
            res[kind], res[kind + "_coef"] = np.stack(rows_g), np.stack(rows_c)
        out[l] = res
    return out


def _keep(batch: list[Unit], seen: set, dedup: bool) -> list[bool]:
    """Per prefix of the batch's units (in order), whether it takes part: with ``dedup`` only the first
    occurrence of a token sequence over the whole corpus (``seen`` carries the ones met so far)."""
    out = []
    for u in batch:
        for t in range(len(u.tokens)):
            prefix = tuple(u.tokens[: t + 1])
            out.append(not dedup or prefix not in seen)
            seen.add(prefix)
    return out


def _brute_force_groups(model, units: list[Unit], top_k: int, batch_tokens: int, dedup: bool, pad_id: int,
                        window: int = 64, batching: str = "mining") -> dict:
    """The reference on an MoE model: {(layer, expert or None): {...}} as above, each (width, k) with gid -1
    (and NaN coefficient) past the prefixes a key has. Expert coefficients are read as the dense (B, T, F)
    table of :meth:`ffkv.models.moe.ExpertCapture.dense`, NaN where a token was not routed, and the NaNs
    are dropped before sorting: an unrouted prefix is no candidate."""
    groups = mining_groups(model)
    dense = sorted({l for l, e, _ in groups if e is None})
    moe = sorted({l for l, e, _ in groups if e is not None})
    cols: dict = {(l, e): [] for l, e, _ in groups}
    all_g = []
    for batch in reference_batches(units, batch_tokens, window, top_k, batching, by_length=False):
        run_units, n = filled(batch) if batching == "mining" else (batch, len(batch))
        ids, mask = encode_units(run_units, pad_id, model.device)
        mask_real = mask.clone()
        mask_real[n:] = 0
        with intervene(model, reads=[("coef", l) for l in dense]) as rec, expert_intervene(model, reads=moe) as caps:
            model.hf(input_ids=ids, attention_mask=mask)
        real = mask_real.reshape(-1).bool().cpu().numpy()
        for l, e, _ in groups:
            c = rec["coef", l] if e is None else caps[l, e].dense()
            cols[l, e].append(c.reshape(-1, c.shape[-1]).float().cpu().numpy()[real])
        all_g.append(np.array([(u.unit << POSITION_BITS) + t for u in batch for t in range(len(u.tokens))], np.int64))
    G = np.concatenate(all_g)
    in_corpus_order = np.argsort(G, kind="stable")
    keep = np.array(_keep(units, set(), dedup))
    G = G[in_corpus_order][keep]
    out = {}
    for l, e, width in groups:
        C = np.concatenate(cols[l, e])[in_corpus_order][keep].T + 0.0  # (width, N), NaN: not routed
        res = {}
        for kind, sgn in (("top", -1.0), ("bottom", 1.0)):
            gs = np.full((width, top_k), -1, np.int64)
            cs = np.full((width, top_k), np.nan, np.float32 if C.dtype == np.float32 else C.dtype)
            for i in range(width):
                ok = ~np.isnan(C[i])
                c, g = C[i][ok], G[ok]
                order = np.lexsort((g, sgn * c))[:top_k]
                gs[i, : order.size], cs[i, : order.size] = g[order], c[order]
            res[kind], res[kind + "_coef"] = gs, cs
        out[l, e] = res
    return out
