"""``ffkv atlas``: mine, analyze, query and report the key-value atlas of a model (a thin layer over the API)."""

from __future__ import annotations

from pathlib import Path

import click

from ..clikit import (FfkvGroup, emit_json, json_option, layers_option, load_model_from_options, model_options,
                      parse_layers, quiet_option, set_threads, show_progress)
from ..errors import FfkvError
from ..models import distributed
from .analysis import STEPS, analyze
from .atlas import Atlas, parse_memory
from .merge import merge_atlases
from .miner import mine
from .queries import describe_memory
from .schema import read_atlas_meta
from .report import format_summary, layer_summary, write_report
from .subupdates import generate_with_memories, sub_updates, switch_effect
from .values import nearest_values, promotes, token_id


def _load(model: str, **load):
    p = Path(model)
    if (p / "atlas.json").exists():  # an atlas folder stands for the model it was mined from
        model = read_atlas_meta(p)["model_path"]
    return load_model_from_options(model, **load)


def _atlas(directory, **load) -> Atlas:
    """The atlas at ``directory``; its model loads on first use from the recorded path, or now with the
    given model options."""
    set_threads(load.pop("threads", None))
    if not any(load.values()):
        return Atlas(directory)  # checks, on first use, that the model is still the one mined
    return Atlas(directory, model=load_model_from_options(Atlas(directory).meta["model_path"], **load))


def _memory_list(items, with_value=False):
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


@click.group("atlas", cls=FfkvGroup)
def atlas():
    """The key-value atlas (Geva et al. 2021, 2022): trigger examples, values, composition, sub-updates."""


