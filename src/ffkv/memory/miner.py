"""Trigger mining (Geva et al. 2021, section 3), the resumable run: the top-k and bottom-k prefixes of every key.

For every layer l, key i and prefix x (a unit up to position t), the memory coefficient is ``m_i^l(x)``.
Mining keeps, for all keys of all layers at once, the k prefixes with the largest coefficient and the k
with the smallest (gated and GELU coefficients are signed). One forward pass per batch reads the coefficients
of every layer (:func:`ffkv.models.engine.capture_coefficients`: no head, no copies), and the running buffers
of :mod:`ffkv.memory.topk`, shape (L * d_ffn, k), absorb them.

Prefixes are identified by the global prefix id ``g = unit * 2^20 + t``; ties go to the smaller g, which makes
the result a pure function of the corpus: batching, checkpoints and resumes do not change it, and it equals
the brute-force sort of :mod:`ffkv.memory.oracle`.

**Length bucketing.** Units are read in consecutive *sort windows* (about ``SORT_WINDOW_BATCHES`` batches of
tokens each, never across two files); inside a window they are grouped by exact length
(:func:`length_batches`): full batches of one length, no padding, and the remainders packed in length
order. The top-k merge orders by g, not by arrival
(:func:`ffkv.memory.topk.merge_topk` with ``window``), and with dedup a prefix's first occurrence is found
over the whole window before any batch runs (:func:`window_fresh`), so the tables stay exactly those of the
corpus order.

A run writes its state beside the target, in ``.NAME.mining/`` (:func:`state_path`: buffers, the units read
so far, the batch reached inside the current window) every ``checkpoint_every`` batches, atomically; running
the same command again resumes after the last checkpoint. The finished atlas is built in a temporary folder
beside the target and renamed onto it whole (:func:`ffkv.io.atomic_path`): ``DIR/atlas.json``,
``DIR/triggers/layer-LLL.parquet``, ``DIR/units.parquet`` (the token ids of every unit a trigger cites) and
``DIR/run.json``, the only file with times in it (creation time, seconds, tokens per second), so a resumed
atlas is byte-identical to an uninterrupted one in every other file. An :class:`FfkvError` while the corpus
is read (a bad JSONL line) removes the state: nothing is left behind. Atlases of corpus shards are merged by
:mod:`ffkv.memory.merge`.

**Several processes** (``torchrun``, :mod:`ffkv.models.distributed`): the sort windows are dealt round-robin,
window w to rank ``w % world_size`` (:func:`shard_windows`), so each rank forms exactly the batches one process
forms for its windows; each rank checkpoints in its own ``.NAME.mining/rank-RRR-of-NNN/``
(:func:`rank_state_path`) and resumes there; at the end rank 0 gathers every rank's tables and keeps per key
the top-k of the union (:func:`ffkv.memory.combine.select_triggers`), so the tables equal one process's
byte for byte; ``atlas.json`` records ``world_size``.

Mixture-of-experts models (:class:`ffkv.models.moe.MoEModel`) are mined per expert: each (layer, expert) is a
group of ``d_expert`` keys whose candidates are only the prefixes *routed* to that expert (an unrouted
prefix's coefficient is not active, so it never enters the top-k, not even as 0), read by
:func:`ffkv.models.moe.expert_intervene` in the same forward pass as the dense coefficients of the other
groups (a shared expert, a layer without experts). Their triggers go to
``DIR/triggers/layer-LLL-expert-EEE.parquet``; ``atlas.json`` lists the groups (:func:`mining_groups`).
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .. import validate
from ..errors import FfkvError
from ..io import (atomic_path, load_safetensors, lock_output, provenance, read_json, require_finite, save_safetensors,
                  write_json, write_parquet)
from ..models import distributed
from ..models.engine import capture_coefficients, run
from ..models.memory_id import MemoryId
from ..models.moe import MoEModel, expert_intervene
from ..progress import bar as progress_bar
from ..progress import forced as progress_forced
from .combine import row_hashes, select_triggers
from .corpus import Corpus, CorpusSpec, Unit, iter_units, open_corpus
from .schema import ATLAS_VERSION, read_atlas_meta
from .topk import POSITION_BITS, GroupBuffers, TriggerBuffers, first_occurrences, prefix_hashes

SORT_WINDOW_BATCHES = 128  # batches' worth of tokens grouped by length together
DIE_ENV = "FFKV_TEST_DIE_AFTER_BATCHES"  # tests: "N" or "N@RANK": that rank exits hard after its N-th checkpoint
MAX_TOP_K = 10_000
MIN_ROWS = 16  # a batch of fewer token rows takes other matrix kernels (other last bits): filled up to this
MAX_BUFFER_BYTES = 64 << 30  # refuse a --top-k whose buffers alone would need more


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


def length_batches(units: list[Unit], batch_tokens: int, max_len: int) -> list[list[Unit]]:
    """The batches of one sort window: its units grouped by exact length (in unit order within a length), each
    group cut into full batches of ``max(batch_tokens, max_len) // length`` units, which have no padding; the
    remainders of all lengths, sorted by (length, unit), are packed as :func:`batches` does (padded to the
    longest of each, a token or two). Deterministic: a resumed run rebuilds them."""
    by_len: dict[int, list[Unit]] = {}
    for u in units:
        by_len.setdefault(len(u.tokens), []).append(u)
    budget = max(batch_tokens, max_len)
    out, rest = [], []
    for n in sorted(by_len):
        group, per = by_len[n], max(1, budget // n)
        full = len(group) // per * per
        out += [group[i: i + per] for i in range(0, full, per)]
        rest += group[full:]
    return out + list(batches(iter(rest), batch_tokens, max_len))


def window_batches(units: list[Unit], batch_tokens: int, max_len: int, by_length: bool = True) -> list[list[Unit]]:
    """A sort window's batches: by exact length (:func:`length_batches`) for a dense model; in corpus order for
    a mixture of experts, whose expert products take as many rows as tokens were routed to the expert, so
    their last bits follow the batch's make-up: corpus order keeps merged shards equal to one run there."""
    return length_batches(units, batch_tokens, max_len) if by_length else list(batches(iter(units), batch_tokens,
                                                                                          max_len))


