"""The reference that mining is tested against: every coefficient of every prefix kept, then a full sort."""

from __future__ import annotations

import numpy as np
import torch

from ..models.memory_id import MemoryId
from .corpus import Unit
from .miner import batch_coefficients, batches, encode_units


@torch.no_grad()
def brute_force_triggers(model, units: list[Unit], top_k: int, batch_tokens: int = 2048, dedup: bool = True) -> dict:
    """Reference: all coefficients of all prefixes kept, then a full sort per key (small corpora only).

    With ``dedup`` only the first occurrence of each distinct prefix (token sequence) takes part.
    Returns {layer: {"top": (d_ffn, k) gids, "bottom": ..., "top_coef": ..., "bottom_coef": ...}} with
    the order (coefficient desc, g asc) for top and (coefficient asc, g asc) for bottom.
    """
    tok = model.require_tokenizer()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    all_c, all_g, seen, keep = [], [], set(), []
    for batch in batches(iter(units), batch_tokens, max(len(u.tokens) for u in units)):
        ids, mask = encode_units(batch, pad_id, model.device)
        c, g = batch_coefficients(model, ids, mask, torch.tensor([u.unit for u in batch]))
        all_c.append(torch.cat(c, dim=1).T.float().cpu().numpy())
        all_g.append(g.cpu().numpy())
        for u in batch:
            for t in range(len(u.tokens)):
                prefix = tuple(u.tokens[: t + 1])
                keep.append(not dedup or prefix not in seen)
                seen.add(prefix)
    keep = np.array(keep)
    C = np.concatenate(all_c, axis=1)[:, keep] + 0.0  # (L*d, N)
    G = np.concatenate(all_g)[keep]
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
