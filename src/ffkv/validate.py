"""The one validation layer that the CLI, the server and the Python API share.

Each function takes a raw value (a command-line string, a request parameter, a Python value) and returns the
checked value, or raises one :class:`~ffkv.errors.FfkvError` that names the parameter, the problem and the valid
range, so every entry point refuses bad input with the same line. Prompts are checked by the model itself
(:meth:`ffkv.models.model.MemoryModel.encode`: empty, longer than the context), memory names by
:class:`ffkv.models.memory_id.MemoryId`, hyperparameters by :func:`ffkv.edit.hparams.resolve_hparams`.
"""

from __future__ import annotations

import math
import re

from .errors import FfkvError

_LAYER_PART = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


def integer(value, name: str, lo: int | None = None, hi: int | None = None, default: int | None = None) -> int:
    """A bounded integer; None or "" gives ``default`` (an error when there is none)."""
    if value is None or value == "":
        if default is None:
            raise FfkvError(f"{name} is missing", f"give {name} as an integer{_range(lo, hi)}")
        return default
    if isinstance(value, bool):
        raise FfkvError(f"{name} must be an integer, got {value!r}", f"use an integer{_range(lo, hi)}")
    try:
        v = int(value)
        if isinstance(value, float) and v != value:
            raise ValueError
    except (TypeError, ValueError):
        raise FfkvError(f"{name} must be an integer, got {value!r}", f"use an integer{_range(lo, hi)}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise FfkvError(f"{name} {v} is out of range", f"use an integer{_range(lo, hi)}")
    return v


def number(value, name: str, lo: float | None = None, hi: float | None = None,
           default: float | None = None) -> float:
    """A finite, bounded number; None or "" gives ``default``."""
    if value is None or value == "":
        if default is None:
            raise FfkvError(f"{name} is missing", f"give {name} as a number{_range(lo, hi)}")
        return default
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FfkvError(f"{name} must be a number, got {value!r}", f"use a number{_range(lo, hi)}") from None
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise FfkvError(f"{name} {value!r} is out of range", f"use a finite number{_range(lo, hi)}")
    return v


def layers(text, n_layers: int, option: str = "--layers") -> list[int] | None:
    """``"0-3,5"`` -> ``[0, 1, 2, 3, 5]`` (sorted, unique), every layer checked against ``n_layers``.

    None or "" stays None (the caller's default, usually every layer).
    """
    if text is None or not str(text).strip():
        return None
    out: set[int] = set()
    for part in str(text).split(","):
        m = _LAYER_PART.match(part)
        if not m:
            raise FfkvError(f"{option} {text!r} is not a list of layers",
                            f"write layers as numbers and ranges, e.g. {option} 0-3,5")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if b < a:
            raise FfkvError(f"{option} range {part.strip()!r} runs backwards", f"write it as {b}-{a}")
        out.update(range(a, b + 1))
    bad = sorted(l for l in out if l >= n_layers)
    if bad:
        raise FfkvError(f"{option}: layer {bad[0]} is out of range (the model has {n_layers} layers)",
                        f"use layers 0-{n_layers - 1}")
    return sorted(out)


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""
