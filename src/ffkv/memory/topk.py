"""The top-k engine of trigger mining: running top-k and bottom-k buffers of every key, merged exactly.

Every key (row) keeps the k prefixes with the largest coefficient; a batch is absorbed by

    buffer <- top_k( [buffer ; batch] )      per key, over the concatenation (k + N candidates)

Ties are broken by prefix id g (earlier prefixes first). A composite integer key (order-preserving bits of
the coefficient, then a 32-bit order code c of the candidate) sorts by exactly (coefficient desc, g asc) in one
``topk``. Two ways to give the code:

- stream order (``window=None``): every buffer entry precedes the batch, so c = the buffer column, then
  k + the batch position (the batch's ids ascending);
- a sort window (``window=(u0, stride)``, what :func:`ffkv.memory.miner.mine` uses): the batches of one window
  of units (``u >= u0``) arrive in any order (sorted by length, so that they are nearly unpadded), every
  entry older than the window precedes it. Then c = the buffer column for entries older than the window,
  and ``k + (u - u0) * stride + t`` (t < stride, the position) for every entry of the window, buffered or new:
  a code that orders like g inside the window.

Either way the result is a pure function of the set of prefixes absorbed, whatever the batching or the order
of a window's batches. Shapes: buffers (R, k), R = L * d_ffn keys; a batch (N, R).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FfkvError
from ..models.memory_id import MemoryId

POSITION_BITS = 20  # global prefix id g = unit << 20 | position


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """An int64 that orders like the float32 ``x`` (NaN below -inf; -0.0 treated as +0.0).

    For IEEE floats the bit pattern orders positive numbers; flipping the magnitude bits of negative
    numbers makes the signed integer monotone in the value. x: any shape, float -> int64 same shape.
    """
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x.float()) + 0.0
    bits = x.contiguous().view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()


def _clean(x: torch.Tensor) -> torch.Tensor:
    """float32, NaN -> -inf, -0.0 -> +0.0 (so that float order and bit order agree)."""
    x = x.float()
    return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x) + 0.0


def order_codes(buf_g: torch.Tensor, new_g: torch.Tensor, k: int, window: tuple[int, int] | None = None):
    """The order codes c of a buffer (R, k) and of a batch's prefixes (N,) (module docstring): int64, smaller
    = earlier prefix; unique within a key."""
    cols = torch.arange(k, device=buf_g.device).expand(buf_g.shape[0], k)
    if window is None:
        return cols, k + torch.arange(new_g.numel(), device=new_g.device)
    u0, stride = window
    mask = (1 << POSITION_BITS) - 1

    def local(g):
        return k + ((g >> POSITION_BITS) - u0) * stride + (g & mask)

    return torch.where(buf_g >= (u0 << POSITION_BITS), local(buf_g), cols), local(new_g)


def batch_topk(new_v: torch.Tensor, k: int, floor: torch.Tensor | None = None,
               strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best prefixes of a batch for every key by (value desc, position asc): values and positions (R, k).

    new_v: (N, R) cleaned float32, one column per key. A float ``topk(k + 1)`` finds them unless the k-th
    and (k+1)-th values tie; only keys with such a tie whose tied value can still enter the buffer (above
    ``floor``, the buffer's k-th value; or equal to it when not ``strict``) are redone with the exact composite
    key ``bits(v) * 2^32 + (2^32 - 1 - position)`` (ReLU zeros are the usual ties).
    """
    N, R = new_v.shape
    if N <= k:
        return new_v.T, torch.arange(N, device=new_v.device).expand(R, N)
    top = new_v.topk(k + 1, dim=0, sorted=True)
    vals, cols = top.values[:k].T, top.indices[:k].T
    tie = top.values[k - 1] == top.values[k]
    if floor is not None:
        tie &= (top.values[k - 1] > floor) if strict else (top.values[k - 1] >= floor)
    rows = tie.nonzero().squeeze(1)
    if rows.numel():
        sub = new_v.index_select(1, rows).T
        col = torch.arange(N, device=new_v.device, dtype=torch.int64)
        exact = ((ordered_bits(sub) << 32) + ((1 << 32) - 1 - col)).topk(k, dim=1, sorted=True).indices
        cols = cols.index_copy(0, rows, exact)
        vals = vals.index_copy(0, rows, sub.gather(1, exact))
    return vals, cols


