"""Trigger examples (Geva et al. 2021, section 3): the top-k and bottom-k prefixes of every key, in one pass.

For every layer l, key i and prefix x (a unit up to position t), the memory coefficient is ``m_i^l(x)``.
Mining keeps, for all keys of all layers at once, the k prefixes with the largest coefficient and the k
with the smallest (gated and GELU coefficients are signed). One forward pass reads the coefficients of
every layer (the ``coef`` site), and a running top-k buffer of shape (L * d_ffn, k) absorbs each batch:

    buffer <- top_k( [buffer ; batch] )      per key, over the concatenation (k + N candidates)

Ties are broken by the global prefix id ``g = unit * 2^20 + t`` (earlier prefixes first), which makes the
result a pure function of the corpus: batching, checkpoints and resumes do not change it, and it equals a
brute-force sort of all prefixes by ``(coefficient desc, g asc)``. The tie-break costs nothing: buffer
entries always precede the batch in the stream, so a composite integer key (order-preserving bits of the
coefficient, then the candidate's column) sorts by exactly that order in one ``topk``.

A run writes ``DIR/state/`` (buffers + the units read so far) every ``checkpoint_every`` batches, atomically;
running it again resumes after the last checkpoint. The finished atlas has ``DIR/atlas.json``,
``DIR/triggers/layer-LLL.parquet`` and ``DIR/units.parquet`` (the token ids of every unit a trigger cites).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import FfkvError
from ..io import load_safetensors, provenance, read_json, save_safetensors, write_json, write_parquet
from .corpus import CorpusSpec, Unit, corpus_files, corpus_fingerprint, iter_units

POSITION_BITS = 20  # global prefix id g = unit << 20 | position
ATLAS_VERSION = 1


# --------------------------------------------------------------------------------------------- top-k merge
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


def batch_topk(new_v: torch.Tensor, k: int, floor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best prefixes of a batch for every key by (value desc, position asc): values and positions (R, k).

    new_v: (N, R) cleaned float32, one column per key. A float ``topk(k + 1)`` finds them unless the k-th
    and (k+1)-th values tie; only keys with such a tie whose tied value can still enter the buffer (above
    ``floor``, the buffer's k-th value) are redone with the exact composite key
    ``bits(v) * 2^32 + (2^32 - 1 - position)`` (ReLU zeros are the usual ties).
    """
    N, R = new_v.shape
    if N <= k:
        return new_v.T, torch.arange(N, device=new_v.device).expand(R, N)
    top = new_v.topk(k + 1, dim=0, sorted=True)
    vals, cols = top.values[:k].T, top.indices[:k].T
    tie = top.values[k - 1] == top.values[k]
    if floor is not None:
        tie &= top.values[k - 1] > floor
    rows = tie.nonzero().squeeze(1)
    if rows.numel():
        sub = new_v.index_select(1, rows).T
        col = torch.arange(N, device=new_v.device, dtype=torch.int64)
        exact = ((ordered_bits(sub) << 32) + ((1 << 32) - 1 - col)).topk(k, dim=1, sorted=True).indices
        cols = cols.index_copy(0, rows, exact)
        vals = vals.index_copy(0, rows, sub.gather(1, exact))
    return vals, cols


def _merge_dense(buf_v, buf_g, buf_h, new_v, new_g, new_h, k):
    """Merge when many prefixes can enter (the start of a run): per-key top-k of the batch, then 2k.

    A batch candidate whose prefix hash is already in the key's buffer is dropped (set to -inf: it can
    then only fill a slot after every empty buffer slot, i.e. never)."""
    new_v = _clean(new_v)
    vals, cols = batch_topk(new_v, k, floor=buf_v[:, -1])
    if buf_h is not None:
        dup = (new_h[cols][:, :, None] == buf_h[:, None, :]).any(2)
        vals = vals.masked_fill(dup, float("-inf"))
    cat = torch.cat([buf_v, vals], dim=1)
    order = torch.cat([torch.arange(k, device=cat.device).expand(cat.shape[0], k), k + cols], dim=1)
    key = (ordered_bits(cat) << 32) + ((1 << 32) - 1 - order)
    idx = key.topk(k, dim=1, sorted=True).indices
    v = cat.gather(1, idx)
    in_buf = idx < k
    bi = idx.clamp(max=k - 1)
    nj = cols.gather(1, (idx - k).clamp(min=0, max=cols.shape[1] - 1))
    g = torch.where(in_buf, buf_g.gather(1, bi), new_g[nj])
    h = None if buf_h is None else torch.where(in_buf, buf_h.gather(1, bi), new_h[nj])
    return v, g, h


