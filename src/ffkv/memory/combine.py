"""The exact combination of trigger tables mined on parts of a corpus: per key, the top-k of the union.

Both :func:`ffkv.memory.merge.merge_atlases` (atlases of corpus shards, units renumbered by offsets) and the
distributed miner (``torchrun``: every rank's tables, units numbered as in the whole corpus) reduce to
:func:`select_triggers`: rows of one group of keys from several parts, each part the top-k / bottom-k of its
own prefixes, give the top-k / bottom-k of all of them, ordered as :func:`ffkv.memory.miner.mine` writes a
table (top rows then bottom rows; per key by rank: coefficient best first, ties to the smaller prefix id
g = (unit, position)). With dedup, a prefix (the same tokens from the start of a unit) that two parts both
kept counts once, at its earliest occurrence (smallest g), as one pass over the whole corpus keeps it: there
a later occurrence is dropped while the first one is in the key's buffer, even when its coefficient differs
in the last bits (another batch shape).
"""

from __future__ import annotations

import numpy as np

from .topk import POSITION_BITS, prefix_hashes


def row_hashes(unit: np.ndarray, position: np.ndarray, unit_tokens: dict) -> np.ndarray:
    """The prefix hash (:func:`ffkv.memory.topk.prefix_hashes`) of every row's prefix ``unit[:position + 1]``:
    (N,) int64, each cited unit hashed once."""
    unit, position = np.asarray(unit, np.int64), np.asarray(position, np.int64)
    if unit.size == 0:
        return np.zeros(0, np.int64)
    uu, inv = np.unique(unit, return_inverse=True)
    hs = [prefix_hashes(unit_tokens[int(u)]) for u in uu]
    starts = np.cumsum([0] + [len(h) for h in hs[:-1]])
    return np.concatenate(hs)[starts[inv] + position]


def select_triggers(t: dict, k: int, dedup: bool = False, unit_tokens: dict | None = None,
                    hashes: np.ndarray | None = None) -> dict:
    """The trigger table of one group of keys from the rows of several parts.

    t: columns ``index, kind, coef, unit, position`` (N,) concatenated over the parts (``rank`` is ignored);
    unit ids must be comparable across parts (one numbering). With ``dedup``, repeated prefixes are found by
    their hashes: ``hashes`` (N,) given, or computed from ``unit_tokens`` (each cited unit's token ids). Returns
    the columns ``index, kind, rank, coef, unit, position`` of at most k rows per (key, kind); coefficients are
    returned bit for bit as given (a bottom row's -0.0 stays -0.0).
    """
    idx, kind = np.asarray(t["index"]), np.asarray(t["kind"])
    coef = np.asarray(t["coef"], np.float32)
    unit, pos = np.asarray(t["unit"], np.int64), np.asarray(t["position"])
    is_top = kind == "top"
    signed = np.where(is_top, -coef.astype(np.float64), coef.astype(np.float64))  # ascending = best first
    order = np.lexsort((pos, unit, signed, idx, ~is_top))  # rows as mine() writes them
    idx_s, top_s = idx[order], is_top[order]
    group_start = np.r_[True, (idx_s[1:] != idx_s[:-1]) | (top_s[1:] != top_s[:-1])] if order.size else \
        np.zeros(0, bool)
    gid = np.cumsum(group_start) - 1
    if dedup and order.size:  # the same prefix from two parts: keep its earliest occurrence in each key list
        h = (row_hashes(unit, pos, unit_tokens) if hashes is None else np.asarray(hashes, np.int64))[order]
        g = (unit[order] << POSITION_BITS) + pos[order]
        by = np.lexsort((g, h, gid))  # per (key list, prefix): the earliest occurrence first
        first = by[np.r_[True, (gid[by][1:] != gid[by][:-1]) | (h[by][1:] != h[by][:-1])]]
        firsts = np.sort(first)
        order, gid = order[firsts], gid[firsts]
        group_start = np.r_[True, gid[1:] != gid[:-1]]
    starts = np.flatnonzero(group_start)
    rank = np.arange(order.size) - starts[gid] if order.size else np.zeros(0, np.int64)
    keep = order[rank < k]
    return {"index": idx[keep].astype(np.int32), "kind": kind[keep], "rank": rank[rank < k].astype(np.int16),
            "coef": coef[keep], "unit": unit[keep], "position": pos[keep].astype(np.int32)}
