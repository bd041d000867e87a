"""Trigger mining (Geva et al. 2021, section 3), the resumable run: the top-k and bottom-k prefixes of every key.

For every layer l, key i and prefix x (a unit up to position t), the memory coefficient is ``m_i^l(x)``.
Mining keeps, for all keys of all layers at once, the k prefixes with the largest coefficient and the k
with the smallest (gated and GELU coefficients are signed). One forward pass per batch reads the coefficients
of every layer (:func:`ffkv.models.engine.capture_coefficients`: no head, no copies), and the running buffers
of :mod:`ffkv.memory.topk`, shape (L * d_ffn, k), absorb them.

Prefixes are identified by the global prefix id ``g = unit * 2^20 + t``; ties go to the smaller g, which makes
the result a pure function of the corpus: batching, checkpoints and resumes do not change it, and it equals
the brute-force sort of :mod:`ffkv.memory.oracle`.

A run writes ``DIR/state/`` (buffers + the units read so far) every ``checkpoint_every`` batches, atomically;
running it again resumes after the last checkpoint. The finished atlas has ``DIR/atlas.json``,
``DIR/triggers/layer-LLL.parquet`` and ``DIR/units.parquet`` (the token ids of every unit a trigger cites).
Atlases of corpus shards are merged by :mod:`ffkv.memory.merge`.

Mixture-of-experts models (:class:`ffkv.models.moe.MoEModel`) are mined per expert: each (layer, expert) is a
group of ``d_expert`` keys whose candidates are only the prefixes *routed* to that expert (an unrouted
prefix's coefficient is not active, so it never enters the top-k, not even as 0), read by
:func:`ffkv.models.moe.expert_intervene` in the same forward pass as the dense coefficients of the other
groups (a shared expert, a layer without experts). Their triggers go to
``DIR/triggers/layer-LLL-expert-EEE.parquet``; ``atlas.json`` lists the groups (:func:`mining_groups`).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from ..errors import FfkvError
from ..io import load_safetensors, provenance, read_json, save_safetensors, write_json, write_parquet
from ..models.engine import capture_coefficients, run
from ..models.memory_id import MemoryId
from ..models.moe import MoEModel, expert_intervene
from .corpus import Corpus, CorpusSpec, Unit, iter_units, open_corpus
from .topk import GroupBuffers, TriggerBuffers, first_occurrences, prefix_hashes

POSITION_BITS = 20  # global prefix id g = unit << 20 | position
ATLAS_VERSION = 1


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
    rec = capture_coefficients(model, ids, mask, layers)
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


def mining_groups(model) -> list[tuple[int, int | None, int]] | None:
    """The key groups of an MoE model, ``[(layer, expert or None, width), ...]`` in layer order (per layer:
    the shared expert or dense MLP first, then experts 0..E-1); None for a dense model (one group per layer,
    mined as one (L * d_ffn, k) buffer)."""
    if not isinstance(model, MoEModel):
        return None
    groups = []
    for l in range(model.n_layers):
        if not model.is_moe_layer(l) or model.has_shared_expert(l):
            groups.append((l, None, model.d_expert(l)))
        groups.extend((l, e, model.d_expert(l, e)) for e in range(model.n_experts(l)))
    return groups


def trigger_file(layer: int, expert: int | None = None) -> str:
    """Path of a group's trigger table inside an atlas folder."""
    return f"triggers/layer-{layer:03d}.parquet" if expert is None else \
        f"triggers/layer-{layer:03d}-expert-{expert:03d}.parquet"


