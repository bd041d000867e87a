"""How much batching buys the evaluation: teacher-forced scoring of CounterFact pairs, batched vs one at a time.

    python bench/bench_evaluate.py [--testbed DIR] [--cases 50]

Scores every (prompt, target) pair of ``--cases`` testbed cases (rewrite, paraphrase and neighborhood prompts,
new and true targets: ~26 pairs a case) with :func:`ffkv.evaluate.metrics.score_continuations` at batch size 1
and 64, in one process, and prints both times, the speed-up, and the largest NLL difference between the two.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default=None)
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import ffkv
    from ffkv.evaluate.datasets import load_cases
    from ffkv.evaluate.metrics import case_pairs, score_continuations

    tb = Path(args.testbed) if args.testbed else Path(ffkv.testbed.default_testbed(build_if_missing=False))
    model = ffkv.load_model(str(tb / "model"))
    cases, _ = load_cases(tb / "data" / "counterfact.json", limit=args.cases)
    pairs = [(p, t) for c in cases for _, p, t in case_pairs(c)]
    score_continuations(model, pairs[:8], batch_size=8)  # warm-up
    times, results = {}, {}
    for bs in (1, 64):
        t0 = time.perf_counter()
        results[bs] = score_continuations(model, pairs, batch_size=bs)
        times[bs] = time.perf_counter() - t0
    diff = max(abs(a.nll - b.nll) for a, b in zip(results[1], results[64]))
    print(f"{len(pairs)} pairs from {len(cases)} cases on {tb.name}, {args.threads} thread(s)")
    print(f"one at a time: {times[1]:.2f} s   batched (64): {times[64]:.2f} s   speed-up: {times[1] / times[64]:.1f}x")
    print(f"largest |NLL difference|: {diff:.2e} nats")


if __name__ == "__main__":
    main()
