"""``ffkv demo``: the whole mission, end to end, on the shipped default testbed.

Each step calls the same public command a user would type (so the demo also checks those interfaces),
keeps its JSON output under ``OUT/``, and the run ends with ``OUT/summary.md`` and a list of what was made.
On 2 cores it takes a few minutes; every step's time is recorded in ``OUT/summary.json``.

``OUT`` is one output, written whole or not at all (:func:`ffkv.io.output_dir`): the steps write into a
temporary folder beside it that is renamed to ``OUT`` only when every step succeeded, so a failing or
interrupted demo leaves nothing (and an earlier demo's ``OUT`` as it was).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import click
import torch

from .cli import cli
from .errors import FfkvError
from .io import check_output_target, output_dir, write_json, write_text
from .testbed import default_testbed, generate_world, load_facts


# What a demo folder holds: an existing folder with only these names is an (older or partial) demo output.
DEMO_FILES = frozenset({"inspect.json", "testbed_report.json", "corpus.txt", "atlas", "subupdates.json", "trace",
                        "neurons.json", "edit", "edit-undone", "evaluate_rome.json", "recall.json", "summary.json",
                        "summary.md"})


def is_demo_output(path: Path) -> bool:
    return any(path.iterdir()) and {p.name for p in path.iterdir()} <= DEMO_FILES | {".ffkv-output"}


def _run(args: list[str]) -> str:
    """Run one ffkv command in this process and return what it printed on stdout (errors propagate; a command
    that ends with a non-zero exit code stops the demo too)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(args=args, prog_name="ffkv", standalone_mode=False)
    if rc not in (None, 0):
        raise FfkvError(f"the demo step `ffkv {' '.join(args[:2])}` failed (exit code {rc}); nothing was written",
                        "run that command alone to see why")
    return buf.getvalue()


def _json(args: list[str]) -> dict:
    return json.loads(_run(args + ["--json"]))


def _pick_facts(testbed: Path):
    """A frequent fact (seen often in training) and a rare one, from the testbed's fact table."""
    facts, _ = load_facts(testbed)
    facts = sorted(facts, key=lambda f: f.train_count if hasattr(f, "train_count") else f["train_count"])

    def get(f, k):
        return getattr(f, k) if hasattr(f, k) else f[k]

    frequent = next(f for f in reversed(facts) if get(f, "subject_type") == "person") if any(
        get(f, "subject_type") == "person" for f in facts) else facts[-1]
    rare = next(f for f in facts if get(f, "train_count") >= 1)
    return {k: get(frequent, k) for k in ("subject", "object", "relation", "train_count", "train_templates",
                                           "heldout_templates")}, \
        {k: get(rare, k) for k in ("subject", "object", "relation", "train_count", "train_templates",
                                   "heldout_templates")}


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="ffkv-demo", show_default=True,
              help="Folder for everything the demo makes.")
@click.option("--cases", type=click.IntRange(min=1), default=10, show_default=True,
              help="CounterFact cases to edit and evaluate.")
def demo(out, cases):
    """Run the main job on the embedded default testbed: read, locate, edit, evaluate, judge recall."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    final = Path(out)
    check_output_target(final, "demo", ("summary.json",), recognise=is_demo_output)
    with output_dir(final, "demo", manifest=("summary.json",), recognise=is_demo_output) as tmp:
        md = _demo(tmp, cases)
    click.echo(md)
    click.echo(f"\nOutputs are in {final.resolve()}/: summary.md, atlas/report.html, trace/ (heatmaps), "
               f"edit/ (edited model + journal), evaluate_rome.json, recall.json")


def _demo(out: Path, cases: int) -> str:
    """Every step of the demo, written under ``out`` (the temporary folder); returns summary.md's text."""
    tb = Path(default_testbed())
    model = str(tb / "model")
    frequent, rare = _pick_facts(tb)
    summary: dict = {"testbed": str(tb), "steps": {}}
    t0 = time.time()

    def step(name, fn):
        click.echo(f"[ffkv demo] {name} ...", err=True)
        t = time.time()
        result = fn()
        summary["steps"][name] = round(time.time() - t, 1)
        click.echo(f"[ffkv demo] {name} done in {time.time() - t:.0f}s", err=True)
        return result

    # 1. The model as memories: family, shapes, adapter check, parameter census.
    info = step("inspect", lambda: _json(["inspect", model]))
    write_json(out / "inspect.json", info)

    # 2. The testbed's ground truth: recall by training frequency.
    rep = step("testbed report", lambda: _json(["testbed", "report", str(tb), "--max-facts-per-bucket", "200",
                                                 "--samples", "5"]))
    write_json(out / "testbed_report.json", rep)

    # 3. Read the memories: mine trigger examples over the world's text, write the atlas report.
    corpus = out / "corpus.txt"
    docs = generate_world(0, "default").documents()[:400]
    write_text(corpus, "\n\n".join(docs) + "\n")
    step("atlas mine", lambda: _run(["atlas", "mine", model, "--corpus", str(corpus), "--out",
                                     str(out / "atlas"), "--top-k", "10"]))
    step("atlas report", lambda: _run(["atlas", "report", str(out / "atlas")]))
    prompt_f = frequent["train_templates"][0].format(frequent["subject"])
    sub = step("sub-updates", lambda: _json(["atlas", "subupdates", model, "--prompt", prompt_f]))
    write_json(out / "subupdates.json", sub)

    # 4. Locate the frequent fact: causal trace (hidden, mlp) and knowledge neurons over its paraphrases.
    traces = step("causal trace", lambda: _json(
        ["trace", model, "--prompt", prompt_f, "--subject", frequent["subject"], "--kind", "all",
         "--out", str(out / "trace")]))["kinds"]
    paraphrases = [t.format(frequent["subject"]) for t in frequent["train_templates"][:3]]
    neuron_args = ["neurons", model, "--answer", frequent["object"]]
    for p in paraphrases:
        neuron_args += ["--prompt", p]
    kn = step("knowledge neurons", lambda: _json(neuron_args))
    write_json(out / "neurons.json", kn)

    # 5. Edit: one ROME edit written out and undone, then CounterFact metrics over several cases.
    new_object = rare["object"] if rare["object"] != frequent["object"] else "Nowhere"
    step("rome edit", lambda: _run(["edit", model, "--method", "rome", "--prompt",
                                    frequent["train_templates"][0], "--subject", frequent["subject"],
                                    "--target", new_object, "--out", str(out / "edit")]))
    step("undo", lambda: _run(["edit", "undo", str(out / "edit"), "--out", str(out / "edit-undone")]))
    metrics = step("evaluate rome", lambda: _json(["evaluate", model, "--data", str(tb / "data" / "counterfact.json"),
                                                   "--method", "rome", "--limit", str(cases)]))
    write_json(out / "evaluate_rome.json", metrics)

    # 6. Judge recall: a frequent and a rare fact.
    verdicts = {}
    for name, fact in (("frequent", frequent), ("rare", rare)):
        prompt = fact["heldout_templates"][0].format(fact["subject"])
        verdicts[name] = step(f"recall {name}", lambda prompt=prompt, fact=fact: _json(
            ["recall", model, "--prompt", prompt, "--subject", fact["subject"], "--answer", fact["object"]]))
        verdicts[name]["train_count"] = fact["train_count"]
    write_json(out / "recall.json", verdicts)

    summary["total_seconds"] = round(time.time() - t0, 1)
    summary["facts"] = {"frequent": frequent, "rare": rare}
    write_json(out / "summary.json", summary)
    md = _summary_md(info, rep, traces, kn, metrics, verdicts, frequent, rare, summary)
    write_text(out / "summary.md", md)
    return md


