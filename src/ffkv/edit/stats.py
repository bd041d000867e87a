"""Second-moment statistics of the keys: C = E[k k^T] over a text corpus, for ROME's and MEMIT's updates.

For layer l the key k is the FFN's memory coefficient vector (the input of W_out, ``coef``), one per token:

    C_l = (1 / N) Σ_t k_t k_t^T            k_t: (d_ffn,)   C_l: (d_ffn, d_ffn)

All requested layers are accumulated in one pass (the forward pass stops after the deepest requested layer),
batch products in float32 and running sums in float64, whatever the model's dtype. Results are cached on
disk as safetensors, one file per layer, with the model's identity, the layer, the corpus and the token
count in the metadata; a cached file that belongs to another model is refused.

The corpus (``corpus=``): ``"auto"`` is the testbed world's training text for a testbed model (its
``testbed.json`` names the world) and WikiText-2 from ``../shared/data`` otherwise; ``"wikitext"``; a
path to a ``.txt`` / ``.jsonl`` (``"text"`` field) file or a folder of them; or a list of strings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import FfkvError
from ..io import load_safetensors, save_safetensors

SHARED_DATA = Path(os.environ.get("FFKV_SHARED_DATA", Path(__file__).resolve().parents[3].parent / "shared" / "data"))


@dataclass
class SecondMoment:
    """C = E[k k^T] of one layer: ``C`` (d_ffn, d_ffn) float64 on the CPU, over ``n_tokens`` tokens."""

    layer: int
    C: torch.Tensor
    n_tokens: int
    corpus: str
    path: Path | None = None


class _StopForward(Exception):
    """Raised by a hook after the deepest requested layer: the rest of the model is not needed."""


def default_stats_dir() -> Path:
    return Path(os.environ.get("FFKV_STATS_DIR", Path.home() / ".cache" / "ffkv" / "stats"))


# ----------------------------------------------------------------------------------------------------
# Identity


def base_identity(model) -> dict:
    """The identity the statistics belong to: the unedited model's.

    Edits change W_out, not the keys that C is computed from at the edited layer, and ROME/MEMIT reuse the
    statistics of the unedited model across edits, so an edited model (in memory, or saved by
    ``ffkv edit`` with ``ffkv_edit.json`` beside its weights) uses its base model's statistics.
    """
    ident = getattr(model, "_ffkv_base_identity", None)
    if ident is not None:
        return ident
    p = Path(str(model.name_or_path)) / "ffkv_edit.json"
    if p.exists():
        try:
            return json.loads(p.read_text())["base_model"]
        except (json.JSONDecodeError, KeyError):
            pass
    return model.identity


def _model_key(identity: dict) -> str:
    p = Path(str(identity.get("name_or_path", "model")))
    # testbed folders all call their model "model": keep the folder above too
    name = f"{p.parent.name}_{p.name}" if p.name == "model" and p.parent.name else (p.name or "model")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
    return f"{name}-{identity.get('model_type')}-{identity.get('n_layers')}x{identity.get('d_model')}x{identity.get('d_ffn')}"


# ----------------------------------------------------------------------------------------------------
# Corpus


def testbed_world_of(model):
    """The testbed world a model was trained on (from its folder's ``testbed.json``), or None."""
    p = Path(str(model.name_or_path))
    for meta_path in (p / "testbed.json", p.parent / "model" / "testbed.json"):
        if meta_path.exists():
            try:
                world = json.loads(meta_path.read_text())["hyperparameters"]["world"]
                from ..testbed.world import generate_world

                return generate_world(int(world["seed"]), world["preset"])
            except (KeyError, ValueError, json.JSONDecodeError, FfkvError):
                return None
    return None


def resolve_corpus(model, corpus: str | Path | Sequence[str] = "auto") -> tuple[str, Iterable[str]]:
    """``(name, texts)`` of a corpus spec (see the module docstring)."""
    if not isinstance(corpus, (str, Path)):
        texts = list(corpus)
        if not texts:
            raise FfkvError("the statistics corpus is empty", "pass a non-empty list of texts")
        return "texts", texts
    spec = str(corpus)
    if spec == "auto":
        world = testbed_world_of(model)
        if world is not None:
            return f"testbed-{world.seed}-{world.preset}", world.documents()
        spec = "wikitext"
    if spec in ("testbed",):
        world = testbed_world_of(model)
        if world is None:
            raise FfkvError(f"model '{model.name_or_path}' is not a testbed model (no testbed.json)",
                            "pass corpus='wikitext' or a text file")
        return f"testbed-{world.seed}-{world.preset}", world.documents()
    if spec == "wikitext":
        folder = SHARED_DATA / "text" / "wikitext-2"
        if not folder.exists():
            raise FfkvError(f"no corpus for the statistics: WikiText-2 is not at {folder}",
                            "pass corpus=<text file or folder> (--corpus), or set FFKV_SHARED_DATA")
        return "wikitext-2", _read_texts(folder, prefer="train")
    p = Path(spec)
    if not p.exists():
        raise FfkvError(f"statistics corpus '{spec}' not found", "pass 'auto', 'wikitext', or a text file/folder")
    return p.name, _read_texts(p)


def _read_texts(path: Path, prefer: str | None = None) -> list[str]:
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*")
                                                  if f.suffix in (".txt", ".jsonl", ".raw", ".tokens", ".parquet"))
    if prefer and any(prefer in f.name for f in files):
        files = [f for f in files if prefer in f.name]
    texts: list[str] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(f)
            col = "text" if "text" in table.column_names else table.column_names[0]
            texts.extend(str(t) for t in table.column(col).to_pylist() if t and str(t).strip())
        elif f.suffix == ".jsonl":
            for line in f.read_text(errors="replace").splitlines():
                if line.strip():
                    d = json.loads(line)
                    texts.append(d.get("text", "") if isinstance(d, dict) else str(d))
        else:
            texts.extend(t for t in re.split(r"\n\s*\n", f.read_text(errors="replace")) if t.strip())
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise FfkvError(f"statistics corpus {path} has no text", "pass a folder or file with text in it")
    return texts


