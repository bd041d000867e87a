"""Atomic result files that say what made them.

Every result ffkv writes (JSON, Parquet, safetensors, model folders) goes through a temporary path in
the same directory and is renamed into place, so a killed run never leaves a half-written file; and
every result carries :func:`provenance`: the ffkv version, the model's identity and the hyperparameters.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ._version import __version__
from .errors import FfkvError


def provenance(model_identity: dict | None = None, **hyperparameters: Any) -> dict:
    """The record every result file carries: ffkv version, model identity, hyperparameters, time."""
    return {
        "ffkv_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_identity or {},
        "hyperparameters": _jsonable(hyperparameters),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp if is_dir else tmp / path.name
    try:
        yield target
        if is_dir:
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
        else:
            os.replace(target, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(obj), indent=indent) + "\n")
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FfkvError(f"file not found: {path}", "check the path")
    try:
        text = path.read_text()
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FfkvError(f"{path} is not valid JSON ({e})", "regenerate or replace the file") from None


def write_parquet(path: str | os.PathLike, table_or_columns: Any, meta: dict | None = None) -> Path:
    """Write a pyarrow Table (or a dict of columns) atomically; ``meta`` goes into the file's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = table_or_columns if isinstance(table_or_columns, pa.Table) else pa.table(table_or_columns)
    if meta is not None:
        existing = dict(table.schema.metadata or {})
        existing[b"ffkv"] = json.dumps(_jsonable(meta)).encode()
        table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_parquet_meta(path: str | os.PathLike) -> dict:
    import pyarrow.parquet as pq

    try:
        md = pq.read_schema(path).metadata or {}
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for corrupt files
        raise FfkvError(f"{path} is not a readable Parquet file ({e})", "delete it and run again") from None
    return json.loads(md[b"ffkv"]) if b"ffkv" in md else {}


def save_safetensors(path: str | os.PathLike, tensors: dict, meta: dict | None = None) -> Path:
    from safetensors.torch import save_file

    metadata = {"ffkv": json.dumps(_jsonable(meta or {}))}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def load_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return ``(tensors, ffkv_metadata)``; a corrupt file is one clear error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FfkvError(f"file not found: {path}", "check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("ffkv", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise FfkvError(f"{path} is not a valid safetensors file ({e})", "delete it and recompute") from None
    return tensors, meta