@torch.no_grad()
def batch_group_coefficients(model, ids: torch.Tensor, mask: torch.Tensor, unit_ids: torch.Tensor,
                             groups: list[tuple[int, int | None, int]], hashes: torch.Tensor | None = None):
    """Coefficients of each key group of an MoE model at the real positions routed to it, one forward pass.

    ids, mask: (B, T); unit_ids: (B,). Returns ``(coefs, rows, gids, h)``: gids (N,) ascending over the N
    real positions (first occurrences only, with ``hashes``; ``h`` (N,) their hashes, else None), and per
    group ``coefs[j]`` (n_j, width_j) with ``rows[j]`` (n_j,) ascending indices into gids: every position for
    a dense group, the positions routed to the expert for an expert group.
    """
    B, T = ids.shape
    sel = mask.reshape(-1).nonzero().squeeze(1)
    h = None
    if hashes is not None:
        h = hashes.reshape(-1).index_select(0, sel)
        fresh = first_occurrences(h)
        sel, h = sel[fresh], h[fresh]
    dense = sorted({l for l, e, _ in groups if e is None})
    moe = sorted({l for l, e, _ in groups if e is not None})
    with expert_intervene(model, reads=moe) as caps:
        rec = run(model, ids, attention_mask=mask, reads=[("coef", l) for l in dense], head="none",
                  stop_after=max(l for l, _, _ in groups), copy_reads=False).rec
    where = torch.full((B * T,), -1, dtype=torch.long, device=ids.device)
    where[sel] = torch.arange(sel.numel(), device=ids.device)
    coefs, rows = [], []
    for l, e, _ in groups:
        if e is None:
            coefs.append(rec["coef", l].reshape(B * T, -1).index_select(0, sel))
            rows.append(torch.arange(sel.numel(), device=ids.device))
        else:
            cap = caps[l, e]
            p = where[cap.token.to(ids.device)]
            keep = p >= 0  # routed, real and (with dedup) the prefix's first occurrence in the batch
            coefs.append(cap.coef[keep])
            rows.append(p[keep])
    pos = torch.arange(T, device=ids.device).expand(B, T)
    gids = ((unit_ids.to(ids.device)[:, None] << POSITION_BITS) + pos).reshape(-1).index_select(0, sel)
    return coefs, rows, gids, h


def _hyper(spec: CorpusSpec, source: Corpus, top_k: int, dedup: bool) -> dict:
    return {"corpus": source.spec, "split": spec.split, "window": spec.window,
            "min_tokens": spec.min_tokens, "text_field": spec.text_field, "max_units": spec.max_units,
            "docs": spec.docs, "top_k": top_k, "dedup": dedup}


def _units_table(units: list[Unit]) -> dict:
    return {"unit": pa.array([u.unit for u in units], pa.int64()),
            "doc": pa.array([u.doc for u in units], pa.int64()),
            "source": pa.array([u.source for u in units], pa.string()),
            "tokens": pa.array([u.tokens for u in units], pa.list_(pa.int32())),
            "next_id": pa.array([u.next_id for u in units], pa.int64())}


