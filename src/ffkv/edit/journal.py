"""The edit journal: every edit as a low-rank delta of one W_out, undoable bit for bit and replayable.

An entry holds the update ``ΔW = u v^T`` of layer l's value matrix in value orientation (d_model, d_ffn):
u (d_model, r) and v (d_ffn, r) in float32, the request(s), the hyperparameters, and SHA-256 checksums of
the W_out parameter before and after. Applying an entry is one deterministic function,

    W <- round_dtype( float64(W) + float64(u) @ float64(v)^T )

so replaying the same entries in the same order onto the same base weights gives the same bits. Adding
and then subtracting ΔW would not (floating point), so the journal also keeps the *base* W_out of every
layer it touched (one copy per layer, in the model's dtype): undoing the last n entries restores the base
of their layers and replays the earlier entries of those layers, then checks the checksum.

An edit of one expert of a mixture-of-experts layer (``expert=e``) changes only that expert's W_out, the
slice ``value_param(l, e)[value_slice(l, e)]`` of the fused (E, D, F) parameter: its checksums, its base copy
and its undo cover exactly that slice (``L3.E2`` in the files), and the other experts are never written.

On disk (``Journal.save(dir)``): ``journal.json`` (entries, provenance), ``deltas.safetensors`` (u, v of
each entry) and ``base.safetensors`` (the base W_out parameters), written as one folder whole or not at all
(:func:`ffkv.io.output_dir`). :meth:`Journal.load` checks ``journal.json`` against its schema first
(:func:`check_journal_meta`: version, entries, each entry's method, integer layer, requests, checksums) and the
tensors' shapes; undo and replay check the entries against the model (:meth:`Journal.check_model`): a tampered
or foreign journal is one FfkvError line.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import FfkvError
from ..io import _jsonable, load_safetensors, output_dir, provenance, require_finite
from .stats import base_identity as stats_base_identity

JOURNAL_VERSION = 1


def weight_checksum(t: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a tensor's bytes, any dtype."""
    b = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(b).hexdigest()[:16]


def layer_checksum(model, layer: int, expert: int | None = None) -> str:
    """Checksum of layer l's W_out parameter, or of expert e's slice of it."""
    return weight_checksum(_written(model, layer, expert))


def _written(model, layer: int, expert: int | None):
    """The tensor an edit writes: the W_out parameter, or expert e's W_out inside the fused parameter."""
    if expert is None:
        return model.value_param(layer)
    return model.value_param(layer, expert)[model.value_slice(layer, expert)]


def _values(model, layer: int, expert: int | None):
    return model.values(layer) if expert is None else model.values(layer, expert)


def _site_name(site) -> str:
    return f"L{site}" if not isinstance(site, tuple) else f"L{site[0]}.E{site[1]}"


@dataclass
class JournalEntry:
    """One applied update ``ΔW_l = u v^T``; u: (d_model, r), v: (d_ffn, r), float32 on the CPU."""

    method: str
    layer: int
    u: torch.Tensor
    v: torch.Tensor
    requests: list[dict]
    hparams: dict
    before: str
    after: str = ""
    info: dict = field(default_factory=dict)
    created: str = ""
    keys: torch.Tensor | None = None  # (d_ffn, r) the keys the update was made for (k*), if any
    targets: torch.Tensor | None = None  # (d_model, r) the values they now map to (v*), if any
    expert: int | None = None  # the expert of an MoE layer whose W_out was edited, None for a dense W_out

    @property
    def site(self):
        """What the entry wrote: the layer, or ``(layer, expert)``."""
        return self.layer if self.expert is None else (self.layer, self.expert)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def meta(self) -> dict:
        out = {"method": self.method, "layer": self.layer, "rank": self.rank, "requests": self.requests,
               "hparams": self.hparams, "before": self.before, "after": self.after, "info": self.info,
               "created": self.created}
        if self.expert is not None:
            out["expert"] = self.expert
        return out