def _merge_dense(buf_v, buf_g, buf_h, new_v, new_g, new_h, k, buf_c, new_c, strict=True):
    """Merge when many prefixes can enter (the start of a run): per-key top-k of the batch, then 2k.

    buf_c (R, k), new_c (N,): order codes (:func:`order_codes`). A batch candidate whose prefix hash is already
    in the key's buffer is dropped (set to -inf: it can then only fill a slot after every empty buffer slot,
    i.e. never)."""
    new_v = _clean(new_v)
    vals, cols = batch_topk(new_v, k, floor=buf_v[:, -1], strict=strict)
    if buf_h is not None:
        dup = (new_h[cols][:, :, None] == buf_h[:, None, :]).any(2)
        vals = vals.masked_fill(dup, float("-inf"))
    cat = torch.cat([buf_v, vals], dim=1)
    order = torch.cat([buf_c, new_c[cols]], dim=1)
    key = (ordered_bits(cat) << 32) + ((1 << 32) - 1 - order)
    idx = key.topk(k, dim=1, sorted=True).indices
    v = cat.gather(1, idx)
    in_buf = idx < k
    bi = idx.clamp(max=k - 1)
    nj = cols.gather(1, (idx - k).clamp(min=0, max=cols.shape[1] - 1))
    g = torch.where(in_buf, buf_g.gather(1, bi), new_g[nj])
    h = None if buf_h is None else torch.where(in_buf, buf_h.gather(1, bi), new_h[nj])
    return v, g, h


def _merge_sparse(buf_v, buf_g, buf_h, pos, rows, vals, new_g, new_h, k, buf_c, new_c, empty=False):
    """Merge a few candidates (key ``rows[j]`` at batch position ``pos[j]``, value ``vals[j]``) by rank.

    Every buffer row is already sorted by the composite key ``bk`` (R, k), strictly descending. A candidate's
    final rank in its row is ``nb + r``: nb = the buffer entries ahead of it (a comparison against its row's k
    keys), r = the row's candidates ahead of it (one sort of the M candidates); buffer entry j moves down by
    the number of candidates with ``nb <= j`` (a cumulative count). Ranks below k are the new buffer. Cost
    O(M log M + M k + R k): only the candidates are sorted, never the whole buffer. ``empty``: the buffer
    holds nothing yet (every candidate is ahead of every slot, and none repeats a buffered prefix).
    """
    sel = torch.Tensor.index_select
    if buf_h is not None and not empty:  # a prefix already in the key's buffer does not enter twice
        fresh = ~(sel(buf_h, 0, rows) == sel(new_h, 0, pos)[:, None]).any(1)
        if not bool(fresh.all()):
            f = fresh.nonzero().squeeze(1)
            pos, rows, vals = sel(pos, 0, f), sel(rows, 0, f), sel(vals, 0, f)
            if rows.numel() == 0:
                return buf_v, buf_g, buf_h
    R = buf_v.shape[0]
    dev = buf_v.device
    low = (1 << 32) - 1
    ck = (ordered_bits(vals + 0.0) << 32) + (low - sel(new_c, 0, pos))  # (M,)
    o = ck.argsort(descending=True)
    o = sel(o, 0, sel(rows, 0, o).argsort(stable=True))  # by row, then composite key descending
    pos, rows, vals, ck = sel(pos, 0, o), sel(rows, 0, o), sel(vals, 0, o), sel(ck, 0, o)
    counts = torch.bincount(rows, minlength=R)
    rank_c = torch.arange(rows.numel(), device=dev) - sel(counts.cumsum(0) - counts, 0, rows)
    if empty:
        nb = torch.zeros_like(rows)
    else:  # (M,) buffer entries ahead of each candidate
        bk = (ordered_bits(buf_v) << 32) + (low - buf_c)  # (R, k), descending along each row
        nb = (sel(bk, 0, rows) > ck[:, None]).sum(1)
    K1 = k + 1  # column k of the (R, k + 1) results collects whatever falls out (ranks >= k)
    ahead = torch.bincount(rows * K1 + nb, minlength=R * K1).view(R, K1).cumsum(1)[:, :k]
    final_b = (torch.arange(k, device=dev) + ahead).clamp_(max=k)  # (R, k)
    flat_c = rows * K1 + (rank_c + nb).clamp_(max=k)  # (M,)
    g_new = sel(new_g, 0, pos)
    h_new = None if buf_h is None else sel(new_h, 0, pos)

    def place(buf, new):
        out = buf.new_empty(R, K1).scatter_(1, final_b, buf)
        out.view(-1).index_copy_(0, flat_c, new)  # repeated indices only in column k
        return out[:, :k].contiguous()

    return place(buf_v, vals + 0.0), place(buf_g, g_new), None if buf_h is None else place(buf_h, h_new)