@atlas.command("mine")
@click.argument("model")
@click.option("--corpus", required=True, help="Text/JSONL/Parquet file, or a folder of them (also a datasets folder).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=25, show_default=True, help="Trigger prefixes kept per key (top and bottom), 1..10000.")
@click.option("--split", type=click.Choice(["sentence", "window"]), default="sentence", show_default=True)
@click.option("--window", type=click.IntRange(min=1), default=64, show_default=True, help="Window length / maximum sentence length (tokens).")
@click.option("--min-tokens", type=click.IntRange(min=1), default=2, show_default=True, help="Drop units shorter than this.")
@click.option("--text-field", default="text", show_default=True, help="JSONL/Parquet text field.")
@click.option("--max-units", type=click.IntRange(min=1), default=None, help="Stop after this many units.")
@click.option("--docs", type=click.Choice(["paragraph", "line"]), default="paragraph", show_default=True,
              help="Documents of .txt files: blank-line separated paragraphs, or one per line.")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=2048, show_default=True, help="Padded tokens per forward pass.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=200, show_default=True, help="Batches between checkpoints.")
@click.option("--dedup/--no-dedup", default=True, show_default=True,
              help="Count a prefix that occurs several times (same tokens) once, at its first occurrence.")
@click.option("--analyze/--no-analyze", "run_analyses", default=False, help="Run the analyses when mining finishes.")
@json_option
@quiet_option
@model_options
def mine_cmd(model, corpus, out, top_k, split, window, min_tokens, text_field, max_units, docs, batch_tokens,
             checkpoint_every, dedup, run_analyses, as_json, quiet, **load):
    """Record the top-k / bottom-k trigger prefixes of every key in one pass; the same command resumes.

    Under torchrun every process mines its share of the corpus and rank 0 writes one atlas, equal to one
    process's (docs/distributed.md)."""

    # under torchrun every rank mines its shard of the corpus; rank 0 writes the one atlas and reports
    load["device"] = distributed.local_device(load.get("device"))
    mm = _load(model, **load)
    meta = mine(mm, corpus, out, top_k=top_k, batch_tokens=batch_tokens, checkpoint_every=checkpoint_every,
                dedup=dedup, split=split, window=window, min_tokens=min_tokens, text_field=text_field,
                max_units=max_units, docs=docs, progress=show_progress(quiet))
    main = distributed.is_main()
    distributed.close()
    if not main:
        return
    if run_analyses:
        analyze(Atlas(out, model=mm), progress=show_progress(quiet))
    if as_json:
        emit_json({"atlas": str(out), **meta})
    else:
        click.echo(f"atlas written to {out}: {meta['units']} units, {meta['tokens']} prefixes, "
                   f"{meta['n_layers']} layers x {meta['d_ffn']} keys, top-{meta['top_k']}")


@atlas.command("merge")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.argument("parts", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@json_option
def merge_cmd(out, parts, as_json):
    """Merge atlases of one model mined on different corpus shards into OUT (per-key top-k of the union)."""

    meta = merge_atlases(list(parts), out)
    if as_json:
        emit_json({"atlas": str(out), **meta})
    else:
        click.echo(f"merged {len(parts)} atlases into {out}: {meta['units']} units, {meta['tokens']} prefixes")


@atlas.command("analyze")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--norm/--no-norm", default=False, show_default=True,
              help="Apply the final norm before projecting values and FFN outputs onto the vocabulary.")
@click.option("--steps", default="values,patterns,removal,composition", show_default=True)
@click.option("--composition-units", type=click.IntRange(min=1), default=200, show_default=True,
              help="Units sampled for section 5.")
@click.option("--active-threshold", type=click.FloatRange(min=0), default=None,
              help="Count memory i active when |m_i| > this (default: the activation's own rule).")
@click.option("--sample-corpus", default=None, help="Corpus for section 5 (default: the mined corpus).")
@click.option("--pattern-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of a key's triggers that must share a pattern for its label.")
@json_option
@quiet_option
@model_options
def analyze_cmd(directory, norm, steps, composition_units, active_threshold, sample_corpus, pattern_threshold,
                as_json, quiet, **load):
    """Values, agreement, pattern labels, token removal, composition and refinement, stored in the atlas."""

    chosen = [s.strip() for s in steps.split(",") if s.strip()]
    bad = [s for s in chosen if s not in STEPS]
    if bad:
        raise FfkvError(f"unknown analysis step(s) {', '.join(bad)}", f"use {', '.join(STEPS)}")
    res = analyze(_atlas(directory, **load), norm=norm, steps=chosen, composition_units=composition_units,
                  active_threshold=active_threshold, sample_corpus=sample_corpus, pattern_threshold=pattern_threshold,
                  progress=show_progress(quiet))
    if as_json:
        emit_json(res)
    else:
        click.echo(f"analyses written to {directory}/analysis ({', '.join(chosen)})")


@atlas.command("report")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--norm/--no-norm", default=False, show_default=True, help="Used for analyses not yet stored.")
@click.option("--composition-units", type=click.IntRange(min=1), default=200, show_default=True,
              help="Units sampled for section 5 (if not yet analysed).")
@json_option
@quiet_option
@model_options
def report_cmd(directory, norm, composition_units, as_json, quiet, **load):
    """Write DIR/report.html with the paper's tables and figures (runs missing analyses first)."""

    path = write_report(_atlas(directory, **load), norm=norm, composition_units=composition_units,
                        progress=show_progress(quiet))
    if as_json:
        emit_json({"report": path})
    else:
        click.echo(f"report written to {path}")


@atlas.command("summary")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@json_option
def summary_cmd(directory, as_json):
    """Per-layer table of the stored analyses (Markdown, percentages), or JSON."""

    rows = layer_summary(_atlas(directory))
    if as_json:
        emit_json({"layers": rows})
    else:
        click.echo(format_summary(rows))


@atlas.command("memory")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("memory")
@click.option("-n", "n", type=click.IntRange(min=0), default=25, show_default=True, help="Trigger examples to show.")
@click.option("--top-tokens", type=click.IntRange(min=1), default=10, show_default=True,
              help="Tokens shown of the value's projection.")
@click.option("--norm/--no-norm", default=False, show_default=True)
@json_option
@model_options
def memory_cmd(directory, memory, n, top_tokens, norm, as_json, **load):
    """Trigger examples (top and bottom) and value top tokens of memory LAYER.INDEX."""

    a = _atlas(directory, **load)
    layer, index = a.check_memory(*parse_memory(memory))
    info = describe_memory(a, layer, index, n=n, top_tokens=top_tokens, norm=norm)
    if as_json:
        emit_json(info)
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
@click.option("-n", "n", type=click.IntRange(min=1), default=20, show_default=True, help="Memories to show.")
@click.option("--norm/--no-norm", default=False, show_default=True)
@click.option("--triggers", type=click.IntRange(min=0), default=3, show_default=True,
              help="Trigger examples shown per memory.")
@json_option
@model_options
def promotes_cmd(directory, token, n, norm, triggers, as_json, **load):
    """Memories whose values promote TOKEN most (p of TOKEN in softmax(E v))."""

    a = _atlas(directory, **load)
    rows = promotes(a.model, token, n=n, norm=norm)
    tok = a.model.tokenizer
    for r in rows:
        r["triggers"] = [t["prefix"] for t in a.memory_triggers(r["layer"], r["index"], n=triggers, tokenizer=tok)]
    tid = token_id(a.model, token)
    if as_json:
        emit_json({"token": token, "token_id": tid, "memories": rows})
        return
    for r in rows:
        click.echo(f"{r['memory']:>10}  p={r['p']:.3g}  rank={r['rank']}  e.g. {r['triggers'][:1]}")


@atlas.command("nearest")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--memory", "memory", default=None, help="Values closest to this memory's value (LAYER.INDEX).")
@click.option("--token", default=None, help="Values closest to this token's unembedding row.")
@click.option("-n", "n", type=click.IntRange(min=1), default=20, show_default=True, help="Memories to show.")
@json_option
@model_options
def nearest_cmd(directory, memory, token, n, as_json, **load):
    """Memories whose values are closest (cosine) to a memory's value or a token's unembedding."""

    a = _atlas(directory, **load)
    if (memory is None) == (token is None):
        raise FfkvError("give exactly one of --memory and --token", "e.g. --memory 3.17 or --token ' Paris'")
    if memory is not None:
        l, i = a.check_memory(*parse_memory(memory))
        vec = a.model.values(l)[:, i]
    else:
        vec = a.model.unembedding.weight[token_id(a.model, token)]
    rows = nearest_values(a.model, vec.detach(), n=n)
    if as_json:
        emit_json({"query": memory or token, "memories": rows})
        return
    for r in rows:
        click.echo(f"{r['memory']:>10}  cos={r['cosine']:.3f}")


@atlas.command("subupdates")
@click.argument("model")
@click.option("--prompt", required=True)
@click.option("--top-n", type=click.IntRange(min=1), default=10, show_default=True,
              help="Sub-updates shown per layer.")
@click.option("--position", type=int, default=-1, show_default=True, help="Token position (default: the last).")
@layers_option()
@click.option("--off", "off", multiple=True, help="Switch memory LAYER.INDEX off (repeatable).")
@click.option("--on", "on", multiple=True, help="Force memory LAYER.INDEX=VALUE on (repeatable).")
@click.option("--positions", default=None, help="Positions for --off/--on, comma-separated (default: all).")
@click.option("--generate", "generate", type=click.IntRange(min=0), default=0, show_default=True, help="Also generate this many tokens.")
@click.option("--norm/--no-norm", default=False, show_default=True)
@json_option
@model_options
def subupdates_cmd(model, prompt, top_n, position, layers, off, on, positions, generate, norm, as_json, **load):
    """The FFN update of each layer as its top sub-updates m_i v_i; optionally switch memories off/on."""

    mm = _load(model, **load)
    layer_list = parse_layers(layers, mm.n_layers)
    try:
        pos_list = [int(x) for x in positions.split(",")] if positions else None
    except ValueError:
        raise FfkvError("--positions takes comma-separated integers", "e.g. --positions 0,2") from None
    res = sub_updates(mm, prompt, top_n=top_n, position=position, layers=layer_list, norm=norm)
    offs, ons = _memory_list(off), _memory_list(on, with_value=True)
    if offs or ons:
        res["switch"] = switch_effect(mm, prompt, off=offs, on=ons, positions=pos_list)
        if generate:
            res["generation"] = generate_with_memories(mm, prompt, off=offs, on=ons, max_new_tokens=generate)
    if as_json:
        emit_json(res)
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

