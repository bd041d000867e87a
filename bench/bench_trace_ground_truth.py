"""Ground truth for localisation: planted memories and the testbed's known facts, by training frequency.

Writes to --figures (default docs/figures): locate_average.{png,svg} (averaged indirect effects by ROME's token
groups), locate_trace_{hidden,mlp,attn}.{png,svg} (the three heatmaps of one known fact),
locate_ablation.png (ablation curve of one fact's knowledge neurons against random memories) and
locate_ground_truth.json (every number printed here, with provenance), and prints markdown tables.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_trace_ground_truth.py [--testbed PATH] [--known-n 60]
        [--per-bucket 8]

An experiment, not a speed benchmark. One thread. Every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", default=None, help="testbed folder (default: the shipped default testbed)")
    ap.add_argument("--known-n", type=int, default=60, help="known facts to average traces over")
    ap.add_argument("--per-bucket", type=int, default=8, help="facts per frequency bucket for the ground truth")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--figures", default=str(REPO / "docs" / "figures"))
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(1)
    import ffkv
    from ffkv.io import provenance, write_json
    from ffkv.locate.average import average_traces, knows, load_known
    from ffkv.locate.ground_truth import planted_ground_truth, testbed_ground_truth
    from ffkv.locate.interventions import ablation_curve, random_matched
    from ffkv.locate.neurons import knowledge_neurons
    from ffkv.locate.plots import plot_ablation, plot_average, plot_trace
    from ffkv.locate.trace import causal_trace
    from ffkv.testbed.datasets import load_facts
    from ffkv.testbed.planted import planted_model

    fig = Path(args.figures)
    t0 = time.time()
    out = {}
    # ---------------------------------------------------------------- planted memories
    out["planted"] = planted_ground_truth(planted_model(), samples=args.samples)
    out["planted_unsaturated"] = planted_ground_truth(planted_model(value_gain=0.3, unembed_gain=2.0),
                                                      samples=args.samples)
    print("\n### Planted memories (trace: kind=mlp, window 1; IG: top-n memories)\n")
    print("| model | fact | planted (layer, index) | trace peak token / layer | agrees | IG top | IG recall |")
    print("|---|---|---|---|---|---|---|")
    for name in ("planted", "planted_unsaturated"):
        for r in out[name]:
            print(f"| {name} | {r['fact']} | {r['planted']} | {r['trace_peak_token']} / {r['trace_peak_layer']} | "
                  f"{r['trace_agrees']} | {r['ig_top']} | {r['ig_recall']:.2f} |")

    # ---------------------------------------------------------------- testbed
    tb = Path(args.testbed) if args.testbed else Path(
        __import__("ffkv.testbed", fromlist=["x"]).default_testbed(build_if_missing=False))
    model = ffkv.load_model(tb / "model")
    known = load_known(tb)
    records = known[: args.known_n]
    avg = average_traces(model, records, samples=args.samples, progress=True)
    out["average"] = avg
    plot_average({k: avg[k] for k in ("hidden", "mlp", "attn")}, fig / "locate_average.png")
    plot_average({k: avg[k] for k in ("hidden", "mlp", "attn")}, fig / "locate_average.svg")
    print(f"\n### Averaged causal traces, {len(records) - avg['n_skipped']} known facts "
          f"({avg['n_skipped']} of {len(records)} skipped: answered wrongly), s3 noise {avg['noise_level']:.3f}\n")
    print("| kind | token group | AIE per layer | peak layer |")
    print("|---|---|---|---|")
    for k in ("hidden", "mlp", "attn"):
        for g, row in zip(avg[k]["groups"], avg[k]["indirect"]):
            print(f"| {k} | {g} | {' '.join(f'{x:.3f}' for x in row)} | {int(np.argmax(row))} |")
        print(f"| {k} | ATE | {avg[k]['ate']:.3f} | |")

    # one example fact: three heatmaps, knowledge neurons and their ablation curve
    subjects = [r["subject"] for r in known]
    ex = next((r for r in known if knows(model, r)[0]), None)
    if ex is None:
        sys.exit("the model answers none of the known facts: nothing to localise")
    for k in ("hidden", "mlp", "attn"):
        tr = causal_trace(model, ex["prompt"], ex["subject"], kind=k, subjects=subjects, samples=args.samples)
        for ext in ("png", "svg"):
            plot_trace(tr, fig / f"locate_trace_{k}.{ext}")
    facts, _ = load_facts(tb)
    fact = next(f for f in facts if f["subject"] == ex["subject"] and f["object"] == ex["attribute"])
    prompts = [t.replace("{}", fact["subject"]) for t in fact["train_templates"]][:4]
    # the answer text goes through the model's one answer rule (MemoryModel.answer_tokens: a leading space)
    kn = knowledge_neurons(model, prompts, fact["object"])
    curve = ablation_curve(model, prompts, fact["object"], kn.neurons)
    rnd = ablation_curve(model, prompts, fact["object"], random_matched(model, kn.neurons))
    plot_ablation(curve, fig / "locate_ablation.png", rnd)
    out["example"] = {"prompt": ex["prompt"], "subject": ex["subject"], "neurons": kn.neurons, "curve": curve,
                      "random_curve": rnd}

    gt = testbed_ground_truth(model, facts, per_bucket=args.per_bucket, samples=args.samples, progress=True)
    out["ground_truth"] = gt
    print("\n### Testbed ground truth by training frequency\n")
    cols = ["bucket", "n_sampled", "n_known", "total_effect", "subject_peak_layer", "subject_peak_effect",
            "subject_peak_at_last_subject_token", "mlp_peak_layer_last_subject", "storage_layer", "agreement",
            "n_neurons", "kn_own_relative_change", "kn_own_flip_rate", "kn_unrelated_relative_change",
            "kn_unrelated_flip_rate", "kn_same_subject_relative_change", "kn_same_subject_flip_rate",
            "random_own_relative_change", "kn_precision", "filtered_n_neurons", "filtered_own_relative_change",
            "filtered_unrelated_relative_change", "filtered_unrelated_flip_rate"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for b in gt["by_bucket"] + [{"bucket": "all", **gt["overall"]}]:
        print("| " + " | ".join(fmt(b.get(c), 2) for c in cols) + " |")
    print("\npeak token groups (hidden):", {b["bucket"]: b["peak_groups"] for b in gt["by_bucket"]})
    out["seconds"] = time.time() - t0
    write_json(fig / "locate_ground_truth.json",
               {**out, "provenance": provenance(model.identity, testbed=tb, known_n=args.known_n,
                                                per_bucket=args.per_bucket, samples=args.samples, threads=1)})
    print(f"\nwrote {fig}/locate_*  ({out['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