def delta_matrix(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ΔW = u v^T in float64, (d_model, d_ffn); exact products, one rounding when applied."""
    return u.double() @ v.double().T


@torch.no_grad()
def apply_delta(model, layer: int, u: torch.Tensor, v: torch.Tensor, expert: int | None = None) -> None:
    """W_out(l) <- dtype(float64(W) + u v^T), written through the value view (transposed for Conv1D); with
    ``expert``, that expert's W_out (its slice of the fused parameter) only."""
    W = _values(model, layer, expert)
    new = W.double() + delta_matrix(u.to(W.device), v.to(W.device))
    W.copy_(new.to(W.dtype))


@torch.no_grad()
def check_update(model, layer: int, u: torch.Tensor, v: torch.Tensor, max_ratio: float, what: str,
                 expert: int | None = None) -> dict:
    """Refuse a non-finite update, or one whose norm is out of range: ||ΔW||_F > max_ratio · ||W||_F."""
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        raise FfkvError(f"the {what} update of layer {layer} is not finite; the model is unchanged",
                        "lower v_lr / clamp_norm_factor, or recompute the statistics")
    d = delta_matrix(u, v)
    dn = float(d.norm())
    wn = float(_values(model, layer, expert).double().norm())
    if not dn == dn or dn > max_ratio * wn:  # noqa: PLR0124 - NaN check
        raise FfkvError(f"the {what} update of layer {layer} has norm {dn:.3g}, {dn / max(wn, 1e-30):.1f}x the "
                        f"layer's W_out norm {wn:.3g} (limit {max_ratio}x); the model is unchanged",
                        "check the request, or raise max_update_ratio if this is intended")
    return {"update_norm": dn, "weight_norm": wn}


class Journal:
    """The edits applied to one model, in order. ``len(journal)``, ``journal.entries``, ``journal[i]``."""

    def __init__(self):
        self.entries: list[JournalEntry] = []
        # layer (or (layer, expert)) -> W_out parameter (expert slice) before the first edit (model dtype)
        self.base: dict = {}
        self.base_identity: dict | None = None
        self.param_layout: str = ""
        self.context = None  # the EditContext of the edits recorded here (in memory only; see apply_edits)

    def __len__(self):
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, i):
        return self.entries[i]

    def __repr__(self):
        return f"Journal({len(self)} edits on layers {sorted({e.layer for e in self.entries})})"

    @property
    def layers(self) -> list[int]:
        return sorted({e.layer for e in self.entries})

    @property
    def base_layers(self) -> list[int]:
        """The layers whose base W_out (or an expert's slice of it) the journal keeps."""
        return sorted({s if isinstance(s, int) else s[0] for s in self.base})

    # ------------------------------------------------------------------------------------------------
    def attach(self, model, base_identity: dict | None = None) -> None:
        """Remember the unedited model's identity (once): ``base_identity`` when given (an
        :class:`~ffkv.edit.context.EditContext`'s), else the model's own (its base model's for an edited
        folder). The statistics of later edits belong to it. Nothing is stored on the model."""
        if self.base_identity is None:
            self.base_identity = base_identity if base_identity is not None else stats_base_identity(model)

    def record(self, model, method: str, layer: int, u: torch.Tensor, v: torch.Tensor, requests: list[dict],
               hparams: dict, info: dict | None = None, max_ratio: float = float("inf"),
               keys: torch.Tensor | None = None, targets: torch.Tensor | None = None,
               expert: int | None = None) -> JournalEntry:
        """Check, apply and record ``ΔW_l = u v^T`` (of expert ``expert``'s W_out when given); a refused
        update leaves the model unchanged."""
        layer = model.check_layer(layer)
        if expert is not None:
            expert = model.check_expert(layer, expert)
        d_ffn = _values(model, layer, expert).shape[1]  # value orientation (d_model, d_ffn) for every family
        u = u.detach().float().cpu().reshape(model.d_model, -1).contiguous()
        v = v.detach().float().cpu().reshape(d_ffn, -1).contiguous()
        info = {**(info or {}), **check_update(model, layer, u, v, max_ratio, method.upper(), expert)}
        self.attach(model)
        param = _written(model, layer, expert)
        site = layer if expert is None else (layer, expert)
        if site not in self.base:
            self.base[site] = param.detach().clone().cpu()
        before = weight_checksum(param)
        apply_delta(model, layer, u, v, expert)
        entry = JournalEntry(method, layer, u, v, requests, dict(hparams), before, weight_checksum(param), info,
                             _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                             None if keys is None else keys.detach().float().cpu().reshape(d_ffn, -1),
                             None if targets is None else targets.detach().float().cpu().reshape(model.d_model, -1),
                             expert)
        self.entries.append(entry)
        return entry

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def undo(self, model, n: int | None = None) -> int:
        """Undo the last ``n`` edits (all when None), restoring W_out bit for bit; returns how many.

        Refuses (model unchanged) when the model's current weights are not those the journal left.
        """
        n = len(self.entries) if n is None else int(n)
        if n < 0 or n > len(self.entries):
            raise FfkvError(f"cannot undo {n} edits: the journal holds {len(self.entries)}",
                            f"pass n in 0..{len(self.entries)}")
        if n == 0:
            return 0
        self.check_model(model)
        keep, drop = self.entries[: len(self.entries) - n], self.entries[len(self.entries) - n:]
        sites = sorted({e.site for e in drop}, key=_site_name)
        for site in sites:
            layer, expert = _split(site)
            what = f"layer {layer}" + ("" if expert is None else f" expert {expert}")
            last = [e for e in self.entries if e.site == site][-1]
            now = layer_checksum(model, layer, expert)
            if now != last.after:
                raise FfkvError(f"{what}'s W_out is not what the journal left (checksum {now}, journal "
                                f"{last.after}): the model was changed outside the journal; nothing was undone",
                                "undo on the model the journal edited, or load the edited model again")
            if site not in self.base:
                raise FfkvError(f"the journal has no base weights of {what}", "it cannot undo this edit")
        for site in sites:
            layer, expert = _split(site)
            _written(model, layer, expert).copy_(self.base[site].to(model.device))
            for e in keep:
                if e.site == site:
                    apply_delta(model, layer, e.u, e.v, expert)
            want = next(e.before for e in drop if e.site == site)
            got = layer_checksum(model, layer, expert)
            if got != want:
                raise FfkvError(f"undo of {_site_name(site)} gave checksum {got}, expected {want}",
                                "please report this; reload the model")
        self.entries = keep
        return n

    @torch.no_grad()
    def replay(self, model) -> "Journal":
        """Apply every entry, in order, to a fresh copy of the base model; bit-identical to the edited model.

        Each entry's 'before' checksum must match the model's weights, so a journal is never replayed onto
        another model (or twice). Returns the journal.
        """
        self.check_model(model)
        first = {}
        for i, e in enumerate(self.entries):
            first.setdefault(e.site, (i, e))
        for i, e in first.values():
            now = layer_checksum(model, e.layer, e.expert)
            if now != e.before:
                raise FfkvError(f"edit {i} ({e.method}, layer {e.layer}) was recorded on W_out checksum {e.before} "
                                f"but this model's is {now}",
                                "replay onto a fresh copy of the model the journal was recorded on")
        for e in self.entries:
            # Checked again per entry: two entries on one layer chain their checksums.
            if layer_checksum(model, e.layer, e.expert) != e.before:
                raise FfkvError(f"the journal's entries on layer {e.layer} do not chain", "the journal is corrupt")
            if e.site not in self.base:
                self.base[e.site] = _written(model, e.layer, e.expert).detach().clone().cpu()
            apply_delta(model, e.layer, e.u, e.v, e.expert)
            if layer_checksum(model, e.layer, e.expert) != e.after:
                raise FfkvError(f"replaying the edit on layer {e.layer} did not reproduce its weights",
                                "replay on the same dtype and device the edit was made on")
        self.attach(model)
        return self

    # ------------------------------------------------------------------------------------------------
    def save(self, out: str | Path, model=None) -> Path:
        """Write ``journal.json``, ``deltas.safetensors`` and ``base.safetensors`` as the folder ``out``, whole
        or not at all (:func:`ffkv.io.output_dir`: an existing journal there is replaced in one rename; any
        other non-empty folder is refused)."""
        out = Path(out)
        with output_dir(out, "journal", manifest=JOURNAL_MANIFEST) as tmp:
            self.write_into(tmp, model)
        return out

    def write_into(self, folder: str | Path, model=None) -> Path:
        """Write the journal's three files into the existing (temporary) folder ``folder``: the part of
        :meth:`save` that an output made of more than a journal (an edited model with its journal,
        :func:`ffkv.edit.api.save_edited`) runs inside its own :func:`ffkv.io.output_dir`."""
        folder = Path(folder)
        meta = provenance(self.base_identity or (model.identity if model is not None else {}),
                          journal_version=JOURNAL_VERSION)
        meta.update(journal_version=JOURNAL_VERSION, n_edits=len(self.entries),
                    entries=[e.meta() for e in self.entries],
                    base_layers=sorted(s for s in self.base if not isinstance(s, tuple)))
        if any(isinstance(s, tuple) for s in self.base):
            meta["base_experts"] = sorted(list(s) for s in self.base if isinstance(s, tuple))
        tensors = {}
        for i, e in enumerate(self.entries):
            tensors[f"{i}.u"] = e.u
            tensors[f"{i}.v"] = e.v
            for name in ("keys", "targets"):
                if getattr(e, name) is not None:
                    tensors[f"{i}.{name}"] = getattr(e, name)
        require_finite("the journal's updates", tensors)
        require_finite("the journal's base weights", list(self.base.values()))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "journal.json").write_text(json.dumps(_plain(meta), indent=2) + "\n")
        _save_tensors(folder / "deltas.safetensors", tensors or {"empty": torch.zeros(0)}, {"n": len(self)})
        _save_tensors(folder / "base.safetensors",
                      {_site_name(s): t for s, t in self.base.items()} or {"empty": torch.zeros(0)},
                      {"layers": sorted(s for s in self.base if not isinstance(s, tuple))})
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "Journal":
        """Read a journal folder written by :meth:`save` (or ``DIR`` with ``DIR/journal``).

        The files are checked before use (:func:`check_journal_meta`: version, entries, each entry's method,
        layer, requests, checksums; every entry's u and v present, 2-D, of one rank): a tampered or truncated
        journal is one FfkvError, never a traceback.
        """
        path = Path(path)
        if (path / "journal" / "journal.json").exists():
            path = path / "journal"
        jp = path / "journal.json"
        if not jp.exists():
            raise FfkvError(f"no edit journal at {path} (journal.json missing)", "pass the folder `ffkv edit` wrote")
        try:
            meta = json.loads(jp.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FfkvError(f"{jp} is not valid JSON ({e})", "the journal is corrupt") from None
        check_journal_meta(meta, jp)
        deltas, _ = load_safetensors(path / "deltas.safetensors")
        base, _ = load_safetensors(path / "base.safetensors")
        j = cls()
        j.base_identity = meta.get("model") or None
        try:
            j.base = {_parse_site(k): t for k, t in base.items() if k.startswith("L")}
        except ValueError:
            raise FfkvError(f"{path}/base.safetensors has a tensor that names no layer "
                            f"({', '.join(sorted(base)[:5])})", "the journal is corrupt") from None
        for i, m in enumerate(meta["entries"]):
            u, v = deltas.get(f"{i}.u"), deltas.get(f"{i}.v")
            if u is None or v is None:
                raise FfkvError(f"{path}/deltas.safetensors lacks edit {i}", "the journal is corrupt")
            if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1] or \
                    ("rank" in m and m["rank"] != u.shape[1]):
                raise FfkvError(f"{path}/deltas.safetensors: edit {i}'s u {tuple(u.shape)} and v {tuple(v.shape)} "
                                f"are not one rank-{m.get('rank', '?')} update", "the journal is corrupt")
            j.entries.append(JournalEntry(m["method"], m["layer"], u.float(), v.float(), m["requests"],
                                          m["hparams"], m["before"], m["after"], m.get("info") or {},
                                          m.get("created", ""), deltas.get(f"{i}.keys"), deltas.get(f"{i}.targets"),
                                          m.get("expert")))
        return j

    def check_model(self, model) -> None:
        """Refuse (one FfkvError) a journal whose entries do not fit ``model``: a layer or expert it lacks, an
        update of another shape. :meth:`undo` and :meth:`replay` check this before touching a weight."""
        for i, e in enumerate(self.entries):
            model.check_layer(e.layer)
            if e.expert is not None:
                model.check_expert(e.layer, e.expert)
            d_ffn = _values(model, e.layer, e.expert).shape[1]
            if tuple(e.u.shape[:1]) != (model.d_model,) or tuple(e.v.shape[:1]) != (d_ffn,):
                raise FfkvError(f"edit {i} of the journal is a ({e.u.shape[0]} x {e.v.shape[0]}) update, but layer "
                                f"{e.layer}'s W_out is ({model.d_model} x {d_ffn})",
                                "use the journal with the model it was recorded on")


