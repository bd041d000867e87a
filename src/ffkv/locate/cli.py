"""``ffkv trace`` and ``ffkv neurons``: thin commands over :mod:`ffkv.locate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def _load(model: str, dtype: str | None, device: str | None):
    import torch

    import ffkv

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    return ffkv.load_model(model, dtype=dtype, device=device)


def _noise(value: str):
    try:
        return float(value)
    except ValueError:
        return value


@click.command("trace")
@click.argument("model")
@click.option("--prompt", default=None, help="The factual prompt, e.g. 'The Eiffel Tower is located in'.")
@click.option("--subject", default=None, help="The subject as written in the prompt (its tokens are corrupted).")
@click.option("--known", type=click.Path(path_type=Path), default=None,
              help="Instead of one prompt: average over a known_1000-layout file (or a testbed folder).")
@click.option("--limit", type=int, default=None, help="With --known: the first N records only.")
@click.option("--kind", type=click.Choice(["hidden", "mlp", "attn", "all"]), default="hidden", show_default=True,
              help="Restore hidden states, MLP outputs or attention outputs (all: the three).")
@click.option("--answer", default=None, help="Answer to score (default: the model's top prediction, as ROME).")
@click.option("--noise", default="s3", show_default=True,
              help="s3 (3 x subject-embedding std), a number, uniform or replace.")
@click.option("--samples", default=10, show_default=True, help="Noise samples.")
@click.option("--window", default=10, show_default=True, help="Layers restored together for mlp/attn.")
@click.option("--seed", default=0, show_default=True, help="Noise seed: the same seed gives the same heatmap.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for trace_<kind>.json and heatmaps (PNG and SVG).")
@click.option("--dtype", default=None, help="float32 (default), bfloat16, float16.")
@click.option("--device", default=None, help="cpu, cuda, ...")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def trace(model, prompt, subject, known, limit, kind, answer, noise, samples, window, seed, out, dtype, device,
          as_json):
    """Causal tracing (ROME): where in MODEL the fact PROMPT -> answer is recalled.

    With --known, traces every record the model answers correctly and averages by ROME's token groups
    (prompts it gets wrong are skipped and counted).
    """
    from ..errors import FfkvError
    from ..io import provenance, write_json
    from .trace import causal_trace

    kinds = ["hidden", "mlp", "attn"] if kind == "all" else [kind]
    if known is not None:
        return _trace_known(model, known, limit, kinds, noise, samples, window, seed, out, dtype, device, as_json)
    if not prompt or not subject:
        raise FfkvError("trace needs --prompt and --subject (or --known FILE)",
                        "e.g. ffkv trace gpt2 --prompt 'The Eiffel Tower is in' --subject 'The Eiffel Tower'")
    mm = _load(model, dtype, device)
    results = {k: causal_trace(mm, prompt, subject, kind=k, answer=answer, noise=_noise(noise), samples=samples,
                               window=window, seed=seed) for k in kinds}
    prov = provenance(mm.identity, noise=noise, samples=samples, window=window, seed=seed)
    if out is not None:
        from .plots import plot_trace

        for k, r in results.items():
            write_json(out / f"trace_{k}.json", {**r.to_json(), "provenance": prov})
            for ext in ("png", "svg"):
                plot_trace(r, out / f"trace_{k}.{ext}")
    if as_json:
        payload = {k: _trace_json(r) for k, r in results.items()}
        obj = payload[kinds[0]] if len(kinds) == 1 else {"kinds": payload}
        click.echo(json.dumps({**obj, "provenance": prov}))
        return
    for k, r in results.items():
        t, l = r.peak()
        click.echo(f"{k}: answer {r.answer!r}  clean p={r.high_score:.4f}  corrupted p={r.low_score:.4f}  "
                   f"peak p={r.scores.max():.4f} at token {t} ({r.tokens[t]!r}), layer {l}")


def _trace_known(model, known, limit, kinds, noise, samples, window, seed, out, dtype, device, as_json):
    from ..io import provenance, write_json
    from .average import average_traces, load_known

    records = load_known(known, limit)
    mm = _load(model, dtype, device)
    avg = average_traces(mm, records, kinds=kinds, noise=_noise(noise), samples=samples, window=window, seed=seed,
                         progress=not as_json)
    payload = {**avg, "provenance": provenance(mm.identity, known=known, limit=limit, noise=noise,
                                               samples=samples, window=window, seed=seed)}
    if out is not None:
        from .plots import plot_average

        write_json(out / "average.json", payload)
        for ext in ("png", "svg"):
            plot_average({k: avg[k] for k in kinds}, out / f"average.{ext}")
    if as_json:
        click.echo(json.dumps(payload))
        return
    click.echo(f"{avg['n_records'] - avg['n_skipped']} traced, {avg['n_skipped']} skipped (answered wrongly)")
    for k in kinds:
        for g, row in zip(avg[k]["groups"], avg[k]["indirect"]):
            l = max(range(len(row)), key=row.__getitem__)
            click.echo(f"{k:6} {g:24} peak AIE {row[l]:.4f} at layer {l}")


def _trace_json(r) -> dict:
    d = r.to_json()
    return {key: d[key] for key in ("tokens", "subject_range", "answer", "answer_id", "high_score", "low_score",
                                    "scores", "kind", "window", "noise", "noise_level", "samples", "seed", "cost")}


@click.command("neurons")
@click.argument("model")
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="A prompt of the fact (repeat for paraphrases).")
@click.option("--answer", required=True, help="The answer, with its leading space: ' Paris'.")
@click.option("--threshold", default=0.2, show_default=True, help="Coarse filter: fraction of the max attribution.")
@click.option("--share", default=0.5, show_default=True, help="Keep neurons found in at least this share of prompts.")
@click.option("--steps", default=20, show_default=True, help="Integrated-gradient steps.")
@click.option("--method", type=click.Choice(["ig", "screen"]), default="ig", show_default=True,
              help="ig: exact integrated gradients on every layer; screen: gradient x activation first.")
@click.option("--unrelated", "unrelated", multiple=True,
              help="An unrelated fact as 'PROMPT|ANSWER', to check that suppression spares it (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write neurons.json (and a figure) here.")
@click.option("--dtype", default=None)
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def neurons(model, prompts, answer, threshold, share, steps, method, unrelated, out, dtype, device, as_json):
    """Knowledge neurons (Dai et al.) of the fact PROMPT -> ANSWER, with suppress / amplify effects."""
    from ..errors import FfkvError
    from ..io import provenance, write_json
    from .interventions import ablation_curve, intervention_effects
    from .neurons import knowledge_neurons

    pairs = []
    for u in unrelated:
        if "|" not in u:
            raise FfkvError(f"--unrelated {u!r} is not 'PROMPT|ANSWER'", "write it as 'The capital of Peru is| Lima'")
        p, a = u.rsplit("|", 1)
        pairs.append((p, a))
    mm = _load(model, dtype, device)
    res = knowledge_neurons(mm, list(prompts), answer, threshold=threshold, share=share, steps=steps, method=method,
                            progress=not as_json and sys.stderr.isatty())
    effects = intervention_effects(mm, list(prompts), answer, res.neurons, unrelated=pairs)
    curve = ablation_curve(mm, list(prompts), answer, res.neurons) if res.neurons else []
    prov = provenance(mm.identity, threshold=threshold, share=share, steps=steps, method=method)
    payload = {**res.to_json(), "effects": effects, "ablation_curve": curve, "provenance": prov}
    if out is not None:
        write_json(out / "neurons.json", payload)
        if curve:
            from .plots import plot_ablation

            plot_ablation(curve, out / "ablation.png")
    if as_json:
        click.echo(json.dumps(payload))
        return
    click.echo(f"{len(res.neurons)} knowledge neurons for {answer!r} over {len(prompts)} prompt(s):")
    for l, i, a in res.neurons:
        click.echo(f"  L{l}.{i}  attribution {a:.4g}")
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