BLOCK_ROWS = 8  # rows of the batch summarised by one block maximum when looking for candidates


def _candidates(new_v: torch.Tensor, floor: torch.Tensor, negate: bool, sparse_share: float,
                k_bound: int | None = None):
    """The entries of new_v (N, R) at or above their key's floor (R,) (at or below ``-floor`` if ``negate``):
    ``(pos, rows, vals)`` (M,) each, vals negated if ``negate``; None when they are more than
    ``sparse_share`` of the batch (then the dense merge is cheaper).

    The maximum (minimum) of every block of ``BLOCK_ROWS`` rows and key is compared first, one read of the
    batch; only the blocks that can hold a candidate are read again. Once the buffers fill, few blocks do, and
    the batch is never compared entry by entry nor a (N, R) mask written. ``k_bound=k`` (only for an empty
    buffer, where nothing can be dropped as a repeat): the k-th best block maximum of a key also bounds its
    batch's k-th best value from below (k blocks each hold a value at least that good), so the search starts
    there: about k candidates per key instead of the whole first batch.
    """
    N, R = new_v.shape
    limit = sparse_share * N * R
    nb = N // BLOCK_ROWS
    parts = []
    if nb:
        head = new_v[: nb * BLOCK_ROWS].view(nb, BLOCK_ROWS, R)
        parts.append(head.amin(1) if negate else head.amax(1))
    if N > nb * BLOCK_ROWS:
        tail = new_v[nb * BLOCK_ROWS:]
        parts.append(tail.amin(0, keepdim=True) if negate else tail.amax(0, keepdim=True))
    best = torch.cat(parts) if len(parts) > 1 else parts[0]  # (blocks, R)
    nan = torch.isnan(best)
    thr = -floor if negate else floor  # in new_v's own sign
    if k_bound is not None and best.shape[0] >= k_bound:
        # a block whose extreme is NaN proves nothing about its other values: it does not count here
        known = best.masked_fill(nan, float("inf") if negate else float("-inf"))
        kth = known.topk(k_bound, dim=0, largest=not negate).values[-1]
        thr = torch.minimum(thr, kth) if negate else torch.maximum(thr, kth)
    # ... but it may hide a candidate: it is always read
    hit = ((best <= thr) if negate else (best >= thr)) | nan
    blk, key = hit.nonzero(as_tuple=True)
    if blk.numel() * BLOCK_ROWS > N * R / 4:  # most blocks: compare the whole batch once instead
        mask = (new_v <= thr) if negate else (new_v >= thr)
        if int(mask.count_nonzero()) > limit:
            return None
        pos, rows = mask.nonzero(as_tuple=True)
        vals = new_v[pos, rows].float()
        return pos, rows, (-vals if negate else vals)
    r = blk[:, None] * BLOCK_ROWS + torch.arange(BLOCK_ROWS, device=new_v.device)  # (C, BLOCK_ROWS)
    inside = r < N
    flat = (r.clamp(max=N - 1) * R + key[:, None]).view(-1)
    cell = new_v.reshape(-1).index_select(0, flat).view(-1, BLOCK_ROWS)  # (C, BLOCK_ROWS)
    t = thr.index_select(0, key)[:, None]
    ok = ((cell <= t) if negate else (cell >= t)) & inside
    f = ok.view(-1).nonzero().squeeze(1)  # = ci * BLOCK_ROWS + j
    if f.numel() > limit:
        return None
    pos, rows = r.view(-1).index_select(0, f), key.index_select(0, f // BLOCK_ROWS)
    vals = cell.view(-1).index_select(0, f).float()
    return pos, rows, (-vals if negate else vals)


def merge_topk(buf_v: torch.Tensor, buf_g: torch.Tensor, new_v: torch.Tensor, new_g: torch.Tensor,
               k: int, negate: bool = False, sparse_share: float = 0.05, buf_h: torch.Tensor | None = None,
               new_h: torch.Tensor | None = None, window: tuple[int, int] | None = None):
    """The k largest of ``[buffer ; batch]`` for every key, ties to the earlier prefix (smaller g).

    buf_v (R, k) float32 sorted by (value desc, g asc); buf_g (R, k) int64 (-1 = empty);
    new_v (N, R): the batch's coefficients, one column per key (``-new_v`` is merged if ``negate``);
    new_g (N,) int64 ascending. Without ``window`` every id of the batch is larger than every id in the
    buffer; with ``window=(u0, stride)`` the batch belongs to the sort window of units ``u >= u0`` (positions
    ``< stride``) and only the buffer's entries older than the window must be older than the batch (see the
    module docstring).
    Only values above a key's current k-th value (its floor) can enter, or equal to it when the floor entry
    is a later prefix of the same window: one comparison of the batch against the floors finds them (NaN
    never enters; values at the floor are kept or dropped on the candidate list). When they are few (< ``sparse_share`` of the batch: the usual case once the buffers fill)
    they are merged by rank (:func:`_merge_sparse`), otherwise the batch is cut to its k best per key first.
    Both paths order by the composite key ``bits(v) * 2^32 + (2^32 - 1 - c)``, c the order code
    (:func:`order_codes`), unique per key, so the result is exact.
    With prefix hashes (buf_h (R, k), new_h (N,), the batch already free of repeats) a prefix whose hash is
    in a key's buffer is not added again, so each key keeps k distinct prefixes.
    Returns the new (buf_v, buf_g) or, with hashes, (buf_v, buf_g, buf_h).
    """
    floor = buf_v[:, -1]
    empty = bool((buf_g[:, 0] < 0).all())  # the first batch of a run: no entry to keep, none to repeat
    # values at or above the floor (those exactly at it are sorted out on the few candidates)
    found = _candidates(new_v, floor, negate, sparse_share, k_bound=k if empty else None)
    if found is None:  # the start of a run, or ties at the floor everywhere (ReLU zeros): cut the batch to k
        buf_c, new_c = order_codes(buf_g, new_g, k, window)
        out = _merge_dense(buf_v, buf_g, buf_h, -new_v if negate else new_v, new_g, new_h, k, buf_c, new_c,
                           strict=window is None)
        return out if buf_h is not None else out[:2]
    pos, rows, vals = found
    R = buf_v.shape[0]
    keys, rows = torch.unique(rows, return_inverse=True)  # only the keys with candidates are rewritten
    part = keys.numel() < R
    bv, bg = (buf_v.index_select(0, keys), buf_g.index_select(0, keys)) if part else (buf_v, buf_g)
    bh = None if buf_h is None else (buf_h.index_select(0, keys) if part else buf_h)
    buf_c, new_c = order_codes(bg, new_g, k, window)
    at = vals == bv[:, -1].index_select(0, rows)
    if bool(at.any()):
        enters = ~at
        if window is not None:
            # ... at the floor: enters when the floor entry is a later prefix of this window
            u0, _ = window
            floor_g = bg[:, -1]
            tie = (floor_g >= (u0 << POSITION_BITS)) & (floor_g > new_g.min())
            enters |= tie.index_select(0, rows) & (new_c.index_select(0, pos) < buf_c[:, -1].index_select(0, rows))
        e = enters.nonzero().squeeze(1)
        pos, rows, vals = pos.index_select(0, e), rows.index_select(0, e), vals.index_select(0, e)
    if rows.numel() == 0:
        return (buf_v, buf_g, buf_h) if buf_h is not None else (buf_v, buf_g)
    out = _merge_sparse(bv, bg, bh, pos, rows, vals, new_g, new_h, k, buf_c, new_c, empty=empty)
    if part:
        out = (buf_v.index_copy(0, keys, out[0]), buf_g.index_copy(0, keys, out[1]),
               None if buf_h is None else buf_h.index_copy(0, keys, out[2]))
    return out if buf_h is not None else out[:2]


def prefix_hashes(tokens) -> np.ndarray:
    """A 64-bit hash of every prefix ``tokens[:t+1]`` of a unit, (T,) int64.

    ``h_t = sum_{j<=t} mix(token_j, j)`` (mod 2^64), mix a SplitMix64 finalizer: equal prefixes get equal
    hashes in any unit; different ones collide with probability about 2^-64.
    """
    with np.errstate(over="ignore"):
        t = np.asarray(tokens, dtype=np.uint64)
        x = t * np.uint64(0x9E3779B97F4A7C15) + np.arange(t.size, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93) \
            + np.uint64(1)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        return np.cumsum(x, dtype=np.uint64).view(np.int64)


def first_occurrences(h: torch.Tensor) -> torch.Tensor:
    """(N,) bool: True where ``h[i]`` does not occur in ``h[:i]``."""
    uniq, inv = torch.unique(h, return_inverse=True)
    n = torch.arange(h.numel(), device=h.device)
    first = torch.full((uniq.numel(),), h.numel(), device=h.device, dtype=torch.long).scatter_reduce(
        0, inv, n, reduce="amin")
    return first[inv] == n


class TriggerBuffers:
    """Running top-k and bottom-k of every key of every layer: tensors of shape (L * d_ffn, k).

    The bottom buffer holds ``-m`` so that one merge serves both. With ``dedup`` each entry also keeps its
    prefix hash, and a prefix seen again (the same token sequence) does not take a second slot.
    """

    NAMES = ("top_v", "top_g", "bot_v", "bot_g")

    def __init__(self, n_layers: int, d_ffn: int, k: int, device="cpu", dedup: bool = False):
        self.n_layers, self.d_ffn, self.k, self.dedup = n_layers, d_ffn, k, dedup
        rows = n_layers * d_ffn
        self.top_v = torch.full((rows, k), float("-inf"), device=device)
        self.top_g = torch.full((rows, k), -1, dtype=torch.int64, device=device)
        self.bot_v = self.top_v.clone()
        self.bot_g = self.top_g.clone()
        self.top_h = self.top_g.clone() if dedup else None
        self.bot_h = self.top_g.clone() if dedup else None

    @property
    def device(self) -> torch.device:
        return self.top_v.device

    def update(self, coef: torch.Tensor, gids: torch.Tensor, layer: int | None = None,
               hashes: torch.Tensor | None = None, window: tuple[int, int] | None = None):
        """Absorb one batch. coef: (N, d_ffn) coefficients of one layer's keys (or (N, L * d_ffn) for all
        layers when ``layer`` is None) at N prefixes; gids: (N,) ascending; hashes: (N,) prefix hashes,
        free of repeats (required with dedup); ``window``: the batch's sort window (:func:`merge_topk`)."""
        if coef.shape[0] == 0:
            return
        rows = slice(None) if layer is None else slice(MemoryId(layer, 0).flat(self.d_ffn),
                                                        MemoryId(layer + 1, 0).flat(self.d_ffn))
        for kind, negate in (("top", False), ("bot", True)):
            v, g, h = getattr(self, kind + "_v"), getattr(self, kind + "_g"), getattr(self, kind + "_h")
            out = merge_topk(v[rows], g[rows], coef, gids, self.k, negate=negate,
                             buf_h=None if h is None else h[rows], new_h=hashes if self.dedup else None,
                             window=window)
            v[rows], g[rows] = out[0], out[1]
            if h is not None:
                h[rows] = out[2]

    def state(self) -> dict:
        names = self.NAMES + (("top_h", "bot_h") if self.dedup else ())
        return {n: getattr(self, n) for n in names}

    def load(self, tensors: dict):
        for name in self.NAMES + (("top_h", "bot_h") if self.dedup else ()):
            t = tensors.get(name)
            if t is None or t.shape != self.top_v.shape:
                raise FfkvError(f"checkpoint buffer {name} is missing or has the wrong shape",
                                "delete the atlas folder and mine again")
            setattr(self, name, t.to(self.top_v.device))


class GroupBuffers:
    """Running top-k / bottom-k of several groups of keys of different widths (an MoE model's experts).

    ``groups[j]`` is a one-layer :class:`TriggerBuffers` of ``widths[j]`` keys; each group absorbs only its own
    candidates (an expert's: the prefixes routed to it), so a group may hold fewer than k entries (g = -1).
    """

    def __init__(self, widths, k: int, device="cpu", dedup: bool = False):
        self.k, self.dedup = k, dedup
        self.groups = [TriggerBuffers(1, int(w), k, device, dedup=dedup) for w in widths]

    @property
    def device(self) -> torch.device:
        return self.groups[0].device

    def update(self, group: int, coef: torch.Tensor, gids: torch.Tensor, hashes: torch.Tensor | None = None,
               window: tuple[int, int] | None = None):
        """Absorb one batch of group ``group``: coef (n, width) at prefixes gids (n,) ascending."""
        self.groups[group].update(coef, gids, layer=0, hashes=hashes, window=window)

    def state(self) -> dict:
        return {f"{j}.{name}": t for j, b in enumerate(self.groups) for name, t in b.state().items()}

    def load(self, tensors: dict):
        for j, b in enumerate(self.groups):
            b.load({name[len(f"{j}."):]: t for name, t in tensors.items() if name.startswith(f"{j}.")})