def _save_tensors(path: Path, tensors: dict, meta: dict) -> None:
    """safetensors straight into a folder that is already temporary (no second temporary inside it)."""
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(path),
              metadata={"ffkv": json.dumps(_plain(meta))})


JOURNAL_MANIFEST = ("journal.json",)
_HEX = set("0123456789abcdef")


def check_journal_meta(meta, where: str | Path = "journal.json") -> dict:
    """Check a ``journal.json`` record against the schema :meth:`Journal.save` writes; one FfkvError names the
    first problem (missing ``entries``, an entry without ``method``, a non-integer layer, a wrong version ...)."""

    def bad(problem: str):
        raise FfkvError(f"{where} is not a valid ffkv journal: {problem}",
                        "the journal is corrupt or was edited by hand; use the folder `ffkv edit` wrote")

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(meta, dict):
        bad(f"expected a JSON object, got {type(meta).__name__}")
    version = meta.get("journal_version")
    if not is_int(version) or version != JOURNAL_VERSION:
        raise FfkvError(f"{where} has journal version {version!r}, not {JOURNAL_VERSION}",
                        "write it again with this ffkv version")
    entries = meta.get("entries")
    if not isinstance(entries, list):
        bad("'entries' is missing" if entries is None else f"'entries' is a {type(entries).__name__}, not a list")
    if "n_edits" in meta and meta["n_edits"] != len(entries):
        bad(f"n_edits is {meta['n_edits']!r} but it lists {len(entries)} entries")
    if meta.get("model") is not None and not isinstance(meta["model"], dict):
        bad("'model' is not an object")
    for i, m in enumerate(entries):
        if not isinstance(m, dict):
            bad(f"entry {i} is not an object")
        if not isinstance(m.get("method"), str) or not m["method"]:
            bad(f"entry {i} has no method")
        if not is_int(m.get("layer")) or m["layer"] < 0:
            bad(f"entry {i}'s layer {m.get('layer')!r} is not a non-negative integer")
        if m.get("expert") is not None and (not is_int(m["expert"]) or m["expert"] < 0):
            bad(f"entry {i}'s expert {m['expert']!r} is not a non-negative integer")
        if "rank" in m and (not is_int(m["rank"]) or m["rank"] < 1):
            bad(f"entry {i}'s rank {m['rank']!r} is not a positive integer")
        if not isinstance(m.get("requests"), list) or not all(isinstance(r, dict) for r in m["requests"]):
            bad(f"entry {i}'s requests are not a list of objects")
        if not isinstance(m.get("hparams"), dict):
            bad(f"entry {i}'s hparams are not an object")
        if m.get("info") is not None and not isinstance(m["info"], dict):
            bad(f"entry {i}'s info is not an object")
        for key in ("before", "after"):
            c = m.get(key)
            if not isinstance(c, str) or not c or not set(c) <= _HEX:
                bad(f"entry {i}'s {key!r} checksum {c!r} is not a hex digest")
    return meta


def _split(site) -> tuple[int, int | None]:
    return (site[0], site[1]) if isinstance(site, tuple) else (site, None)


def _parse_site(name: str):
    """``"L3"`` -> 3, ``"L3.E2"`` -> (3, 2): the keys of ``base.safetensors``."""
    layer, _, expert = name[1:].partition(".E")
    return int(layer) if not expert else (int(layer), int(expert))


def _plain(obj):
    return _jsonable(obj)
