"""Sequential editing, method against method: one figure and one table from the runs' summaries.

    python examples/sequential_stress.py run --method alphaedit --batch 100 --cases subjects --n 1000 \
        --every 100 --probes 100 --out runs/seq-alphaedit-1000        # (and rome, memit: docs/evaluate.md)
    python bench/bench_sequential_methods.py docs/figures/evaluate_sequential_rome_1000.json \
        docs/figures/evaluate_sequential_memit_1000.json runs/seq-alphaedit-1000/summary.json \
        --out docs/figures/evaluate_sequential_methods.png

Each argument is a ``summary.json`` of :func:`ffkv.evaluate.sequential.sequential_edits` (its ``curve`` holds
every measurement). The figure is :func:`ffkv.evaluate.sequential.plot_curves` with one line per run; the
table prints, at each measured number of edits, probe accuracy, perplexity and the efficacy of the earlier
edits now (retention ES) per run, and each run's distance from the goal of docs/evaluate.md (probe accuracy
within 5 points of the unedited model's, earlier-edit ES >= 0.9).

``--nullspace MODEL`` also prints, for AlphaEdit's layers on that model, the null space its thresholds give:
the eigenvectors of C = E[k k^T] (the edit statistics, AlphaEdit's defaults) with eigenvalue below each
threshold, their number and the share of the keys' energy they hold, Σ_{λ<thr} λ / tr C.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summaries", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="sequential edits on the default testbed")
    ap.add_argument("--nullspace", default=None, help="a model folder: print AlphaEdit's null space on it")
    ap.add_argument("--thresholds", default="2e-2,1e-3,1e-4")
    args = ap.parse_args()
    if args.nullspace:
        nullspace(args.nullspace, [float(x) for x in args.thresholds.split(",")])
    from ffkv.evaluate.sequential import SequentialResult, plot_curves

    results = {}
    for s in args.summaries:
        d = json.loads(Path(s).read_text())
        label = f"{d.get('method')} b={d.get('batch_size', 1)}"
        results[label] = SequentialResult(d["curve"], [], d.get("baseline", {}), d.get("collapse", {}),
                                          {"method": d.get("method")})
    path = plot_curves(results, args.out, title=args.title)
    for label, r in results.items():
        base = r.baseline.get("probe_acc", float("nan"))
        print(f"\n{label}: unedited probe accuracy {base:.2f}, perplexity {r.baseline.get('ppl', float('nan')):.2f}")
        print(f"{'edits':>6s} {'probe acc':>9s} {'ppl':>10s} {'ES now':>7s} {'ES made':>7s} {'NS':>5s}  goal")
        for row in r.curve[1:]:
            ok = row["probe_acc"] >= base - 0.05 and row["retention_ES"] >= 0.9
            print(f"{row['n_edits']:6d} {row['probe_acc']:9.2f} {row['ppl']:10.1f} {row['retention_ES']:7.2f} "
                  f"{row['efficacy_at_edit']:7.2f} {row['edited_NS']:5.2f}  {'met' if ok else 'missed'}")
    print(path)


def nullspace(path: str, thresholds: list[float]) -> None:
    import torch

    torch.set_num_threads(1)
    import ffkv
    from ffkv.edit import EditContext
    from ffkv.edit.hparams import resolve_hparams

    model = ffkv.load_model(path)
    hp = resolve_hparams(model, "alphaedit")
    stats = EditContext(progress=False).layer_stats(model, hp["layers"], hp)
    for l in hp["layers"]:
        s = torch.linalg.eigvalsh(stats[l].C.double())
        parts = [f"thr {t:g}: {int((s < t).sum())} dims, {float(s[s < t].sum() / s.sum()):.2%} of the energy"
                 for t in thresholds]
        print(f"layer {l} (d_ffn {len(s)}, {stats[l].n_tokens} tokens): " + "; ".join(parts))


if __name__ == "__main__":
    main()
