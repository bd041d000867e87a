"""Second-moment statistics of the keys: C = E[k k^T] over a text corpus, for ROME's and MEMIT's updates.

For layer l the key k is the FFN's memory coefficient vector (the input of W_out, ``coef``), one per token:

    C_l = (1 / N) Σ_t k_t k_t^T            k_t: (d_ffn,)   C_l: (d_ffn, d_ffn)

The sample (``n_texts``): as kmeng01's ``layer_stats`` counts it (``mom2_n_samples``), ``n_texts`` records of
the corpus drawn in the order of ``random.Random(1).shuffle`` of their indices (its ``FixedRandomSubsetSampler``,
seed 1), each tokenized alone and truncated to the model's context, every token of every record counted
(``n_tokens``, when given, caps the total). The records are those of ffkv's corpus reader, which drops empty
ones (WikiText's blank lines are records of the Hugging Face data set the reference reads). Without ``n_texts``: the corpus's first ``n_tokens`` tokens as one
stream (records joined by eos) cut into windows of ``window`` tokens. Every result says which: ``n_texts``
(None for the stream), ``n_tokens`` and the corpus.

All requested layers are accumulated in one pass (the forward pass stops after the deepest requested layer),
batch products in float32 and running sums in float64, whatever the model's dtype. Results are cached on
disk as safetensors, one file per layer, with the model's identity, the layer, the corpus and the token
count in the metadata; a cached file that belongs to another model is refused.

The corpus (``corpus=``) is read by ffkv's one corpus reader, :func:`ffkv.memory.corpus.open_corpus`, so
``--corpus`` means the same here as to ``ffkv atlas mine``: ``"auto"`` (the testbed world's training text for
a testbed model, whose ``testbed.json`` names the world, WikiText-2 from the shared data otherwise),
``"testbed"``, ``"wikitext"``, a text/JSONL/Parquet/Arrow file or a folder of them, or a list of strings.

Mixture-of-experts layers (:class:`ffkv.models.moe.MoEModel`): the key of expert e is its coefficient vector
m^e, which exists only at the tokens routed to e, so its statistics are taken over those tokens alone,

    C_{l,e} = (1 / N_e) Σ_{t routed to e} m^e_t m^e_t^T            N_e = the number of such tokens

(read by :func:`ffkv.models.moe.expert_intervene`, the engine of the expert axis). Ask for them by passing
``(layer, expert)`` in ``layers``; the result is keyed by that pair, and the cache file and memo key name the
expert.

Several processes (``torchrun``, :mod:`ffkv.models.distributed`): every function that accumulates takes
``shard=(rank, world_size)`` and runs only batch b with ``b % world_size == rank``: the batches one process
forms, dealt round-robin. :func:`layer_stats` does so by itself under torchrun and all-reduces the float64
sums and the token counts, so every rank gets C of the whole sample (equal to one process's up to the order
of the float64 additions); rank 0 alone writes the cache files.

No state is kept on the model: a caller that edits many times (an ``EditContext``) passes ``memo`` (a dict
that keeps the results in memory between calls) and ``base_identity`` (the unedited model's identity).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from ..errors import FfkvError
from ..io import load_safetensors, provenance, save_safetensors
from ..memory.corpus import SHARED_DATA, open_corpus, testbed_world_of
from ..models import distributed
from ..models.engine import capture_coefficients, run
from ..models.moe import expert_intervene
from ..progress import bar

__all__ = ["SHARED_DATA", "SecondMoment", "accumulate_expert_second_moments", "accumulate_second_moments",
           "accumulate_text_second_moments", "text_sample",
           "base_identity", "cholesky_factor",
           "default_stats_dir", "layer_stats", "load_second_moment", "resolve_corpus", "testbed_world_of",
           "token_windows"]


@dataclass
class SecondMoment:
    """C = E[k k^T] of one layer (or of one expert of it): ``C`` (d_ffn, d_ffn) float64 on the CPU, over
    ``n_tokens`` tokens (an expert's: the tokens routed to it)."""

    layer: int
    C: torch.Tensor
    n_tokens: int
    corpus: str
    path: Path | None = None
    expert: int | None = None
    n_texts: int | None = None  # corpus records sampled (kmeng01's mom2_n_samples); None: a token stream

    def describe(self) -> str:
        """'N tokens of T texts of CORPUS' (or 'N tokens of CORPUS' for a stream sample)."""
        of = f" of {self.n_texts} texts" if self.n_texts is not None else ""
        return f"{self.n_tokens} tokens{of} of {self.corpus}"


def default_stats_dir() -> Path:
    return Path(os.environ.get("FFKV_STATS_DIR", Path.home() / ".cache" / "ffkv" / "stats"))


# ----------------------------------------------------------------------------------------------------
# Identity


def base_identity(model) -> dict:
    """The identity the statistics belong to: the unedited model's, as far as the model folder tells.

    Edits change W_out, not the keys that C is computed from at the edited layer, and ROME/MEMIT reuse the
    statistics of the unedited model across edits, so an edited model saved by ``ffkv edit`` (with
    ``ffkv_edit.json`` beside its weights) uses its base model's statistics. A model edited in memory does
    not know its base: its journal does, and the caller passes ``layer_stats(..., base_identity=...)``.
    """
    p = Path(str(model.name_or_path)) / "ffkv_edit.json"
    if p.exists():
        try:
            return json.loads(p.read_text())["base_model"]
        except (json.JSONDecodeError, KeyError):
            pass
    return model.identity


_identity_of = base_identity  # layer_stats' keyword of the same name hides the function


def _model_key(identity: dict) -> str:
    p = Path(str(identity.get("name_or_path", "model")))
    # testbed folders all call their model "model": keep the folder above too
    name = f"{p.parent.name}_{p.name}" if p.name == "model" and p.parent.name else (p.name or "model")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
    return f"{name}-{identity.get('model_type')}-{identity.get('n_layers')}x{identity.get('d_model')}x{identity.get('d_ffn')}"


# ----------------------------------------------------------------------------------------------------
# Corpus


def resolve_corpus(model, corpus: str | Path | Sequence[str] = "auto") -> tuple[str, list[str]]:
    """``(name, texts)`` of a corpus spec, read by :func:`ffkv.memory.corpus.open_corpus`."""
    source = open_corpus(corpus, model)
    texts = source.texts_list()
    if not texts:
        raise FfkvError(f"statistics corpus '{source.name}' has no text", "pass a corpus with text in it")
    return source.name, texts


def token_windows(model, texts: Iterable[str], n_tokens: int, window: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the texts, joined by eos, as windows: (n_windows, window) long."""
    tok = model.require_tokenizer()
    sep = [tok.eos_token_id] if tok.eos_token_id is not None else []
    stream: list[int] = []
    for t in texts:
        stream.extend(tok(t, add_special_tokens=False, verbose=False)["input_ids"] + sep)
        if len(stream) >= n_tokens:
            break
    stream = stream[:n_tokens]
    if len(stream) < window:
        if not stream:
            raise FfkvError("the statistics corpus tokenizes to nothing", "pass a corpus with text in it")
        window = len(stream)
    n = len(stream) // window
    return torch.tensor(stream[: n * window], dtype=torch.long).view(n, window)


# ----------------------------------------------------------------------------------------------------
# Accumulation


def accumulate_second_moments(model, windows: torch.Tensor, layers: Sequence[int], batch_size: int = 8,
                              progress: bool = True, shard: tuple[int, int] = (0, 1)
                              ) -> tuple[dict[int, torch.Tensor], int]:
    """Σ_t k_t k_t^T for each layer over all tokens of ``windows`` (n, T), in one forward pass per batch.

    Returns ``({layer: S (d_ffn, d_ffn) float64}, N)``; C = S / N. Each batch is one engine run that reads
    the coefficients without copying them and stops after the deepest requested layer. ``shard`` (rank,
    world_size): only this rank's batches (module docstring); the sums and N are then the rank's part.
    """
    layers = sorted(set(layers))
    sums: dict[int, torch.Tensor] = {}  # width read from the coefficients (an MoE shared expert's is its own)
    count = 0
    starts = _shard_starts(range(0, windows.shape[0], batch_size), shard)
    pbar = bar(total=sum(windows[i:i + batch_size].numel() for i in starts),
               desc=f"C=E[kk^T] L{','.join(map(str, layers))}", unit="tok", enabled=progress)
    with torch.no_grad():
        for i in starts:
            ids = windows[i:i + batch_size].to(model.device)
            coef = capture_coefficients(model, ids, layers=layers)
            for l in layers:
                k = coef[l].reshape(-1, coef[l].shape[-1]).float()
                if l not in sums:
                    sums[l] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=model.device)
                sums[l] += (k.T @ k).double()
            count += ids.numel()
            pbar.update(ids.numel())
    pbar.close()
    return {l: s.cpu() for l, s in sums.items()}, count


def _shard_starts(starts, shard: tuple[int, int]) -> list:
    """The batches (their start indices) of rank ``shard[0]`` of ``shard[1]``: batch b where b % world == rank."""
    rank, size = shard
    return [i for b, i in enumerate(starts) if b % size == rank]


def text_sample(model, texts: Sequence[str], n_texts: int, n_tokens: int | None = None, seed: int = 1
                ) -> list[list[int]]:
    """kmeng01's statistics sample: token ids of ``n_texts`` records (module docstring), each truncated to
    the model's context; records without tokens count as records and give none. ``n_tokens`` caps the total."""
    tok = model.require_tokenizer()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    maxlen = int(model.context_length)
    out, total = [], 0
    for i in order[: int(n_texts)]:
        ids = tok(texts[i], add_special_tokens=False, verbose=False)["input_ids"][:maxlen]
        if n_tokens is not None:
            ids = ids[: max(0, int(n_tokens) - total)]
        out.append(ids)
        total += len(ids)
        if n_tokens is not None and total >= n_tokens:
            break
    if total == 0:
        raise FfkvError("the statistics sample tokenizes to nothing", "pass a corpus with text in it")
    return out


def accumulate_text_second_moments(model, seqs: Sequence[Sequence[int]], layers: Sequence[int],
                                   batch_tokens: int | None = None, progress: bool = True,
                                   shard: tuple[int, int] = (0, 1)) -> tuple[dict[int, torch.Tensor], int]:
    """Σ_t k_t k_t^T over every token of every record in ``seqs`` (token id lists), as
    :func:`accumulate_second_moments`; records sorted by length and padded on the right into batches of at
    most ``batch_tokens`` (default 3 x the context, the reference's) tokens, pads left out of the sums.
    ``shard`` (rank, world_size): only this rank's batches."""
    layers = sorted(set(layers))
    batch_tokens = int(batch_tokens or 3 * model.context_length)
    seqs = sorted((s for s in seqs if len(s)), key=len, reverse=True)
    pad = model.require_tokenizer().pad_token_id
    pad = 0 if pad is None else pad
    sums: dict[int, torch.Tensor] = {}
    count = 0
    spans, i = [], 0
    while i < len(seqs):  # the batches as one process forms them: (start, end), longest first
        j = min(len(seqs), i + max(1, batch_tokens // len(seqs[i])))
        spans.append((i, j))
        i = j
    spans = _shard_starts(spans, shard)
    total = sum(len(s) for i, j in spans for s in seqs[i:j])
    pbar = bar(total=total, desc=f"C=E[kk^T] L{','.join(map(str, layers))}", unit="tok", enabled=progress)
    with torch.no_grad():
        for i, j in spans:
            T = len(seqs[i])  # the longest of the batch (sorted)
            ids = torch.full((j - i, T), pad, dtype=torch.long)
            mask = torch.zeros((j - i, T), dtype=torch.long)
            for r, sq in enumerate(seqs[i:j]):
                ids[r, : len(sq)] = torch.tensor(sq, dtype=torch.long)
                mask[r, : len(sq)] = 1
            ids, mask = ids.to(model.device), mask.to(model.device)
            coef = capture_coefficients(model, ids, attention_mask=mask, layers=layers)
            keep = mask.reshape(-1).bool()
            for l in layers:
                k = coef[l].reshape(-1, coef[l].shape[-1])[keep].float()
                if l not in sums:
                    sums[l] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=model.device)
                sums[l] += (k.T @ k).double()
            n = int(keep.sum())
            count += n
            pbar.update(n)
    pbar.close()
    return {l: s.cpu() for l, s in sums.items()}, count


@torch.no_grad()
def accumulate_expert_second_moments(model, windows: torch.Tensor, experts: Sequence[tuple[int, int]],
                                     batch_size: int = 8, progress: bool = True, shard: tuple[int, int] = (0, 1)
                                     ) -> tuple[dict[tuple[int, int], torch.Tensor], dict[tuple[int, int], int]]:
    """Σ m^e m^e^T over the tokens routed to each ``(layer, expert)``, one forward pass per batch.

    Returns ``({(layer, expert): S (F, F) float64}, {(layer, expert): N_e})``; C = S / N_e. The pass stops after
    the deepest layer asked for. ``shard`` (rank, world_size): only this rank's batches (None for an expert
    no batch of the rank reached).
    """
    experts = sorted(set(experts))
    sums = {k: None for k in experts}
    counts = {k: 0 for k in experts}
    stop = max(l for l, _ in experts)
    starts = _shard_starts(range(0, windows.shape[0], batch_size), shard)
    pbar = bar(total=sum(windows[i:i + batch_size].numel() for i in starts),
               desc="C=E[kk^T] " + ",".join(f"L{l}.E{e}" for l, e in experts), unit="tok", enabled=progress)
    for i in starts:
        ids = windows[i:i + batch_size].to(model.device)
        with expert_intervene(model, reads=experts) as rec:
            run(model, ids, head="none", stop_after=stop)
        for key in experts:
            k = rec[key].coef.float()  # (n_e, F): only the tokens routed to the expert
            s = (k.T @ k).double()
            sums[key] = s if sums[key] is None else sums[key] + s
            counts[key] += k.shape[0]
        pbar.update(ids.numel())
    pbar.close()
    return {key: s.cpu() for key, s in sums.items()}, counts


def _reduce_sums(sums: dict, counts, keys: list) -> tuple[dict, object]:
    """The float64 sums (of ``keys``) and token counts of every rank added up (a lone process: as given). A rank
    that ran no batch of a key gives zeros of the width another rank read."""
    if distributed.world()[1] <= 1:
        return sums, counts
    mine = {str(k): list(sums[k].shape) for k in keys if sums.get(k) is not None}
    widths = {}
    for part in distributed.all_gather_json(mine):
        widths.update(part)
    out = {}
    for k in keys:  # the same order on every rank
        s = sums[k] if sums.get(k) is not None else torch.zeros(widths[str(k)], dtype=torch.float64)
        out[k] = distributed.all_reduce_sum(s.cpu())
    if isinstance(counts, dict):
        total = distributed.all_reduce_sum(torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64))
        return out, {k: int(v) for k, v in zip(keys, total.tolist())}
    return out, int(distributed.all_reduce_sum(torch.tensor([float(counts)], dtype=torch.float64)).item())


def _missing_anywhere(missing: list, wanted: list) -> list:
    """The keys some rank has no cache file for: every rank then computes them (the collectives need all)."""
    if distributed.world()[1] <= 1:
        return missing
    flags = distributed.all_reduce_sum(torch.tensor([float(k in missing) for k in wanted], dtype=torch.float64))
    return [k for k, f in zip(wanted, flags.tolist()) if f > 0]


def _stats_path(stats_dir: Path, identity: dict, corpus_key: str, layer, n_tokens: int) -> Path:
    if isinstance(layer, tuple):  # (layer, expert)
        return stats_dir / _model_key(identity) / f"{corpus_key}-L{layer[0]}-E{layer[1]}-{n_tokens}.safetensors"
    return stats_dir / _model_key(identity) / f"{corpus_key}-L{layer}-{n_tokens}.safetensors"


def load_second_moment(path: str | Path, identity: dict | None = None, layer: int | None = None,
                       expert: int | None = None) -> SecondMoment:
    """Read one cached statistics file; refuse it if it was computed for another model or layer."""
    tensors, meta = load_safetensors(path)
    if "C" not in tensors or "layer" not in meta:
        raise FfkvError(f"{path} is not an ffkv statistics file", "delete it and recompute")
    if identity is not None:
        theirs = meta.get("model", {}).get("fingerprint")
        if theirs != identity.get("fingerprint"):
            raise FfkvError(
                f"statistics {path} belong to another model ({meta.get('model', {}).get('name_or_path')}, "
                f"fingerprint {theirs}; this model is {identity.get('name_or_path')}, fingerprint "
                f"{identity.get('fingerprint')})",
                "pass another stats_dir (--stats-dir), delete the file, or recompute with recompute=True")
    if layer is not None and int(meta["layer"]) != layer:
        raise FfkvError(f"statistics {path} are for layer {meta['layer']}, not {layer}", "delete it and recompute")
    if layer is not None and meta.get("expert") != expert:
        raise FfkvError(f"statistics {path} are for expert {meta.get('expert')}, not {expert}",
                        "delete it and recompute")
    n_texts = meta.get("n_texts")
    return SecondMoment(int(meta["layer"]), tensors["C"].double(), int(meta["n_tokens"]), meta.get("corpus", ""),
                        Path(path), meta.get("expert"), None if n_texts is None else int(n_texts))


def layer_stats(model, layers: int | Sequence[int], corpus: str | Path | Sequence[str] = "auto",
                n_tokens: int = 100_000, stats_dir: str | Path | None = None, window: int | None = None,
                batch_size: int = 8, recompute: bool = False, cache: bool = True,
                progress: bool = True, base_identity: dict | None = None,
                memo: dict | None = None, n_texts: int | None = None) -> dict[int, SecondMoment]:
    """C = E[k k^T] of each layer in ``layers``, from the cache or computed in one pass over ``corpus``.

    ``layers`` holds layers and/or ``(layer, expert)`` pairs (an MoE layer's expert: the statistics over the
    tokens routed to it). Returns ``{layer or (layer, expert): SecondMoment}``; C is (d_ffn, d_ffn) float64
    on the CPU. ``n_tokens`` is the number of
    corpus tokens (fewer if the corpus is shorter); windows of ``window`` tokens (default: min(256, the
    model's context)). Cached under ``stats_dir`` (default ``$FFKV_STATS_DIR`` or ``~/.cache/ffkv/stats``).
    base_identity: the identity the statistics belong to (an edited model's base, from its journal;
    default :func:`base_identity` of the model). memo: a dict that keeps results between calls (sequential
    edits); None keeps nothing. n_texts: sample ``n_texts`` records as kmeng01 does (module docstring),
    ``n_tokens`` then caps the total (None: no cap); an expert's statistics always use the token stream.
    """
    if isinstance(layers, int):
        layers = [layers]
    experts = sorted({(model.check_layer(int(l[0])), model.check_expert(model.check_layer(int(l[0])), l[1]))
                      for l in layers if isinstance(l, (tuple, list))})
    layers = sorted({model.check_layer(l) for l in layers if not isinstance(l, (tuple, list))})
    if experts:
        return {**(layer_stats(model, layers, corpus, n_tokens, stats_dir, window, batch_size, recompute, cache,
                               progress, base_identity, memo, n_texts) if layers else {}),
                **_expert_stats(model, experts, corpus, n_tokens or 100_000, stats_dir, window, batch_size,
                                recompute, cache, progress, base_identity, memo)}
    if not layers:
        raise FfkvError("no layers given for the statistics", "pass layers=[...]")
    if n_texts is None and n_tokens is None:
        raise FfkvError("the statistics sample has no size", "pass n_tokens (a token stream) or n_texts (records)")
    identity, memo, memo_key = _memo(model, corpus, n_tokens, window, stats_dir, base_identity, memo)
    memo_key = memo_key + ((n_texts,) if n_texts is not None else ())
    if not recompute and all((memo_key, l) in memo for l in layers):
        return {l: memo[memo_key, l] for l in layers}
    if n_texts is None:
        name, windows, window, corpus_key, stats_dir = _corpus_windows(model, corpus, n_tokens, window, stats_dir)
        n = windows.numel()
    else:
        name, texts = resolve_corpus(model, corpus)
        seqs = text_sample(model, texts, n_texts, n_tokens)
        n_texts = len(seqs)  # fewer when the corpus has fewer records or the cap ended the sample
        n = sum(len(q) for q in seqs)
        digest = hashlib.sha256(json.dumps(seqs).encode()).hexdigest()[:10]
        corpus_key = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:40]}-texts{n_texts}-{digest}"
        window = int(model.context_length)
        stats_dir = Path(stats_dir) if stats_dir is not None else default_stats_dir()
    out: dict[int, SecondMoment] = {}
    missing = []
    for l in layers:
        path = _stats_path(stats_dir, identity, corpus_key, l, n)
        if cache and not recompute and path.exists():
            out[l] = load_second_moment(path, identity, l)
        else:
            missing.append(l)
    missing = _missing_anywhere(missing, layers)
    if missing:
        rank, size = distributed.world()
        progress = progress and rank == 0
        if n_texts is None:
            sums, count = accumulate_second_moments(model, windows, missing, batch_size, progress, (rank, size))
        else:
            sums, count = accumulate_text_second_moments(model, seqs, missing, progress=progress, shard=(rank, size))
        sums, count = _reduce_sums(sums, count, missing)
        sample = "stream" if n_texts is None else "texts"
        for l in missing:
            C = sums[l] / count
            path = _stats_path(stats_dir, identity, corpus_key, l, n)
            if cache and rank == 0:
                meta = provenance(identity, layer=l, corpus=name, corpus_key=corpus_key, n_tokens=count,
                                  window=window, n_texts=n_texts, sample=sample)
                meta.update(layer=l, corpus=name, n_tokens=count, n_texts=n_texts, sample=sample,
                            window=window)
                save_safetensors(path, {"C": C}, meta)
            out[l] = SecondMoment(l, C, count, name, path if cache else None, None, n_texts)
    for l in layers:
        memo[memo_key, l] = out[l]
    return out


