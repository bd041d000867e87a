"""Model files and load arguments checked before use: every problem is one :class:`~ffkv.errors.FfkvError`.

:func:`ffkv.models.loading.load_model` runs these, in this order, before transformers reads a weight:

1. the load arguments (:func:`check_device`, :func:`check_device_map`);
2. the folder's ``config.json`` (:func:`read_config_json`: readable, a JSON object, a known ``model_type``, no
   custom code unless it is trusted);
3. the checkpoint's files (:func:`check_checkpoint`): a safetensors file is an 8-byte little-endian header
   length ``N``, ``N`` bytes of JSON, then the tensors' bytes; each tensor's ``data_offsets [begin, end)``
   must satisfy ``end - begin == numel * itemsize``, the tensors must tile the byte buffer exactly and the
   buffer must end where the file does (a truncated, padded, empty or garbled file fails here, naming the
   file and the first tensor that does not fit). A sharded checkpoint's index must name shards that exist
   and hold the tensors it maps to them. Only the headers are read (kilobytes, whatever the model's size);
4. the checkpoint's tensor shapes against the model ``config.json`` describes, built on the ``meta`` device
   (:func:`check_shapes`);

and after loading: the names transformers could not place (:func:`check_loading_info`: missing, unexpected,
mismatched) and the non-finite values (:func:`nonfinite_weights`, one reduction per tensor).

A pickle checkpoint (``pytorch_model.bin``) is only ever read by transformers through
``torch.load(weights_only=True)``, which refuses anything but tensors; such a refusal is reported with the
way to convert the checkpoint to safetensors (:func:`pickle_refusal`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FfkvError

__all__ = ["Checkpoint", "check_checkpoint", "read_safetensors_header", "check_shapes", "check_loading_info",
           "nonfinite_weights", "nonfinite_error", "describe_nonfinite", "check_device", "check_device_map",
           "read_config_json", "pickle_refusal", "DEVICE_MAP_STRATEGIES"]

# Bits per element of every safetensors dtype (sub-byte float types pack several elements in a byte).
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
               "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# safetensors' own limit on the header (100 MB): a larger length field is a garbled file, not a header.
_MAX_HEADER = 100_000_000
_INDEX = "model.safetensors.index.json"
_PICKLE_INDEX = "pytorch_model.bin.index.json"

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

_CONVERT = ("convert it to safetensors where you trust its source: load it with transformers and "
            "save_pretrained(DIR, safe_serialization=True), then pass DIR")


@dataclass
class Checkpoint:
    """The weight files ``from_pretrained`` will read from a local folder.

    format: "safetensors" or "pickle". tensors: name -> (safetensors dtype, shape) for safetensors
    checkpoints (empty for pickle ones, whose contents are only known once unpickled).
    """

    format: str
    files: list[Path]
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ files
def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors of one safetensors file, ``{name: (dtype, shape)}``, after checking that the header parses
    and every tensor's byte range lies inside the file and tiles it exactly (only the header is read)."""
    path = Path(path)
    where = f"weight file {path}"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if size == 0:
                raise FfkvError(f"{where} is empty (0 bytes)", "copy or save the model again")
            if len(head) < 8:
                raise FfkvError(f"{where} is truncated ({size} bytes, shorter than the 8-byte header length)",
                                "copy or save the model again")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise FfkvError(f"{where} is corrupt: its header length field reads {n} bytes",
                                "the file is not a safetensors file or is damaged; copy or save the model again")
            if 8 + n > size:
                raise FfkvError(f"{where} is truncated: its header needs {8 + n} bytes but the file has {size}",
                                "copy or save the model again")
            raw = f.read(n)
    except OSError as e:
        raise FfkvError(f"{where} cannot be read ({e.strerror or e})", "check the file and its permissions") \
            from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FfkvError(f"{where} is corrupt: its header is not valid JSON ({_short(e)})",
                        "copy or save the model again") from None
    if not isinstance(header, dict):
        raise FfkvError(f"{where} is corrupt: its header is not a JSON object", "copy or save the model again")
    buffer = size - 8 - n
    spans, out = [], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = _tensor_entry(where, name, info)
        begin, end = offsets
        if end > buffer:
            raise FfkvError(f"{where} is truncated: tensor '{name}' needs bytes {begin}-{end} of the data but the "
                            f"file holds {buffer}", "copy or save the model again")
        bits = _DTYPE_BITS.get(dtype)
        if bits is not None and (end - begin) * 8 != math.prod(shape) * bits:
            raise FfkvError(f"{where} is corrupt: tensor '{name}' ({dtype} {list(shape)}) spans {end - begin} bytes, "
                            f"its shape needs {math.prod(shape) * bits // 8}", "copy or save the model again")
        spans.append((begin, end, name))
        out[name] = (dtype, tuple(shape))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:  # safetensors requires the tensors to tile the buffer: a gap or overlap is damage
            raise FfkvError(f"{where} is corrupt: tensor '{name}' starts at byte {begin} of the data, expected {at}",
                            "copy or save the model again")
        at = end
    if at != buffer:
        raise FfkvError(f"{where} is corrupt: {buffer - at} bytes follow its last tensor",
                        "copy or save the model again")
    return out


