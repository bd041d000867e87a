"""``ffkv recall``: judge one query (signals, score, verdict) or tabulate storage strength over a data set.

    ffkv recall MODEL --prompt "Ana Boll was born in" --subject "Ana Boll" --answer Paris --json
    ffkv recall MODEL --facts TESTBED_DIR --out strength.parquet [--per-bucket 50]
"""

from __future__ import annotations

import json
import sys

import click

from ..errors import FfkvError


@click.command("recall")
@click.argument("model")
@click.option("--prompt", help="the query, e.g. 'Ana Boll was born in'")
@click.option("--subject", help="the subject as written in the prompt (needed for --trace)")
@click.option("--answer", help="an answer to check (its first token), e.g. 'Paris'")
@click.option("--samples", type=int, default=None, help="samples for self-consistency (default: as fitted)")
@click.option("--temperature", type=float, default=None, help="sampling temperature (default: as fitted)")
@click.option("--trace", is_flag=True, help="add the causal-trace concentration (needs --subject; slower)")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="verdict weights JSON (default: the shipped default-testbed fit)")
@click.option("--facts", "facts_path", type=click.Path(), default=None,
              help="testbed folder or facts.jsonl: tabulate storage strength over its facts instead")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Parquet file for --facts")
@click.option("--per-bucket", type=int, default=50, show_default=True, help="facts per frequency bucket")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--device", default=None, help="cpu, cuda, ...")
def recall(model, prompt, subject, answer, samples, temperature, trace, weights, facts_path, out, per_bucket,
           seed, as_json, device):
    """Judge how strongly MODEL stores a fact and whether to trust its recall or retrieve the fact."""
    from ..models.loading import load_model

    if (prompt is None) == (facts_path is None):
        raise FfkvError("give either --prompt (one query) or --facts (a data set)", "see ffkv recall --help")
    if samples is not None and samples < 1:
        raise FfkvError(f"--samples must be >= 1, got {samples}", "pass a positive number")
    if temperature is not None and temperature < 0:
        raise FfkvError(f"--temperature must be >= 0, got {temperature}", "pass 0 or more")
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    mm = load_model(model, device=device)
    if facts_path is not None:
        return _table(mm, facts_path, out, per_bucket, seed, as_json)
    from .verdict import judge

    rep = judge(mm, prompt, subject=subject, answer=answer, n_samples=samples, temperature=temperature,
                seed=seed, weights=weights, trace=trace)
    if as_json:
        click.echo(json.dumps(rep))
        return
    s = rep["signals"]
    click.echo(f"prompt: {prompt!r}   greedy answer: {rep['greedy_answer']!r}")
    click.echo("signals: " + ", ".join(f"{k}={v:.3g}" for k, v in s.items()))
    if "answer" in rep:
        a = rep["answer"]
        click.echo(f"answer {a['text']!r}: p={a['p']:.3g} rank={a['rank']} margin={a['margin']:.3g} "
                   f"strength={a['strength']:.3g} k50={a['redundancy']} greedy_matches={a['greedy_matches_answer']}")
    click.echo(f"score {rep['score']:.3f} (threshold {rep['threshold']:.3f}) -> verdict: {rep['verdict']}")


def _table(mm, facts_path, out, per_bucket, seed, as_json):
    import random

    from tqdm import tqdm

    from ..io import provenance, write_parquet
    from .data import bucket_of, fact_queries, load_testbed_facts, stratified_facts
    from .strength import storage_strength

    if out is None and not as_json:
        raise FfkvError("--facts needs --out FILE.parquet or --json", "pass one")
    facts, _ = load_testbed_facts(facts_path)
    chosen = stratified_facts(facts, per_bucket, seed)
    rng = random.Random(f"recall-table-{seed}")
    cols: dict[str, list] = {k: [] for k in ("fact_id", "subject", "relation_id", "object", "train_count", "bucket",
                                              "prompt", "p_answer", "rank", "margin", "strength", "survival",
                                              "redundancy", "attribution_share")}
    for f in tqdm(chosen, desc="storage strength", file=sys.stderr, mininterval=2):
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
        from .stats import bootstrap_ci, spearman

        rho, lo, hi = bootstrap_ci(spearman, cols["strength"], cols["train_count"], n_boot=500)
        summary = {"n": len(chosen), "spearman_strength_vs_train_count": rho, "ci95": [lo, hi]}
    meta = provenance(mm.identity, facts=str(facts_path), per_bucket=per_bucket, seed=seed)
    if out is not None:
        write_parquet(out, cols, meta={**meta, "summary": summary})
    if as_json:
        click.echo(json.dumps({"summary": summary, "out": out, "rows": len(chosen)}))
    else:
        click.echo(f"{len(chosen)} facts -> {out}; " + (f"Spearman(strength, train count) = "
                                                        f"{summary['spearman_strength_vs_train_count']:.3f} "
                                                        f"[{summary['ci95'][0]:.3f}, {summary['ci95'][1]:.3f}]"
                                                        if summary else ""))