def filled(batch: list[Unit]) -> tuple[list[Unit], int]:
    """``batch`` with copies of its first unit appended until it has ``MIN_ROWS`` token rows, and the number of
    real units: a lone short unit then runs through the same kernels as in a full batch (copies are not read)."""
    rows = len(batch) * max(len(u.tokens) for u in batch)
    extra = -(-(MIN_ROWS - rows) // len(batch[0].tokens)) if rows < MIN_ROWS else 0
    return batch + [batch[0]] * extra, len(batch)


def sort_windows(stream, window_tokens: int, max_units: int, resume: dict | None = None):
    """Consecutive windows of the unit stream, each ``window_tokens`` tokens (or ``max_units`` units) long and
    within one source file (so the atlas of a file mined alone batches its units as the whole corpus's does:
    merged shards equal one run bit for bit).

    Yields ``(units, batch_tokens or None, batches already done)``; with ``resume`` (a checkpoint's window:
    start, end, batch_tokens, batches_done) the first window is exactly the recorded one."""
    units: list[Unit] = []
    if resume is not None:
        for u in stream:
            units.append(u)
            if u.unit + 1 >= resume["end"]:
                break
        if units:
            yield units, int(resume["batch_tokens"]), int(resume["batches_done"])
        units = []
    n = 0
    for u in stream:
        if units and u.source != units[-1].source:  # a window never spans two files: shards batch alike
            yield units, None, 0
            units, n = [], 0
        units.append(u)
        n += len(u.tokens)
        if n >= window_tokens or len(units) >= max_units:
            yield units, None, 0
            units, n = [], 0
    if units:
        yield units, None, 0


def window_fresh(units: list[Unit]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per unit of a window: its prefix hashes (T,) int64 and (T,) bool, True where the prefix occurs for
    the first time in the window (in corpus order), so that dedup does not depend on the batch order."""
    hs = [prefix_hashes(u.tokens) for u in units]
    flat = np.concatenate(hs)
    _, first = np.unique(flat, return_index=True)
    fresh = np.zeros(flat.size, bool)
    fresh[first] = True
    ends = np.cumsum([len(h) for h in hs])
    return {u.unit: (h, f) for u, h, f in zip(units, hs, np.split(fresh, ends[:-1]))}


def encode_units(units: list[Unit], pad_id: int, device, hashes: bool = False, fresh: dict | None = None):
    """Right-padded ``input_ids`` and ``attention_mask`` (B, T) of a batch of units (and, with ``hashes``,
    the (B, T) int64 prefix hashes, 0 at padding; with ``fresh`` (:func:`window_fresh`) also the (B, T) bool
    selection of the prefixes that take part)."""
    T = max(len(u.tokens) for u in units)
    B = len(units)
    lens = np.array([len(u.tokens) for u in units])
    real = np.arange(T)[None, :] < lens[:, None]
    flat = np.concatenate([np.asarray(u.tokens, np.int64) for u in units])
    ids_np = np.full((B, T), pad_id, np.int64)
    ids_np[real] = flat
    ids = torch.from_numpy(ids_np).to(device)
    mask = torch.from_numpy(real.astype(np.int64)).to(device)
    if not hashes:
        return ids, mask
    hs = np.zeros((B, T), np.int64)
    if fresh is not None:
        hs[real] = np.concatenate([fresh[u.unit][0] for u in units])
        sel = np.zeros((B, T), bool)
        sel[real] = np.concatenate([fresh[u.unit][1] for u in units])
        return ids, mask, torch.from_numpy(hs).to(device), torch.from_numpy(sel).to(device)
    hs[real] = np.concatenate([prefix_hashes(u.tokens) for u in units])
    return ids, mask, torch.from_numpy(hs).to(device)


def _positions(ids, mask, unit_ids, hashes, select):
    """Flat indices (N,) of the prefixes a batch contributes, sorted by g, their gids (N,) and hashes."""
    B, T = ids.shape
    sel = (mask.bool() if select is None else select).reshape(-1).nonzero().squeeze(1)
    pos = torch.arange(T, device=ids.device).expand(B, T)
    g_all = ((unit_ids.to(ids.device)[:, None] << POSITION_BITS) + pos).reshape(-1)
    gids = g_all.index_select(0, sel)
    order = gids.argsort()
    sel, gids = sel[order], gids[order]
    h = None
    if hashes is not None:
        h = hashes.reshape(-1).index_select(0, sel)
        if select is None:  # repeats inside the batch: the first occurrence (smallest g) takes part
            fresh = first_occurrences(h)
            sel, gids, h = sel[fresh], gids[fresh], h[fresh]
    return sel, gids, h


@torch.no_grad()
def batch_coefficients(model, ids: torch.Tensor, mask: torch.Tensor, unit_ids: torch.Tensor,
                       layers: list[int] | None = None, hashes: torch.Tensor | None = None,
                       select: torch.Tensor | None = None):
    """Coefficients of every real position of a batch, all layers, in one forward pass.

    ids, mask: (B, T); unit_ids: (B,). Returns one (N, d_ffn) tensor per layer (column i: key i) over the
    N positions taken, and gids (N,) = ``unit << 20 | t``, ascending. ``select`` (B, T) bool: the positions
    taken (default: every real one). With ``hashes`` (B, T) their hashes (N,) are returned third, and
    without ``select`` a prefix that already occurred earlier in the batch is left out.
    """
    layers = list(range(model.n_layers)) if layers is None else layers
    rec = capture_coefficients(model, ids, mask, layers)
    B, T = ids.shape
    sel, gids, h = _positions(ids, mask, unit_ids, hashes, select)
    coefs = [rec[l].reshape(B * T, -1).index_select(0, sel) for l in layers]  # (N, d) each
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
                             groups: list[tuple[int, int | None, int]], hashes: torch.Tensor | None = None,
                             select: torch.Tensor | None = None):
    """Coefficients of each key group of an MoE model at the real positions routed to it, one forward pass.

    ids, mask: (B, T); unit_ids: (B,). Returns ``(coefs, rows, gids, h)``: gids (N,) ascending over the N
    positions taken (``select``, or every real one; first occurrences only with ``hashes`` and no ``select``;
    ``h`` (N,) their hashes, else None), and per group ``coefs[j]`` (n_j, width_j) with ``rows[j]`` (n_j,)
    ascending indices into gids: every position for a dense group, the positions routed to the expert for an
    expert group.
    """
    B, T = ids.shape
    sel, gids, h = _positions(ids, mask, unit_ids, hashes, select)
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
            keep = p >= 0  # routed, taken and (with dedup) the prefix's first occurrence
            p, c = p[keep], cap.coef[keep]
            order = p.argsort()
            coefs.append(c[order])
            rows.append(p[order])
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


def state_path(out: str | Path) -> Path:
    """Where a run into ``out`` keeps its resumable state: the hidden folder ``.NAME.mining`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.mining"


def rank_state_path(out: str | Path, rank: int = 0, world_size: int = 1) -> Path:
    """The state folder of one rank of a ``torchrun`` of ``world_size`` processes: ``.NAME.mining/rank-RRR-of-NNN``
    (a lone process: :func:`state_path` itself). Each rank checkpoints and resumes its own shard there."""
    base = state_path(out)
    return base if world_size <= 1 else base / f"rank-{rank:03d}-of-{world_size:03d}"


def _check_world(out: Path, world_size: int):
    """Refuse to resume a state begun with another number of processes (its shards are other windows)."""
    base = state_path(out)
    if not base.is_dir():
        return
    others = sorted({p.name.split("-of-")[1] for p in base.glob("rank-*-of-*") if p.is_dir()} - {f"{world_size:03d}"})
    began = int(others[0]) if others else (1 if world_size > 1 and (base / "state.safetensors").exists() else None)
    if began is not None:
        raise FfkvError(f"atlas '{out}' was begun by {began} process(es), not {world_size}",
                        f"rerun it with {began} process(es) (torchrun --nproc_per_node), "
                        f"or delete {base} to start over")


def shard_windows(windows, rank: int, world_size: int, first: int = 0):
    """The sort windows of rank ``rank``: window w (numbered from ``first``) belongs to rank ``w % world_size``.
    Whole windows are dealt round-robin, so every rank forms exactly the batches one process forms for them
    (the coefficients are bit-identical) and the ranks' loads stay within a window of each other. Yields
    ``(w, mine, window)`` for every window: the ranks all read the whole unit stream (tokenizing is not
    sharded), and skip the windows of others."""
    for w, win in enumerate(windows, start=first):
        yield w, w % world_size == rank, win


def _die_for_tests(rank: int, world_size: int, batches: int):
    flag = os.environ.get(DIE_ENV)
    if not flag:
        return
    n, _, who = flag.partition("@")
    if batches >= int(n) and rank == (int(who) if who else world_size - 1):
        os._exit(17)  # a hard death (no cleanup, no finally): what a killed rank leaves behind


def check_mining_options(model, top_k, batch_tokens, checkpoint_every, max_batches, dedup: bool) -> tuple:
    """The numeric options of :func:`mine`, checked before anything is allocated or written."""
    top_k = validate.integer(top_k, "--top-k", 1, MAX_TOP_K)
    batch_tokens = validate.integer(batch_tokens, "--batch-tokens", 1)
    checkpoint_every = validate.integer(checkpoint_every, "--checkpoint-every", 1)
    if max_batches is not None:
        max_batches = validate.integer(max_batches, "max_batches", 1)
    rows = model.n_layers * model.d_ffn if mining_groups(model) is None else \
        sum(w for _, _, w in mining_groups(model))
    need = 2 * rows * top_k * (4 + 8 + (8 if dedup else 0))
    if need > MAX_BUFFER_BYTES:
        raise FfkvError(f"--top-k {top_k} needs {need / 2**30:.0f} GiB of buffers for {rows} keys",
                        f"use a --top-k of at most {MAX_BUFFER_BYTES // (2 * rows * 20)}")
    return top_k, batch_tokens, checkpoint_every, max_batches


def count_units(tok, spec: CorpusSpec, source: Corpus) -> tuple[int, int]:
    """``(units, tokens)`` of a corpus stream (a tokenizing pass without the model: the progress bar's total)."""
    n = t = 0
    for u in iter_units(tok, spec, source=source):
        n, t = n + 1, t + len(u.tokens)
    return n, t


def mine(model, corpus: str | Path | CorpusSpec, out: str | Path, top_k: int = 25, batch_tokens: int = 2048,
         checkpoint_every: int = 200, progress: bool = False, max_batches: int | None = None,
         device_buffers: bool = True, dedup: bool = True, **corpus_options) -> dict:
    # One writer at a time: the resumable state beside the target is locked for the whole run (a second
    # ``atlas mine`` into the same folder is refused in one line); the final rename locks the target itself.
    rank, world_size = distributed.world()
    _check_world(Path(out), world_size)
    state = rank_state_path(Path(out), rank, world_size)
    with lock_output(state):
        fresh = not state.exists()
        try:
            return _mine(model, corpus, out, top_k, batch_tokens, checkpoint_every, progress, max_batches,
                         device_buffers, dedup, **corpus_options)
        except FfkvError:
            # A run that fails before its first checkpoint leaves nothing to resume: remove what it began.
            if fresh and state.exists() and not (state / "state.safetensors").exists():
                shutil.rmtree(state, ignore_errors=True)
            raise


def _mine(model, corpus: str | Path | CorpusSpec, out: str | Path, top_k: int = 25, batch_tokens: int = 2048,
          checkpoint_every: int = 200, progress: bool = False, max_batches: int | None = None,
          device_buffers: bool = True, dedup: bool = True, **corpus_options) -> dict:
    """Mine the top-k / bottom-k trigger prefixes of every key of ``model`` over ``corpus`` into ``out``.

    corpus: a corpus spec (a file or folder, "wikitext", "testbed", "auto": :func:`ffkv.memory.corpus.open_corpus`,
    the same specs as the statistics of ``ffkv edit``) or a :class:`CorpusSpec`; ``corpus_options`` (split, window,
    min_tokens, text_field, max_units) build the spec from a path. Running again on the same ``out``
    resumes after the last checkpoint (and returns at once if the atlas is complete); a different model,
    corpus or top_k is refused. ``max_batches`` stops after that many batches of this call, leaving a
    checkpoint (for tests of resuming). ``dedup`` (default): a prefix that occurs several times in the
    corpus (the same token sequence from the start of its unit) counts once, at its first occurrence, so a
    key's k triggers are k different prefixes. ``progress``: a bar with the corpus's total tokens and an ETA
    (one extra tokenizing pass counts them). Returns the atlas metadata (``atlas.json``; ``status`` "partial"
    when ``max_batches`` stopped it).
    """
    spec = corpus if isinstance(corpus, CorpusSpec) else CorpusSpec(str(corpus), **corpus_options)
    top_k, batch_tokens, checkpoint_every, max_batches = check_mining_options(
        model, top_k, batch_tokens, checkpoint_every, max_batches, dedup)
    if spec.window >= 1 << POSITION_BITS:
        raise FfkvError(f"window {spec.window} is too long", f"use at most {(1 << POSITION_BITS) - 1} tokens")
    n_pos = max_positions(model)
    if n_pos is not None and spec.window > n_pos:
        raise FfkvError(f"window {spec.window} is longer than the model's context ({n_pos} positions)",
                        f"pass --window {n_pos} or less")
    source = open_corpus(spec.path, model)
    out = Path(out)
    rank, world_size = distributed.world()
    state_dir = rank_state_path(out, rank, world_size)
    hyper = _hyper(spec, source, top_k, dedup)
    identity = model.identity
    fingerprint = source.fingerprint
    tok = model.require_tokenizer()
    if (out / "atlas.json").exists():
        meta = read_atlas_meta(out)
        _check_same_run(meta, identity, hyper, fingerprint, out)
    else:
        meta = None
    if world_size > 1:  # rank 0's folder decides (the others may not see it: one node's disk)
        meta = distributed.all_gather_json(meta)[0]
    if meta is not None and meta.get("status") == "complete":
        return meta
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FfkvError(f"output folder '{out}' exists and is not an atlas", "pass a new or empty --out folder")
    if next(iter_units(tok, spec, source=source), None) is None:  # before anything is written
        raise FfkvError(f"corpus '{spec.path}' yields no units of at least {spec.min_tokens} tokens",
                        "pass a corpus with text in it (or lower --min-tokens)")
    run_file = state_dir / "run.json"
    if run_file.exists():
        meta = read_json(run_file)
        _check_same_run(meta, identity, hyper, fingerprint, out)
    else:
        prov = provenance(identity, **hyper)
        meta = {"atlas_version": ATLAS_VERSION, "status": "mining", "model_path": _model_path(model),
                "corpus_fingerprint": fingerprint, **prov}
    # creation times live in run.json only: every other file of a resumed atlas equals an uninterrupted run's
    created = meta.pop("created", None) or utc_now()

    groups = mining_groups(model)
    buf_dev = model.device if device_buffers else "cpu"
    buffers = TriggerBuffers(model.n_layers, model.d_ffn, top_k, buf_dev, dedup=dedup) if groups is None else \
        GroupBuffers([w for _, _, w in groups], top_k, buf_dev, dedup=dedup)
    done = {"units": 0, "tokens": 0, "batches": 0, "shards": [], "window": None, "seconds": 0.0, "calls": 0,
            "next_window": 0}
    ckpt = state_dir / "state.safetensors"
    if ckpt.exists():
        tensors, saved = load_safetensors(ckpt)
        buffers.load(tensors)
        done.update(saved)
        _drop_orphan_shards(state_dir, done["shards"])
    done["calls"] = int(done.get("calls", 0)) + 1
    call_meta = {**meta, "created": created}

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    resume = done.get("window")
    first_unit = resume["start"] if resume else done["units"]
    stream = (u for u in iter_units(tok, spec, source=source) if u.unit >= first_unit)
    stride = spec.window  # positions are < window: the order code of a window entry fits 32 bits
    windows = sort_windows(stream, SORT_WINDOW_BATCHES * max(batch_tokens, spec.window),
                           max(1, ((1 << 31) - 1 - top_k) // stride), resume)
    pending: list[Unit] = []
    t0, tokens_this_call, n_batches = time.perf_counter(), 0, 0
    finished = True
    bar = None
    try:
        show = progress if progress_forced() is None else progress_forced()  # FFKV_PROGRESS decides first
        if show and rank == 0:
            total = count_units(tok, spec, source)[1] if world_size == 1 else \
                _shard_tokens(tok, spec, source, batch_tokens, top_k, rank, world_size)
            bar = progress_bar(total=total, desc="mining" if world_size == 1 else f"mining (rank 0 of {world_size})",
                               unit="tok", enabled=True, initial=done["tokens"], unit_scale=True)
        for w, own, (wunits, bt, skip) in shard_windows(windows, rank, world_size, int(done.get("next_window", 0))):
            u0, end = wunits[0].unit, wunits[-1].unit + 1
            if not own:  # another rank's window: only the count of units read moves on
                done["units"], done["next_window"] = end, w + 1
                continue
            bt = bt or batch_tokens
            fresh = window_fresh(wunits) if dedup else None
            wbatches = window_batches(wunits, bt, spec.window, groups is None)
            for j in range(skip, len(wbatches)):
                n_tok = _absorb(model, buffers, groups, wbatches[j], pad_id, fresh, (u0, stride))
                done["tokens"], done["batches"] = done["tokens"] + n_tok, done["batches"] + 1
                done["window"] = {"start": u0, "end": end, "batch_tokens": bt, "batches_done": j + 1}
                if j + 1 == len(wbatches):  # the window is complete: its units join the next shard
                    pending.extend(wunits)
                    done["units"], done["window"], done["next_window"] = end, None, w + 1
                tokens_this_call += n_tok
                n_batches += 1
                if bar is not None:
                    bar.update(n_tok)
                if done["batches"] % checkpoint_every == 0:
                    done = _checkpoint(state_dir, buffers, pending, done, call_meta, t0)
                    pending = []
                    _die_for_tests(rank, world_size, done["batches"])
                if max_batches is not None and n_batches >= max_batches:
                    finished = False
                    break
            if not finished:
                break
    except FfkvError:
        # the corpus itself is at fault (a bad line): the state could never resume, so nothing is left
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    done = _checkpoint(state_dir, buffers, pending, done, call_meta, t0)
    if world_size > 1:  # one rank stopped by max_batches: every rank stops (the combine needs them all)
        finished = all(distributed.all_gather_json(finished))
    if not finished:
        return {**meta, "status": "partial", "units": done["units"], "tokens": done["tokens"],
                **({"world_size": world_size} if world_size > 1 else {})}
    elapsed = time.perf_counter() - t0
    done["seconds"] = float(done.get("seconds", 0.0)) + elapsed
    if world_size > 1:
        return _finalize_ranks(model, out, buffers, done, meta, created, tokens_this_call, elapsed, groups,
                               rank, world_size)
    return _finalize(model, out, buffers, done, meta, created, tokens_this_call / max(elapsed, 1e-9), groups)


def _shard_tokens(tok, spec: CorpusSpec, source: Corpus, batch_tokens: int, top_k: int, rank: int,
                  world_size: int) -> int:
    """Tokens of the windows of one rank (a tokenizing pass without the model: its progress bar's total)."""
    windows = sort_windows(iter_units(tok, spec, source=source), SORT_WINDOW_BATCHES * max(batch_tokens, spec.window),
                           max(1, ((1 << 31) - 1 - top_k) // spec.window))
    return sum(sum(len(u.tokens) for u in win[0]) for _, own, win in shard_windows(windows, rank, world_size) if own)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _absorb(model, buffers, groups, batch: list[Unit], pad_id: int, fresh, window) -> int:
    """One batch of a sort window through the model into the buffers; returns its real tokens."""
    n_tok = sum(len(u.tokens) for u in batch)
    batch, n_real = filled(batch)
    unit_ids = torch.tensor([u.unit for u in batch], dtype=torch.long)
    dev = buffers.device
    if fresh is not None:
        ids, mask, hashes, select = encode_units(batch, pad_id, model.device, hashes=True, fresh=fresh)
    else:
        ids, mask = encode_units(batch, pad_id, model.device)
        hashes, select = None, mask.bool()
    if n_real < len(batch):
        select = select.clone()
        select[n_real:] = False
    if groups is not None:
        coefs, rows, gids, h = batch_group_coefficients(model, ids, mask, unit_ids, groups, hashes, select)
        for j, (c, r) in enumerate(zip(coefs, rows)):
            if r.numel():
                buffers.update(j, c.to(dev), gids[r].to(dev), hashes=None if h is None else h[r].to(dev),
                               window=window)
    else:
        out = batch_coefficients(model, ids, mask, unit_ids, hashes=hashes, select=select)
        coefs, gids, h = out if hashes is not None else (*out, None)
        for l, c in enumerate(coefs):
            buffers.update(c.to(dev), gids.to(dev), layer=l, hashes=None if h is None else h.to(dev),
                           window=window)
    return n_tok


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


def _checkpoint(state_dir: Path, buffers, pending: list[Unit], done: dict, meta: dict, t0: float):
    """Write the units of the windows finished since the last checkpoint, then the buffers (the commit point)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if not (state_dir / "run.json").exists():
        write_json(state_dir / "run.json", meta)
    done = dict(done)
    if pending:
        name = f"units-{pending[0].unit:012d}.parquet"
        write_parquet(state_dir / name, _units_table(pending))
        done["shards"] = list(done["shards"]) + [name]
    saved = {**done, "seconds": float(done.get("seconds", 0.0)) + time.perf_counter() - t0}
    save_safetensors(state_dir / "state.safetensors", buffers.state(), meta=saved)
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


def _group_tables(model, buffers, groups, cited: set) -> list[tuple[int, int | None, dict, dict]]:
    """This run's trigger tables from its buffers: ``(layer, expert, columns, parquet meta extra)`` per group of
    keys (every layer of a dense model; every expert and dense FFN of an MoE one); ``cited`` collects units."""
    out = []
    if groups is None:
        d = buffers.d_ffn
        for l in range(buffers.n_layers):
            block = slice(MemoryId(l, 0).flat(d), MemoryId(l + 1, 0).flat(d))  # the rows of layer l's keys
            table = _trigger_table(buffers.top_v[block], buffers.top_g[block], buffers.bot_v[block],
                                   buffers.bot_g[block], cited)
            require_finite(f"the trigger coefficients of layer {l}", table["coef"])
            out.append((l, None, table, {"layer": l}))
    else:
        for j, (l, e, _) in enumerate(groups):
            b = buffers.groups[j]
            table = _trigger_table(b.top_v, b.top_g, b.bot_v, b.bot_g, cited)
            require_finite(f"the trigger coefficients of layer {l} expert {e}", table["coef"])
            out.append((l, e, table, {"layer": l, "expert": e}))
    return out


def _group_extra(model, groups) -> dict:
    if groups is None:
        return {}
    return {"groups": [{"layer": l, "expert": e, "d_ffn": w} for l, e, w in groups],
            "n_experts": [model.n_experts(l) for l in range(model.n_layers)]}


def _cited_units(state_dir: Path, shards: list[str], cited: set):
    """The rows of the units shards written so far whose unit a trigger cites, in unit order, one chunk."""
    tables = [pq.read_table(state_dir / s) for s in shards]
    units = pa.concat_tables(tables) if tables else pa.table(_units_table([]))
    keep = pa.array(sorted(cited), pa.int64())
    return units.filter(pc.is_in(units["unit"], value_set=keep)).combine_chunks()


def _finalize(model, out: Path, buffers, done: dict, meta: dict, created: str, tok_per_s: float,
              groups=None) -> dict:
    """Build the atlas in a temporary folder beside ``out`` and rename it onto ``out``: ``triggers/``,
    ``units.parquet``, ``atlas.json``, ``run.json`` (the times); then drop the state."""
    k = buffers.k
    prov = {k2: meta[k2] for k2 in ("ffkv_version", "model", "hyperparameters")}
    cited: set = set()
    state_dir = state_path(out)
    # atomic_path locks ``out`` for the rename; mine() holds the state's lock for the whole run
    with atomic_path(out, is_dir=True) as tmp:
        for l, e, table, extra in _group_tables(model, buffers, groups, cited):
            write_parquet(tmp / trigger_file(l, e), table, meta={**prov, **extra})
        write_parquet(tmp / "units.parquet", _cited_units(state_dir, done["shards"], cited), meta=prov)
        meta = {**meta, "status": "complete", "units": done["units"], "tokens": done["tokens"],
                "batches": done["batches"], "n_layers": model.n_layers, "d_ffn": model.d_ffn, "top_k": k,
                **_group_extra(model, groups), "world_size": 1}
        write_json(tmp / "atlas.json", meta)
        write_json(tmp / "run.json", {"created": created, "finished": utc_now(), "calls": int(done.get("calls", 1)),
                                      "seconds": round(float(done.get("seconds", 0.0)), 3),
                                      "tokens_per_second_last_call": round(tok_per_s, 1)})
    shutil.rmtree(state_dir, ignore_errors=True)
    return meta


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _finalize_ranks(model, out: Path, buffers, done: dict, meta: dict, created: str, tokens_this_call: int,
                    elapsed: float, groups, rank: int, world_size: int) -> dict:
    """The atlas of a ``torchrun``: every rank's tables and cited units are gathered to rank 0 (exactly: bytes),
    which keeps per key the top-k of the union (:func:`ffkv.memory.combine.select_triggers`, unit ids are the
    whole corpus's) and writes the one atlas as :func:`_finalize` does; then every rank drops its state."""
    k = buffers.k
    prov = {k2: meta[k2] for k2 in ("ffkv_version", "model", "hyperparameters")}
    dedup = bool(meta["hyperparameters"].get("dedup", False))
    state_dir = rank_state_path(out, rank, world_size)
    cited: set = set()
    mine_tables = _group_tables(model, buffers, groups, cited)
    own_units = _cited_units(state_dir, done["shards"], cited)
    own_tokens = dict(zip(own_units["unit"].to_pylist(), own_units["tokens"].to_pylist())) if dedup else None
    units = distributed.gather_bytes(_ipc_bytes(own_units))
    if rank == 0:
        units = pa.concat_tables([pa.ipc.open_stream(b).read_all() for b in units]).sort_by("unit").combine_chunks()
    merged, cited = [], set()
    for l, e, table, extra in mine_tables:  # one group at a time: rank 0 holds one group of every rank at once
        payload = dict(table)
        if dedup:  # each rank hashes its own rows' prefixes (its units): rank 0 needs no tokens
            payload["hash"] = row_hashes(table["unit"], table["position"], own_tokens)
        parts = distributed.gather_arrays(payload)
        if rank == 0:
            t = select_triggers({c: np.concatenate([p[c] for p in parts]) for c in table}, k, dedup,
                                hashes=np.concatenate([p["hash"] for p in parts]) if dedup else None)
            cited.update(np.unique(t["unit"]).tolist())
            merged.append((l, e, t, extra))
    runs = distributed.all_gather_json({"tokens": int(done["tokens"]), "batches": int(done["batches"]),
                                        "units": int(done["units"]), "calls": int(done.get("calls", 1)),
                                        "seconds": float(done.get("seconds", 0.0)), "call_tokens": tokens_this_call,
                                        "elapsed": elapsed})
    meta = {**meta, "status": "complete", "units": max(r["units"] for r in runs),
            "tokens": sum(r["tokens"] for r in runs), "batches": sum(r["batches"] for r in runs),
            "n_layers": model.n_layers, "d_ffn": model.d_ffn, "top_k": k, **_group_extra(model, groups),
            "world_size": world_size}
    if rank == 0:
        with atomic_path(out, is_dir=True) as tmp:
            for l, e, t, extra in merged:
                write_parquet(tmp / trigger_file(l, e), t, meta={**prov, **extra})
            keep = pa.array(sorted(cited), pa.int64())
            write_parquet(tmp / "units.parquet",
                          units.filter(pc.is_in(units["unit"], value_set=keep)).combine_chunks(), meta=prov)
            write_json(tmp / "atlas.json", meta)
            longest = max(r["elapsed"] for r in runs)
            write_json(tmp / "run.json", {"created": created, "finished": utc_now(), "world_size": world_size,
                                          "calls": max(r["calls"] for r in runs),
                                          "seconds": round(max(r["seconds"] for r in runs), 3),
                                          "tokens_per_second_last_call":
                                              round(sum(r["call_tokens"] for r in runs) / max(longest, 1e-9), 1)})
    distributed.barrier()  # the atlas is in place: the states may go
    shutil.rmtree(state_dir, ignore_errors=True)
    distributed.barrier()
    if rank == 0:
        shutil.rmtree(state_path(out), ignore_errors=True)
    return meta
