"""Integrated gradients for knowledge neurons: ffkv's batched version against Dai et al.'s per-layer loop,
side by side, and the one-pass screens.

For each prompt (known facts of a testbed) both implementations run in this process; the script checks that the
attributions are equal and prints forward/backward passes, FLOPs (torch's FlopCounterMode, forward + backward),
layer-token units and wall time, with the ratios; and how often the gradient x activation screen's top
candidates contain IG's top memory.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_neurons.py [--testbed PATH] [--n 10] [--out ...json]

One thread. Every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from bench_trace import flops_of, random_gpt2, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", default=None, help="testbed folder (default: the shipped default testbed)")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--random", default=None, metavar="LxD",
                    help="a randomly initialised GPT-2 of L layers and width D (testbed tokenizer and prompts; the "
                         "answer is its top prediction)")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="largest |difference| of the attributions, relative to the largest one, that counts as equal")
    ap.add_argument("--out", default=str(REPO / "docs" / "figures" / "locate_bench_neurons.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import ffkv
    from ffkv.io import provenance, write_json
    from ffkv.locate.attribution import grad_x_activation, integrated_gradients, integrated_gradients_reference
    from ffkv.locate.average import knows, load_known
    from ffkv.models.engine import Cost

    tb = Path(args.testbed) if args.testbed else Path(__import__("ffkv.testbed", fromlist=["x"]).default_testbed(build_if_missing=False))
    model, known = ffkv.load_model(tb / "model"), load_known(tb)
    if args.random:
        model = random_gpt2(model, *map(int, args.random.lower().split("x")))
        records = [{**r, "attribute": model.decode([int(model.next_token_probs(r["prompt"])[0].argmax())])}
                   for r in known[: args.n]]
    else:
        records = [r for r in known if knows(model, r)[0]][: args.n]
    print(f"model {model}  prompts {len(records)}", file=sys.stderr)
    rows = []
    for r in records:
        # a text answer is tokenized by the model's one answer rule (MemoryModel.answer_tokens)
        ans = int(model.next_token_probs(r["prompt"])[0].argmax()) if args.random else r["attribute"].strip()
        cf, cr, cg = Cost(), Cost(), Cost()
        fast, f_flops, _ = flops_of(lambda: integrated_gradients(model, r["prompt"], ans, steps=args.steps, cost=cf))
        ref, r_flops, _ = flops_of(lambda: integrated_gradients_reference(model, r["prompt"], ans, steps=args.steps,
                                                                          cost=cr))
        gxa, g_flops, _ = flops_of(lambda: grad_x_activation(model, r["prompt"], ans, cost=cg))
        _, f_wall = timed(lambda: integrated_gradients(model, r["prompt"], ans, steps=args.steps))
        _, r_wall = timed(lambda: integrated_gradients_reference(model, r["prompt"], ans, steps=args.steps))
        _, g_wall = timed(lambda: grad_x_activation(model, r["prompt"], ans))
        top = int(ref.flatten().argmax())
        screen = set(gxa.flatten().topk(50).indices.tolist())
        rows.append({"prompt": r["prompt"], "tokens": len(model.token_ids(r["prompt"])),
                     "max_abs_diff": float((fast - ref).abs().max()), "max_abs_attr": float(ref.abs().max()),
                     "fast_passes": [cf.forward_passes, cf.backward_passes],
                     "dai_passes": [cr.forward_passes, cr.backward_passes],
                     "fast_flops": f_flops, "dai_flops": r_flops, "gxa_flops": g_flops,
                     "fast_layer_tokens": cf.layer_tokens + cf.backward_layer_tokens,
                     "dai_layer_tokens": cr.layer_tokens + cr.backward_layer_tokens,
                     "fast_seconds": f_wall, "dai_seconds": r_wall, "gxa_seconds": g_wall,
                     "ig_top_in_gxa_top50": top in screen})
    n = len(rows)
    tot = {k: sum(x[k] for x in rows) for k in rows[0] if k.endswith(("_flops", "_layer_tokens", "_seconds"))}
    summary = {"prompts": n, "max_abs_diff": max(x["max_abs_diff"] for x in rows),
               "max_abs_attribution": max(x["max_abs_attr"] for x in rows),
               "passes_per_prompt_fast": rows[0]["fast_passes"], "passes_per_prompt_dai": rows[0]["dai_passes"],
               "flops_ratio": tot["dai_flops"] / tot["fast_flops"],
               "layer_token_ratio": tot["dai_layer_tokens"] / tot["fast_layer_tokens"],
               "wall_ratio": tot["dai_seconds"] / tot["fast_seconds"],
               "seconds_per_prompt": {"ffkv": tot["fast_seconds"] / n, "dai": tot["dai_seconds"] / n,
                                      "gxa": tot["gxa_seconds"] / n},
               "gxa_flops_vs_dai": tot["dai_flops"] / tot["gxa_flops"],
               "ig_top_in_gxa_top50": sum(x["ig_top_in_gxa_top50"] for x in rows) / n}
    for k, v in summary.items():
        print(f"{k:28} {v}")
    # equal up to float error relative to the attributions' scale (Dai et al.'s loop sums in another order)
    tol = args.tolerance * max(summary["max_abs_attribution"], 1e-30)
    print(f"results equal: {summary['max_abs_diff'] <= tol} (max |diff| {summary['max_abs_diff']:.2e}, "
          f"tolerance {args.tolerance:g} x max |attribution|)")
    write_json(args.out, {"summary": summary, "rows": rows,
                          "provenance": provenance(model.identity, steps=args.steps, n=n, threads=1)})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
