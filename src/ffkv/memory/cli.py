"""``ffkv atlas``: mine, analyse, query and report the key-value atlas of a model (a thin layer over the API)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import FfkvError


def _echo_json(obj):
    from ..io import _jsonable

    click.echo(json.dumps(_jsonable(obj)))


def _load(model: str, dtype: str | None, device: str | None):
    from ..models.loading import load_model

    p = Path(model)
    if (p / "atlas.json").exists():  # an atlas folder stands for the model it was mined from
        from ..io import read_json

        model = read_json(p / "atlas.json")["model_path"]
    return load_model(model, dtype=dtype, device=device)


def _atlas(directory, dtype=None, device=None):
    from .atlas import Atlas

    a = Atlas(directory)
    if dtype or device:
        a._model = _load(a.meta["model_path"], dtype, device)
    return a


def _memory_list(items, with_value=False):
    from .atlas import parse_memory

    out = []
    for it in items:
        if with_value:
            if "=" not in it:
                raise FfkvError(f"'{it}' has no value", "write forced memories as LAYER.INDEX=VALUE, e.g. 3.17=5")
            name, v = it.split("=", 1)
            try:
                out.append((*parse_memory(name), float(v)))
            except ValueError:
                raise FfkvError(f"'{v}' is not a number", "write LAYER.INDEX=VALUE") from None
        else:
            out.append(parse_memory(it))
    return out


model_options = [click.option("--dtype", default=None, help="float32 (default), bfloat16, float16."),
                 click.option("--device", default=None, help="cpu, cuda, ...")]


def with_model_options(f):
    for opt in reversed(model_options):
        f = opt(f)
    return f


@click.group("atlas")
def atlas():
    """The key-value atlas (Geva et al. 2021, 2022): trigger examples, values, composition, sub-updates."""


@atlas.command("mine")
@click.argument("model")
@click.option("--corpus", required=True, help="Text/JSONL/Parquet file, or a folder of them (also a datasets folder).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--top-k", default=25, show_default=True, help="Trigger prefixes kept per key (top and bottom).")
@click.option("--split", type=click.Choice(["sentence", "window"]), default="sentence", show_default=True)
@click.option("--window", default=64, show_default=True, help="Window length / maximum sentence length (tokens).")
@click.option("--min-tokens", default=2, show_default=True, help="Drop units shorter than this.")
@click.option("--text-field", default="text", show_default=True, help="JSONL/Parquet text field.")
@click.option("--max-units", type=int, default=None, help="Stop after this many units.")
@click.option("--docs", type=click.Choice(["paragraph", "line"]), default="paragraph", show_default=True,
              help="Documents of .txt files: blank-line separated paragraphs, or one per line.")
@click.option("--batch-tokens", default=2048, show_default=True, help="Padded tokens per forward pass.")
@click.option("--checkpoint-every", default=200, show_default=True, help="Batches between checkpoints.")
@click.option("--dedup/--no-dedup", default=True, show_default=True,
              help="Count a prefix that occurs several times (same tokens) once, at its first occurrence.")
@click.option("--analyze/--no-analyze", default=False, help="Run the analyses when mining finishes.")
@click.option("--json", "as_json", is_flag=True)
@with_model_options
def mine_cmd(model, corpus, out, top_k, split, window, min_tokens, text_field, max_units, docs, batch_tokens,
             checkpoint_every, dedup, analyze, as_json, dtype, device):
    """Record the top-k / bottom-k trigger prefixes of every key in one pass; the same command resumes."""
    from .mining import mine

    mm = _load(model, dtype, device)
    meta = mine(mm, corpus, out, top_k=top_k, batch_tokens=batch_tokens, checkpoint_every=checkpoint_every,
                dedup=dedup, split=split, window=window, min_tokens=min_tokens, text_field=text_field,
                max_units=max_units, docs=docs)
    if analyze:
        from .analysis import analyze as run
        from .atlas import Atlas

        run(Atlas(out, model=mm))
    if as_json:
        _echo_json({"atlas": str(out), **meta})
    else:
        click.echo(f"atlas written to {out}: {meta['units']} units, {meta['tokens']} prefixes, "
                   f"{meta['n_layers']} layers x {meta['d_ffn']} keys, top-{meta['top_k']}")


@atlas.command("merge")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.argument("parts", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def merge_cmd(out, parts, as_json):
    """Merge atlases of one model mined on different corpus shards into OUT (per-key top-k of the union)."""
    from .mining import merge_atlases

    meta = merge_atlases(list(parts), out)
    if as_json:
        _echo_json({"atlas": str(out), **meta})
    else:
        click.echo(f"merged {len(parts)} atlases into {out}: {meta['units']} units, {meta['tokens']} prefixes")


@atlas.command("analyze")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--norm/--no-norm", default=False, show_default=True,
              help="Apply the final norm before projecting values and FFN outputs onto the vocabulary.")
@click.option("--steps", default="values,patterns,removal,composition", show_default=True)
@click.option("--composition-units", default=200, show_default=True, help="Units sampled for section 5.")
@click.option("--active-threshold", type=float, default=None,
              help="Count memory i active when |m_i| > this (default: the activation's own rule).")
@click.option("--sample-corpus", default=None, help="Corpus for section 5 (default: the mined corpus).")
@click.option("--pattern-threshold", default=0.5, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@with_model_options
def analyze_cmd(directory, norm, steps, composition_units, active_threshold, sample_corpus, pattern_threshold,
                as_json, dtype, device):
    """Values, agreement, pattern labels, token removal, composition and refinement, stored in the atlas."""
    from .analysis import STEPS, analyze

    chosen = [s.strip() for s in steps.split(",") if s.strip()]
    bad = [s for s in chosen if s not in STEPS]
    if bad:
        raise FfkvError(f"unknown analysis step(s) {', '.join(bad)}", f"use {', '.join(STEPS)}")
    res = analyze(_atlas(directory, dtype, device), norm=norm, steps=chosen, composition_units=composition_units,
                  active_threshold=active_threshold, sample_corpus=sample_corpus, pattern_threshold=pattern_threshold)
    if as_json:
        _echo_json(res)
    else:
        click.echo(f"analyses written to {directory}/analysis ({', '.join(chosen)})")


@atlas.command("report")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--norm/--no-norm", default=False, show_default=True, help="Used for analyses not yet stored.")
@click.option("--composition-units", default=200, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@with_model_options
def report_cmd(directory, norm, composition_units, as_json, dtype, device):
    """Write DIR/report.html with the paper's tables and figures (runs missing analyses first)."""
    from .report import write_report

    path = write_report(_atlas(directory, dtype, device), norm=norm, composition_units=composition_units)
    if as_json:
        _echo_json({"report": path})
    else:
        click.echo(f"report written to {path}")


