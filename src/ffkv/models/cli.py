"""``ffkv census`` and ``ffkv inspect``."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from ..clikit import emit_json, json_option, model_options, set_threads
from ..errors import AdapterCheckFailed
from .adapters import get_spec
from .census import census as count_parameters
from .census import format_count
from .check import check_adapter
from .integrity import describe_nonfinite
from .loading import SHIPPED_CONFIGS, load_checked, load_config, tiny_model
from .moe import MoEModel, check_moe, moe_census


@click.command()
@click.argument("model")
@json_option
@click.option("--trust-remote-code", is_flag=True, help="Run the model repository's own code (config only).")
def census(model, as_json, trust_remote_code):
    """Count MODEL's parameters by component from its config alone (no weights are read).

    MODEL is a hub name, a model folder, a config.json, or a shipped config: gpt2-xl, gpt-j-6b,
    llama-2-7b, llama-3-8b, mistral-7b.
    """
    result = count_parameters(load_config(model, trust_remote_code=trust_remote_code))
    result["model"] = model
    if as_json:
        emit_json(result)
        return
    _print_census(result)


def _print_census(c: dict, title: str | None = None):
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


def padded_vocabulary(mm) -> dict:
    """Embedding rows vs the tokenizer's tokens: ``{"embedding_rows", "tokenizer_vocab_size", "padded_vocab"}``.

    Some families pad the embedding matrix beyond the tokenizer (Pythia: 50304 rows, 50277 tokens) so that
    its width divides evenly on accelerators; the extra rows are no token, decode to nothing, and must not
    be reported as an answer.
    """
    rows = mm.vocab_size
    if mm.tokenizer is None:
        return {"embedding_rows": rows, "tokenizer_vocab_size": None, "padded_vocab": None}
    n_tok = len(mm.tokenizer)
    return {"embedding_rows": rows, "tokenizer_vocab_size": n_tok, "padded_vocab": rows > n_tok}


def inspect_model(model: str, trust_remote_code: bool = False, threads: int | None = None, **load_kwargs) -> dict:
    """Family, shapes, activation, gating, the adapter check, the census and the non-finite weights of a model.

    A shipped config (no weights) is checked on a 2-layer, narrow model of the same family. A model whose
    weights hold NaN or inf loads (inspect is where they are looked at): ``"nonfinite_weights"`` lists them
    (``[{"tensor", "nan", "inf", "numel"}]``, empty when every weight is finite, None for a shipped config) and
    the adapter check is not run (``"passed": None``), since its comparison would be NaN.
    """
    config = load_config(model, trust_remote_code=trust_remote_code)
    load_kwargs.pop("allow_nonfinite", None)  # always allowed here: inspect reports them
    nonfinite = None
    if model in SHIPPED_CONFIGS:
        get_spec(config)
        mm = tiny_model(config.model_type, check=False)
        checked_on = "2-layer random model of the same family (the shipped config has no weights)"
        cen = count_parameters(config)
        vocab = {"embedding_rows": None, "tokenizer_vocab_size": None, "padded_vocab": None}
    else:
        set_threads(threads)
        mm, nonfinite = load_checked(model, trust_remote_code=trust_remote_code, check=False, allow_nonfinite=True,
                                     **load_kwargs)
        checked_on = "the loaded weights"
        cen = count_parameters(mm)
        vocab = padded_vocabulary(mm)
    spec = mm.spec  # hand-written, inferred, or a mixture-of-experts spec
    if isinstance(mm, MoEModel):  # experts are checked per expert and counted by expert
        cen = {**cen, "experts": moe_census(mm)}
    if nonfinite:
        check = {"passed": None, "max_abs_error": None, "relative_tolerance": None}
        checked_on = "not run: the weights hold non-finite values"
    elif isinstance(mm, MoEModel):
        check = check_moe(mm, raise_on_fail=False)
    else:
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
        **vocab,
        "activation": _activation_name(config, mm),
        "gated": spec.gated,
        "parallel_attention_ffn": spec.parallel,
        "tokenizer": mm.tokenizer is not None if model not in SHIPPED_CONFIGS else None,
        "adapter_check": {"passed": check["passed"], "max_abs_error": check["max_abs_error"],
                          "relative_tolerance": check["relative_tolerance"], "checked_on": checked_on},
        "census": cen,
        "nonfinite_weights": nonfinite,
    }


@click.command("inspect")
@click.argument("model")
@json_option
@model_options
def inspect_cmd(model, as_json, **load):
    """Describe MODEL: family, layers, widths, activation, gating, vocabulary, adapter check and census.

    A model whose embedding matrix has more rows than its tokenizer has tokens (a padded vocabulary, as
    Pythia's) gets a warning line on stderr and "padded_vocab": true in --json. Weights holding NaN or inf
    are reported (a warning line, "nonfinite_weights" in --json: tensor, NaN and inf counts) and the adapter
    check is not run on them; other commands refuse such a model unless given --allow-nonfinite.
    """
    info = inspect_model(model, **load)
    if info["nonfinite_weights"]:
        click.echo(f"ffkv: warning: the weights hold non-finite values ({describe_nonfinite(info['nonfinite_weights'])});"
                   f" other commands refuse this model unless given --allow-nonfinite", err=True)
    if info["padded_vocab"]:
        click.echo(f"ffkv: warning: the embedding matrix has {info['embedding_rows']} rows but the tokenizer has "
                   f"{info['tokenizer_vocab_size']} tokens (a padded vocabulary); ids "
                   f"{info['tokenizer_vocab_size']}-{info['embedding_rows'] - 1} are no token and are never reported "
                   f"as an answer", err=True)
    if as_json:
        emit_json(info)
    else:
        t = Table(title=f"ffkv inspect {model}", show_header=False)
        for k in ("family", "model_type", "architecture", "layers", "d_model", "d_ffn", "vocab_size",
                  "tokenizer_vocab_size", "activation", "gated", "parallel_attention_ffn", "tokenizer"):
            t.add_row(k, str(info[k]))
        nf = info["nonfinite_weights"]
        if nf is not None:
            t.add_row("non-finite weights", describe_nonfinite(nf, limit=10) if nf else "none")
        ac = info["adapter_check"]
        if ac["passed"] is None:
            t.add_row("adapter check", ac["checked_on"])
        else:
            t.add_row("adapter check", f"{'passed' if ac['passed'] else 'FAILED'} "
                                       f"(max abs error {ac['max_abs_error']:.2e}; {ac['checked_on']})")
        Console().print(t)
        _print_census(info["census"], title="census")
    if info["adapter_check"]["passed"] is False:
        raise AdapterCheckFailed(f"adapter check failed for family '{info['family']}'",
                                 "the model's FFN does not match ffkv's spec; please report the model")
