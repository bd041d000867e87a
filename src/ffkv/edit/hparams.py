"""Hyperparameters of the edit methods: read them (a dict, JSON, YAML), map ROME's and EasyEdit's names,
check them against the method's defaults.

    from ffkv.edit.hparams import load_hparams, resolve_hparams, parse_settings
    load_hparams("hparams/ROME/gpt2-xl.yaml")          # -> dict (a dict, JSON string, .json/.yaml/.yml file)
    hp = resolve_hparams(model, "rome", "my.yaml", parse_settings(["v_lr=0.1"]), {"layer": 5})

:func:`resolve_hparams` is THE way to override hyperparameters (``ffkv edit --hparams`` and
``ffkv evaluate --hparams/--set`` both call it): the method's defaults (:mod:`ffkv.edit.registry`), updated
by each override in order, every name known and every value checked. Each method's names and meanings are
its ``hparam_docs`` (``ffkv edit --help``, docs/edit.md).

ROME / MEMIT / EasyEdit files paste in: their names are ffkv's where they mean the same, and

    context_template_length_params  -> prefixes
    layers: [17] (ROME)              -> layer: 17
    steps, adaptive_threshold (KN)   -> ig_steps, threshold
    mom2_update_weight (AlphaEdit)   dropped with a warning: AlphaEdit's update does not read it
    norm_constraint: false (FT)      0 (no bound); FT's kl_factor 0 is dropped (its code does not read it)
    alg_name                         must name the method; v_loss_layer must be the last layer (ffkv's loss is
                                     on the model's output); mom2_adjustment must be true (ffkv always uses C)
    model_name, device, stats_dir, fp16, model_parallel, max_length, batch_size, layer_selection,
    *_module_tmp, ln_f_module, lm_head_module, mom2_dataset, mom2_n_samples, mom2_dtype
                                     say where a module or file is, or how the reference ran: ffkv finds the
                                     modules from the model, so they are dropped, with a warning naming them
                                     (the statistics corpus is ``corpus``; mom2_n_samples is ffkv's name too
                                     for the methods with key statistics: texts, as the reference counts)
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import yaml

from ..errors import FfkvError

# name in ROME / MEMIT / EasyEdit files -> ffkv's name (used when the method has the ffkv name)
ALIASES = {"context_template_length_params": "prefixes", "steps": "ig_steps", "adaptive_threshold": "threshold"}
# names of the reference's plumbing: dropped with a warning
PLUMBING = ("model_name", "device", "stats_dir", "fp16", "model_parallel", "max_length", "batch_size",
            "layer_selection", "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
            "ln_f_module", "lm_head_module", "mom2_dataset", "mom2_n_samples", "mom2_dtype")
# integer hyperparameters that may be 0 (every other integer one must be positive)
NONNEGATIVE_INTS = ("seed",)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_hparams(spec) -> dict:
    """Hyperparameter overrides from a dict, a JSON object string, or a ``.json`` / ``.yaml`` / ``.yml`` file.

    None gives {}. Anything but a mapping (a JSON list, invalid JSON or YAML, a missing file) is one FfkvError.
    """
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    if not isinstance(spec, (str, Path)):
        raise FfkvError(f"hyperparameters must be a dict, a JSON object or a JSON/YAML file, got "
                        f"{type(spec).__name__}", "pass a dict or a file")
    text, where = str(spec), "hyperparameters"
    path = Path(text)
    is_file = isinstance(spec, Path) or path.suffix.lower() in (".json", ".yaml", ".yml")
    try:
        is_file = is_file or path.is_file()
    except OSError:  # a JSON string too long for a file name
        pass
    if is_file:
        if not path.is_file():
            raise FfkvError(f"no hyperparameter file {text}", "pass an existing .json, .yaml or .yml file")
        where, text = str(path), path.read_text()
    if is_file and path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise FfkvError(f"{where} is not valid YAML ({_one_line(e)})", "fix the file") from None
        # YAML 1.1 reads 5e-1 as a string; a number-shaped string is a number
        if isinstance(data, dict):
            data = {k: float(v) if isinstance(v, str) and _NUMBER.match(v) else v for k, v in data.items()}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FfkvError(f"{where} {'' if is_file else repr(text[:60]) + ' '}is not valid JSON ({e})",
                            "pass a JSON object, e.g. '{\"v_lr\": 0.1}', or a .json/.yaml file") from None
    if not isinstance(data, dict):
        raise FfkvError(f"{where} must hold an object of name: value, not a {type(data).__name__}",
                        "write the hyperparameters as {\"name\": value, ...}")
    return data


def parse_settings(settings: Sequence[str]) -> dict:
    """``["key=value", ...]`` (``--set``) as a dict; a value is read as JSON when it parses, else a string."""
    out = {}
    for s in settings or ():
        if "=" not in s:
            raise FfkvError(f"--set expects key=value, got {s!r}", "e.g. --set v_num_grad_steps=30")
        k, v = s.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def default_hparams(model, method) -> dict:
    """The hyperparameters ``method`` uses on ``model`` when none are given (a fresh dict)."""
    from .registry import get_method  # noqa: PLC0415 - same folder; a top import would cycle through kn_edit

    m = get_method(method)
    hp = m.defaults(model)
    hp["method"] = m.name
    return hp


def _translate(model, method_name: str, known: dict, over: dict) -> dict:
    """ROME / MEMIT / EasyEdit names -> ffkv's (module docstring)."""
    over = dict(over)
    alg = over.pop("alg_name", None)
    if alg is not None and str(alg).lower() != method_name:
        raise FfkvError(f"these hyperparameters are for {alg}, not {method_name}",
                        f"pass {alg}'s hyperparameters with method {str(alg).lower()}, or drop alg_name")
    dropped = [k for k in PLUMBING if k in over and k not in known]
    for k in dropped:
        over.pop(k)
    if dropped:
        warnings.warn(f"hyperparameters {', '.join(dropped)} locate modules or files of the reference "
                      "implementation; ffkv reads them from the model and ignores them", stacklevel=4)
    for src, dst in ALIASES.items():
        if src in over and src not in known and dst in known:
            over[dst] = over.pop(src)
    if "v_loss_layer" in over and "v_loss_layer" not in known:
        vl = over.pop("v_loss_layer")
        if vl not in (model.n_layers - 1, -1):
            raise FfkvError(f"v_loss_layer={vl}: ffkv's target loss is on the model's output (layer "
                            f"{model.n_layers - 1})", "drop v_loss_layer or set it to the last layer")
    if "mom2_update_weight" in over and "mom2_update_weight" not in known and "nullspace_threshold" in known:
        over.pop("mom2_update_weight")
        warnings.warn("mom2_update_weight is in AlphaEdit's files but its update does not use it (the null-space "
                      "projector replaces lambda C); ignored", stacklevel=4)
    if "norm_constraint" in known:  # ROME's FT files: false = unconstrained, kl_factor 0 is not read
        if over.get("norm_constraint") is False:
            over["norm_constraint"] = 0.0
        if "kl_factor" in over and "kl_factor" not in known and over["kl_factor"] == 0:
            over.pop("kl_factor")
    if "mom2_adjustment" in over and "mom2_adjustment" not in known:
        if not over.pop("mom2_adjustment"):
            raise FfkvError("mom2_adjustment=false (an update without the key statistics C) is not ffkv's "
                            f"{method_name}: it always uses C = E[k k^T]", "drop mom2_adjustment or set it true")
    if "layers" in over and "layers" not in known and "layer" in known:
        ls = over.pop("layers")
        ls = ls if isinstance(ls, (list, tuple)) else [ls]
        if len(ls) != 1:
            raise FfkvError(f"{method_name} edits one layer, got layers={list(ls)}",
                            "pass one layer, or use memit for several")
        over["layer"] = ls[0]
    if "layer" in over and "layer" not in known and "layers" in known:
        if over["layer"] == "trace":
            raise FfkvError(f"layer='trace' chooses one layer; {method_name} edits layers=[...]",
                            "pass layers, or use rome with layer='trace'")
        over["layers"] = [over.pop("layer")]
    return over


