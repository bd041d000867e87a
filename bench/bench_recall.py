"""Measure recall on a testbed: storage strength vs frequency, the verdict vs single signals, temperature,
in context vs weights. Writes ``docs/figures/recall_*.png``, a results JSON, and (``--fit-weights``) the
shipped verdict weights ``src/ffkv/recall/verdict_default.json``.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_recall.py --testbed PATH [--per-bucket 60] [--fit-weights]

An experiment, not a speed benchmark: every figure it prints is measured in this run. One thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def split_by_subject(facts, seed):
    """Two disjoint halves of the facts, split by subject so no subject is in both."""
    subjects = sorted({f["subject"] for f in facts})
    random.Random(f"recall-split-{seed}").shuffle(subjects)
    fit_subjects = set(subjects[: len(subjects) // 2])
    return [f for f in facts if f["subject"] in fit_subjects], [f for f in facts if f["subject"] not in fit_subjects]


def strength_rows(model, facts, rng, adaptive, trace_every, progress, cache):
    """Storage strength of the TRUE answer on a training-template prompt of every fact (kept in ``cache``)."""
    from tqdm import tqdm

    from ffkv.recall.data import fact_queries
    from ffkv.recall.strength import storage_strength

    rows = []
    for i, f in enumerate(tqdm(facts, desc="storage strength", disable=not progress, mininterval=5)):
        q = fact_queries(f, "train", rng)
        st = storage_strength(model, q.prompt, f["object"], subject=f["subject"], adaptive=adaptive,
                              trace=bool(trace_every) and i % trace_every == 0)
        cache[id(f)] = (q, st)
        rows.append({"fact_id": f.get("fact_id"), "subject": f["subject"], "relation_id": f["relation_id"],
                     "train_count": int(f["train_count"]), "prompt": q.prompt, "p_answer": st.p_answer,
                     "rank": st.rank, "margin": st.margin, "strength": st.strength, "survival": st.survival,
                     "redundancy": st.redundancy,
                     "attribution_share": st.attribution_share, "curve": st.curve, "ks": st.ks,
                     "trace_concentration": (st.trace or {}).get("concentration"),
                     "trace_peak_layer": (st.trace or {}).get("peak_layer"),
                     "trace_peak_effect": (st.trace or {}).get("peak_effect")})
    return rows


def verdict_rows(model, facts, kind, rng, adaptive, progress, settings, cache):
    """Verdict features (greedy answer) and label (greedy == true object) on one query of each fact.

    kind "train" reuses the training-template query of the storage-strength pass (and its strength when
    the greedy answer is the true one)."""
    from tqdm import tqdm

    from ffkv.recall.data import fact_queries
    from ffkv.recall.verdict import query_signals
    from ffkv.testbed.buckets import bucket_of

    rows = []
    for f in tqdm(facts, desc=f"signals ({kind})", disable=not progress, mininterval=5):
        known = None
        if kind == "train" and id(f) in cache:
            q, known = cache[id(f)]
        else:
            q = fact_queries(f, kind, rng)
        sig = query_signals(model, q.prompt, f["subject"], settings["n_samples"], settings["temperature"],
                            adaptive=adaptive, known=known)
        y = model.answer_id(f["object"])
        rows.append({"fact_id": f.get("fact_id"), "train_count": int(f["train_count"]),
                     "bucket": bucket_of(int(f["train_count"])), "prompt": q.prompt, "kind": kind,
                     "greedy": sig["strength"].answer, "correct": int(sig["strength"].answer_id == y),
                     **sig["features"]})
    return rows


def by_bucket(values, counts):
    from ffkv.recall.stats import bootstrap_ci
    from ffkv.testbed.buckets import BUCKET_NAMES, bucket_of

    out = {}
    b = np.array([bucket_of(int(c)) for c in counts])
    v = np.asarray(values, float)
    for name in BUCKET_NAMES:
        m = (b == name) & np.isfinite(v)
        if m.sum() >= 2:
            est, lo, hi = bootstrap_ci(lambda a: float(np.mean(a)), v[m], n_boot=500)
            out[name] = {"n": int(m.sum()), "mean": est, "low": lo, "high": hi}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", type=Path, default=None, help="testbed folder (default: ffkv.testbed.default_testbed())")
    ap.add_argument("--per-bucket", type=int, default=60)
    ap.add_argument("--unseen", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-adaptive", action="store_true", help="rank memories once (faster, blind to backups)")
    ap.add_argument("--trace-every", type=int, default=1, help="causal trace on every n-th fact (0: none)")
    ap.add_argument("--figures", type=Path, default=REPO / "docs" / "figures")
    ap.add_argument("--results", type=Path, default=REPO / "docs" / "figures" / "recall_results.json")
    ap.add_argument("--fit-weights", action="store_true", help="write src/ffkv/recall/verdict_default.json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(1)
    import ffkv
    from ffkv.io import provenance, write_json
    from ffkv.recall.consistency import temperature_table
    from ffkv.recall.data import fact_queries, unseen_facts
    from ffkv.recall.incontext import batched_logits, in_context_table
    from ffkv.recall.stats import auroc, best_threshold, bootstrap_ci, spearman
    from ffkv.recall.verdict import DEFAULT_WEIGHTS, FEATURES, fit_verdict
    from ffkv.testbed.buckets import stratified_facts
    from ffkv.testbed.datasets import load_facts

    progress = not args.no_progress
    adaptive = not args.no_adaptive
    testbed = args.testbed or Path(__import__("ffkv.testbed", fromlist=["default_testbed"]).default_testbed())
    model = ffkv.load_model(str(testbed / "model"))
    facts, candidates = load_facts(testbed)
    chosen = stratified_facts([f for f in facts if f["train_count"] >= 1], args.per_bucket, args.seed)
    fit_facts, eval_facts = split_by_subject(chosen, args.seed)
    settings = {"n_samples": 20, "temperature": 1.0, "adaptive": adaptive}
    prov = provenance(model.identity, testbed=str(testbed), per_bucket=args.per_bucket, seed=args.seed,
                      n_facts=len(chosen), **settings)
    results = {"provenance": prov}
    timings = {}

    # 1. Storage strength vs training frequency (true answer, training-template prompt).
    t0 = time.time()
    rng = random.Random(f"recall-bench-{args.seed}")
    cache = {}
    srows = strength_rows(model, chosen, rng, adaptive, args.trace_every, progress, cache)
    timings["storage_strength_s"] = time.time() - t0
    counts = np.array([r["train_count"] for r in srows])
    strength_summary = {}
    for key in ("strength", "survival", "margin", "p_answer", "redundancy", "attribution_share",
                "trace_concentration"):
        v = np.array([np.nan if r[key] is None else r[key] for r in srows], float)
        m = np.isfinite(v)
        if m.sum() >= 10:
            rho, lo, hi = bootstrap_ci(spearman, v[m], counts[m], n_boot=1000)
            strength_summary[key] = {"spearman": rho, "ci95": [lo, hi], "n": int(m.sum()),
                                     "by_bucket": by_bucket(v[m], counts[m])}
    results["storage_vs_frequency"] = strength_summary
    print(json.dumps({k: (v["spearman"], v["ci95"]) for k, v in strength_summary.items()}), flush=True)

    # 2. Verdict: fit on training-template queries of one half, test on held-out paraphrases of the other.
    t0 = time.time()
    fit_rows = verdict_rows(model, fit_facts, "train", rng, adaptive, progress, settings, cache)
    eval_rows = verdict_rows(model, eval_facts, "heldout", rng, adaptive, progress, settings, cache)
    timings["verdict_signals_s"] = time.time() - t0
    Xf = np.array([[r[f] for f in FEATURES] for r in fit_rows])
    yf = np.array([r["correct"] for r in fit_rows])
    Xe = np.array([[r[f] for f in FEATURES] for r in eval_rows])
    ye = np.array([r["correct"] for r in eval_rows])
    vm = fit_verdict(Xf, yf, provenance=prov, signal_settings=settings)
    se = vm.score(Xe)
    verdict = {"fit": {"n": len(yf), "accuracy_of_model": float(yf.mean())},
               "eval": {"n": len(ye), "accuracy_of_model": float(ye.mean())}, "signals": {}}
    idx = np.arange(len(ye))

    def signal_eval(name, fit_score, eval_score):
        est, lo, hi = bootstrap_ci(lambda i: auroc(eval_score[i], ye[i]), idx, n_boot=1000)
        t, _ = best_threshold(fit_score, yf)
        return {"auroc": est, "ci95": [lo, hi], "threshold": t,
                "accuracy_at_threshold": float(((eval_score >= t) == ye.astype(bool)).mean())}

    verdict["signals"]["verdict"] = signal_eval("verdict", vm.score(Xf), se)
    for j, f in enumerate(FEATURES):
        sign = 1.0 if f not in ("entropy",) else -1.0  # higher entropy = less trustworthy
        verdict["signals"][f] = signal_eval(f, sign * Xf[:, j], sign * Xe[:, j])
    # Paired bootstrap of the AUROC gain over each baseline.
    for base in ("log_p", "consistency"):
        j = FEATURES.index(base)
        d, lo, hi = bootstrap_ci(lambda i: auroc(se[i], ye[i]) - auroc(Xe[i, j], ye[i]), idx, n_boot=1000)
        verdict["signals"]["verdict"][f"gain_over_{base}"] = {"delta": d, "ci95": [lo, hi]}
    verdict["weights"] = dict(zip(FEATURES, vm.weights))
    verdict["threshold"] = vm.threshold
    verdict["majority_baseline_accuracy"] = float(max(ye.mean(), 1 - ye.mean()))
    results["verdict"] = verdict
    print(json.dumps({k: (round(v["auroc"], 3), [round(x, 3) for x in v["ci95"]], round(v["accuracy_at_threshold"], 3))
                      for k, v in verdict["signals"].items()}), flush=True)
    if args.fit_weights:
        vm.fit.update({"eval_auroc": verdict["signals"]["verdict"]["auroc"],
                       "eval_accuracy_at_threshold": verdict["signals"]["verdict"]["accuracy_at_threshold"],
                       "fit_queries": "training-template prompts of half the subjects",
                       "eval_queries": "held-out paraphrase prompts of the other half"})
        vm.save(DEFAULT_WEIGHTS)
        print(f"wrote {DEFAULT_WEIGHTS}", flush=True)

    # 3. Temperature: greedy accuracy and calibration on the held-out paraphrases of every chosen fact.
    rng_t = random.Random(f"recall-temp-{args.seed}")
    qs = [fact_queries(f, "heldout", rng_t) for f in chosen]
    logits = batched_logits(model, [q.prompt for q in qs])
    ans = [model.answer_id(q.object) for q in qs]
    results["temperature"] = temperature_table(logits, ans)
    for row in results["temperature"]:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    # 4. In context vs weights, with unseen subjects and counterfactual contexts.
    t0 = time.time()
    unseen = unseen_facts(facts, candidates, args.unseen, args.seed)
    ic = {}
    for d in (0, 1):
        tab = in_context_table(model, chosen, candidates, unseen=unseen, distractors=d, seed=args.seed,
                               progress=progress)
        ic[f"distractors_{d}"] = tab["buckets"]
        ic[f"examples_{d}"] = tab["rows"][:3] + tab["rows"][-3:]
    timings["in_context_s"] = time.time() - t0
    results["in_context"] = ic
    for name, row in ic["distractors_1"].items():
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    results["timings"] = timings
    results["strength_rows"] = srows
    results["verdict_rows"] = {"fit": fit_rows, "eval": eval_rows}
    write_json(args.results, results)
    plot(results, args.figures)
    print(f"wrote {args.results}", flush=True)


def plot(results, figures: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ffkv.testbed.buckets import BUCKET_NAMES

    figures.mkdir(parents=True, exist_ok=True)
    # Storage strength by frequency.
    s = results["storage_vs_frequency"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, key, label in zip(axes, ("strength", "survival", "trace_concentration", "redundancy"),
                              ("storage strength (area under ablation curve)", "survival (relative to intact p)",
                               "causal-trace concentration", "redundancy k50 (memories)")):
        if key not in s:
            continue
        bb = s[key]["by_bucket"]
        names = [n for n in BUCKET_NAMES if n in bb]
        x = np.arange(len(names))
        mean = np.array([bb[n]["mean"] for n in names])
        err = np.array([[bb[n]["mean"] - bb[n]["low"], bb[n]["high"] - bb[n]["mean"]] for n in names]).T
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=3)
        ax.set_xticks(x, names)
        ax.set_xlabel("times the fact was seen in training")
        ax.set_title(f"{label}\nSpearman ρ = {s[key]['spearman']:.2f} "
                     f"[{s[key]['ci95'][0]:.2f}, {s[key]['ci95'][1]:.2f}]", fontsize=9)
    fig.tight_layout()
    fig.savefig(figures / "recall_strength_vs_frequency.png", dpi=120)
    plt.close(fig)

    # Temperature.
    t = results["temperature"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    T = [r["temperature"] for r in t]
    for key, lab in (("greedy_accuracy", "greedy accuracy"), ("sampled_accuracy", "sampled accuracy"),
                     ("confidence", "confidence p_T(greedy)"), ("confidence_when_wrong", "confidence when wrong"),
                     ("ece", "ECE")):
        ax.plot(T, [r[key] for r in t], marker="o", label=lab)
    ax.set_xlabel("temperature")
    ax.legend(fontsize=8)
    ax.set_title("Lower temperature: more confident, not more correct", fontsize=9)
    fig.tight_layout()
    fig.savefig(figures / "recall_temperature.png", dpi=120)
    plt.close(fig)

    # In context vs weights.
    ic = results["in_context"]["distractors_1"]
    names = [n for n in BUCKET_NAMES if n in ic]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for key, lab in (("weights", "from weights (held-out paraphrase)"), ("in_context", "fact stated in context"),
                     ("counterfactual_follows", "counterfactual context: follows context"),
                     ("counterfactual_sticks", "counterfactual context: sticks to weights")):
        ax.plot(x, [ic[n][key] for n in names], marker="o", label=lab)
    ax.set_xticks(x, names)
    ax.set_xlabel("times the fact was seen in training (0 = invented subject)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figures / "recall_in_context.png", dpi=120)
    plt.close(fig)

    # Verdict ROC-style bar chart.
    v = results["verdict"]["signals"]
    keys = ["verdict"] + [k for k in v if k != "verdict"]
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    au = [v[k]["auroc"] for k in keys]
    err = np.array([[v[k]["auroc"] - v[k]["ci95"][0], v[k]["ci95"][1] - v[k]["auroc"]] for k in keys]).T
    ax.bar(range(len(keys)), au, yerr=err, capsize=3, color=["C3"] + ["C0"] * (len(keys) - 1))
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("AUROC (held-out paraphrases)")
    fig.tight_layout()
    fig.savefig(figures / "recall_verdict_auroc.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
