"""``ffkv dossier``: one fact's report (HTML and JSON) joining tracing, memories, storage, verdict and edit safety.

    ffkv dossier MODEL --prompt "Ana Boll was born in" --subject "Ana Boll" --answer Paris --out dossier/ [--json]
"""

from __future__ import annotations

import click

from ..clikit import (default_of, emit_json, json_option, load_model_from_options, model_options, quiet_option,
                      show_progress)
from ..errors import FfkvError
from ..testbed.datasets import load_facts
from .build import ABLATE_POSITIONS, build_dossier
from .report import write_dossier


@click.command("dossier")
@click.argument("model")
@click.option("--prompt", required=True, help="The fact's prompt, e.g. 'Ana Boll was born in'.")
@click.option("--subject", required=True, help="The subject as written in the prompt.")
@click.option("--answer", required=True, help="The fact's answer (its first token is scored), e.g. Paris.")
@click.option("--paraphrase", "paraphrases", multiple=True,
              help="Another prompt of the same fact (repeatable; default: the testbed's held-out templates of a "
                   "testbed fact, else the prompt only).")
@click.option("--control", "controls", multiple=True, metavar="PROMPT|ANSWER[|SUBJECT]",
              help="An unrelated fact the ablation must spare (repeatable; default on a testbed: 5 other facts).")
@click.option("--facts", "facts_path", type=click.Path(exists=True), default=None,
              help="Testbed folder or facts.jsonl (default: the testbed the model was loaded from, if any).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for dossier.json and .html.")
@click.option("--samples", type=click.IntRange(min=1), default=default_of(build_dossier, "samples"),
              show_default=True, help="Noise samples per trace cell.")
@click.option("--noise", default="s3", show_default=True, help="Trace noise: s3, a number, uniform or replace.")
@click.option("--kn-method", type=click.Choice(["ig", "screen"]), default="ig", show_default=True,
              help="Knowledge-neuron attribution (screen: faster on large models).")
@click.option("--kn-steps", type=click.IntRange(min=1), default=default_of(build_dossier, "kn_steps"),
              show_default=True, help="Integrated-gradients steps.")
@click.option("--ablate-positions", type=click.Choice(list(ABLATE_POSITIONS)), default="last", show_default=True,
              help="Where the carrying memories are switched off: the prediction position or every position.")
@click.option("--corpus", default="auto", show_default=True, help="Corpus of the key statistics C = E[kk^T].")
@click.option("--stats-tokens", type=click.IntRange(min=1), default=default_of(build_dossier, "stats_tokens"),
              show_default=True, help="Corpus tokens of C.")
@click.option("--stats-dir", type=click.Path(file_okay=False), default=None, help="Cache folder of C.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise and sampling seed.")
@json_option
@quiet_option
@model_options
def dossier(model, prompt, subject, answer, paraphrases, controls, facts_path, out, samples, noise, kn_method,
            kn_steps, ablate_positions, corpus, stats_tokens, stats_dir, seed, as_json, quiet, **load):
    """Write one fact's dossier: where tracing puts it, which memories carry it, whether switching them off
    removes it (and only it), how strongly it is stored, the recall verdict and the predicted safety of editing it."""
    mm = load_model_from_options(model, **load)
    facts = load_facts(facts_path)[0] if facts_path else None
    try:
        noise_value = float(noise)
    except ValueError:
        noise_value = noise
    if isinstance(noise_value, str) and not noise_value.strip():
        raise FfkvError("--noise is empty", "use s3, a number, uniform or replace")
    d = build_dossier(mm, prompt, subject, answer, paraphrases=list(paraphrases) or None,
                      controls=list(controls) or None, facts=facts, noise=noise_value, samples=samples,
                      kn_method=kn_method, kn_steps=kn_steps, ablate_positions=ablate_positions, corpus=corpus, stats_tokens=stats_tokens,
                      stats_dir=stats_dir, seed=seed, progress=show_progress(quiet))
    paths = write_dossier(d, out)
    if as_json:
        emit_json({**d, "files": {k: str(v) for k, v in paths.items()}})
        return
    c = d["claims"]
    click.echo(f"{prompt!r} -> {answer!r}: traced layer {c['traced_layer']} (agreement "
               f"{d['tracing']['layer_agreement']:.0%}), {len(d['subspace']['memories'])} carrying memories, "
               f"ablation removes it on {d['subspace']['removed_share']:.0%} of paraphrases and "
               f"{d['subspace']['control_removed_share']:.0%} of controls; strength {d['storage']['strength']:.3g}, "
               f"k50 {d['storage']['redundancy']}; verdict {d['verdict']['verdict']}; edit "
               f"{'safe' if c['edit_safe'] else 'not safe'} ({d['edit_safety']['n_moved']}/"
               f"{d['edit_safety']['n_known']} keys moved)")
    click.echo(f"wrote {paths['html']} and {paths['json']}")