@atlas.command("summary")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def summary_cmd(directory, as_json):
    """Per-layer table of the stored analyses (Markdown, percentages), or JSON."""
    from .report import format_summary, layer_summary

    rows = layer_summary(_atlas(directory))
    if as_json:
        _echo_json({"layers": rows})
    else:
        click.echo(format_summary(rows))


@atlas.command("memory")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("memory")
@click.option("-n", "n", default=25, show_default=True, help="Trigger examples to show.")
@click.option("--top-tokens", default=10, show_default=True)
@click.option("--norm/--no-norm", default=False, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def memory_cmd(directory, memory, n, top_tokens, norm, as_json):
    """Trigger examples (top and bottom) and value top tokens of memory LAYER.INDEX."""
    from .atlas import parse_memory
    from .queries import describe_memory

    a = _atlas(directory)
    layer, index = a.check_memory(*parse_memory(memory))
    info = describe_memory(a, layer, index, n=n, top_tokens=top_tokens, norm=norm)
    if as_json:
        _echo_json(info)
        return
    click.echo(f"{info['memory']}  value top tokens: {info['value_top_tokens']}  (max p {info['max_p']:.3g})")
    click.echo(f"pattern: {info['pattern']['label']}"
               + (f" (last token shared by {info['pattern']['last_share']:.0%})" if info['pattern'] else ""))
    for t in info["triggers"]:
        click.echo(f"  {t['coef']:+9.3f}  {t['prefix'][-100:]!r}  -> {t['next_token']!r}")
    if info["bottom_triggers"]:
        click.echo("bottom:")
        for t in info["bottom_triggers"][:5]:
            click.echo(f"  {t['coef']:+9.3f}  {t['prefix'][-100:]!r}")


@atlas.command("promotes")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("token")
@click.option("-n", "n", default=20, show_default=True)
@click.option("--norm/--no-norm", default=False, show_default=True)
@click.option("--triggers", default=3, show_default=True, help="Trigger examples shown per memory.")
@click.option("--json", "as_json", is_flag=True)
def promotes_cmd(directory, token, n, norm, triggers, as_json):
    """Memories whose values promote TOKEN most (p of TOKEN in softmax(E v))."""
    from .values import promotes, token_id

    a = _atlas(directory)
    rows = promotes(a.model, token, n=n, norm=norm)
    tok = a.model.tokenizer
    for r in rows:
        r["triggers"] = [t["prefix"] for t in a.memory_triggers(r["layer"], r["index"], n=triggers, tokenizer=tok)]
    tid = token_id(a.model, token)
    if as_json:
        _echo_json({"token": token, "token_id": tid, "memories": rows})
        return
    for r in rows:
        click.echo(f"{r['memory']:>10}  p={r['p']:.3g}  rank={r['rank']}  e.g. {r['triggers'][:1]}")


@atlas.command("nearest")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--memory", "memory", default=None, help="Values closest to this memory's value (LAYER.INDEX).")
@click.option("--token", default=None, help="Values closest to this token's unembedding row.")
@click.option("-n", "n", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def nearest_cmd(directory, memory, token, n, as_json):
    """Memories whose values are closest (cosine) to a memory's value or a token's unembedding."""
    from .atlas import parse_memory
    from .values import nearest_values, token_id

    a = _atlas(directory)
    if (memory is None) == (token is None):
        raise FfkvError("give exactly one of --memory and --token", "e.g. --memory 3.17 or --token ' Paris'")
    if memory is not None:
        l, i = a.check_memory(*parse_memory(memory))
        vec = a.model.values(l)[:, i]
    else:
        vec = a.model.unembedding.weight[token_id(a.model, token)]
    rows = nearest_values(a.model, vec.detach(), n=n)
    if as_json:
        _echo_json({"query": memory or token, "memories": rows})
        return
    for r in rows:
        click.echo(f"{r['memory']:>10}  cos={r['cosine']:.3f}")


@atlas.command("subupdates")
@click.argument("model")
@click.option("--prompt", required=True)
@click.option("--top-n", default=10, show_default=True, help="Sub-updates shown per layer.")
@click.option("--position", default=-1, show_default=True, help="Token position (default: the last).")
@click.option("--layers", default=None, help="Comma-separated layers (default: all).")
@click.option("--off", "off", multiple=True, help="Switch memory LAYER.INDEX off (repeatable).")
@click.option("--on", "on", multiple=True, help="Force memory LAYER.INDEX=VALUE on (repeatable).")
@click.option("--positions", default=None, help="Positions for --off/--on, comma-separated (default: all).")
@click.option("--generate", "generate", default=0, show_default=True, help="Also generate this many tokens.")
@click.option("--norm/--no-norm", default=False, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@with_model_options
def subupdates_cmd(model, prompt, top_n, position, layers, off, on, positions, generate, norm, as_json, dtype,
                   device):
    """The FFN update of each layer as its top sub-updates m_i v_i; optionally switch memories off/on."""
    from .subupdates import generate_with_memories, sub_updates, switch_effect

    mm = _load(model, dtype, device)
    try:
        layer_list = [int(x) for x in layers.split(",")] if layers else None
        pos_list = [int(x) for x in positions.split(",")] if positions else None
    except ValueError:
        raise FfkvError("--layers and --positions take comma-separated integers", "e.g. --layers 3,4,5") from None
    res = sub_updates(mm, prompt, top_n=top_n, position=position, layers=layer_list, norm=norm)
    offs, ons = _memory_list(off), _memory_list(on, with_value=True)
    if offs or ons:
        res["switch"] = switch_effect(mm, prompt, off=offs, on=ons, positions=pos_list)
        if generate:
            res["generation"] = generate_with_memories(mm, prompt, off=offs, on=ons, max_new_tokens=generate)
    if as_json:
        _echo_json(res)
        return
    click.echo(f"prompt {prompt!r}, position {res['position']} ({res['token']!r}); prediction "
               + ", ".join(f"{p['token']!r} {p['p']:.3f}" for p in res["prediction"]))
    for lay in res["layers"]:
        click.echo(f"layer {lay['layer']}: FFN promotes {lay['ffn_top_tokens']}")
        for s in lay["sub_updates"]:
            click.echo(f"  {s['memory']:>10}  m={s['coef']:+.3f}  |m|*||v||={s['score']:.3f}  {s['promotes']}")
    if "switch" in res:
        sw = res["switch"]
        click.echo(f"switch off {sw['off']} on {sw['on']}: KL = {sw['kl']:.4f}")
        click.echo("  before: " + ", ".join(f"{p['token']!r} {p['p']:.3f}" for p in sw["before"][:5]))
        click.echo("  after:  " + ", ".join(f"{p['token']!r} {p['p']:.3f}" for p in sw["after"][:5]))
    if "generation" in res:
        click.echo(f"  generation before: {res['generation']['before']!r}")
        click.echo(f"  generation after:  {res['generation']['after']!r}")