def _tensor_entry(where: str, name: str, info) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    bad = FfkvError(f"{where} is corrupt: the header entry of tensor '{name}' is malformed",
                    "copy or save the model again")
    if not isinstance(info, dict):
        raise bad
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list):
        raise bad
    if not all(_nat(d) for d in shape) or len(offsets) != 2 or not all(_nat(o) for o in offsets):
        raise bad
    if offsets[1] < offsets[0]:
        raise bad
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _nat(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_checkpoint(folder: str | Path) -> Checkpoint:
    """The weight files of a local model folder, checked (see the module docstring), in the order
    transformers looks for them: ``model.safetensors``, ``model.safetensors.index.json`` and its shards,
    then ``pytorch_model.bin`` (or its index)."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return Checkpoint("safetensors", [single], read_safetensors_header(single))
    if (folder / _INDEX).is_file():
        return _sharded(folder)
    if (folder / "pytorch_model.bin").is_file() or (folder / _PICKLE_INDEX).is_file():
        files = [folder / "pytorch_model.bin"] if (folder / "pytorch_model.bin").is_file() else \
            [folder / f for f in sorted(set(_weight_map(folder / _PICKLE_INDEX).values()))]
        for f in files:
            if not f.is_file():
                raise FfkvError(f"shard {f.name} named in {folder / _PICKLE_INDEX} is missing",
                                "copy the missing shard into the folder, or save the model again")
            if f.stat().st_size == 0:
                raise FfkvError(f"weight file {f} is empty (0 bytes)", "copy or save the model again")
        return Checkpoint("pickle", files)
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        raise FfkvError(f"folder '{folder}' has safetensors files ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}) but no model.safetensors or {_INDEX}",
                        "save the model with save_pretrained, or restore the missing index file")
    raise FfkvError(f"folder '{folder}' has a config but no weights", "save the model with save_pretrained")


def _weight_map(index: Path) -> dict[str, str]:
    try:
        d = json.loads(index.read_text())
    except OSError as e:
        raise FfkvError(f"index {index} cannot be read ({e.strerror or e})", "check the file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FfkvError(f"index {index} is not valid JSON ({_short(e)})",
                        "restore the index file or save the model again") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise FfkvError(f"index {index} has no weight_map of tensor names to shard files",
                        "restore the index file or save the model again")
    for shard in set(wm.values()):
        p = Path(shard)
        if p.is_absolute() or p.name != shard:  # a shard outside the folder is never read
            raise FfkvError(f"index {index} names shard '{shard}', which is not a file of the model folder",
                            "restore the index file or save the model again")
    return wm


def _sharded(folder: Path) -> Checkpoint:
    index = folder / _INDEX
    wm = _weight_map(index)
    shards = sorted(set(wm.values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise FfkvError(f"shard {missing[0]} named in {index} is missing"
                        + (f" ({len(missing)} of {len(shards)} shards are)" if len(missing) > 1 else ""),
                        "copy the missing shard into the folder, or save the model again")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for s in shards:
        header = read_safetensors_header(folder / s)
        absent = [n for n, f in wm.items() if f == s and n not in header]
        if absent:
            raise FfkvError(f"index {index} maps tensor '{absent[0]}' to shard {s}, which does not hold it",
                            "restore the index file or save the model again")
        tensors.update({n: header[n] for n in header if wm.get(n) == s})
    return Checkpoint("safetensors", [folder / s for s in shards], tensors)


# ------------------------------------------------------------------------------------------ shapes
def check_shapes(checkpoint: Checkpoint, model: torch.nn.Module, folder: str | Path) -> None:
    """Every checkpoint tensor that names a tensor of ``model`` (built from config.json on the ``meta``
    device) must have its shape. Names are matched as transformers does for a base-model checkpoint (with or
    without the ``base_model_prefix``); a name that matches nothing is left to :func:`check_loading_info`,
    because transformers renames some legacy keys while loading."""
    expected = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    bad = []
    for name, (_, shape) in checkpoint.tensors.items():
        for cand in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if cand in expected:
                if expected[cand] != shape:
                    bad.append((name, shape, expected[cand]))
                break
    if bad:
        name, got, want = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise FfkvError(f"the weights in '{folder}' do not match its config.json: tensor '{name}' has shape "
                        f"{list(got)}, the config gives {list(want)}{more}",
                        "use the config.json saved with these weights")


def check_loading_info(info: dict, folder: str) -> None:
    """Refuse a model that transformers loaded with weights it could not place: names the model has but the
    checkpoint lacks (they would be left at random initialisation), names the checkpoint has but the model
    lacks (they would be dropped), or shapes that differ."""
    for key, what in (("mismatched_keys", "has tensors whose shapes differ from its config.json"),
                      ("missing_keys", "lacks tensors its config.json needs"),
                      ("unexpected_keys", "has tensors its config.json has no place for")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(key) or ()))
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise FfkvError(f"the checkpoint in '{folder}' {what}: {shown}",
                            "use the config.json saved with these weights")


def pickle_refusal(folder: str, e: BaseException) -> FfkvError:
    """The one line for a pickle checkpoint that ``torch.load(weights_only=True)`` refused or could not read."""
    return FfkvError(f"the pickle checkpoint (pytorch_model.bin) in '{folder}' was refused: it holds more than "
                     f"tensors or is damaged, and is never unpickled beyond torch.load(weights_only=True), which "
                     f"raised {type(e).__name__}", _CONVERT)


# ------------------------------------------------------------------------------------------ values
@torch.no_grad()
def nonfinite_weights(module: torch.nn.Module) -> list[dict]:
    """The parameters of ``module`` holding NaN or inf: ``[{"tensor", "nan", "inf", "numel"}]`` (empty when
    every weight is finite).

    One reduction per tensor: ``sum(W)`` is finite only if every element is (a NaN or inf element makes the
    sum NaN or inf), so a clean tensor costs one read; a tensor whose sum is not finite (an overflow of large
    finite values is possible) is counted exactly with ``isfinite``. Tensors on the ``meta`` device (offloaded
    by a device map) hold no values here and are not checked; integer tensors cannot be non-finite.
    """
    out = []
    for name, p in module.named_parameters():
        if p.device.type == "meta" or not (p.is_floating_point() or p.is_complex()) or p.numel() == 0:
            continue
        if bool(torch.isfinite(p.sum())):
            continue
        nan = int(torch.isnan(p).sum())
        bad = int((~torch.isfinite(p)).sum())
        if bad:
            out.append({"tensor": name, "nan": nan, "inf": bad - nan, "numel": p.numel()})
    return out


def describe_nonfinite(report: list[dict], limit: int = 3) -> str:
    """``"5 values in 2 tensors: transformer.h.0.mlp.c_fc.weight (3 NaN), lm_head.weight (2 inf)"``."""
    total = sum(r["nan"] + r["inf"] for r in report)
    parts = []
    for r in report[:limit]:
        kinds = [f"{r[k]} {k if k == 'inf' else 'NaN'}" for k in ("nan", "inf") if r[k]]
        parts.append(f"{r['tensor']} ({', '.join(kinds)})")
    more = f" and {len(report) - limit} more" if len(report) > limit else ""
    return (f"{total} value{'s' if total != 1 else ''} in {len(report)} tensor{'s' if len(report) != 1 else ''}: "
            f"{', '.join(parts)}{more}")


def nonfinite_error(name: str, report: list[dict], dtype: torch.dtype | None = None) -> FfkvError:
    narrow = f" (loaded as {str(dtype).removeprefix('torch.')}, whose range may be too small)" \
        if dtype in (torch.float16, torch.bfloat16) else ""
    return FfkvError(f"model '{name}' has non-finite weights{narrow}: {describe_nonfinite(report)}",
                     f"`ffkv inspect {name}` lists them; pass --allow-nonfinite (allow_nonfinite=True) to use the "
                     "model anyway")


# ------------------------------------------------------------------------------------------ arguments
def check_device(device, option: str = "--device") -> torch.device | None:
    """A device string ffkv can place a model on here: parsed by torch, and present on this machine."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FfkvError(f"{option} {device!r} is not a device", "use cpu, cuda, cuda:N or mps") from None
    if d.type == "cpu":
        return d
    if d.type == "meta":
        raise FfkvError(f"{option} meta holds no weights", "use cpu, cuda, cuda:N or mps")
    backend = getattr(torch, d.type, None) if d.type != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        why = "this torch build has no CUDA" if d.type == "cuda" and torch.version.cuda is None and \
            getattr(torch.version, "hip", None) is None else f"no {d.type} device is available on this machine"
        raise FfkvError(f"{option} {device!r} cannot be used: {why}", "use --device cpu (the default)"
                        if option == "--device" else "use cpu")
    count = getattr(backend, "device_count", None)
    if d.index is not None and count is not None and d.index >= count():
        n = count()
        raise FfkvError(f"{option} {device!r} does not exist: this machine has {n} {d.type} device"
                        f"{'s' if n != 1 else ''}", f"use {d.type}:0" + (f"-{d.type}:{n - 1}" if n > 1 else ""))
    return d


def check_device_map(device_map):
    """``--device-map``: a strategy (auto, balanced, balanced_low_0, sequential), a device, a JSON object of
    module -> device, or a dict; returns what ``from_pretrained`` takes. Needs the accelerate package."""
    if device_map is None:
        return None
    value = device_map
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise FfkvError(f"--device-map {device_map!r} is not valid JSON ({_short(e)})",
                            'write it as a JSON object, e.g. \'{"": "cpu"}\'') from None
    if isinstance(value, str):
        if value not in DEVICE_MAP_STRATEGIES:
            try:
                torch.device(value)
            except (RuntimeError, TypeError, ValueError):
                raise FfkvError(f"--device-map {device_map!r} is not a device map",
                                f"use {', '.join(DEVICE_MAP_STRATEGIES)}, a device (cpu, cuda:0) or a JSON object "
                                "of module -> device") from None
            check_device(value, "--device-map")
    elif isinstance(value, dict):
        for where in value.values():
            if not isinstance(where, (str, int)) or isinstance(where, bool):
                raise FfkvError(f"--device-map maps a module to {where!r}, which is not a device",
                                "map each module to a device such as cpu, cuda:0, 0 or disk")
            if isinstance(where, str) and where != "disk":
                check_device(where, "--device-map")
    else:
        raise FfkvError(f"--device-map {device_map!r} is not a device map",
                        f"use {', '.join(DEVICE_MAP_STRATEGIES)}, a device, or a dict of module -> device")
    if not _has_accelerate():
        raise FfkvError("--device-map needs the accelerate package, which is not installed",
                        "install it (pip install accelerate), or leave out --device-map and use --device")
    return value


def _has_accelerate() -> bool:
    return importlib.util.find_spec("accelerate") is not None


# ------------------------------------------------------------------------------------------ config.json
def read_config_json(folder: str | Path, trust_remote_code: bool, known_model_types) -> dict:
    """``folder/config.json`` as a dict, refused in one line when it cannot be read, is not a JSON object, has
    a ``model_type`` transformers does not know, or needs the folder's own code without ``trust_remote_code``."""
    path = Path(folder) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FfkvError(f"{path} cannot be read ({e.strerror or e})", "check the file and its permissions") from None
    except UnicodeDecodeError:
        raise FfkvError(f"{path} is corrupt: it is not UTF-8 text", "restore config.json from the model's source") \
            from None
    if not text.strip():
        raise FfkvError(f"{path} is empty", "restore config.json from the model's source")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise FfkvError(f"{path} is not valid JSON ({_short(e)})", "restore config.json from the model's source") \
            from None
    if not isinstance(d, dict):
        raise FfkvError(f"{path} is not a JSON object", "restore config.json from the model's source")
    mt = d.get("model_type")
    auto_map = d.get("auto_map") if isinstance(d.get("auto_map"), dict) else {}
    if mt is not None and not isinstance(mt, str):
        raise FfkvError(f"{path} has a model_type that is not a string ({mt!r})", "fix model_type in config.json")
    if mt is not None and mt not in known_model_types:
        if auto_map and not trust_remote_code:
            raise FfkvError(f"model '{folder}' needs custom code from its folder (model_type '{mt}', auto_map "
                            f"{', '.join(sorted(auto_map))})",
                            "pass --trust-remote-code (trust_remote_code=True) if you trust that code")
        if not auto_map:
            raise FfkvError(f"{path} has model_type '{mt}', which the installed transformers does not know",
                            "upgrade transformers, or fix model_type in config.json")
    return d


def _short(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:160]
