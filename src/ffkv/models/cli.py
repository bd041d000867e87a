"""``ffkv census`` and ``ffkv inspect``."""

from __future__ import annotations

import json

import click


def model_options(f):
    """Options every command that loads a model shares."""
    f = click.option("--dtype", default=None, help="float32 (default), bfloat16, float16 or auto.")(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:1, mps ...")(f)
    f = click.option("--device-map", default=None, help="Passed to from_pretrained, e.g. 'auto'.")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="Run the model repository's own code.")(f)
    return f


def load_from_options(model, dtype=None, device=None, device_map=None, trust_remote_code=False, **kw):
    from .loading import load_model

    return load_model(model, dtype=dtype, device=device, device_map=device_map,
                      trust_remote_code=trust_remote_code, **kw)


def emit_json(obj) -> None:
    from ..io import _jsonable

    click.echo(json.dumps(_jsonable(obj), indent=2))


@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--trust-remote-code", is_flag=True)
def census(model, as_json, trust_remote_code):
    """Count MODEL's parameters by component from its config alone (no weights are read).

    MODEL is a hub name, a model folder, a config.json, or a shipped config: gpt2-xl, gpt-j-6b,
    llama-2-7b, llama-3-8b, mistral-7b.
    """
    from .census import census as _census
    from .loading import load_config

    result = _census(load_config(model, trust_remote_code=trust_remote_code))
    result["model"] = model
    if as_json:
        emit_json(result)
        return
    _print_census(result)


def _print_census(c: dict, title: str | None = None):
    from rich.console import Console
    from rich.table import Table

    from .census import format_count

    t = Table(title=title or f"{c.get('model', '')}: {format_count(c['total_params'])} parameters")
    t.add_column("component")
    t.add_column("parameters", justify="right")
    t.add_column("share", justify="right")
    for comp, n in c["components"].items():
        t.add_row(comp, f"{n:,}", f"{n / c['total_params']:.1%}")
    t.add_row("total", f"{c['total_params']:,}", "100%", style="bold")
    console = Console()
    console.print(t)
    console.print(f"FFN share {c['ffn_share']:.1%}; {c['n_layers']} layers x {c['d_ffn']} = "
                  f"{c['memory_slots']:,} memory slots; {'gated' if c['gated'] else 'non-gated'} FFN "
                  f"({c['ffn_matrices']} matrices)")


def _activation_name(config, mm=None) -> str:
    for key in ("activation_function", "hidden_act", "hidden_activation"):
        v = getattr(config, key, None)
        if isinstance(v, str):
            return v
    if mm is not None:
        return type(mm.activation(0)).__name__
    return "unknown"


def inspect_model(model: str, trust_remote_code: bool = False, **load_kwargs) -> dict:
    """Family, shapes, activation, gating, the adapter check and the census of a model.

    A shipped config (no weights) is checked on a 2-layer, narrow model of the same family.
    """
    from .census import census as _census
    from .loading import SHIPPED_CONFIGS, load_config, tiny_model

    config = load_config(model, trust_remote_code=trust_remote_code)
    from .adapters import get_spec

    spec = get_spec(config)
    if model in SHIPPED_CONFIGS:
        mm = tiny_model(config.model_type, check=False)
        checked_on = "2-layer random model of the same family (the shipped config has no weights)"
        cen = _census(config)
    else:
        mm = load_from_options(model, trust_remote_code=trust_remote_code, check=False, **load_kwargs)
        checked_on = "the loaded weights"
        cen = _census(mm)
    from .check import check_adapter

    check = check_adapter(mm, raise_on_fail=False)
    return {
        "model": model,
        "family": spec.family,
        "model_type": config.model_type,
        "architecture": (getattr(config, "architectures", None) or [type(mm.hf).__name__])[0],
        "layers": cen["n_layers"],
        "d_model": getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or mm.d_model,
        "d_ffn": cen["d_ffn"],
        "vocab_size": getattr(config, "vocab_size", None),
        "activation": _activation_name(config, mm),
        "gated": spec.gated,
        "parallel_attention_ffn": spec.parallel,
        "tokenizer": mm.tokenizer is not None if model not in SHIPPED_CONFIGS else None,
        "adapter_check": {"passed": check["passed"], "max_abs_error": check["max_abs_error"],
                          "relative_tolerance": check["relative_tolerance"], "checked_on": checked_on},
        "census": cen,
    }


@click.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@model_options
def inspect_cmd(model, as_json, **opts):
    """Describe MODEL: family, layers, widths, activation, gating, adapter check and census."""
    from ..errors import AdapterCheckFailed

    info = inspect_model(model, **opts)
    if as_json:
        emit_json(info)
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"ffkv inspect {model}", show_header=False)
        for k in ("family", "model_type", "architecture", "layers", "d_model", "d_ffn", "vocab_size",
                  "activation", "gated", "parallel_attention_ffn", "tokenizer"):
            t.add_row(k, str(info[k]))
        ac = info["adapter_check"]
        t.add_row("adapter check", f"{'passed' if ac['passed'] else 'FAILED'} "
                                   f"(max abs error {ac['max_abs_error']:.2e}; {ac['checked_on']})")
        Console().print(t)
        _print_census(info["census"], title="census")
    if not info["adapter_check"]["passed"]:
        raise AdapterCheckFailed(f"adapter check failed for family '{info['family']}'",
                                 "the model's FFN does not match ffkv's spec; please report the model")