def token_windows(model, texts: Iterable[str], n_tokens: int, window: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the texts, joined by eos, as windows: (n_windows, window) long."""
    tok = model._require_tokenizer()
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


def _max_positions(model) -> int:
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1024


# ----------------------------------------------------------------------------------------------------
# Accumulation


def accumulate_second_moments(model, windows: torch.Tensor, layers: Sequence[int], batch_size: int = 8,
                              progress: bool = True) -> tuple[dict[int, torch.Tensor], int]:
    """Σ_t k_t k_t^T for each layer over all tokens of ``windows`` (n, T), in one forward pass per batch.

    Returns ``({layer: S (d_ffn, d_ffn) float64}, N)``; C = S / N.
    """
    from tqdm import tqdm

    from ..models.hooks import Intervention, intervene

    layers = sorted(set(layers))
    sums = {l: torch.zeros(model.d_ffn, model.d_ffn, dtype=torch.float64, device=model.device) for l in layers}
    count = 0

    def stop(h):
        raise _StopForward

    deepest = layers[-1]
    bar = tqdm(total=windows.numel(), desc=f"C=E[kk^T] L{','.join(map(str, layers))}", unit="tok",
               disable=not progress, file=None, mininterval=1.0, leave=False)
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i:i + batch_size].to(model.device)
            with intervene(model, reads=[("coef", l) for l in layers],
                           edits=[Intervention("ffn_out", deepest, "fn", value=stop)]) as rec:
                try:
                    model.hf(input_ids=ids)
                except _StopForward:
                    pass
            for l in layers:
                k = rec["coef", l].reshape(-1, model.d_ffn).float()
                sums[l] += (k.T @ k).double()
            count += ids.numel()
            bar.update(ids.numel())
    bar.close()
    return {l: s.cpu() for l, s in sums.items()}, count


def _stats_path(stats_dir: Path, identity: dict, corpus_key: str, layer: int, n_tokens: int) -> Path:
    return stats_dir / _model_key(identity) / f"{corpus_key}-L{layer}-{n_tokens}.safetensors"


def load_second_moment(path: str | Path, identity: dict | None = None, layer: int | None = None) -> SecondMoment:
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
    return SecondMoment(int(meta["layer"]), tensors["C"].double(), int(meta["n_tokens"]), meta.get("corpus", ""),
                        Path(path))


def layer_stats(model, layers: int | Sequence[int], corpus: str | Path | Sequence[str] = "auto",
                n_tokens: int = 100_000, stats_dir: str | Path | None = None, window: int | None = None,
                batch_size: int = 8, recompute: bool = False, cache: bool = True,
                progress: bool = True) -> dict[int, SecondMoment]:
    """C = E[k k^T] of each layer in ``layers``, from the cache or computed in one pass over ``corpus``.

    Returns ``{layer: SecondMoment}``; C is (d_ffn, d_ffn) float64 on the CPU. ``n_tokens`` is the number of
    corpus tokens (fewer if the corpus is shorter); windows of ``window`` tokens (default: min(256, the
    model's context)). Cached under ``stats_dir`` (default ``$FFKV_STATS_DIR`` or ``~/.cache/ffkv/stats``).
    """
    if isinstance(layers, int):
        layers = [layers]
    layers = sorted({model.check_layer(l) for l in layers})
    if not layers:
        raise FfkvError("no layers given for the statistics", "pass layers=[...]")
    identity = base_identity(model)
    # Sequential edits call this once per edit: keep the results on the model object as well.
    memo = model.__dict__.setdefault("_ffkv_stats_memo", {})
    spec = str(corpus) if isinstance(corpus, (str, Path)) else \
        "texts-" + hashlib.sha256("\x00".join(corpus).encode()).hexdigest()[:16]
    memo_key = (spec, int(n_tokens), window, str(stats_dir), identity.get("fingerprint"))
    if not recompute and all((memo_key, l) in memo for l in layers):
        return {l: memo[memo_key, l] for l in layers}
    name, texts = resolve_corpus(model, corpus)
    window = window or min(256, _max_positions(model))
    windows = token_windows(model, texts, int(n_tokens), window)
    n = windows.numel()
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:10]
    corpus_key = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:40]}-{digest}"
    stats_dir = Path(stats_dir) if stats_dir is not None else default_stats_dir()

    out: dict[int, SecondMoment] = {}
    missing = []
    for l in layers:
        path = _stats_path(stats_dir, identity, corpus_key, l, n)
        if cache and not recompute and path.exists():
            out[l] = load_second_moment(path, identity, l)
        else:
            missing.append(l)
    if missing:
        sums, count = accumulate_second_moments(model, windows, missing, batch_size, progress)
        for l in missing:
            C = sums[l] / count
            path = _stats_path(stats_dir, identity, corpus_key, l, n)
            if cache:
                from ..io import provenance

                meta = provenance(identity, layer=l, corpus=name, corpus_key=corpus_key, n_tokens=count,
                                  window=window)
                meta.update(layer=l, corpus=name, n_tokens=count)
                save_safetensors(path, {"C": C}, meta)
            out[l] = SecondMoment(l, C, count, name, path if cache else None)
    for l in layers:
        memo[memo_key, l] = out[l]
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
