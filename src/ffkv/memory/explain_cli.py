"""``ffkv explain``: the logit difference between candidate answers, by layer and by memory.

    ffkv explain MODEL --prompt "Ana Boll was born in" --candidates Paris Rome [--top-n 5] [--json]
"""

from __future__ import annotations

import click

from ..clikit import emit_json, json_option, layers_option, load_model_from_options, model_options, parse_layers
from ..errors import FfkvError
from ..io import require_finite
from .explain import explain


@click.command("explain", context_settings={"allow_interspersed_args": True})
@click.argument("model")
@click.argument("more_candidates", nargs=-1, metavar="")
@click.option("--prompt", required=True, help="The prompt whose next token is explained.")
@click.option("--candidates", multiple=True, help="Candidate answers: --candidates A B [C ...] (two or more).")
@click.option("--top-n", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Memories per layer (those that most separate the candidates).")
@layers_option(help="Layers whose memories to list, e.g. '0-3,5' (default: all).")
@json_option
@model_options
def explain_cmd(model, more_candidates, prompt, candidates, top_n, layers, as_json, **load):
    """Decompose MODEL's preference between candidate answers into attention, FFN and memory terms."""
    cands = list(candidates) + list(more_candidates)
    if len(cands) < 2:
        raise FfkvError("explain needs at least two candidates", "pass --candidates A B [C ...]")
    mm = load_model_from_options(model, **load)
    e = explain(mm, prompt, cands, top_n=top_n, layers=parse_layers(layers, mm.n_layers))
    if not load.get("allow_nonfinite"):
        require_finite("the explanation's logits", e.logits)
    if as_json:
        emit_json(e.to_dict())
        return
    a, b = e.candidates[:2]
    click.echo(f"prompt: {prompt!r}   logit({a}) - logit({b}) = {e.logit_diff:+.3f}   "
               f"(decomposition error {e.check['error']:.1e})")
    click.echo(f"{'layer':>5} {'attn':>9} {'ffn':>9}   top memories (contribution to {a} - {b})")
    diff = lambda d: d[a] - d[b]
    click.echo(f"{'embed':>5} {diff(e.embed):+9.3f}")
    for layer in e.layers:
        mems = "  ".join(f"{m['memory']}:{diff(m['contribution']):+.2f}" for m in layer["memories"][:3])
        click.echo(f"{layer['layer']:>5} {diff(layer['attn']):+9.3f} {diff(layer['ffn']):+9.3f}   {mems}")
