"""Knowledge neurons on one prompt against the cost of their own integrated-gradients pass, side by side; and
(``--dai``) ffkv's batched integrated gradients against Dai et al.'s per-layer loop.

For each prompt (known facts of a testbed, or the first ``--n`` on a randomly initialised model of a given shape,
``--random 12x768`` = GPT-2 small's shape with 50,257 vocabulary rows, answer = its top prediction):

1. ``integrated_gradients(model, prompt, answer)`` (the defaults ``knowledge_neurons`` uses) and
   ``knowledge_neurons(model, [prompt], answer)`` (that pass, the completeness check, the specificity check) are
   timed in this process; the neurons are checked equal to the coarse neurons of the IG pass, and the ratio
   ``neurons / IG`` is printed (target <= 2). ``ffkv neurons`` adds the suppress / amplify effects and the capped
   ablation curve: that total is printed too.
2. ``--dai``: ``integrated_gradients(..., **DAI_IG)`` against ``integrated_gradients_reference`` (Dai et al.'s loop),
   attributions equal, passes, layer-token units and wall time.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_neurons.py [--testbed PATH] [--random 12x768] [--n 3] [--dai]
        [--out docs/figures/locate_bench_neurons.json]

One thread. Every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from bench_trace import random_gpt2, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", default=None, help="testbed folder (default: the shipped default testbed)")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--random", default=None, metavar="LxD",
                    help="a randomly initialised GPT-2 of L layers and width D (testbed tokenizer and prompts; the "
                         "answer is its top prediction)")
    ap.add_argument("--dai", action="store_true", help="also compare with Dai et al.'s per-layer loop")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import ffkv
    from ffkv.io import provenance, write_json
    from ffkv.locate.attribution import DAI_IG, integrated_gradients, integrated_gradients_reference
    from ffkv.locate.average import knows, load_known
    from ffkv.locate.interventions import ablation_curve, intervention_effects
    from ffkv.locate.neurons import MAX_NEURONS, coarse_neurons, knowledge_neurons
    from ffkv.models.engine import Cost
    from ffkv.testbed import default_testbed

    tb = Path(args.testbed) if args.testbed else Path(default_testbed(build_if_missing=False))
    model, known = ffkv.load_model(tb / "model"), load_known(tb)
    if args.random:
        model = random_gpt2(model, *map(int, args.random.lower().split("x")))
        records = known[: args.n]
    else:
        records = [r for r in known if knows(model, r)[0]][: args.n]
    print(f"model {model}  prompts {len(records)}", file=sys.stderr)
    rows = []
    for r in records:
        p = r["prompt"]
        ans = int(model.next_token_probs(p)[0].argmax()) if args.random else model.answer_id(r["attribute"].strip())
        ig, t_ig = timed(lambda: integrated_gradients(model, p, ans))
        kn, t_kn = timed(lambda: knowledge_neurons(model, [p], ans))
        _, t_eff = timed(lambda: intervention_effects(model, [p], ans, kn.neurons))
        _, t_curve = timed(lambda: ablation_curve(model, [p], ans, kn.neurons) if kn.neurons else [])
        _, t_ig2 = timed(lambda: integrated_gradients(model, p, ans))
        t_ig = (t_ig + t_ig2) / 2
        same = [(n.layer, n.index) for n in kn.neurons] == \
            [(n.layer, n.index) for n in coarse_neurons(ig, kn.threshold, MAX_NEURONS)]
        row = {"prompt": p, "tokens": model.encode(p)["input_ids"].shape[1], "neurons": len(kn.neurons),
               "neurons_equal_ig_coarse": same, "ig_seconds": t_ig, "neurons_seconds": t_kn,
               "cli_seconds": t_kn + t_eff + t_curve, "neurons_over_ig": t_kn / t_ig,
               "cli_over_ig": (t_kn + t_eff + t_curve) / t_ig, "completeness": kn.completeness_error()}
        if args.dai:
            cf, cr = Cost(), Cost()
            fast, f_wall = timed(lambda: integrated_gradients(model, p, ans, cost=cf, **DAI_IG))
            ref, r_wall = timed(lambda: integrated_gradients_reference(model, p, ans, steps=DAI_IG["steps"], cost=cr))
            row.update({"dai_max_abs_diff": float((fast - ref).abs().max()), "dai_max_abs": float(ref.abs().max()),
                        "dai_wall_ratio": r_wall / f_wall, "dai_seconds": [f_wall, r_wall],
                        "dai_layer_token_ratio": (cr.layer_tokens + cr.backward_layer_tokens)
                        / (cf.layer_tokens + cf.backward_layer_tokens)})
        rows.append(row)
        print(f"  {p!r}: IG {t_ig:.2f}s, neurons {t_kn:.2f}s ({t_kn / t_ig:.2f}x), ffkv neurons total "
              f"{t_kn + t_eff + t_curve:.2f}s ({(t_kn + t_eff + t_curve) / t_ig:.2f}x), {len(kn.neurons)} neurons, "
              f"equal to IG's coarse set: {same}", file=sys.stderr, flush=True)
    n = len(rows)
    tot = {k: sum(x[k] for x in rows) for k in ("ig_seconds", "neurons_seconds", "cli_seconds")}
    summary = {"prompts": n, "neurons_over_ig": tot["neurons_seconds"] / tot["ig_seconds"],
               "cli_over_ig": tot["cli_seconds"] / tot["ig_seconds"],
               "max_neurons_over_ig": max(x["neurons_over_ig"] for x in rows),
               "neurons_equal_ig_coarse": all(x["neurons_equal_ig_coarse"] for x in rows),
               "seconds_per_prompt": {k: v / n for k, v in tot.items()}}
    if args.dai:
        summary["dai_wall_ratio"] = sum(x["dai_seconds"][1] for x in rows) / sum(x["dai_seconds"][0] for x in rows)
        summary["dai_max_abs_diff"] = max(x["dai_max_abs_diff"] for x in rows)
        summary["dai_layer_token_ratio"] = sum(x["dai_layer_token_ratio"] for x in rows) / n
    for k, v in summary.items():
        print(f"{k:26} {v}")
    print(f"results equal: {summary['neurons_equal_ig_coarse']} (knowledge neurons = coarse neurons of the IG pass); "
          f"neurons / IG = {summary['neurons_over_ig']:.2f}x (target <= 2)")
    if args.out:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        write_json(args.out, {"summary": summary, "rows": rows, "commit": commit,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "provenance": provenance(model.identity, n=n, threads=1)})


if __name__ == "__main__":
    main()