def _fmt(x, pct=False):
    if isinstance(x, dict):
        x = x.get("mean", x.get("value"))
    if isinstance(x, (int, float)):
        return f"{x:.1f}" if pct else f"{x:.3g}"
    return str(x)


def _summary_md(info, rep, traces, kn, metrics, verdicts, frequent, rare, summary) -> str:
    lines = ["# ffkv demo on the default testbed", ""]
    c = info.get("census", {})
    lines.append(f"- Model: {info.get('family')} with {info.get('layers')} layers, d_model {info.get('d_model')}, "
                 f"d_ffn {info.get('d_ffn')}; {c.get('memory_slots')} memory slots; FFN share "
                 f"{c.get('ffn_share', 0):.0%}; adapter check passed: {info['adapter_check']['passed']}.")
    lines.append(f"- Recall by training frequency (held-out paraphrases, greedy top-1): "
                 + _bucket_line(rep))
    h = traces["hidden"]
    lines.append(f"- Causal trace of \"{frequent['subject']}\" ({frequent['relation']}, seen "
                 f"{frequent['train_count']}x): clean p={_fmt(h.get('high_score'))}, corrupted "
                 f"p={_fmt(h.get('low_score'))}; peaks (token, layer): "
                 + ", ".join(f"{k} {h['tokens'][v['peak']['token']]!r} L{v['peak']['layer']}"
                             for k, v in traces.items()) + ".")
    memories = kn.get("memories", [])
    lines.append(f"- Knowledge neurons for {frequent['object']!r}: {len(memories)} found"
                 + (": " + ", ".join(memories[:5]) if memories else "") + ".")
    lines.append("- ROME edits of the testbed's CounterFact, " + _metric_line(metrics))
    for name, fact in (("frequent", frequent), ("rare", rare)):
        v = verdicts[name]
        lines.append(f"- Recall verdict, {name} fact (seen {fact['train_count']}x): {v.get('verdict')} "
                     f"(score {_fmt(v.get('score'))}).")
    lines.append(f"- Total time: {summary['total_seconds']:.0f}s.")
    return "\n".join(lines) + "\n"


def _bucket_line(rep: dict) -> str:
    try:
        rows = rep.get("buckets") or rep.get("by_bucket") or []
        parts = []
        for r in rows:
            held = r.get("heldout") or r.get("held_out") or {}
            acc = held.get("greedy", held) if isinstance(held, dict) else held
            if isinstance(acc, dict):
                acc = acc.get("top1", acc.get("accuracy"))
            parts.append(f"{r.get('bucket')}: {acc:.2f}" if isinstance(acc, (int, float)) else str(r.get("bucket")))
        return ", ".join(parts) if parts else "see testbed_report.json"
    except (AttributeError, TypeError):
        return "see testbed_report.json"


def _metric_line(metrics: dict) -> str:
    try:
        post = metrics["rome"]["post"]
        return f"{metrics['counts']['cases']} cases: " + ", ".join(
            f"{k} {_fmt(post[k], pct=True)}" for k in ("ES", "PS", "NS", "S") if k in post) + \
            f"; fluency (generation entropy) {_fmt(post.get('GE'))}"
    except (KeyError, TypeError):
        return "see evaluate_rome.json"


if __name__ == "__main__":
    sys.exit(demo())
