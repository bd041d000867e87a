"""Does the interference predicted before an edit rank the edits that do damage? Fit and validate on the testbed.

    python bench/bench_interference.py [--testbed DIR] [--cases 120] [--probes 200] [--method rome]
        [--out docs/figures/interference_testbed.json]

For each of ``--cases`` testbed CounterFact cases of distinct subjects (``spread_subjects`` order), one at a
time on the unedited model:

1. before the edit, :func:`ffkv.edit.interference.predict_interference` on ``--probes`` known facts of other
   subjects (``data/known_facts.json``): the spill-over features (max / mean / summed relative shift of
   their keys' outputs, facts moved, update norm), the trace's concentration, the key's spread over the
   case's paraphrases, and the naive baselines (MLP trace peak height, P(true answer));
2. the edit (:func:`ffkv.edit.apply_edits`, the method's defaults), then the damage: probe facts whose top-1
   answer token flips from right to wrong (``flips``), the mean rise of their answer NLL (``nll_rise``), the
   case's NS, and the flips among the facts predicted to move (relative shift > 0.05) and the others;
3. undo (bit for bit).

An edit is *damaging* when it flips at least ``--damage-flips`` probe facts. The first half of the cases is
the fit split: every feature's direction (more or less is worse) is chosen there, the criterion is the
prediction feature with the best fit-split AUROC, and its threshold the fit split's Youden point; the second
half (held out) gives the AUROC, the Spearman correlation with nll_rise and flips, and the threshold's
accuracy, for the criterion and for the baselines alike. Per fact: pooled over the held-out edits, how well
the predicted relative shift of a known fact ranks the facts the edit flips (AUROC). Results with provenance go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

PREDICTION = ["max_relative", "mean_relative", "sum_relative", "moved_0.01", "moved_0.05", "moved_0.1",
              "max_shift", "update_norm", "concentration", "spread", "paraphrase_gain"]
BASELINES = ["peak", "p_true"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default=None)
    ap.add_argument("--method", default="rome", choices=["rome", "memit"])
    ap.add_argument("--cases", type=int, default=120)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--damage-flips", type=int, default=2)
    ap.add_argument("--moved", type=float, default=0.05)
    ap.add_argument("--stats-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import ffkv
    from ffkv.edit import EditContext, apply_edits
    from ffkv.edit.hparams import resolve_hparams
    from ffkv.edit.interference import known_fact_probes, paraphrase_templates, predict_interference
    from ffkv.evaluate.datasets import load_cases, spread_subjects
    from ffkv.evaluate.metrics import auroc, score_continuations, spearman
    from ffkv.evaluate.sequential import retention_metrics
    from ffkv.io import provenance, write_json
    from ffkv.models.loading import weights_fingerprint

    tb = Path(args.testbed) if args.testbed else Path(ffkv.testbed.default_testbed(build_if_missing=False))
    model = ffkv.load_model(str(tb / "model"))
    cases = [c for c in spread_subjects(load_cases(tb / "data" / "counterfact.json")[0]) if c.target_true]
    cases = cases[:args.cases]
    edited = {c.subject for c in cases}
    probes = known_fact_probes(tb / "data" / "known_facts.json", exclude=edited, limit=args.probes)
    pairs = [(p["template"].replace("{}", p["subject"]), p["answer"]) for p in probes]
    hp = resolve_hparams(model, args.method)
    ctx = EditContext(stats_dir=args.stats_dir, progress=False)
    pre = score_continuations(model, pairs, batch_size=64)
    right0 = np.array([s.accuracy == 1.0 for s in pre])
    nll0 = np.array([s.nll for s in pre])
    fp0 = weights_fingerprint(model.hf)
    rows, per_fact = [], []
    t0 = time.perf_counter()
    for i, c in enumerate(cases):
        req = c.edit_request()
        t1 = time.perf_counter()
        rep = predict_interference(model, [req], args.method, hp, probes, context=ctx,
                                   paraphrases=[paraphrase_templates(c.paraphrase_prompts, c.subject)])
        t_pred = time.perf_counter() - t1
        feats = rep.summary()
        moved = rep.total_relative() > args.moved
        journal = apply_edits(model, [req], args.method, hp, context=ctx, progress=False)
        try:
            post = score_continuations(model, pairs, batch_size=64)
            ret = retention_metrics(model, [c])
        finally:
            journal.undo(model)
        right1 = np.array([s.accuracy == 1.0 for s in post])
        flipped = right0 & ~right1
        nll1 = np.array([s.nll for s in post])
        per_fact.append((rep.total_relative()[right0], flipped[right0]))
        rows.append({"case_id": c.case_id, "subject": c.subject, **feats, "flips": int(flipped.sum()),
                     "nll_rise": float((nll1 - nll0).mean()), "NS": ret["NS"], "ES": ret["ES"],
                     "n_moved": int(moved.sum()), "flips_moved": int((flipped & moved).sum()),
                     "flips_unmoved": int((flipped & ~moved).sum()), "predict_seconds": t_pred})
        print(f"[{i + 1}/{len(cases)} {time.perf_counter() - t0:5.0f} s] {c.subject!r}: flips {rows[-1]['flips']} "
              f"nll_rise {rows[-1]['nll_rise']:.3f} NS {ret['NS']:.2f} ES {ret['ES']:.0f} | max_rel "
              f"{feats['max_relative']:.3f} sum_rel {feats['sum_relative']:.2f} conc {feats['concentration']:.2f} "
              f"spread {feats['spread']:.3f} peak {feats['peak']:.3f} p_true {feats['p_true']:.3f}", flush=True)
        if args.out:  # a killed run keeps its rows
            write_json(Path(args.out).with_suffix(".partial.json"), {"rows": rows})
    if weights_fingerprint(model.hf) != fp0:
        raise SystemExit("bench_interference: undo did not restore the weights")

    half = len(rows) // 2
    fit, held = rows[:half], rows[half:]
    label = lambda rs: np.array([r["flips"] >= args.damage_flips for r in rs])  # noqa: E731
    col = lambda rs, k: np.array([r[k] for r in rs], dtype=np.float64)  # noqa: E731

    def direction(k):  # +1: more is worse; chosen on the fit split
        a = auroc(col(fit, k), label(fit))
        return 1.0 if (math.isnan(a) or a >= 0.5) else -1.0

    def youden(scores, y):
        best, thr = -1.0, float("nan")
        for t in np.unique(scores):
            pred = scores >= t
            j = (pred & y).sum() / max(y.sum(), 1) - (pred & ~y).sum() / max((~y).sum(), 1)
            if j > best:
                best, thr = j, float(t)
        return thr

    table = {}
    for k in PREDICTION + BASELINES:
        s = direction(k)
        f, h = s * col(fit, k), s * col(held, k)
        thr = youden(f, label(fit))
        table[k] = {"direction": "higher is worse" if s > 0 else "lower is worse",
                    "fit_auroc": auroc(f, label(fit)), "heldout_auroc": auroc(h, label(held)),
                    "heldout_spearman_nll_rise": spearman(h, col(held, "nll_rise")),
                    "heldout_spearman_flips": spearman(h, col(held, "flips")),
                    "heldout_spearman_NS": spearman(-h, col(held, "NS")),
                    "heldout_accuracy_at_fit_threshold": float(np.mean((h >= thr) == label(held))),
                    "is_baseline": k in BASELINES}
    best = max(PREDICTION, key=lambda k: (table[k]["fit_auroc"], -PREDICTION.index(k)))
    fm = sum(r["flips_moved"] for r in rows)
    fu = sum(r["flips_unmoved"] for r in rows)
    nm = sum(r["n_moved"] for r in rows)
    n_known = int(right0.sum())
    nu = len(rows) * n_known - nm
    held_rel = np.concatenate([r for r, _ in per_fact[half:]])
    held_flip = np.concatenate([f for _, f in per_fact[half:]])
    fit_rel = np.concatenate([r for r, _ in per_fact[:half]])
    fit_flip = np.concatenate([f for _, f in per_fact[:half]])
    out = {
        "per_fact": {"what": "which known facts an edit flips, ranked by their predicted relative shift "
                             "(pooled over edits; facts right before the edit)",
                     "fit_auroc": auroc(fit_rel, fit_flip), "heldout_auroc": auroc(held_rel, held_flip),
                     "heldout_flipped": int(held_flip.sum()), "heldout_pairs": int(held_flip.size)},
        "criterion": best, "criterion_row": table[best], "features": table,
        "split": {"fit": [r["case_id"] for r in fit], "heldout": [r["case_id"] for r in held],
                  "fit_damaging": int(label(fit).sum()), "heldout_damaging": int(label(held).sum())},
        "damage_definition": f"flips >= {args.damage_flips} of {n_known} known probe facts (top-1 right -> wrong)",
        "moved_facts": {"threshold_relative": args.moved, "moved": nm, "flips_among_moved": fm,
                        "flip_rate_moved": fm / nm if nm else float("nan"),
                        "flip_rate_unmoved": fu / nu if nu else float("nan")},
        "means": {k: float(np.mean(col(rows, k))) for k in ("flips", "nll_rise", "NS", "ES", "predict_seconds")},
        "rows": rows,
        "provenance": provenance(model.identity, method=args.method, hparams=hp, cases=len(cases),
                                 probes=len(probes), damage_flips=args.damage_flips, moved=args.moved,
                                 testbed=str(tb)),
    }
    print(f"\n{len(cases)} {args.method} edits on {tb.name} ({half} fit / {len(held)} held out), {len(probes)} probe "
          f"facts ({n_known} answered right unedited); damaging: {out['damage_definition']} "
          f"(fit {out['split']['fit_damaging']}, held out {out['split']['heldout_damaging']})")
    print(f"{'feature':18s} {'direction':16s} {'fit AUROC':>9s} {'held AUROC':>10s} {'rho(nll)':>8s} "
          f"{'rho(flips)':>10s} {'rho(-NS)':>8s} {'acc@thr':>7s}")
    for k, r in table.items():
        mark = " <- criterion" if k == best else (" (baseline)" if r["is_baseline"] else "")
        print(f"{k:18s} {r['direction']:16s} {r['fit_auroc']:9.3f} {r['heldout_auroc']:10.3f} "
              f"{r['heldout_spearman_nll_rise']:8.3f} {r['heldout_spearman_flips']:10.3f} "
              f"{r['heldout_spearman_NS']:8.3f} {r['heldout_accuracy_at_fit_threshold']:7.3f}{mark}")
    mf = out["moved_facts"]
    print(f"facts predicted to move (relative > {args.moved}): {mf['moved']}, flip rate {mf['flip_rate_moved']:.4f} "
          f"vs {mf['flip_rate_unmoved']:.4f} for the others")
    pf = out["per_fact"]
    print(f"which facts flip, ranked by their predicted shift: AUROC fit {pf['fit_auroc']:.3f}, held out "
          f"{pf['heldout_auroc']:.3f} ({pf['heldout_flipped']} flips in {pf['heldout_pairs']} edit-fact pairs)")
    if args.out:
        write_json(args.out, out)
        print(json.dumps({"written": args.out}))


if __name__ == "__main__":
    main()
