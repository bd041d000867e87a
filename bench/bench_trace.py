"""Causal tracing: ffkv's exact tracer against a direct implementation of ROME's per-cell loop, side by side.

For each prompt (known facts of a testbed, or the first ``--n`` of them on a randomly initialised model of a
given shape, e.g. ``--random 12x768`` for GPT-2 small's shape with 50,257 vocabulary rows) and each kind
(hidden, mlp, attn), both implementations run in this process on the same noise (ROME's defaults: s3 over the
noise subjects, ``RandomState(1)``, 10 samples, window 10); the script checks that the heatmaps are equal and
prints forward passes, layer-token units (rows x positions x layers run), wall time, the wall-time ratio, the
bound an exact method has (:func:`ffkv.locate.trace.work_bound`: ROME's work over the bound's) and the fraction
of the bound reached in wall time (wall ratio / bound ratio). ``all``: the three kinds from one call
(:func:`ffkv.locate.trace.causal_traces`, sharing the clean and corrupted runs) against ROME's three loops. The
bound for a deeper shape (``--bound-shape 48x10``, GPT-2 XL's depth on a 10-token prompt) is computed, not run.
ffkv runs before and after ROME's loop and its mean time counts (the machine's load drifts over a long run).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_trace.py [--testbed PATH] [--random 12x768] [--n 3]
        [--tokens 10] [--out docs/figures/locate_bench_trace.json]

One thread. Every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def random_gpt2(like, n_layers: int, d_model: int, vocab: int | None = None):
    """A random GPT-2 with ``like``'s tokenizer, ``n_layers`` x ``d_model`` (d_ffn = 4 d), ``vocab`` rows (default
    50,257, GPT-2's)."""
    import torch
    import transformers as T

    from ffkv.models.loading import from_hf

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=max(1, d_model // 64), n_inner=4 * d_model,
                       vocab_size=vocab or 50257, n_positions=1024, bos_token_id=0, eos_token_id=0)
    return from_hf(T.GPT2LMHeadModel(cfg).eval(), like.tokenizer, name_or_path=f"random-gpt2-{n_layers}x{d_model}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", default=None, help="testbed folder (default: the shipped default testbed)")
    ap.add_argument("--n", type=int, default=3, help="prompts")
    ap.add_argument("--tokens", type=int, default=None, help="only prompts of this many tokens")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--kinds", default="hidden,mlp,attn")
    ap.add_argument("--random", default=None, metavar="LxD",
                    help="trace a randomly initialised GPT-2 of L layers and width D (the testbed's tokenizer and "
                         "prompts, 50,257 vocabulary rows; answer = its top prediction)")
    ap.add_argument("--bound-shape", default="48x10", metavar="LxT", help="layers x tokens of the computed bound")
    ap.add_argument("--tolerance", type=float, default=1e-5,
                    help="largest |difference| of the heatmaps that counts as equal (float error)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import ffkv
    from ffkv.io import provenance, write_json
    from ffkv.locate.average import knows, load_known
    from ffkv.locate.trace import causal_trace_reference, causal_traces, noise_setting, work_bound
    from ffkv.models.engine import Cost
    from ffkv.testbed import default_testbed

    tb = Path(args.testbed) if args.testbed else Path(default_testbed(build_if_missing=False))
    model, known = ffkv.load_model(tb / "model"), load_known(tb)
    if args.random:
        model = random_gpt2(model, *map(int, args.random.lower().split("x")))
        pool = known
    else:
        pool = [r for r in known if knows(model, r)[0]]
    if args.tokens:
        pool = [r for r in pool if model.encode(r["prompt"])["input_ids"].shape[1] == args.tokens]
    records = pool[: args.n]
    kinds = args.kinds.split(",")
    level, _, source = noise_setting(model, "s3")
    print(f"model {model}  prompts {len(records)}  s3 noise level {level:.4f} ({source})", file=sys.stderr)
    opts = dict(noise="s3", samples=args.samples, window=args.window)
    rows = []
    for r in records:
        answer = int(model.next_token_probs(r["prompt"])[0].argmax())
        ids = model.encode(r["prompt"])["input_ids"]
        T, s = ids.shape[1], model.find_subject(r["prompt"], r["subject"])[0]
        refs, ref_s = {}, {}
        one = {}
        for kind in kinds:
            cf, cr = Cost(), Cost()
            fast, t1 = timed(lambda: causal_traces(model, r["prompt"], r["subject"], [kind], answer, cost=cf,
                                                   **opts)[kind])
            ref, ref_s[kind] = timed(lambda: causal_trace_reference(model, r["prompt"], r["subject"], kind, answer,
                                                                    cost=cr, **opts))
            _, t2 = timed(lambda: causal_traces(model, r["prompt"], r["subject"], [kind], answer, **opts))
            refs[kind] = ref
            b = work_bound(T, model.n_layers, s, [kind], args.samples, args.window)
            rome_units = cr.layer_tokens + (args.samples + 1) * T * model.n_layers  # + ROME's prediction pass
            one[kind] = {"prompt": r["prompt"], "kind": kind, "tokens": T, "subject_start": s,
                         "max_abs_diff": float(np.abs(fast.scores - ref.scores).max()),
                         "ffkv_passes": cf.forward_passes, "rome_passes": cr.forward_passes + 1,
                         "ffkv_layer_tokens": cf.layer_tokens, "rome_layer_tokens": rome_units,
                         "bound_layer_tokens": b["bound"], "ffkv_seconds": (t1 + t2) / 2,
                         "ffkv_seconds_runs": [t1, t2], "rome_seconds": ref_s[kind]}
            print(f"  {kind}: ffkv {(t1 + t2) / 2:.2f}s ROME {ref_s[kind]:.1f}s", file=sys.stderr, flush=True)
        rows += list(one.values())
        if len(kinds) > 1:
            c = Cost()
            (every, t1) = timed(lambda: causal_traces(model, r["prompt"], r["subject"], kinds, answer, cost=c,
                                                      **opts))
            b = work_bound(T, model.n_layers, s, kinds, args.samples, args.window)
            rows.append({"prompt": r["prompt"], "kind": "all", "tokens": T, "subject_start": s,
                         "max_abs_diff": max(float(np.abs(every[k].scores - refs[k].scores).max()) for k in kinds),
                         "ffkv_passes": c.forward_passes, "rome_passes": sum(one[k]["rome_passes"] for k in kinds),
                         "ffkv_layer_tokens": c.layer_tokens,
                         "rome_layer_tokens": sum(one[k]["rome_layer_tokens"] for k in kinds),
                         "bound_layer_tokens": b["bound"], "ffkv_seconds": t1,
                         "rome_seconds": sum(ref_s.values())})
    summary = {}
    for kind in kinds + (["all"] if len(kinds) > 1 else []):
        rs = [x for x in rows if x["kind"] == kind]
        tot = {k: sum(x[k] for x in rs) for k in ("ffkv_passes", "rome_passes", "ffkv_layer_tokens",
                                                  "rome_layer_tokens", "bound_layer_tokens", "ffkv_seconds",
                                                  "rome_seconds")}
        wall = tot["rome_seconds"] / tot["ffkv_seconds"]
        bound = tot["rome_layer_tokens"] / tot["bound_layer_tokens"]
        summary[kind] = {"prompts": len(rs), "max_abs_diff": max(x["max_abs_diff"] for x in rs),
                         "passes_per_prompt": [tot["ffkv_passes"] / len(rs), tot["rome_passes"] / len(rs)],
                         "layer_token_ratio": tot["rome_layer_tokens"] / tot["ffkv_layer_tokens"],
                         "bound_ratio": bound, "wall_ratio": wall, "fraction_of_bound": wall / bound,
                         "seconds_per_prompt": [tot["ffkv_seconds"] / len(rs), tot["rome_seconds"] / len(rs)]}
    print(f"{'kind':7} {'max|diff|':>10} {'passes ffkv':>11} {'ROME':>6} {'layer-tok x':>11} {'bound x':>8} "
          f"{'wall x':>7} {'of bound':>8} {'s ffkv':>7} {'s ROME':>7}")
    for kind, v in summary.items():
        print(f"{kind:7} {v['max_abs_diff']:10.2e} {v['passes_per_prompt'][0]:11.1f} {v['passes_per_prompt'][1]:6.0f} "
              f"{v['layer_token_ratio']:11.2f} {v['bound_ratio']:8.2f} {v['wall_ratio']:7.2f} "
              f"{v['fraction_of_bound']:8.2f} {v['seconds_per_prompt'][0]:7.2f} {v['seconds_per_prompt'][1]:7.1f}")
    worst = max(v["max_abs_diff"] for v in summary.values())
    print(f"results equal: {worst <= args.tolerance} (max |diff| {worst:.2e}, tolerance {args.tolerance:g})")
    L2, T2 = map(int, args.bound_shape.lower().split("x"))
    deep = {k: work_bound(T2, L2, 1, [k] if k != "all" else kinds, args.samples, args.window)["ratio"]
            for k in kinds + ["all"]}
    print(f"bound (computed) for {L2} layers, {T2} tokens, subject from token 1: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in deep.items()))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if args.out:
        write_json(args.out, {"summary": summary, "rows": rows, "bound_deeper_shape": {"shape": args.bound_shape,
                                                                                         "ratios": deep},
                              "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "provenance": provenance(model.identity, samples=args.samples, window=args.window,
                                                       noise_level=level, noise_subjects=source, n=len(records),
                                                       threads=1)})
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
