"""Merging atlases mined on different corpora (shards of one corpus, other machines) into one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import FfkvError
from ..io import atomic_path, write_json, write_parquet
from .atlas import Atlas
from .miner import utc_now, trigger_file
from .combine import select_triggers
from .schema import UNIT_COLUMNS, read_table


def merge_atlases(parts: list[str | Path], out: str | Path) -> dict:
    """Merge atlases mined with the same model and top_k on different corpora (e.g. shards of a corpus
    mined on different machines) into one: per key, the top-k / bottom-k of the union.

    Units are renumbered (part p's units are offset by the units of parts 0..p-1), so ties go to the earlier
    part, then the earlier prefix: merging the atlases of consecutive shards of a corpus gives the atlas of
    the whole corpus.
    """
    atlases = [Atlas(p, model=False) for p in parts]
    if len(atlases) < 2:
        raise FfkvError("merging needs at least two atlases", "pass two or more atlas folders")
    first = atlases[0]
    for a in atlases[1:]:
        if a.meta["model"].get("fingerprint") != first.meta["model"].get("fingerprint") or a.top_k != first.top_k \
                or a.groups != first.groups:
            raise FfkvError(f"atlas '{a.path}' was mined with another model or top_k than '{first.path}'",
                            "merge atlases of one model with the same --top-k")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FfkvError(f"output folder '{out}' exists and is not empty", "pass a new --out folder")
    with atomic_path(out, is_dir=True) as tmp:  # the merged atlas appears whole or not at all
        return _merge(atlases, first, tmp)


def _merge(atlases: list[Atlas], first: Atlas, out: Path) -> dict:
    k = first.top_k
    offsets = np.cumsum([0] + [int(a.meta["units"]) for a in atlases[:-1]])
    prov = {key: first.meta[key] for key in ("ffkv_version", "model", "hyperparameters")}
    prov["hyperparameters"] = {**prov["hyperparameters"], "corpus": [a.meta["hyperparameters"]["corpus"]
                                                                      for a in atlases]}
    dedup = bool(first.meta["hyperparameters"].get("dedup", False))
    all_units = pa.concat_tables([_offset_units(read_table(a.path / "units.parquet", UNIT_COLUMNS), off)
                                  for a, off in zip(atlases, offsets)]).combine_chunks()
    unit_tokens = dict(zip(all_units["unit"].to_pylist(), all_units["tokens"].to_pylist())) if dedup else None
    for l, e in first.groups:  # every layer of a dense atlas; every expert (and dense FFN) of an MoE one
        t = pa.concat_tables([_offset_units(a.triggers(l, e), off) for a, off in zip(atlases, offsets)]).to_pydict()
        table = select_triggers(t, k, dedup, unit_tokens)
        write_parquet(out / trigger_file(l, e), table,
                      meta={**prov, "layer": l} if e is None else {**prov, "layer": l, "expert": e})
    write_parquet(out / "units.parquet", all_units, meta=prov)
    meta = {**first.meta, **prov, "status": "complete", "units": int(sum(a.meta["units"] for a in atlases)),
            "tokens": int(sum(a.meta["tokens"] for a in atlases)), "merged_from": [str(a.path) for a in atlases],
            "world_size": int(sum(int(a.meta.get("world_size", 1)) for a in atlases))}
    write_json(out / "atlas.json", meta)
    write_json(out / "run.json", {"created": utc_now(), "merged_from": meta["merged_from"]})
    return meta


def _offset_units(table, offset: int):
    i = table.schema.get_field_index("unit")
    return table.set_column(i, "unit", pc.add(table["unit"], pa.scalar(int(offset), pa.int64())))
