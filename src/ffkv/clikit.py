"""The options every ``ffkv`` command shares, declared once (docs/cli.md).

    @click.command()
    @click.argument("model")
    @layers_option()
    @json_option
    @quiet_option
    @model_options
    def trace(model, layers, as_json, quiet, **load):
        mm = load_model_from_options(model, **load)       # --device --dtype --device-map --trust-remote-code
                                                          # --threads --allow-nonfinite
        layer_list = parse_layers(layers, mm.n_layers)    # "0-3,5" -> [0, 1, 2, 3, 5], checked against the model
        ...
        emit_json({...})                                  # one JSON object, one line, on stdout

Rules the kit keeps for every command: the model options have the same names, meaning and defaults; ``--json``
prints exactly one JSON object on stdout (snake_case keys, floats as Python's shortest round-trip repr,
non-finite floats as ``null``) and nothing else goes to stdout; progress bars go to stderr, only on a
terminal and never under ``--quiet``; hyperparameters are overridden by ``--hparams JSON-or-FILE`` then by
``--set key=value`` (later wins); bad input is one :class:`~ffkv.errors.FfkvError` line.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import click
import torch

from .cli import Group as FfkvGroup
from . import validate
from .errors import FfkvError
from .models.integrity import describe_nonfinite
from .models.loading import DTYPES, load_checked

__all__ = ["MODEL_OPTIONS", "FfkvGroup", "model_options", "load_model_from_options", "layers_option",
           "parse_layers", "set_threads", "json_option", "emit_json", "to_json", "quiet_option", "show_progress",
           "hparams_options", "parse_settings", "default_of", "token_text", "predicted_token"]

# The options of every command that loads a model (tests introspect the commands for exactly these).
MODEL_OPTIONS = ("device", "dtype", "device_map", "trust_remote_code", "threads", "allow_nonfinite")


def model_options(f: Callable) -> Callable:
    """Add ``--device --dtype --device-map --trust-remote-code --threads --allow-nonfinite`` (their values go to
    :func:`load_model_from_options` as keyword arguments of the same names)."""
    f = click.option("--allow-nonfinite", is_flag=True,
                     help="Use a model whose weights hold NaN or inf (refused otherwise; `ffkv inspect` lists "
                          "them).")(f)
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Torch CPU threads (default: torch's own choice).")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="Run the model repository's own code.")(f)
    f = click.option("--device-map", default=None,
                     help="Passed to from_pretrained for models larger than one device, e.g. 'auto'.")(f)
    f = click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
                     help="Weights' dtype (default float32).")(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cpu).")(f)
    return f


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads for this process (None leaves torch's choice)."""
    if threads is not None:
        torch.set_num_threads(threads)


def load_model_from_options(model: str | Path, device: str | None = None, dtype: str | None = None,
                            device_map: str | None = None, trust_remote_code: bool = False,
                            threads: int | None = None, allow_nonfinite: bool = False, **load_kwargs):
    """:func:`ffkv.models.loading.load_model` with the shared model options (``threads``: torch CPU threads).

    A model with NaN or inf weights is refused in one line; under ``--allow-nonfinite`` it loads with one
    warning line on stderr naming them.
    """
    set_threads(threads)
    mm, nonfinite = load_checked(model, dtype=dtype, device=device, device_map=device_map,
                                 trust_remote_code=trust_remote_code, allow_nonfinite=allow_nonfinite, **load_kwargs)
    if nonfinite:
        click.echo(f"ffkv: warning: the model's weights hold non-finite values ({describe_nonfinite(nonfinite)}); "
                   "results may be NaN and the adapter check was not run", err=True)
    return mm


# ------------------------------------------------------------------------------------------------ layers


def layers_option(name: str = "--layers", help: str | None = None) -> Callable:
    """A ``--layers`` option taking a list or ranges of layers, "0-3,5" (parsed by :func:`parse_layers`)."""
    return click.option(name, "layers", default=None, metavar="LIST",
                        help=help or "Layers as a list and/or ranges, e.g. '0-3,5' (default: all).")


def parse_layers(text: str | None, n_layers: int, option: str = "--layers") -> list[int] | None:
    """``"0-3,5"`` -> ``[0, 1, 2, 3, 5]``: :func:`ffkv.validate.layers`, the rule the server uses too."""
    return validate.layers(text, n_layers, option)


# ------------------------------------------------------------------------------------------------ output
def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON object on stdout (and nothing else there).")(f)


def quiet_option(f: Callable) -> Callable:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(f)


def show_progress(quiet: bool = False) -> bool:
    """Progress bars (on stderr) only on a terminal and never under ``--quiet``."""
    return not quiet and sys.stderr.isatty()


def to_json(obj: Any) -> Any:
    """``obj`` as JSON types: tensors and arrays to lists, paths to strings, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return to_json(obj.tolist())
    return str(obj)  # MemoryId and other named values: their readable form ("L3.17")


def emit_json(obj: dict) -> None:
    """Print ``obj`` as one JSON object on one line of stdout: the one ``--json`` style of ffkv."""
    click.echo(json.dumps(to_json(obj), allow_nan=False))


# ------------------------------------------------------------------------------------------ hyperparameters
def hparams_options(f: Callable) -> Callable:
    """``--hparams JSON-or-FILE`` and repeatable ``--set key=value`` (applied after --hparams)."""
    f = click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                     help="Override one hyperparameter, e.g. --set v_num_grad_steps=30 (repeatable; the value is "
                          "read as JSON when it parses, else as text; applied after --hparams).")(f)
    f = click.option("--hparams", default=None, metavar="JSON|FILE",
                     help="Hyperparameter overrides: a JSON object, or a .json / .yaml / .yml file "
                          "(EasyEdit's YAML files work).")(f)
    return f


def parse_settings(settings) -> dict:
    """``("v_lr=0.1", "layers=[3,4]", "corpus=wikitext")`` -> ``{"v_lr": 0.1, "layers": [3, 4], "corpus": ...}``."""
    out = {}
    for s in settings or ():
        key, eq, value = s.partition("=")
        if not eq or not key.strip():
            raise FfkvError(f"--set expects key=value, got {s!r}", "e.g. --set v_num_grad_steps=30")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def default_of(fn: Callable, name: str):
    """The default of parameter ``name`` of ``fn``: a command shows the API's default rather than restating it."""
    return inspect.signature(fn).parameters[name].default


# ------------------------------------------------------------------------------------------------ tokens
def token_text(model, token_id: int) -> str:
    """How a token reads in output: its decoded text, or, for an id that decodes to nothing (a padded
    vocabulary row, a special token), the tokenizer's token name or ``<id N>``; never an empty string."""
    text = model.decode([int(token_id)])
    if text:
        return text
    tok = model.tokenizer
    name = tok.convert_ids_to_tokens(int(token_id)) if tok is not None and token_id < len(tok) else None
    return name or f"<id {int(token_id)}>"


def predicted_token(model, prompt: str) -> int:
    """The model's top next token after ``prompt`` among the tokenizer's tokens.

    A padded vocabulary's extra rows (ids >= len(tokenizer)) are no token; an untrained row can still win
    the argmax, and would then be reported as the answer ''. Without a padded vocabulary this is the
    plain argmax (ROME's default answer).
    """
    probs = model.next_token_probs(prompt)[0]
    n = len(model.tokenizer) if model.tokenizer is not None else probs.shape[-1]
    return int(probs[: min(n, probs.shape[-1])].argmax())
