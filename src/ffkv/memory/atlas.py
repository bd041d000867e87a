"""An atlas folder, read back: trigger examples of any memory, prefixes as text, the model that made it.

Layout (written by :func:`ffkv.memory.miner.mine` and :func:`ffkv.memory.analysis.analyze`)::

    DIR/atlas.json               metadata: provenance, model path, corpus, status
    DIR/triggers/layer-LLL.parquet  index, kind (top|bottom), rank, coef, unit, position
    DIR/triggers/layer-LLL-expert-EEE.parquet  the same, for expert EEE of an MoE layer
    DIR/units.parquet            unit, doc, source, tokens (list<int32>), next_id
    DIR/values.parquet           layer, index, top_ids, top_p, max_p, ... (after analysis)
    DIR/analysis/*.json          per-layer measurements (after analysis)
    DIR/report.html + figures    (ffkv atlas report)
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import FfkvError
from ..io import read_json
from ..models.loading import load_model
from ..models.memory_id import MemoryId
from .miner import trigger_file
from .schema import TRIGGER_COLUMNS, UNIT_COLUMNS, VALUE_COLUMNS, read_atlas_meta, read_table

_MEMORY = re.compile(r"^[Ll]?(-?\d+)[.:](\d+)$")


def parse_memory(text) -> tuple[int, int]:
    """``"L3.17"`` / ``"3.17"`` / ``MemoryId(3, 17)`` -> (3, 17), the (layer, index) of a dense memory."""
    if isinstance(text, MemoryId):
        mid = text
    else:
        m = _MEMORY.match(str(text).strip())
        if not m:
            return _dense(MemoryId.parse(str(text)))  # "L3.E2.17": one error for an expert's memory
        mid = MemoryId(int(m.group(1)), int(m.group(2)))
    return _dense(mid)


def _dense(mid: MemoryId) -> tuple[int, int]:
    if mid.expert is not None:
        raise FfkvError(f"memory {mid} belongs to an expert, and this atlas has no expert axis",
                        "name a dense memory as L<layer>.<index>")
    return mid.layer, mid.index


class Atlas:
    """A mined atlas folder. ``model`` is loaded from the recorded path on first use unless given."""

    def __init__(self, path: str | Path, model=None):
        self.path = Path(path)
        meta_path = self.path / "atlas.json"
        if not meta_path.exists():
            raise FfkvError(f"'{path}' is not an atlas folder (no atlas.json)", "run `ffkv atlas mine` first")
        self.meta = read_atlas_meta(self.path)
        if self.meta.get("status") != "complete":
            raise FfkvError(f"atlas '{path}' is not complete (status {self.meta.get('status')})",
                            "run the same `ffkv atlas mine` command again to finish it")
        self._model = model
        self._tables: dict = {}

    # ------------------------------------------------------------------ basics
    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def d_ffn(self) -> int:
        return int(self.meta["d_ffn"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def model(self):
        if self._model is False:
            raise FfkvError("this atlas was opened without its model", "open it with Atlas(path)")
        if self._model is None:
            self._model = load_model(self.meta["model_path"])
            if self._model.identity["fingerprint"] != self.meta["model"].get("fingerprint"):
                raise FfkvError(f"the model at '{self.meta['model_path']}' has changed since the atlas was mined",
                                "mine the atlas again")
        return self._model

    @property
    def groups(self) -> list[tuple[int, int | None]]:
        """The key groups mined, ``(layer, expert or None)``: one per layer for a dense model; for an MoE
        model each expert of each MoE layer (and the shared expert / dense MLP where there is one)."""
        if "groups" not in self.meta:
            return [(l, None) for l in range(self.n_layers)]
        return [(int(g["layer"]), None if g["expert"] is None else int(g["expert"])) for g in self.meta["groups"]]

    @property
    def has_experts(self) -> bool:
        return any(e is not None for _, e in self.groups)

    def width(self, layer: int, expert: int | None = None) -> int:
        """Keys in the group (d_ffn of a dense layer, d_expert of an expert)."""
        if "groups" not in self.meta:
            return self.d_ffn
        for g in self.meta["groups"]:
            if g["layer"] == layer and g["expert"] == expert:
                return int(g["d_ffn"])
        if expert is None:
            raise FfkvError(f"layer {layer} of this atlas is a mixture of experts with no dense FFN",
                            f"name an expert: L{layer}.E<expert>.<index>")
        n = [e for l, e in self.groups if l == layer and e is not None]
        raise FfkvError(f"this atlas has no expert {expert} at layer {layer}",
                        f"use experts {min(n)}..{max(n)}" if n else f"layer {layer} has no experts: drop E{expert}")

    def check_memory(self, layer, index: int | None = None, expert: int | None = None):
        """``(layer, index)`` of a dense memory, or ``(layer, index, expert)`` when ``expert`` is given (or
        ``layer`` is a MemoryId / ``"L3.E2.17"`` naming one); refuses what the atlas does not have."""
        if isinstance(layer, (MemoryId, str, tuple)):
            mid = MemoryId.parse(layer)
            layer, index, expert = mid.layer, mid.index, mid.expert
        if not -self.n_layers <= layer < self.n_layers:
            raise FfkvError(f"layer {layer} is out of range for a {self.n_layers}-layer model",
                            f"use 0..{self.n_layers - 1}")
        layer = layer % self.n_layers
        if expert is not None and not self.has_experts:
            raise FfkvError(f"memory L{layer}.E{expert}.{index} belongs to an expert, and this atlas has no "
                            "expert axis", "name a dense memory as L<layer>.<index>")
        width = self.width(layer, expert)
        if not 0 <= index < width:
            raise FfkvError(f"memory index {index} is out of range (d_ffn = {width})", f"use 0..{width - 1}")
        return (layer, index) if expert is None else (layer, index, expert)

    # ------------------------------------------------------------------ tables
    def triggers(self, layer: int, expert: int | None = None):
        """The trigger table of one layer, or of one expert of it (pyarrow Table: index, kind, rank, coef,
        unit, position)."""
        layer = self.check_memory(layer, 0, expert)[0]
        key = layer if expert is None else (layer, expert)
        if key not in self._tables:
            f = self.path / trigger_file(layer, expert)
            if not f.exists():
                raise FfkvError(f"atlas '{self.path}' has no trigger file for layer {layer}"
                                + ("" if expert is None else f" expert {expert}"), "mine it again")
            t = read_table(f, TRIGGER_COLUMNS)
            d = self.width(layer, expert)
            idx, rank = t["index"].to_numpy(), t["rank"].to_numpy()
            if idx.size and (idx.min() < 0 or idx.max() >= d or rank.min() < 0 or rank.max() >= self.top_k):
                raise FfkvError(f"{f} has an index or rank out of range (d_ffn {d}, top_k {self.top_k})",
                                "mine the atlas again (or restore the file)")
            self._tables[key] = t
        return self._tables[key]

    def trigger_matrix(self, layer: int, kind: str = "top", expert: int | None = None) -> dict:
        """Dense arrays (d_ffn, k) of ``unit``, ``position``, ``coef`` (unit -1 where a key has fewer; an
        expert's key has fewer when fewer than k distinct prefixes were routed to the expert)."""
        t = self.triggers(layer, expert)
        d = self.width(layer % self.n_layers, expert)
        sel = np.asarray(t["kind"].to_numpy(zero_copy_only=False)) == kind
        idx, rank = t["index"].to_numpy()[sel], t["rank"].to_numpy()[sel].astype(np.int64)
        out = {"unit": np.full((d, self.top_k), -1, np.int64),
               "position": np.zeros((d, self.top_k), np.int64),
               "coef": np.full((d, self.top_k), np.nan, np.float32)}
        for col in out:
            out[col][idx, rank] = t[col].to_numpy()[sel]
        return out

    @cached_property
    def units(self) -> dict:
        """``unit -> (tokens list, next_id)`` for every unit a trigger cites."""
        t = read_table(self.path / "units.parquet", UNIT_COLUMNS, ["unit", "tokens", "next_id"]).to_pydict()
        return {u: (toks, nxt) for u, toks, nxt in zip(t["unit"], t["tokens"], t["next_id"])}

    @cached_property
    def unit_arrays(self) -> dict:
        """The cited units as flat arrays: ``unit`` (U,) ascending, ``offset`` (U,) into ``tokens`` (all their
        token ids, concatenated), ``length`` (U,), ``next_id`` (U,): for whole-layer lookups without a loop."""
        t = read_table(self.path / "units.parquet", UNIT_COLUMNS, ["unit", "tokens", "next_id"])
        units = t["unit"].to_numpy()
        toks = t["tokens"].combine_chunks()
        offs = toks.offsets.to_numpy().astype(np.int64)
        flat = toks.values.to_numpy().astype(np.int64)
        order = np.argsort(units, kind="stable")
        return {"unit": units[order], "offset": offs[:-1][order], "length": np.diff(offs)[order],
                "tokens": flat, "next_id": t["next_id"].to_numpy()[order]}

    def token_at(self, units: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Token ids at ``positions`` of ``units`` (same shapes); -1 where a position is outside its unit
        (negative, or at/after its end) or the unit is -1."""
        ua = self.unit_arrays
        units, positions = np.asarray(units, np.int64), np.asarray(positions, np.int64)
        j = np.clip(np.searchsorted(ua["unit"], units), 0, max(len(ua["unit"]) - 1, 0))
        ok = (units >= 0) & (len(ua["unit"]) > 0) & (positions >= 0)
        ok &= ua["unit"][j] == units if len(ua["unit"]) else False
        ok &= positions < ua["length"][j] if len(ua["unit"]) else False
        out = np.full(units.shape, -1, np.int64)
        out[ok] = ua["tokens"][ua["offset"][j[ok]] + positions[ok]]
        return out

    def prefix(self, unit: int, position: int) -> list[int]:
        """Token ids of the prefix ``unit[:position + 1]``."""
        return self.units[int(unit)][0][: int(position) + 1]

    def next_token(self, unit: int, position: int) -> int:
        """The token after the prefix in the corpus (-1 if the document ends there)."""
        toks, nxt = self.units[int(unit)]
        return toks[position + 1] if position + 1 < len(toks) else int(nxt)

    def next_tokens(self, layer: int, rank: int = 0, expert: int | None = None) -> np.ndarray:
        """(d_ffn,) next token of each key's rank-th top trigger (-1 where unknown)."""
        tm = self.trigger_matrix(layer, "top", expert)
        u, p = tm["unit"][:, rank], tm["position"][:, rank]
        inside = self.token_at(u, p + 1)
        ua = self.unit_arrays
        j = np.clip(np.searchsorted(ua["unit"], u), 0, max(len(ua["unit"]) - 1, 0))
        at_end = (u >= 0) & (inside < 0)
        out = np.where(at_end, ua["next_id"][j] if len(ua["unit"]) else -1, inside)
        return np.where(u >= 0, out, -1).astype(np.int64)

    # ------------------------------------------------------------------ one memory
    def memory_triggers(self, layer, index: int | None = None, kind: str = "top", n: int | None = None,
                        tokenizer=None, expert: int | None = None) -> list[dict]:
        """The trigger examples of memory ``L{layer}.{index}`` (``L{layer}.E{expert}.{index}``), best first,
        with their text. ``layer`` may also be a :class:`MemoryId` or its name (then ``index`` is omitted)."""
        layer, index, *ex = self.check_memory(layer, index, expert)
        tm = self.trigger_matrix(layer, kind, ex[0] if ex else None)
        tok = tokenizer if tokenizer is not None else self.model.tokenizer
        rows = []
        for r in range(self.top_k if n is None else min(n, self.top_k)):
            u, p = int(tm["unit"][index, r]), int(tm["position"][index, r])
            if u < 0:
                break
            ids = self.prefix(u, p)
            nxt = self.next_token(u, p)
            rows.append({"rank": r, "coef": float(tm["coef"][index, r]), "unit": u, "position": p,
                         "prefix": tok.decode(ids), "last_token": tok.decode(ids[-1:]),
                         "next_token": tok.decode([nxt]) if nxt >= 0 else None})
        return rows

    def values_table(self):
        f = self.path / "values.parquet"
        if not f.exists():
            return None
        if "values" not in self._tables:
            self._tables["values"] = read_table(f, VALUE_COLUMNS)
        return self._tables["values"]

    def analysis(self, name: str) -> dict | None:
        f = self.path / "analysis" / f"{name}.json"
        return read_json(f) if f.exists() else None