def _bad(name, value, what, default):
    return FfkvError(f"hyperparameter {name}={value!r} must be {what}", f"pass {what} (default {default!r})")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_hparams(model, method, hp: dict) -> dict:
    """Check types and ranges against the method's defaults (the type of each default), normalise the layers;
    returns ``hp``. Numbers >= 0 and finite, integers positive (``seed`` >= 0), layers in range."""
    from .registry import get_method  # noqa: PLC0415 - same folder; a top import would cycle through kn_edit

    m = get_method(method)
    ref = m.defaults(model)
    for name, d in ref.items():
        v = hp.get(name)
        if name in ("layer", "layers", "neurons", "stats_tokens") or (d is None and v is None):
            continue
        if name == "trace_noise":
            if not (isinstance(v, str) or (_is_number(v) and math.isfinite(v) and v >= 0)):
                raise _bad(name, v, "a noise spec (s3) or a finite number >= 0", d)
        elif isinstance(d, bool):
            if not isinstance(v, bool):
                raise _bad(name, v, "true or false", d)
        elif isinstance(d, int):
            low = 0 if name in NONNEGATIVE_INTS else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise _bad(name, v, "an integer >= 0" if low == 0 else "a positive integer", d)
        elif isinstance(d, float):
            if not (_is_number(v) and math.isfinite(float(v)) and float(v) >= 0):
                raise _bad(name, v, "a finite number >= 0", d)
            hp[name] = float(v)
        elif isinstance(d, str) and name != "corpus" and not isinstance(v, str):
            raise _bad(name, v, "a string", d)
    if "kl_prompt" in hp and hp["kl_prompt"].count("{}") != 1:
        raise _bad("kl_prompt", hp["kl_prompt"], "a prompt with one '{}' for the subject", ref.get("kl_prompt"))
    if "v_weight_decay_form" in hp and hp["v_weight_decay_form"] not in ("reference", "squared"):
        raise _bad("v_weight_decay_form", hp["v_weight_decay_form"], "reference or squared", "reference")
    if "stats_tokens" in hp and hp["stats_tokens"] is not None and not (
            isinstance(hp["stats_tokens"], int) and not isinstance(hp["stats_tokens"], bool)
            and hp["stats_tokens"] >= 1):
        raise _bad("stats_tokens", hp["stats_tokens"], "a positive integer or null", ref.get("stats_tokens"))
    if "fact_token" in hp and hp["fact_token"] != "subject_last":
        raise _bad("fact_token", hp["fact_token"], "subject_last (the only token ffkv edits at)", "subject_last")
    if "prefixes" in hp:
        p = hp["prefixes"]
        if not (isinstance(p, (list, tuple)) and all(isinstance(s, (list, tuple)) and len(s) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in s) for s in p)):
            raise _bad("prefixes", p, "[[length, count], ...] of positive integers", ref.get("prefixes"))
    if "layer" in hp and hp["layer"] != "trace":  # "trace": chosen by causal tracing in apply_edits
        hp["layer"] = model.check_layer(hp["layer"])
    if "layers" in hp and not (hp["layers"] is None and ref.get("layers") is None):
        layers = hp["layers"]
        layers = [layers] if isinstance(layers, int) else layers
        if not isinstance(layers, (list, tuple)) or not layers:
            raise FfkvError(f"{m.name} needs at least one layer, got layers={hp['layers']!r}", "pass layers=[...]")
        hp["layers"] = sorted({model.check_layer(layer) for layer in layers})
    for layer in m.layers(hp):
        model.check_layer(layer)
    return hp


def resolve_hparams(model, method, *overrides) -> dict:
    """The method's defaults on ``model`` updated by each override in order (a dict, a JSON string, a
    .json/.yaml/.yml file, or None), then checked (:func:`check_hparams`). Unknown names are refused in one
    line that names them and the known ones."""
    hp = default_hparams(model, method)
    name = hp["method"]
    for spec in overrides:
        over = _translate(model, name, hp, load_hparams(spec))
        unknown = sorted(set(over) - set(hp))
        if unknown:
            raise FfkvError(f"unknown {name} hyperparameters: {', '.join(unknown)}",
                            f"known: {', '.join(sorted(k for k in hp if k != 'method'))}")
        hp.update(over)
    hp["method"] = name
    return check_hparams(model, name, hp)
