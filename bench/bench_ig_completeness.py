"""Completeness of integrated gradients: Dai et al.'s 20 left-Riemann steps against ffkv's default (adaptive).

For ``--n`` known facts of the testbed (and the planted-memory model), every layer's ``sum_i IG_i^(l)`` is compared
with the exact ``P(m) - P(m^(l) = 0)`` (``ffkv.locate.attribution.completeness``); the script prints, per
setting, the worst absolute and relative error over paths whose exact change is at least 1e-3, per layer, and
the gradient rows used (cost).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_ig_completeness.py [--testbed DIR] [--n 40]

One thread. Every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SETTINGS = {"dai (20, left)": {"steps": 20, "rule": "left"}, "20 gauss": {"steps": 20, "rule": "gauss"},
            "default (adaptive)": {}}


def measure(model, cases, L):
    from ffkv.models.engine import Cost
    from ffkv.locate.attribution import completeness, integrated_gradients

    out = {}
    for name, opts in SETTINGS.items():
        worst_abs, worst_rel, per_layer = 0.0, 0.0, [0.0] * L
        cost = Cost()
        for prompt, answer in cases:
            attr = integrated_gradients(model, prompt, answer, cost=cost, **opts)
            for c in completeness(model, prompt, answer, attr):
                if abs(c["exact"]) >= 1e-3:
                    worst_abs = max(worst_abs, abs(c["error"]))
                    worst_rel = max(worst_rel, c["relative_error"])
                    per_layer[c["layer"]] = max(per_layer[c["layer"]], abs(c["error"]))
        out[name] = {"max_abs_error": worst_abs, "max_relative_error": worst_rel,
                     "max_abs_error_per_layer": per_layer,
                     "backward_rows_per_prompt": cost.backward_layer_tokens / max(1, len(cases))}
        print(f"{name:20} max |error| {worst_abs:.3f}  max relative {worst_rel:.3f}  per layer "
              f"{[round(x, 3) for x in per_layer]}  backward layer-tokens/prompt "
              f"{out[name]['backward_rows_per_prompt']:.0f}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", default=None)
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    import torch

    import ffkv
    from ffkv.locate.average import knows, load_known
    from ffkv.testbed import default_testbed
    from ffkv.testbed.planted import planted_model

    torch.set_num_threads(1)
    tb = Path(args.testbed) if args.testbed else Path(default_testbed(build_if_missing=False))
    model = ffkv.load_model(tb / "model")
    cases = [(r["prompt"], r["attribute"]) for r in load_known(tb) if knows(model, r)[0]][: args.n]
    print(f"testbed: {len(cases)} known facts", flush=True)
    res = {"testbed": measure(model, cases, model.n_layers)}
    pm = planted_model(value_gain=0.3, unembed_gain=2.0)
    pcases = [("the old tower", "paris"), ("a big castle", "london"), ("the river", "rome")]
    print("planted (unsaturated):", flush=True)
    res["planted"] = measure(pm.model, pcases, pm.model.n_layers)
    res["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip()
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
