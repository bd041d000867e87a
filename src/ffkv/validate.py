"""The one validation layer that the CLI, the server and the Python API share.

Each function takes a raw value (a command-line string, a request parameter, a Python value) and returns the
checked value, or raises one :class:`~ffkv.errors.FfkvError` that names the parameter, the problem and the valid
range, so every entry point refuses bad input with the same line. Prompts are checked by the model itself
(:meth:`ffkv.models.model.MemoryModel.encode`: empty, longer than the context), memory names by
:class:`ffkv.models.memory_id.MemoryId`, hyperparameters by :func:`ffkv.edit.hparams.resolve_hparams`.

Command-line numbers go through the same functions: :class:`IntRange` and :class:`FloatRange` are click types
that call :func:`integer` and :func:`number`, and the root command (:mod:`ffkv.cli`) gives every numeric option
of every command such a type on load (:func:`harden`), with an upper bound from :data:`LIMITS` where the command
states none, so every range is checked in one place and shown in ``--help`` as ``[1<=x<=10000]``; a bad value is
click's usage error, which :mod:`ffkv.cli` prints as the one line
``ffkv: error: invalid value for '--samples': 0 is not in the range 1<=x<=10000. Run 'ffkv trace --help' for usage.``
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click

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
           default: float | None = None, lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite, bounded number; None or "" gives ``default``; ``lo_open`` / ``hi_open`` exclude the bound."""
    if value is None or value == "":
        if default is None:
            raise FfkvError(f"{name} is missing", f"give {name} as a number{_range(lo, hi)}")
        return default
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FfkvError(f"{name} must be a number, got {value!r}", f"use a number{_range(lo, hi)}") from None
    below = lo is not None and (v <= lo if lo_open else v < lo)
    above = hi is not None and (v >= hi if hi_open else v > hi)
    if not math.isfinite(v) or below or above:
        raise FfkvError(f"{name} {value} is out of range",
                        f"use a finite number{_range(lo, hi, lo_open, hi_open)}")
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


def records(path, required=(), what: str = "record") -> list[dict]:
    """The records of a data file (a JSON list, or JSONL: one object a line), each checked for ``required``
    fields (``"requested_rewrite.subject"`` looks inside a nested object).

    A bad file is one FfkvError that names the offending record: its line in a JSONL file, its position in a
    JSON list (1-based), and the field it lacks.
    """
    path = Path(path)
    if not path.is_file():
        raise FfkvError(f"{'no such file' if not path.exists() else 'not a file'}: {path}",
                        f"pass the {what} file's path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FfkvError(f"{path} is not a text file", f"pass a JSON or JSONL file of {what}s") from None
    where: list[str] = []
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FfkvError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno})",
                                "fix or remove that line") from None
            where.append(f"line {n}")
    else:
        try:
            out = json.loads(text)
        except json.JSONDecodeError as e:
            raise FfkvError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                            "fix the file, or regenerate it") from None
        if isinstance(out, dict):
            out = [out]
        if not isinstance(out, list):
            raise FfkvError(f"{path} holds a JSON {type(out).__name__}, not a list of {what}s",
                            f"give a JSON list (or JSONL) of {what}s")
        where = [f"{what} {i}" for i in range(1, len(out) + 1)]
    if not out:
        raise FfkvError(f"{path} holds no {what}s", f"give at least one {what}")
    for rec, at in zip(out, where):
        if not isinstance(rec, dict):
            raise FfkvError(f"{path} {at} is a JSON {type(rec).__name__}, not an object",
                            f"write each {what} as a JSON object")
        for field in required:
            v = rec
            for part in field.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            if v is None:
                raise FfkvError(f"{path} {at} lacks the field {field!r}",
                                f"every {what} needs {', '.join(repr(f) for f in required)}")
    return out


def _range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        if lo_open or hi_open:
            return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


