"""Causal tracing: ffkv's batched tracer against a direct implementation of ROME's per-cell loop, side by side.

For each prompt (known facts of a testbed, or ROME's known_1000 with a hub model) and each kind (hidden, mlp,
attn), both implementations run in this process on the same noise; the script checks that the heatmaps are
equal and prints forward passes, FLOPs (torch's FlopCounterMode: every matmul, attention and the unembedding),
layer-token units (rows x positions x layers run) and wall time, with the ratios.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_trace.py [--testbed PATH | --model NAME --known FILE] [--n 10]
        [--out docs/figures/locate_bench_trace.json]

One thread. Every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def flops_of(fn):
    """(result, FLOPs, seconds) of ``fn()``."""
    from torch.utils.flop_counter import FlopCounterMode

    t = time.perf_counter()
    with FlopCounterMode(display=False) as fc:
        out = fn()
    return out, fc.get_total_flops(), time.perf_counter() - t


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def random_gpt2(like, n_layers: int, d_model: int):
    """A random GPT-2 with ``like``'s tokenizer and vocabulary, ``n_layers`` x ``d_model`` (d_ffn = 4 d)."""
    import torch
    import transformers as T

    from ffkv.models.loading import from_hf

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=max(1, d_model // 64), n_inner=4 * d_model,
                       vocab_size=like.vocab_size, n_positions=256, bos_token_id=0, eos_token_id=0)
    return from_hf(T.GPT2LMHeadModel(cfg).eval(), like.tokenizer, name_or_path=f"random-gpt2-{n_layers}x{d_model}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", default=None, help="testbed folder (default: the shipped default testbed)")
    ap.add_argument("--model", default=None, help="a model instead of a testbed (with --known)")
    ap.add_argument("--known", default=None, help="known_1000-layout file")
    ap.add_argument("--n", type=int, default=10, help="prompts")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--random", default=None, metavar="LxD",
                    help="trace a randomly initialised GPT-2 of L layers and width D (with the testbed's tokenizer "
                         "and prompts; answer = its top prediction): the ratios depend on shapes, not weights")
    ap.add_argument("--tolerance", type=float, default=1e-5,
                    help="largest |difference| of the heatmaps that counts as equal (float error)")
    ap.add_argument("--out", default=str(REPO / "docs" / "figures" / "locate_bench_trace.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import ffkv
    from ffkv.io import provenance, write_json
    from ffkv.locate.average import knows, load_known
    from ffkv.locate.trace import causal_trace, causal_trace_reference, noise_level
    from ffkv.models.engine import Cost

    if args.model:
        model, known = ffkv.load_model(args.model), load_known(args.known)
    else:
        tb = Path(args.testbed) if args.testbed else Path(__import__("ffkv.testbed", fromlist=["x"]).default_testbed(build_if_missing=False))
        model, known = ffkv.load_model(tb / "model"), load_known(tb)
    if args.random:
        model = random_gpt2(model, *map(int, args.random.lower().split("x")))
        records = known[: args.n]
    else:
        records = [r for r in known if knows(model, r)[0]][: args.n]
    level, _ = noise_level(model, "s3", [r["subject"] for r in known])
    print(f"model {model}  prompts {len(records)}  s3 noise level {level:.4f}", file=sys.stderr)
    rows = []
    for r in records:
        for kind in ("hidden", "mlp", "attn"):
            kw = dict(kind=kind, noise=level, samples=args.samples, window=args.window, seed=0)
            cf, cr = Cost(), Cost()
            fast, f_flops, _ = flops_of(lambda: causal_trace(model, r["prompt"], r["subject"], cost=cf, **kw))
            ref, r_flops, _ = flops_of(lambda: causal_trace_reference(model, r["prompt"], r["subject"], cost=cr, **kw))
            _, f_wall = timed(lambda: causal_trace(model, r["prompt"], r["subject"], **kw))
            _, r_wall = timed(lambda: causal_trace_reference(model, r["prompt"], r["subject"], **kw))
            rows.append({"prompt": r["prompt"], "kind": kind, "tokens": len(fast.tokens),
                         "max_abs_diff": float(np.abs(fast.scores - ref.scores).max()),
                         "fast_passes": cf.forward_passes, "rome_passes": cr.forward_passes,
                         "fast_flops": f_flops, "rome_flops": r_flops,
                         "fast_layer_tokens": cf.layer_tokens, "rome_layer_tokens": cr.layer_tokens,
                         "fast_seconds": f_wall, "rome_seconds": r_wall})
    summary = {}
    for kind in ("hidden", "mlp", "attn", "all"):
        rs = [x for x in rows if kind == "all" or x["kind"] == kind]
        tot = {k: sum(x[k] for x in rs) for k in rs[0] if k.startswith(("fast_", "rome_"))}
        summary[kind] = {
            "prompts": len(rs) if kind != "all" else len(records),
            "max_abs_diff": max(x["max_abs_diff"] for x in rs),
            "passes_per_prompt": [tot["fast_passes"] / len(rs), tot["rome_passes"] / len(rs)],
            "flops_ratio": tot["rome_flops"] / tot["fast_flops"],
            "layer_token_ratio": tot["rome_layer_tokens"] / tot["fast_layer_tokens"],
            "wall_ratio": tot["rome_seconds"] / tot["fast_seconds"],
            "seconds_per_prompt": [tot["fast_seconds"] / len(rs), tot["rome_seconds"] / len(rs)]}
    print(f"{'kind':8} {'max|diff|':>10} {'passes ffkv':>11} {'passes ROME':>11} {'FLOPs x':>8} "
          f"{'layer-tok x':>11} {'wall x':>7} {'s ffkv':>7} {'s ROME':>7}")
    for kind, s in summary.items():
        print(f"{kind:8} {s['max_abs_diff']:10.2e} {s['passes_per_prompt'][0]:11.1f} {s['passes_per_prompt'][1]:11.1f} "
              f"{s['flops_ratio']:8.2f} {s['layer_token_ratio']:11.2f} {s['wall_ratio']:7.2f} "
              f"{s['seconds_per_prompt'][0]:7.3f} {s['seconds_per_prompt'][1]:7.3f}")
    worst = summary["all"]["max_abs_diff"]
    print(f"results equal: {worst <= args.tolerance} (max |diff| {worst:.2e}, tolerance {args.tolerance:g})")
    write_json(args.out, {"summary": summary, "rows": rows,
                          "provenance": provenance(model.identity, samples=args.samples, window=args.window,
                                                   noise_level=level, n=len(records), threads=1)})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
