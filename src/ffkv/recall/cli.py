"""``ffkv recall``: judge one query (signals, score, verdict) or tabulate storage strength over a data set.

    ffkv recall MODEL --prompt "Ana Boll was born in" --subject "Ana Boll" --answer Paris --json
    ffkv recall MODEL --facts TESTBED_DIR --out strength.parquet [--per-bucket 50]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import click
from tqdm import tqdm

from ..clikit import (emit_json, json_option, load_model_from_options, model_options, quiet_option, show_progress,
                      token_text)
from ..errors import FfkvError
from ..io import provenance, read_json, write_parquet
from .data import bucket_of, fact_queries, load_testbed_facts, stratified_facts
from .stats import bootstrap_ci, spearman
from .strength import storage_strength
from .verdict import judge


@click.command("recall")
@click.argument("model")
@click.option("--prompt", help="The query, e.g. 'Ana Boll was born in'.")
@click.option("--subject", help="The subject as written in the prompt (needed for --trace).")
@click.option("--answer", help="An answer to check (its first token), e.g. Paris (a leading space is implied: "
                               "Paris and ' Paris' are one token).")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Samples for self-consistency (default: as fitted).")
@click.option("--temperature", type=click.FloatRange(min=0), default=None,
              help="Sampling temperature (default: as fitted).")
@click.option("--trace", is_flag=True, help="Add the causal-trace concentration (needs --subject; slower).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Verdict weights JSON (default: the shipped default-testbed fit).")
@click.option("--facts", "facts_path", type=click.Path(exists=True), default=None,
              help="Testbed folder or facts.jsonl: tabulate storage strength over its facts instead.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Parquet file for --facts.")
@click.option("--per-bucket", type=click.IntRange(min=1), default=50, show_default=True,
              help="Facts per frequency bucket (--facts).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling and fact-sampling seed.")
@json_option
@quiet_option
@model_options
def recall(model, prompt, subject, answer, samples, temperature, trace, weights, facts_path, out, per_bucket,
           seed, as_json, quiet, **load):
    """Judge how strongly MODEL stores a fact and whether to trust its recall or retrieve the fact."""
    if (prompt is None) == (facts_path is None):
        raise FfkvError("give either --prompt (one query) or --facts (a data set)", "see ffkv recall --help")
    # Every input is checked before the model loads: a bad one is refused before any work.
    if weights is not None:
        read_json(weights)
    if facts_path is not None:
        if out is None and not as_json:
            raise FfkvError("--facts needs --out FILE.parquet or --json", "pass one")
        if out is not None and Path(out).suffix != ".parquet":
            raise FfkvError(f"--out {Path(out).name}: unknown format ({Path(out).suffix or 'no extension'})",
                            "the table is written as Parquet: end the file name in .parquet")
        facts = load_testbed_facts(facts_path)[0]
        mm = load_model_from_options(model, **load)
        return _table(mm, facts, facts_path, out, per_bucket, seed, as_json, quiet)
    mm = load_model_from_options(model, **load)
    answer_id = mm.answer_id(answer) if answer is not None else None  # the one answer rule
    rep = judge(mm, prompt, subject=subject, answer=answer, n_samples=samples, temperature=temperature,
                seed=seed, weights=weights, trace=trace)
    if answer is not None:
        rep = {**rep, "answer_id": answer_id, "answer_token": token_text(mm, answer_id)}
    if as_json:
        emit_json(rep)
        return
    s = rep["signals"]
    click.echo(f"prompt: {prompt!r}   greedy answer: {rep['greedy_answer']!r}")
    click.echo("signals: " + ", ".join(f"{k}={v:.3g}" for k, v in s.items()))
    if "answer" in rep:
        a = rep["answer"]
        click.echo(f"answer {a['text']!r}: p={a['p']:.3g} rank={a['rank']} margin={a['margin']:.3g} "
                   f"strength={a['strength']:.3g} k50={a['redundancy']} greedy_matches={a['greedy_matches_answer']}")
    click.echo(f"score {rep['score']:.3f} (threshold {rep['threshold']:.3f}) -> verdict: {rep['verdict']}")


def _table(mm, facts, facts_path, out, per_bucket, seed, as_json, quiet):
    chosen = stratified_facts(facts, per_bucket, seed)
    rng = random.Random(f"recall-table-{seed}")
    cols: dict[str, list] = {k: [] for k in ("fact_id", "subject", "relation_id", "object", "train_count", "bucket",
                                              "prompt", "p_answer", "rank", "margin", "strength", "survival",
                                              "redundancy", "attribution_share")}
    for f in tqdm(chosen, desc="storage strength", file=sys.stderr, mininterval=2, disable=not show_progress(quiet)):
        q = fact_queries(f, "train", rng)
        st = storage_strength(mm, q.prompt, f["object"], subject=f["subject"])
        for k, v in (("fact_id", f.get("fact_id", -1)), ("subject", f["subject"]), ("relation_id", f["relation_id"]),
                     ("object", f["object"]), ("train_count", int(f["train_count"])),
                     ("bucket", bucket_of(int(f["train_count"]))), ("prompt", q.prompt), ("p_answer", st.p_answer),
                     ("rank", st.rank), ("margin", st.margin), ("strength", st.strength), ("survival", st.survival),
                     ("redundancy", st.redundancy), ("attribution_share", st.attribution_share)):
            cols[k].append(v)
    summary = {}
    if len(chosen) >= 3:
        rho, lo, hi = bootstrap_ci(spearman, cols["strength"], cols["train_count"], n_boot=500)
        summary = {"n": len(chosen), "spearman_strength_vs_train_count": rho, "ci95": [lo, hi]}
    meta = provenance(mm.identity, facts=str(facts_path), per_bucket=per_bucket, seed=seed)
    if out is not None:
        write_parquet(out, cols, meta={**meta, "summary": summary})
    if as_json:
        emit_json({"summary": summary, "out": out, "rows": len(chosen)})
    else:
        click.echo(f"{len(chosen)} facts -> {out}; " + (f"Spearman(strength, train count) = "
                                                        f"{summary['spearman_strength_vs_train_count']:.3f} "
                                                        f"[{summary['ci95'][0]:.3f}, {summary['ci95'][1]:.3f}]"
                                                        if summary else ""))