def _merge_sparse(buf_v, buf_g, buf_h, pos, rows, vals, new_g, new_h, k):
    """Merge a few candidates (key ``rows[j]`` at batch position ``pos[j]``, value ``vals[j]``).

    All buffer entries and candidates are sorted once by the composite key, then stably by key row; the
    first k of each row are the new buffer. Cost O((R k + M) log), independent of the batch size.
    """
    if buf_h is not None:  # a prefix already in the key's buffer does not enter twice
        fresh = ~(buf_h[rows] == new_h[pos][:, None]).any(1)
        pos, rows, vals = pos[fresh], rows[fresh], vals[fresh]
        if rows.numel() == 0:
            return buf_v, buf_g, buf_h
    R = buf_v.shape[0]
    dev = buf_v.device
    all_rows = torch.cat([torch.arange(R, device=dev).repeat_interleave(k), rows])
    all_v = torch.cat([buf_v.reshape(-1), vals + 0.0])
    order = torch.cat([torch.arange(k, device=dev).repeat(R), k + pos])
    key = (ordered_bits(all_v) << 32) + ((1 << 32) - 1 - order)
    by_key = key.argsort(descending=True)
    perm = by_key[all_rows[by_key].argsort(stable=True)]
    counts = k + torch.bincount(rows, minlength=R)
    start = counts.cumsum(0) - counts
    take = perm[start[:, None] + torch.arange(k, device=dev)]
    all_g = torch.cat([buf_g.reshape(-1), new_g[pos]])
    h = None if buf_h is None else torch.cat([buf_h.reshape(-1), new_h[pos]])[take]
    return all_v[take], all_g[take], h


def merge_topk(buf_v: torch.Tensor, buf_g: torch.Tensor, new_v: torch.Tensor, new_g: torch.Tensor,
               k: int, negate: bool = False, sparse_share: float = 0.05, buf_h: torch.Tensor | None = None,
               new_h: torch.Tensor | None = None, col_best: torch.Tensor | None = None):
    """The k largest of ``[buffer ; batch]`` for every key, ties to the earlier prefix.

    buf_v (R, k) float32 sorted by (value desc, g asc); buf_g (R, k) int64 (-1 = empty);
    new_v (N, R): the batch's coefficients, one column per key (``-new_v`` is merged if ``negate``);
    new_g (N,) int64, ascending and larger than every id in the buffer.
    Only values above a key's current k-th value (its floor) can enter: equal ones lose the tie to the
    older prefix. Keys whose batch maximum (``col_best``, computed if not given) is not above their floor
    are skipped without touching the batch again. Among the others, when the candidates are few
    (< ``sparse_share`` of the block: the usual case once the buffers fill) they are merged sparsely,
    otherwise the batch is cut to its k best per key first. Both paths order by the composite key
    ``bits(v) * 2^32 + (2^32 - 1 - c)``, c = stream order (buffer columns first, then k + batch position),
    unique per key, so the result is exact.
    With prefix hashes (buf_h (R, k), new_h (N,), the batch already free of repeats) a prefix whose hash is
    in a key's buffer is not added again, so each key keeps k distinct prefixes.
    Returns the new (buf_v, buf_g) or, with hashes, (buf_v, buf_g, buf_h).
    """
    R = buf_v.shape[0]
    if col_best is None:
        col_best = (-new_v).amax(0) if negate else new_v.amax(0)
    col_best = torch.nan_to_num(col_best.float(), nan=float("inf"))  # a NaN column takes the exact path
    keys = (col_best > buf_v[:, -1]).nonzero().squeeze(1)
    if keys.numel() == 0:
        return (buf_v, buf_g, buf_h) if buf_h is not None else (buf_v, buf_g)
    if keys.numel() == R:
        sub_v, bv, bg, bh = new_v, buf_v, buf_g, buf_h
    else:
        sub_v = new_v.index_select(1, keys)
        bv, bg = buf_v.index_select(0, keys), buf_g.index_select(0, keys)
        bh = None if buf_h is None else buf_h.index_select(0, keys)
    floor = bv[:, -1]
    mask = (sub_v < -floor) if negate else (sub_v > floor)
    pos, rows = mask.nonzero(as_tuple=True)
    if pos.numel() <= sparse_share * mask.numel():
        vals = sub_v[pos, rows].float()
        out = _merge_sparse(bv, bg, bh, pos, rows, -vals if negate else vals, new_g, new_h, k)
    else:
        out = _merge_dense(bv, bg, bh, -sub_v if negate else sub_v, new_g, new_h, k)
    if keys.numel() != R:
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

    def update(self, coef: torch.Tensor, gids: torch.Tensor, layer: int | None = None,
               hashes: torch.Tensor | None = None):
        """Absorb one batch. coef: (N, d_ffn) coefficients of one layer's keys (or (N, L * d_ffn) for all
        layers when ``layer`` is None) at N prefixes; gids: (N,) ascending; hashes: (N,) prefix hashes,
        free of repeats (required with dedup)."""
        if coef.shape[0] == 0:
            return
        rows = slice(None) if layer is None else slice(layer * self.d_ffn, (layer + 1) * self.d_ffn)
        hi, lo = coef.amax(0), coef.amin(0)  # (aminmax along dim 0 is 10x slower on CPU)
        for kind, negate, best in (("top", False, hi), ("bot", True, -lo)):
            v, g, h = getattr(self, kind + "_v"), getattr(self, kind + "_g"), getattr(self, kind + "_h")
            out = merge_topk(v[rows], g[rows], coef, gids, self.k, negate=negate, col_best=best,
                             buf_h=None if h is None else h[rows], new_h=hashes if self.dedup else None)
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