def mine(model, corpus: str | Path | CorpusSpec, out: str | Path, top_k: int = 25, batch_tokens: int = 2048,
         checkpoint_every: int = 200, progress: bool = True, max_batches: int | None = None,
         device_buffers: bool = True, dedup: bool = True, **corpus_options) -> dict:
    """Mine the top-k / bottom-k trigger prefixes of every key of ``model`` over ``corpus`` into ``out``.

    corpus: a corpus spec (a file or folder, "wikitext", "testbed", "auto": :func:`ffkv.memory.corpus.open_corpus`,
    the same specs as the statistics of ``ffkv edit``) or a :class:`CorpusSpec`; ``corpus_options`` (split, window,
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
    source = open_corpus(spec.path, model)
    out = Path(out)
    state_dir = out / "state"
    hyper = _hyper(spec, source, top_k, dedup)
    identity = model.identity
    meta_path = out / "atlas.json"
    fingerprint = source.fingerprint
    tok = model.require_tokenizer()
    if next(iter_units(tok, spec, source=source), None) is None:  # before anything is written
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

    groups = mining_groups(model)
    buf_dev = model.device if device_buffers else "cpu"
    buffers = TriggerBuffers(model.n_layers, model.d_ffn, top_k, buf_dev, dedup=dedup) if groups is None else \
        GroupBuffers([w for _, _, w in groups], top_k, buf_dev, dedup=dedup)
    done = {"units": 0, "tokens": 0, "batches": 0, "shards": []}
    ckpt = state_dir / "state.safetensors"
    if ckpt.exists():
        tensors, done = load_safetensors(ckpt)
        buffers.load(tensors)
        _drop_orphan_shards(state_dir, done["shards"])

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    stream = (u for u in iter_units(tok, spec, source=source) if u.unit >= done["units"])
    pending: list[Unit] = []
    bar = _progress(progress, done["tokens"])
    t0, tokens_this_call, n_batches = time.perf_counter(), 0, 0
    finished = True
    try:
        for batch in batches(stream, batch_tokens, spec.window):
            ids, mask, hashes = encode_units(batch, pad_id, model.device, hashes=True)
            unit_ids = torch.tensor([u.unit for u in batch], dtype=torch.long)
            dev = buffers.device
            if groups is not None:
                coefs, rows, gids, hashes = batch_group_coefficients(model, ids, mask, unit_ids, groups,
                                                                     hashes if dedup else None)
                for j, (c, r) in enumerate(zip(coefs, rows)):
                    buffers.update(j, c.to(dev), gids[r].to(dev),
                                   hashes=None if hashes is None else hashes[r].to(dev))
            else:
                coefs, gids, hashes = batch_coefficients(model, ids, mask, unit_ids,
                                                         hashes=hashes if dedup else None) \
                    if dedup else (*batch_coefficients(model, ids, mask, unit_ids), None)
                for l, c in enumerate(coefs):
                    buffers.update(c.to(dev), gids.to(dev), layer=l,
                                   hashes=None if hashes is None else hashes.to(dev))
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
    return _finalize(model, out, buffers, done, meta, tokens_this_call / max(elapsed, 1e-9), groups)


def max_positions(model) -> int:
    """The longest input the model takes: :attr:`MemoryModel.context_length`, the one rule."""
    return model.context_length


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


def _trigger_table(top_v, top_g, bot_v, bot_g, cited: set) -> dict:
    """The trigger rows of one group of keys from its buffers (rows: keys, columns: ranks)."""
    cols: dict = {}
    for kind, v, g, sign in (("top", top_v, top_g, 1.0), ("bottom", bot_v, bot_g, -1.0)):
        vv = (v * sign).cpu().numpy()
        gg = g.cpu().numpy()
        idx, rank = np.nonzero(gg >= 0)
        cols.setdefault("index", []).append(idx.astype(np.int32))
        cols.setdefault("kind", []).append(np.full(idx.size, kind))
        cols.setdefault("rank", []).append(rank.astype(np.int16))
        cols.setdefault("coef", []).append(vv[idx, rank].astype(np.float32))
        gid = gg[idx, rank]
        cols.setdefault("unit", []).append(gid >> POSITION_BITS)
        cols.setdefault("position", []).append((gid & ((1 << POSITION_BITS) - 1)).astype(np.int32))
        cited.update(np.unique(gid >> POSITION_BITS).tolist())
    return {c: np.concatenate(parts) for c, parts in cols.items()}


def _finalize(model, out: Path, buffers, done: dict, meta: dict, tok_per_s: float, groups=None) -> dict:
    """Write ``triggers/layer-LLL.parquet`` (and ``layer-LLL-expert-EEE.parquet``) and ``units.parquet``;
    mark the atlas complete."""
    k = buffers.k
    prov = {k2: meta[k2] for k2 in ("ffkv_version", "created", "model", "hyperparameters")}
    cited: set = set()
    if groups is None:
        L, d = buffers.n_layers, buffers.d_ffn
        for l in range(L):
            block = slice(MemoryId(l, 0).flat(d), MemoryId(l + 1, 0).flat(d))  # the rows of layer l's keys
            table = _trigger_table(buffers.top_v[block], buffers.top_g[block], buffers.bot_v[block],
                                   buffers.bot_g[block], cited)
            write_parquet(out / trigger_file(l), table, meta={**prov, "layer": l})
        extra = {}
    else:
        L, d = model.n_layers, model.d_ffn
        for j, (l, e, _) in enumerate(groups):
            b = buffers.groups[j]
            table = _trigger_table(b.top_v, b.top_g, b.bot_v, b.bot_g, cited)
            write_parquet(out / trigger_file(l, e), table, meta={**prov, "layer": l, "expert": e})
        extra = {"groups": [{"layer": l, "expert": e, "d_ffn": w} for l, e, w in groups],
                 "n_experts": [model.n_experts(l) for l in range(L)]}
    state_dir = out / "state"
    shards = [pq.read_table(state_dir / s) for s in done["shards"]]
    units = pa.concat_tables(shards) if shards else pa.table(_units_table([]))
    keep = pa.array(sorted(cited), pa.int64())
    units = units.filter(pc.is_in(units["unit"], value_set=keep))
    write_parquet(out / "units.parquet", units, meta=prov)
    meta = {**meta, "status": "complete", "units": done["units"], "tokens": done["tokens"],
            "batches": done["batches"], "n_layers": L, "d_ffn": d, "top_k": k, **extra,
            "tokens_per_second_last_call": round(tok_per_s, 1)}
    write_json(out / "atlas.json", meta)
    shutil.rmtree(state_dir, ignore_errors=True)
    return meta
