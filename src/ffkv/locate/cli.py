"""``ffkv trace`` and ``ffkv neurons``: thin commands over :mod:`ffkv.locate`."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from .. import validate
from ..clikit import (default_of, emit_json, json_option, layers_option, load_model_from_options, model_options,
                      parse_layers, predicted_token, quiet_option, show_progress, token_text)
from ..errors import FfkvError
from ..io import check_output_target, output_dir, provenance, require_finite, write_json
from ..models.memory_id import MemoryId
from .average import average_traces, load_known
from .interventions import ablation_curve, intervention_effects
from .neurons import METHODS as NEURON_METHODS, knowledge_neurons
from .plots import plot_ablation, plot_average, plot_trace
from .trace import DEFAULT_SEED, causal_traces


# What marks a folder as trace / neurons output (an existing non-empty --out must be one, or it is refused).
TRACE_FILES = ("trace_hidden.json", "trace_mlp.json", "trace_attn.json", "average.json")
NEURON_FILES = ("neurons.json",)


def _noise(value: str):
    """--noise: a number (the noise's standard deviation, finite and >= 0) or a named level such as s3."""
    try:
        x = float(value)
    except ValueError:
        return value
    return validate.number(x, "--noise", lo=0.0)


@click.command("trace")
@click.argument("model")
@click.option("--prompt", default=None, help="The factual prompt, e.g. 'The Eiffel Tower is located in'.")
@click.option("--subject", default=None, help="The subject as written in the prompt (its tokens are corrupted).")
@click.option("--known", type=click.Path(exists=True, path_type=Path), default=None,
              help="Instead of one prompt: average over a known_1000-layout file (or a testbed folder).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="With --known: the first N records only.")
@click.option("--kind", type=click.Choice(["hidden", "mlp", "attn", "all"]), default="hidden", show_default=True,
              help="Restore hidden states, MLP outputs or attention outputs (all: the three).")
@click.option("--answer", default=None,
              help="Answer to score, e.g. Paris (a leading space is implied: Paris and ' Paris' are one token; "
                   "default: the model's top prediction, as ROME).")
@click.option("--noise", default="s3", show_default=True,
              help="s3 (3 x subject-embedding std), a number, uniform or replace.")
@click.option("--samples", type=click.IntRange(min=1), default=10, show_default=True, help="Noise samples.")
@click.option("--window", type=click.IntRange(min=1), default=10, show_default=True,
              help="Layers restored together for mlp/attn.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True,
              help="Noise seed (ROME's RandomState(1)): the same seed gives the same heatmap.")
@click.option("--subjects", "subjects_file", type=click.Path(exists=True, path_type=Path), default=None,
              help="Data set whose subjects set the s3 noise level (known_1000 layout, a testbed folder or one "
                   "subject per line; default: ROME's known_1000 from the shared data, else the prompt's subject).")
@layers_option(help="Report these layers only, e.g. '0-3,5' (default: all; the trace itself covers every layer).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for trace_<kind>.json and heatmaps (PNG and SVG).")
@json_option
@quiet_option
@model_options
def trace(model, prompt, subject, known, limit, kind, answer, noise, samples, window, seed, subjects_file, layers, out,
          as_json, quiet, **load):
    """Causal tracing (ROME): where in MODEL the fact PROMPT -> answer is recalled.

    With --known, traces every record the model answers correctly and averages by ROME's token groups
    (prompts it gets wrong are skipped and counted). In --json, "peak" is the strongest (token, layer) and
    "subject_peak" the strongest layer at the subject's last token (what `ffkv edit --layer trace` picks
    with --kind mlp).
    """
    kinds = ["hidden", "mlp", "attn"] if kind == "all" else [kind]
    if known is None and (not prompt or not subject):
        raise FfkvError("trace needs --prompt and --subject (or --known FILE)",
                        "e.g. ffkv trace gpt2 --prompt 'The Eiffel Tower is in' --subject 'The Eiffel Tower'")
    if out is not None:  # before any work: an unrelated folder is refused, not overwritten after minutes
        check_output_target(out, "trace", TRACE_FILES)
    mm = load_model_from_options(model, **load)
    shown = parse_layers(layers, mm.n_layers) or list(range(mm.n_layers))
    if known is not None:
        return _trace_known(mm, known, limit, kinds, noise, samples, window, seed, subjects_file, shown, out, as_json,
                            quiet)
    # The one answer rule (MemoryModel.answer_id): "Paris" and " Paris" are the same token.
    answer_id = mm.answer_id(answer) if answer is not None else predicted_token(mm, prompt)
    results = causal_traces(mm, prompt, subject, kinds, answer=answer_id, noise=_noise(noise), samples=samples,
                            window=window, seed=seed, subjects=subjects_file, progress=show_progress(quiet))
    for k, r in results.items():  # a NaN grid (an overflow in the model) is refused, never written or printed,
        if not load.get("allow_nonfinite"):  # unless the user let a model with NaN/inf weights in on purpose
            require_finite(f"the {k} trace's scores", r.scores)
    first = results[kinds[0]]
    prov = provenance(mm.identity, noise=noise, noise_level=first.noise_level, noise_subjects=first.noise_subjects,
                      samples=samples, window=window, seed=seed)
    if out is not None:  # the folder is written whole (ffkv.io.output_dir)
        with output_dir(out, "trace", TRACE_FILES) as tmp:
            for k, r in results.items():
                write_json(tmp / f"trace_{k}.json", {**r.to_json(), "provenance": prov})
                for ext in ("png", "svg"):
                    plot_trace(r, tmp / f"trace_{k}.{ext}")
    payload = {k: _trace_json(mm, r, shown) for k, r in results.items()}
    if as_json:
        obj = payload[kinds[0]] if len(kinds) == 1 else {"kinds": payload}
        emit_json({**obj, "provenance": prov})
        return
    for k, d in payload.items():
        p = d["peak"]
        click.echo(f"{k}: answer {d['answer']!r}  clean p={d['high_score']:.4f}  corrupted p={d['low_score']:.4f}  "
                   f"peak p={p['score']:.4f} at token {p['token']} ({d['tokens'][p['token']]!r}), layer {p['layer']}")


def _trace_json(mm, r, shown: list[int]) -> dict:
    """One trace for output: ``scores`` (tokens, len(layers)) of the shown ``layers``, its peaks."""
    scores = np.asarray(r.scores)[:, shown]
    t, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    last = r.subject_range[1] - 1
    js = int(np.argmax(scores[last]))
    d = r.to_json()
    out = {key: d[key] for key in ("tokens", "subject_range", "answer_id", "high_score", "low_score", "kind",
                                    "window", "noise", "noise_level", "noise_subjects", "samples", "seed", "cost")}
    return {**out, "answer": token_text(mm, r.answer_id), "layers": shown, "scores": scores.tolist(),
            "peak": {"token": int(t), "layer": shown[int(j)], "score": float(scores[t, j])},
            "subject_peak": {"token": last, "layer": shown[js], "score": float(scores[last, js])}}


def _trace_known(mm, known, limit, kinds, noise, samples, window, seed, subjects_file, shown, out, as_json, quiet):
    records = load_known(known, limit)
    avg = average_traces(mm, records, kinds=kinds, noise=_noise(noise), samples=samples, window=window, seed=seed,
                         subjects=subjects_file, progress=show_progress(quiet))
    for k in kinds:
        avg[k] = {**avg[k], "indirect": [[row[l] for l in shown] for row in avg[k]["indirect"]]}
    payload = {**avg, "layers": shown, "provenance": provenance(mm.identity, known=known, limit=limit, noise=noise,
                                                                  noise_level=avg["noise_level"],
                                                                  noise_subjects=avg["noise_subjects"],
                                                                  samples=samples, window=window, seed=seed)}
    if out is not None:
        with output_dir(out, "trace", TRACE_FILES) as tmp:
            write_json(tmp / "average.json", payload)
            for ext in ("png", "svg"):
                plot_average({k: avg[k] for k in kinds}, tmp / f"average.{ext}")
    if as_json:
        emit_json(payload)
        return
    click.echo(f"{avg['n_records'] - avg['n_skipped']} traced, {avg['n_skipped']} skipped (answered wrongly)")
    for k in kinds:
        for g, row in zip(avg[k]["groups"], avg[k]["indirect"]):
            j = max(range(len(row)), key=row.__getitem__)
            click.echo(f"{k:6} {g:24} peak AIE {row[j]:.4f} at layer {shown[j]}")


@click.command("neurons")
@click.argument("model")
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="A prompt of the fact (repeat for paraphrases).")
@click.option("--answer", required=True,
              help="The answer, e.g. Paris (a leading space is implied: Paris and ' Paris' are one answer).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=default_of(knowledge_neurons, "threshold"),
              show_default=True, help="Coarse filter: fraction of the max attribution.")
@click.option("--share", type=click.FloatRange(0, 1, min_open=True), default=default_of(knowledge_neurons, "share"),
              show_default=True, help="Keep neurons found in at least this share of prompts.")
@click.option("--steps", type=click.IntRange(min=1), default=default_of(knowledge_neurons, "steps"),
              show_default=True, help="Integrated-gradient steps.")
@click.option("--max-neurons", type=click.IntRange(min=1), default=None,
              help="Keep at most this many neurons, strongest first (default: all).")
@click.option("--method", type=click.Choice(list(NEURON_METHODS)), default=default_of(knowledge_neurons, "method"),
              show_default=True,
              help="ig: exact integrated gradients on every layer; screen: gradient x activation first.")
@layers_option(help="Attribute these layers only, e.g. '0-3,5' (default: all).")
@click.option("--unrelated", "unrelated", multiple=True,
              help="An unrelated fact as 'PROMPT|ANSWER', to check that suppression spares it (repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write neurons.json (and a figure) here.")
@json_option
@quiet_option
@model_options
def neurons(model, prompts, answer, threshold, share, steps, max_neurons, method, layers, unrelated, out, as_json,
            quiet, **load):
    """Knowledge neurons (Dai et al.) of the fact PROMPT -> ANSWER, with suppress / amplify effects.

    In --json, "memories" lists the neurons as L<layer>.<index> and "answer_id" the answer's token.
    """
    pairs = []
    for u in unrelated:
        if "|" not in u:
            raise FfkvError(f"--unrelated {u!r} is not 'PROMPT|ANSWER'", "write it as 'The capital of Peru is|Lima'")
        p, a = u.rsplit("|", 1)
        pairs.append((p, a))
    if out is not None:
        check_output_target(out, "neurons", NEURON_FILES)
    mm = load_model_from_options(model, **load)
    layer_list = parse_layers(layers, mm.n_layers)
    # The one answer rule (MemoryModel.answer_tokens); an answer of one token is passed as its id, so that
    # no later tokenization of the text can name another token. Longer answers are teacher-forced as text.
    ids = mm.answer_tokens(answer)
    answer_id, target = ids[0], (ids[0] if len(ids) == 1 else answer)
    limit = {"max_neurons": max_neurons} if max_neurons is not None else {}  # the API's default otherwise
    res = knowledge_neurons(mm, list(prompts), target, threshold=threshold, share=share, steps=steps, method=method,
                            layers=layer_list, progress=show_progress(quiet), **limit)
    if not load.get("allow_nonfinite"):
        require_finite("the neurons' attributions", [float(a) for _, _, a in res.neurons])
    effects = intervention_effects(mm, list(prompts), target, res.neurons, unrelated=pairs)
    curve = ablation_curve(mm, list(prompts), target, res.neurons, progress=show_progress(quiet)) \
        if res.neurons else []
    prov = provenance(mm.identity, threshold=threshold, share=share, steps=steps, method=method, layers=layer_list,
                      max_neurons=max_neurons)
    memories = [str(MemoryId(l, i)) for l, i, _ in res.neurons]
    payload = {**res.to_json(), "answer": answer, "answer_id": answer_id, "answer_token": token_text(mm, answer_id),
               "memories": memories, "effects": effects, "ablation_curve": curve, "provenance": prov}
    if out is not None:
        with output_dir(out, "neurons", NEURON_FILES) as tmp:
            write_json(tmp / "neurons.json", payload)
            if curve:
                plot_ablation(curve, tmp / "ablation.png")
    if as_json:
        emit_json(payload)
        return
    click.echo(f"{len(res.neurons)} knowledge neurons for {answer!r} over {len(prompts)} prompt(s):")
    for name, (_, _, a) in zip(memories, res.neurons):
        click.echo(f"  {name}  attribution {a:.4g}")
    own = effects.get("own", {})
    for op in ("suppress", "amplify"):
        if "found" in own.get(op, {}):
            f, r = own[op]["found"], own[op].get("random", {})
            click.echo(f"{op}: p(answer) {f['prob_before']:.4f} -> {f['prob_after']:.4f} "
                       f"({100 * f['relative_change']:+.1f}%), flip rate {f['flip_rate']:.2f}; random memories "
                       f"{100 * r.get('relative_change', 0):+.1f}%")
    unrel = effects.get("unrelated", {}).get("suppress", {}).get("found")
    if unrel:
        click.echo(f"unrelated facts under suppression: {100 * unrel['relative_change']:+.1f}%, "
                   f"flip rate {unrel['flip_rate']:.2f} (n={unrel['n']})")