# --------------------------------------------------------------------------------------------- batches
def batches(units, batch_tokens: int, max_len: int):
    """Consecutive units grouped so that ``len(batch) * longest <= max(batch_tokens, max_len)``."""
    batch: list[Unit] = []
    longest = 0
    for u in units:
        new_longest = max(longest, len(u.tokens))
        if batch and (len(batch) + 1) * new_longest > max(batch_tokens, max_len):
            yield batch
            batch, new_longest = [], len(u.tokens)
        batch.append(u)
        longest = new_longest
    if batch:
        yield batch


def encode_units(units: list[Unit], pad_id: int, device, hashes: bool = False):
    """Right-padded ``input_ids`` and ``attention_mask`` (B, T) of a batch of units (and, with ``hashes``,
    the (B, T) int64 prefix hashes, 0 at padding)."""
    T = max(len(u.tokens) for u in units)
    ids = torch.full((len(units), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(units), T), dtype=torch.long)
    hs = np.zeros((len(units), T), np.int64) if hashes else None
    for b, u in enumerate(units):
        ids[b, : len(u.tokens)] = torch.tensor(u.tokens)
        mask[b, : len(u.tokens)] = 1
        if hashes:
            hs[b, : len(u.tokens)] = prefix_hashes(u.tokens)
    if hashes:
        return ids.to(device), mask.to(device), torch.from_numpy(hs).to(device)
    return ids.to(device), mask.to(device)


def forward_module(model):
    """The transformer body without the LM head (mining needs no logits); the full model if unknown."""
    base = getattr(model.hf, "base_model", None)
    return base if isinstance(base, torch.nn.Module) and base is not model.hf else model.hf