def _memo(model, corpus, n_tokens, window, stats_dir, base_identity, memo):
    """``(identity, memo, memo_key)``: what a statistics call is keyed by in the edit context's memo, known
    before the corpus is read (so a repeated call tokenizes nothing)."""
    identity = base_identity if base_identity is not None else _identity_of(model)
    memo = memo if memo is not None else {}
    spec = str(corpus) if isinstance(corpus, (str, Path)) else \
        "texts-" + hashlib.sha256("\x00".join(corpus).encode()).hexdigest()[:16]
    return identity, memo, (spec, None if n_tokens is None else int(n_tokens), window, str(stats_dir),
                            identity.get("fingerprint"))


def _corpus_windows(model, corpus, n_tokens, window, stats_dir):
    """``(corpus name, token windows (n, window), window, cache key of those windows, stats folder)``."""
    name, texts = resolve_corpus(model, corpus)
    window = window or min(256, model.context_length)
    windows = token_windows(model, texts, int(n_tokens), window)
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:10]
    corpus_key = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:40]}-{digest}"
    return name, windows, window, corpus_key, Path(stats_dir) if stats_dir is not None else default_stats_dir()


def _expert_stats(model, experts, corpus, n_tokens, stats_dir, window, batch_size, recompute, cache, progress,
                  base_identity, memo) -> dict[tuple[int, int], SecondMoment]:
    """:func:`layer_stats` of ``(layer, expert)`` pairs: C over the tokens routed to each expert."""
    identity, memo, memo_key = _memo(model, corpus, n_tokens, window, stats_dir, base_identity, memo)
    if not recompute and all((memo_key, k) in memo for k in experts):
        return {k: memo[memo_key, k] for k in experts}
    name, windows, window, corpus_key, stats_dir = _corpus_windows(model, corpus, n_tokens, window, stats_dir)
    n = windows.numel()
    out: dict = {}
    missing = []
    for key in experts:
        path = _stats_path(stats_dir, identity, corpus_key, key, n)
        if cache and not recompute and path.exists():
            out[key] = load_second_moment(path, identity, key[0], key[1])
        else:
            missing.append(key)
    missing = _missing_anywhere(missing, experts)
    if missing:
        rank, size = distributed.world()
        sums, counts = accumulate_expert_second_moments(model, windows, missing, batch_size,
                                                        progress and rank == 0, (rank, size))
        sums, counts = _reduce_sums(sums, counts, missing)
        for key in missing:
            l, e = key
            if counts[key] == 0:
                raise FfkvError(f"no token of the statistics corpus is routed to expert {e} of layer {l}",
                                "use a larger corpus (stats_tokens) or another expert")
            C = sums[key] / counts[key]
            path = _stats_path(stats_dir, identity, corpus_key, key, n)
            if cache and rank == 0:
                meta = provenance(identity, layer=l, expert=e, corpus=name, corpus_key=corpus_key,
                                  n_tokens=counts[key], corpus_tokens=n, window=window)
                meta.update(layer=l, expert=e, corpus=name, n_tokens=counts[key])
                save_safetensors(path, {"C": C}, meta)
            out[key] = SecondMoment(l, C, counts[key], name, path if cache else None, e)
    for key in experts:
        memo[memo_key, key] = out[key]
    return out


def cholesky_factor(C: torch.Tensor, jitter: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor of C (float64), adding ``jitter · mean(diag C) · I`` until it is positive definite.

    Keys of dead memories make C singular on a finite corpus; the jitter is the smallest that works,
    starting at 1e-6 of the mean variance.
    """
    C = C.double()
    scale = C.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    for k in range(8):
        L, info = torch.linalg.cholesky_ex(C + (0.0 if k == 0 else jitter * 10 ** (k - 1)) * scale * eye)
        if int(info) == 0:
            return L
    raise FfkvError("the key statistics C are not positive definite even with jitter",
                    "compute them over more tokens (stats_tokens)")
