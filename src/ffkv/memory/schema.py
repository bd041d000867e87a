"""What an atlas folder must hold, checked on read: ``atlas.json``'s fields and every Parquet table's columns.

A tampered or truncated file is refused in one line that names the file and the bad field
(:class:`~ffkv.errors.FfkvError`), never a traceback from deep inside an analysis.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FfkvError
from ..io import read_json

ATLAS_VERSION = 1

# column -> pyarrow type name (as ``str(field.type)``) of every table an atlas holds
TRIGGER_COLUMNS = {"index": "int32", "kind": "string", "rank": "int16", "coef": "float", "unit": "int64",
                   "position": "int32"}
UNIT_COLUMNS = {"unit": "int64", "doc": "int64", "source": "string", "tokens": "list<int32>",
                "next_id": "int64"}
VALUE_COLUMNS = {"layer": "int32", "index": "int32", "top_ids": "list<int32>", "max_p": "float"}

_FIX = "mine the atlas again (or restore the file)"


def _bad(path: Path, field: str, want: str, got) -> FfkvError:
    return FfkvError(f"{path} has a bad field '{field}' (expected {want}, got {got!r})", _FIX)


def _int(meta: dict, path: Path, field: str, lo: int = 0) -> int:
    v = meta.get(field)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(path, field, f"an integer >= {lo}", v)
    return v


def check_atlas_meta(meta, path: Path, complete: bool = True) -> dict:
    """``meta`` (the parsed ``atlas.json`` at ``path``) if it is an atlas's metadata of this version; with
    ``complete`` the fields of a finished atlas (n_layers, d_ffn, top_k, units, tokens) too."""
    if not isinstance(meta, dict):
        raise FfkvError(f"{path} is not an atlas metadata object (got {type(meta).__name__})", _FIX)
    if meta.get("atlas_version") != ATLAS_VERSION:
        raise FfkvError(f"{path} has atlas_version {meta.get('atlas_version')!r}; this ffkv reads version "
                        f"{ATLAS_VERSION}", "mine the atlas again with this ffkv")
    for field in ("model", "hyperparameters"):
        if not isinstance(meta.get(field), dict):
            raise _bad(path, field, "an object", meta.get(field))
    for field in ("model_path", "ffkv_version", "status"):
        if not isinstance(meta.get(field), str):
            raise _bad(path, field, "a string", meta.get(field))
    h = meta["hyperparameters"]
    for field, kind in (("corpus", (str, list)), ("split", str), ("window", int), ("min_tokens", int),
                        ("text_field", str), ("top_k", int)):
        if not isinstance(h.get(field), kind) or isinstance(h.get(field), bool):
            raise _bad(path, f"hyperparameters.{field}", "a value of the mined run", h.get(field))
    if not complete or meta["status"] != "complete":
        return meta
    for field, lo in (("n_layers", 1), ("d_ffn", 1), ("top_k", 1), ("units", 0), ("tokens", 0)):
        _int(meta, path, field, lo)
    if "groups" in meta:
        groups = meta["groups"]
        if not isinstance(groups, list) or not all(
                isinstance(g, dict) and isinstance(g.get("layer"), int) and isinstance(g.get("d_ffn"), int)
                and (g.get("expert") is None or isinstance(g.get("expert"), int)) for g in groups):
            raise _bad(path, "groups", "a list of {layer, expert, d_ffn}", groups if not isinstance(groups, list)
                       else "a malformed entry")
    return meta


def read_atlas_meta(folder: str | Path, complete: bool = True) -> dict:
    """``folder/atlas.json``, parsed and checked (:func:`check_atlas_meta`)."""
    path = Path(folder) / "atlas.json"
    return check_atlas_meta(read_json(path), path, complete)


def read_table(path: str | Path, columns: dict[str, str], read_columns: list[str] | None = None):
    """A Parquet table of an atlas, refused in one line when the file is missing, truncated or corrupt, or
    lacks a column of ``columns`` (name -> type) or has it with another type."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FfkvError(f"atlas file {path} is missing", _FIX)
    try:
        table = pq.read_table(path, columns=read_columns)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for truncated or corrupt files
        raise FfkvError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:120]})", _FIX) from None
    names = set(table.schema.names)
    for col, typ in columns.items():
        if read_columns is not None and col not in read_columns:
            continue
        if col not in names:
            raise FfkvError(f"{path} has no column '{col}'", _FIX)
        t = table.schema.field(col).type
        got = f"list<{t.value_type}>" if hasattr(t, "value_type") else str(t)
        if got != typ:
            raise FfkvError(f"{path} has column '{col}' of type {got}, expected {typ}", _FIX)
    return table