@contextlib.contextmanager
def coefficient_reader(model, layers: list[int]):
    """Record the coefficients m (the input of W_out, the ``coef`` site of :func:`ffkv.models.hooks.intervene`)
    of ``layers`` during a forward pass: yields a dict ``layer -> (B, T, d_ffn)``.

    The same modules as the ``coef`` site, read without the copy ``intervene`` makes for sites that may be
    edited in place downstream (W_out's input is only read by W_out), which saves one pass over every
    coefficient. Hooks are removed on exit.
    """
    rec: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(layer):
        def pre_hook(module, args, kwargs):
            rec[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
        return pre_hook

    try:
        for l in layers:
            handles.append(model.module(l, model.spec.value).register_forward_pre_hook(hook_for(l), with_kwargs=True))
        yield rec
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def batch_coefficients(model, ids: torch.Tensor, mask: torch.Tensor, unit_ids: torch.Tensor,
                       layers: list[int] | None = None, hashes: torch.Tensor | None = None):
    """Coefficients of every real position of a batch, all layers, in one forward pass.

    ids, mask: (B, T); unit_ids: (B,). Returns one (N, d_ffn) tensor per layer (column i: key i) over the
    N real positions, and gids (N,) = ``unit << 20 | t``, ascending. With ``hashes`` (B, T), positions
    whose prefix already occurred earlier in the batch are left out, and their hashes (N,) are returned
    third.
    """
    layers = list(range(model.n_layers)) if layers is None else layers
    with coefficient_reader(model, layers) as rec:
        forward_module(model)(input_ids=ids, attention_mask=mask)
    B, T = ids.shape
    sel = mask.reshape(-1).nonzero().squeeze(1)
    if hashes is not None:
        h = hashes.reshape(-1).index_select(0, sel)
        fresh = first_occurrences(h)
        sel, h = sel[fresh], h[fresh]
    coefs = [rec[l].reshape(B * T, -1).index_select(0, sel) for l in layers]  # (N, d) each
    pos = torch.arange(T, device=ids.device).expand(B, T)
    gids = ((unit_ids.to(ids.device)[:, None] << POSITION_BITS) + pos).reshape(-1).index_select(0, sel)
    return (coefs, gids) if hashes is None else (coefs, gids, h)


# --------------------------------------------------------------------------------------------- the run
def _hyper(spec: CorpusSpec, top_k: int, dedup: bool) -> dict:
    return {"corpus": str(Path(spec.path).resolve()), "split": spec.split, "window": spec.window,
            "min_tokens": spec.min_tokens, "text_field": spec.text_field, "max_units": spec.max_units,
            "docs": spec.docs, "top_k": top_k, "dedup": dedup}


def _units_table(units: list[Unit]) -> dict:
    import pyarrow as pa

    return {"unit": pa.array([u.unit for u in units], pa.int64()),
            "doc": pa.array([u.doc for u in units], pa.int64()),
            "source": pa.array([u.source for u in units], pa.string()),
            "tokens": pa.array([u.tokens for u in units], pa.list_(pa.int32())),
            "next_id": pa.array([u.next_id for u in units], pa.int64())}


def mine(model, corpus: str | Path | CorpusSpec, out: str | Path, top_k: int = 25, batch_tokens: int = 2048,
         checkpoint_every: int = 200, progress: bool = True, max_batches: int | None = None,
         device_buffers: bool = True, dedup: bool = True, **corpus_options) -> dict:
    """Mine the top-k / bottom-k trigger prefixes of every key of ``model`` over ``corpus`` into ``out``.

    corpus: a path (file or folder) or a :class:`CorpusSpec`; ``corpus_options`` (split, window,
    min_tokens, text_field, max_units) build the spec from a path. Running again on the same ``out``
    resumes after the last checkpoint (and returns at once if the atlas is complete); a different model,
    corpus or top_k is refused. ``max_batches`` stops after that many batches of this call, leaving a
    checkpoint (for tests of resuming). ``dedup`` (default): a prefix that occurs several times in the
    corpus (the same token sequence from the start of its unit) counts once, at its first occurrence, so a
    key's k triggers are k different prefixes. Returns the atlas metadata (``atlas.json``).
    """
    spec = corpus if isinstance(corpus, CorpusSpec) else CorpusSpec(str(corpus), **corpus_options)
    if top_k < 1:
        raise FfkvError(f"top_k must be at least 1, got {top_k}", "pass --top-k 25")
    if spec.window >= 1 << POSITION_BITS:
        raise FfkvError(f"window {spec.window} is too long", f"use at most {(1 << POSITION_BITS) - 1} tokens")
    n_pos = max_positions(model)
    if n_pos is not None and spec.window > n_pos:
        raise FfkvError(f"window {spec.window} is longer than the model's context ({n_pos} positions)",
                        f"pass --window {n_pos} or less")
    files = corpus_files(spec.path)
    out = Path(out)
    state_dir = out / "state"
    hyper = _hyper(spec, top_k, dedup)
    identity = model.identity
    meta_path = out / "atlas.json"
    fingerprint = corpus_fingerprint(files)
    tok = model._require_tokenizer()
    if next(iter_units(tok, spec, files), None) is None:  # before anything is written
        raise FfkvError(f"corpus '{spec.path}' yields no units of at least {spec.min_tokens} tokens",
                        "pass a corpus with text in it (or lower --min-tokens)")
    if meta_path.exists():
        meta = read_json(meta_path)
        _check_same_run(meta, identity, hyper, fingerprint, out)
        if meta.get("status") == "complete":
            return meta
    else:
        if out.exists() and any(out.iterdir()):
            raise FfkvError(f"output folder '{out}' exists and is not an atlas", "pass a new or empty --out folder")
        meta = {"atlas_version": ATLAS_VERSION, "status": "mining", "model_path": _model_path(model),
                "corpus_fingerprint": fingerprint, **provenance(identity, **hyper)}
        write_json(meta_path, meta)

    buffers = TriggerBuffers(model.n_layers, model.d_ffn, top_k, model.device if device_buffers else "cpu",
                             dedup=dedup)
    done = {"units": 0, "tokens": 0, "batches": 0, "shards": []}
    ckpt = state_dir / "state.safetensors"
    if ckpt.exists():
        tensors, done = load_safetensors(ckpt)
        buffers.load(tensors)
        _drop_orphan_shards(state_dir, done["shards"])

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    stream = (u for u in iter_units(tok, spec, files) if u.unit >= done["units"])
    pending: list[Unit] = []
    bar = _progress(progress, done["tokens"])
    t0, tokens_this_call, n_batches = time.perf_counter(), 0, 0
    finished = True
    try:
        for batch in batches(stream, batch_tokens, spec.window):
            ids, mask, hashes = encode_units(batch, pad_id, model.device, hashes=True)
            unit_ids = torch.tensor([u.unit for u in batch], dtype=torch.long)
            coefs, gids, hashes = batch_coefficients(model, ids, mask, unit_ids, hashes=hashes if dedup else None) \
                if dedup else (*batch_coefficients(model, ids, mask, unit_ids), None)
            dev = buffers.top_v.device
            for l, c in enumerate(coefs):
                buffers.update(c.to(dev), gids.to(dev), layer=l, hashes=None if hashes is None else hashes.to(dev))
            pending.extend(batch)
            n_tok = int(mask.sum())
            done["units"], done["tokens"], done["batches"] = batch[-1].unit + 1, done["tokens"] + n_tok, \
                done["batches"] + 1
            tokens_this_call += n_tok
            n_batches += 1
            if bar is not None:
                bar.update(n_tok)
            if done["batches"] % checkpoint_every == 0:
                done = _checkpoint(state_dir, buffers, pending, done)
                pending = []
            if max_batches is not None and n_batches >= max_batches:
                finished = False
                break
    finally:
        if bar is not None:
            bar.close()
    if pending or not finished:
        done = _checkpoint(state_dir, buffers, pending, done)
    if not finished:
        return {**meta, "status": "partial", "units": done["units"], "tokens": done["tokens"]}
    elapsed = time.perf_counter() - t0
    return _finalize(model, out, buffers, done, meta, tokens_this_call / max(elapsed, 1e-9))


def max_positions(model) -> int | None:
    """The longest input the model takes (absolute position tables), or None if unbounded."""
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(model.config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _model_path(model) -> str:
    p = Path(str(model.name_or_path))
    return str(p.resolve()) if p.exists() else str(model.name_or_path)


def _check_same_run(meta: dict, identity: dict, hyper: dict, fingerprint: str, out: Path):
    old_h = meta.get("hyperparameters", {})
    diffs = [k for k in hyper if old_h.get(k) != hyper[k]]
    if meta.get("model", {}).get("fingerprint") != identity["fingerprint"]:
        diffs.append("model")
    if meta.get("corpus_fingerprint") != fingerprint:
        diffs.append("corpus files")
    if diffs:
        raise FfkvError(f"atlas '{out}' was mined with a different {', '.join(diffs)}",
                        "use the same model, corpus and options to resume, or a new --out folder")


def _progress(enabled: bool, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=None, initial=initial, unit="tok", unit_scale=True, desc="mining", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


def _checkpoint(state_dir: Path, buffers: TriggerBuffers, pending: list[Unit], done: dict):
    """Write the units read since the last checkpoint, then the buffers (the commit point)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    done = dict(done)
    if pending:
        name = f"units-{pending[0].unit:012d}.parquet"
        write_parquet(state_dir / name, _units_table(pending))
        done["shards"] = list(done["shards"]) + [name]
    save_safetensors(state_dir / "state.safetensors", buffers.state(), meta=done)
    return done


def _drop_orphan_shards(state_dir: Path, shards: list[str]):
    """Unit shards written after the last committed checkpoint (a kill between the two writes)."""
    for f in state_dir.glob("units-*.parquet"):
        if f.name not in shards:
            f.unlink()


def _finalize(model, out: Path, buffers: TriggerBuffers, done: dict, meta: dict, tok_per_s: float) -> dict:
    """Write ``triggers/layer-LLL.parquet`` and ``units.parquet``; mark the atlas complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    L, d, k = buffers.n_layers, buffers.d_ffn, buffers.k
    prov = {k2: meta[k2] for k2 in ("ffkv_version", "created", "model", "hyperparameters")}
    cited = set()
    for l in range(L):
        cols = {}
        for kind, v, g, sign in (("top", buffers.top_v, buffers.top_g, 1.0),
                                 ("bottom", buffers.bot_v, buffers.bot_g, -1.0)):
            vv = (v[l * d:(l + 1) * d] * sign).cpu().numpy()
            gg = g[l * d:(l + 1) * d].cpu().numpy()
            idx, rank = np.nonzero(gg >= 0)
            cols.setdefault("index", []).append(idx.astype(np.int32))
            cols.setdefault("kind", []).append(np.full(idx.size, kind))
            cols.setdefault("rank", []).append(rank.astype(np.int16))
            cols.setdefault("coef", []).append(vv[idx, rank].astype(np.float32))
            gid = gg[idx, rank]
            cols.setdefault("unit", []).append(gid >> POSITION_BITS)
            cols.setdefault("position", []).append((gid & ((1 << POSITION_BITS) - 1)).astype(np.int32))
            cited.update(np.unique(gid >> POSITION_BITS).tolist())
        table = {c: np.concatenate(parts) for c, parts in cols.items()}
        write_parquet(out / "triggers" / f"layer-{l:03d}.parquet", table, meta={**prov, "layer": l})
    state_dir = out / "state"
    shards = [pq.read_table(state_dir / s) for s in done["shards"]]
    units = pa.concat_tables(shards) if shards else pa.table(_units_table([]))
    keep = pa.array(sorted(cited), pa.int64())
    import pyarrow.compute as pc

    units = units.filter(pc.is_in(units["unit"], value_set=keep))
    write_parquet(out / "units.parquet", units, meta=prov)
    meta = {**meta, "status": "complete", "units": done["units"], "tokens": done["tokens"],
            "batches": done["batches"], "n_layers": L, "d_ffn": d, "top_k": k,
            "tokens_per_second_last_call": round(tok_per_s, 1)}
    write_json(out / "atlas.json", meta)
    shutil.rmtree(state_dir, ignore_errors=True)
    return meta


# --------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def brute_force_triggers(model, units: list[Unit], top_k: int, batch_tokens: int = 2048, dedup: bool = True) -> dict:
    """Reference: all coefficients of all prefixes kept, then a full sort per key (small corpora only).

    With ``dedup`` only the first occurrence of each distinct prefix (token sequence) takes part.
    Returns {layer: {"top": (d_ffn, k) gids, "bottom": ..., "top_coef": ..., "bottom_coef": ...}} with
    the order (coefficient desc, g asc) for top and (coefficient asc, g asc) for bottom.
    """
    tok = model._require_tokenizer()
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
                c = C[l * d + i]
                order = np.lexsort((G, sgn * c))[:top_k]
                rows_g.append(G[order])
                rows_c.append(c[order])
            res[kind], res[kind + "_coef"] = np.stack(rows_g), np.stack(rows_c)
        out[l] = res
    return out


# --------------------------------------------------------------------------------------------- merging
def merge_atlases(parts: list[str | Path], out: str | Path) -> dict:
    """Merge atlases mined with the same model and top_k on different corpora (e.g. shards of a corpus
    mined on different machines) into one: per key, the top-k / bottom-k of the union.

    Units are renumbered (part p's units are offset by the units of parts 0..p-1), so ties go to the earlier
    part, then the earlier prefix: merging the atlases of consecutive shards of a corpus gives the atlas of
    the whole corpus.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .atlas import Atlas

    atlases = [Atlas(p, model=False) for p in parts]
    if len(atlases) < 2:
        raise FfkvError("merging needs at least two atlases", "pass two or more atlas folders")
    first = atlases[0]
    for a in atlases[1:]:
        if a.meta["model"].get("fingerprint") != first.meta["model"].get("fingerprint") or a.top_k != first.top_k:
            raise FfkvError(f"atlas '{a.path}' was mined with another model or top_k than '{first.path}'",
                            "merge atlases of one model with the same --top-k")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FfkvError(f"output folder '{out}' exists and is not empty", "pass a new --out folder")
    k = first.top_k
    offsets = np.cumsum([0] + [int(a.meta["units"]) for a in atlases[:-1]])
    prov = {key: first.meta[key] for key in ("ffkv_version", "created", "model", "hyperparameters")}
    prov["hyperparameters"] = {**prov["hyperparameters"], "corpus": [a.meta["hyperparameters"]["corpus"]
                                                                      for a in atlases]}
    dedup = bool(first.meta["hyperparameters"].get("dedup", False))
    all_units = pa.concat_tables([_offset_units(pq.read_table(a.path / "units.parquet"), off)
                                  for a, off in zip(atlases, offsets)])
    unit_tokens = dict(zip(all_units["unit"].to_pylist(), all_units["tokens"].to_pylist()))
    cache: dict = {}

    def hashes(u, p_):
        if u not in cache:
            cache[u] = prefix_hashes(unit_tokens[u])
        return cache[u][p_]

    for l in range(first.n_layers):
        t = pa.concat_tables([_offset_units(a.triggers(l), off) for a, off in zip(atlases, offsets)]).to_pydict()
        idx, kind = np.asarray(t["index"]), np.asarray(t["kind"])
        coef, unit, pos = np.asarray(t["coef"], np.float64) + 0.0, np.asarray(t["unit"]), np.asarray(t["position"])
        is_top = kind == "top"
        signed = np.where(is_top, -coef, coef)  # ascending sort = best first for both kinds
        order = np.lexsort((pos, unit, signed, idx, ~is_top))  # rows as mine() writes them
        idx_s, top_s = idx[order], is_top[order]
        group_start = np.r_[True, (idx_s[1:] != idx_s[:-1]) | (top_s[1:] != top_s[:-1])]
        gid = np.cumsum(group_start) - 1
        if dedup:  # the same prefix from two parts: keep its first occurrence in each key's list
            h = np.array([hashes(u, p_) for u, p_ in zip(unit[order], pos[order])], np.int64)
            _, firsts = np.unique(np.stack([gid, h], 1), axis=0, return_index=True)
            firsts = np.sort(firsts)
            order, gid = order[firsts], gid[firsts]
            group_start = np.r_[True, gid[1:] != gid[:-1]]
        starts = np.flatnonzero(group_start)
        rank = np.arange(order.size) - starts[gid]
        keep = order[rank < k]
        table = {"index": idx[keep].astype(np.int32), "kind": kind[keep], "rank": rank[rank < k].astype(np.int16),
                 "coef": coef[keep].astype(np.float32), "unit": unit[keep], "position": pos[keep].astype(np.int32)}
        write_parquet(out / "triggers" / f"layer-{l:03d}.parquet", table, meta={**prov, "layer": l})
    write_parquet(out / "units.parquet", all_units, meta=prov)
    meta = {**first.meta, **prov, "status": "complete", "units": int(sum(a.meta["units"] for a in atlases)),
            "tokens": int(sum(a.meta["tokens"] for a in atlases)), "merged_from": [str(a.path) for a in atlases]}
    write_json(out / "atlas.json", meta)
    return meta


def _offset_units(table, offset: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    i = table.schema.get_field_index("unit")
    return table.set_column(i, "unit", pc.add(table["unit"], pa.scalar(int(offset), pa.int64())))