# ------------------------------------------------------------------------------------------ command line
# Upper (and, for plain integers, lower) bounds of the numeric options that state none of their own, by option
# name: far above any real use, far below what would allocate without bound or run for days (issue 14:
# ``--samples 1e9`` tried to allocate terabytes). A command's own bound wins when it is tighter.
# ``ffkv <cmd> --help`` shows each as ``[lo<=x<=hi]``; tests/test_faults.py checks that every integer option of
# every command has an upper bound. A key "<command> <option>" ("neurons --steps") is that command's alone.
LIMITS: dict[str, tuple[int | None, int]] = {
    # integrated-gradient steps run as one batch of scaled activations: steps x d_ffn x tokens floats
    "neurons --steps": (None, 1_000), "--kn-steps": (None, 1_000),
    # counts of samples, steps, tokens, units
    "--samples": (None, 10_000), "--steps": (None, 10_000_000), "--tokens": (None, 1_000_000_000),
    "--stats-tokens": (1, 1_000_000_000), "--top-k": (None, 1_000), "--top-n": (None, 10_000),
    "--top-tokens": (None, 10_000), "-n": (None, 100_000), "--triggers": (None, 1_000),
    "--composition-units": (None, 1_000_000), "--window": (None, 1_000_000), "--min-tokens": (None, 1_000_000),
    "--max-units": (None, 1_000_000_000), "--batch-tokens": (None, 10_000_000),
    "--checkpoint-every": (None, 1_000_000), "--generate": (None, 10_000), "--gen-tokens": (None, 10_000),
    "--gen-prompts": (None, 1_000), "--max-neurons": (None, 10_000_000), "--per-bucket": (None, 1_000_000),
    "--max-facts-per-bucket": (None, 10_000_000), "--templates-per-fact": (None, 10_000),
    # counts of records or edits: more than a data set holds is harmless, but a bound keeps them integers
    "--limit": (None, 100_000_000), "--cases": (None, 100_000), "--batch-size": (None, 100_000),
    "--sequential": (None, 1_000_000), "--every": (None, 1_000_000), "--probes": (None, 1_000_000),
    # machine and address
    "--threads": (None, 4096), "--port": (0, 65535),
    # numpy's seed range, so one seed means one stream in every library ffkv seeds
    "--seed": (0, 2 ** 32 - 1),
    # a token position: negative counts from the end (-1: the last)
    "--position": (-1_000_000, 1_000_000),
}


def _option_name(param) -> str:
    if param is None:
        return "value"
    longs = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
    return (longs or list(getattr(param, "opts", ())) or [param.human_readable_name])[0]


class IntRange(click.IntRange):
    """A click integer type checked by :func:`integer`; a bad value is click's one usage line, in click's words
    with the range as ``--help`` shows it ("0 is not in the range 1<=x<=10000"). An open bound is closed
    (``min_open`` 0 is ``>= 1``)."""

    name = "integer range"

    def __init__(self, min: int | None = None, max: int | None = None, min_open: bool = False,
                 max_open: bool = False) -> None:
        lo = None if min is None else (min + 1 if min_open else min)
        hi = None if max is None else (max - 1 if max_open else max)
        super().__init__(lo, hi)

    def convert(self, value, param, ctx):
        try:
            return integer(value, _option_name(param), self.min, self.max)
        except FfkvError as e:
            if "must be an integer" in e.problem:
                self.fail(f"{value!r} is not a valid integer", param, ctx)
            self.fail(f"{value} is not in the range {self._describe_range()}", param, ctx)


class FloatRange(click.FloatRange):
    """A click number type checked by :func:`number`: finite (``nan``, ``inf`` are refused, which click's own
    FloatRange lets through) and within its range."""

    name = "float range"

    def convert(self, value, param, ctx):
        try:
            return number(value, _option_name(param), self.min, self.max, lo_open=self.min_open,
                          hi_open=self.max_open)
        except FfkvError as e:
            if "must be a number" in e.problem:
                self.fail(f"{value!r} is not a valid float", param, ctx)
            if not math.isfinite(float(value)):
                self.fail(f"{value} is not a finite number", param, ctx)
            self.fail(f"{value} is not in the range {self._describe_range()}", param, ctx)


def hardened_type(param: click.Parameter, command_path: str = ""):
    """The validated type for ``param`` of the command ``command_path`` ("atlas mine"), or None when it is no
    number (or already validated, or clamping)."""
    t = param.type
    if isinstance(t, (IntRange, FloatRange)) or getattr(t, "clamp", False):
        return None
    opt = _option_name(param)
    lo, hi = LIMITS.get(f"{command_path} {opt}".strip(), LIMITS.get(opt, (None, None)))
    if isinstance(t, click.IntRange):
        tlo = None if t.min is None else (t.min + 1 if t.min_open else t.min)
        thi = None if t.max is None else (t.max - 1 if t.max_open else t.max)
        lo = tlo if lo is None else (lo if tlo is None else max(lo, tlo))
        hi = thi if hi is None else (hi if thi is None else min(hi, thi))
        return IntRange(lo, hi)
    if t is click.INT or type(t) is click.types.IntParamType:
        return IntRange(lo, hi)
    if isinstance(t, click.FloatRange):
        return FloatRange(t.min, t.max, min_open=t.min_open, max_open=t.max_open)
    if t is click.FLOAT or type(t) is click.types.FloatParamType:
        return FloatRange()
    return None


def harden(command: click.Command, path: str | None = None) -> click.Command:
    """Give every numeric option of ``command`` (and of its sub-commands) a validated type
    (:class:`IntRange` / :class:`FloatRange`, bounds from the command or :data:`LIMITS`); idempotent.
    ``path``: the command as typed after ``ffkv`` (default: its name)."""
    path = command.name or "" if path is None else path
    for param in command.params:
        if isinstance(param, click.Option) and not param.is_flag and param.nargs == 1:
            new = hardened_type(param, path)
            if new is not None:
                param.type = new
    for name, sub in getattr(command, "commands", {}).items():
        harden(sub, f"{path} {name}".strip())
    return command
