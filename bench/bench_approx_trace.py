"""The approximate causal trace (attribution patching + exact verification) against the exact trace and ROME's loop.

1. Speed: on a randomly initialised model of GPT-2 small's shape (12 x 768, d_ffn 3072, 50,257 vocabulary rows;
   the testbed's tokenizer), one 10-token prompt: ``ffkv.locate.approx.approx_trace`` (all three kinds from one
   forward and one backward pass of the noised rows, ``verify`` cells per kind restored exactly; and each kind
   alone) against ROME's per-cell loop (``ffkv.locate.trace.causal_trace_reference``, ``--rome-kinds``) and
   ffkv's exact ``causal_traces``; the verified cells are checked equal to ROME's values there.
2. Agreement: on the testbed, over ``--n`` frequent known facts (``data/facts.jsonl``, train_count >= 30, the
   first training template the model answers correctly): Spearman rank correlation of the estimated grid with
   the exact ``causal_trace`` grid (cells from the first subject token on), and how often the peak is the same
   (the screen's top cell and the best verified cell reach the exact maximum; ties count as the same peak).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_approx_trace.py [--testbed DIR] [--n 20] [--verify 3]
        [--windows 10,1] [--out docs/figures/locate_bench_approx.json]

One thread. Every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def speed(tb: Path, verify: int, window: int, rome_kinds: list[str]) -> dict:
    """On GPT-2 small's shape: approx (all kinds, and each kind alone) against ROME's loop (``rome_kinds``; every
    kind of ROME's loop is the same 121 passes of 11 rows, so one kind's time stands for each), and against ffkv's
    exact trace of all kinds; the verified cells equal ROME's values there."""
    import ffkv
    from bench_trace import random_gpt2

    from ffkv.locate.approx import approx_trace
    from ffkv.locate.trace import causal_trace_reference, causal_traces

    model = random_gpt2(ffkv.load_model(tb / "model"), 12, 768)
    prompt, subject = "According to the records, Lian Terkeli was born in", "Lian Terkeli"
    T = model.encode(prompt)["input_ids"].shape[1]
    opts = {"noise": "s3", "samples": 10, "window": window}
    approx, t_all = timed(lambda: approx_trace(model, prompt, subject, verify=verify, **opts))
    out = {"model": "random GPT-2 12x768, 50,257 vocabulary rows", "tokens": T, "verify": verify, "window": window,
           "approx_all_kinds_s": t_all, "kinds": {}}
    _, t_exact = timed(lambda: causal_traces(model, prompt, subject, answer=approx.answer_id, **opts))
    out["ffkv_exact_all_kinds_s"] = t_exact
    for kind in ("hidden", "mlp", "attn"):
        def alone():
            return timed(lambda: approx_trace(model, prompt, subject, kinds=[kind], answer=approx.answer_id,
                                              verify=verify, **opts))

        one, t_one = alone()
        row = {"approx_alone_s": t_one}
        if kind in rome_kinds:
            ref, t_ref = timed(lambda: causal_trace_reference(model, prompt, subject, kind=kind,
                                                              answer=approx.answer_id, **opts))
            # interleaved: the approximate trace timed before and after ROME's loop, the mean taken
            t_one = row["approx_alone_s"] = (t_one + alone()[1]) / 2
            row.update({"rome_s": t_ref, "verified_max_abs_diff": max(
                abs(p - ref.scores[t, l]) for t, l, p in approx.detail["verified"][kind])})
        out["kinds"][kind] = row
        print(f"speed {kind}: approx alone {t_one:.2f}s" + (f", ROME loop {row['rome_s']:.1f}s; verified cells vs "
              f"ROME max |diff| {row['verified_max_abs_diff']:.2g}" if "rome_s" in row else ""), flush=True)
    rome = np.mean([k["rome_s"] for k in out["kinds"].values() if "rome_s" in k])
    out["rome_per_kind_s"] = float(rome)
    out["ratio_per_kind_all_kinds_at_once"] = 3 * rome / t_all
    out["ratio_per_kind_alone"] = {k: rome / v["approx_alone_s"] for k, v in out["kinds"].items()}
    out["ratio_vs_ffkv_exact_all_kinds"] = t_exact / t_all
    print(f"speed: approx, 3 kinds at once {t_all:.2f}s: {out['ratio_per_kind_all_kinds_at_once']:.1f}x ROME's loop "
          f"per kind ({rome:.1f}s); one kind alone: " + ", ".join(f"{k} {v:.1f}x" for k, v in
                                                             out["ratio_per_kind_alone"].items())
          + f"; ffkv exact 3 kinds {t_exact:.1f}s = {out['ratio_vs_ffkv_exact_all_kinds']:.1f}x approx", flush=True)
    return out


def agreement(tb: Path, n: int, verify: int, window: int) -> dict:
    import ffkv
    from ffkv.locate.approx import approx_trace, verified_peaks
    from ffkv.locate.trace import causal_trace

    model = ffkv.load_model(tb / "model")
    facts = [json.loads(line) for line in (tb / "data" / "facts.jsonl").read_text().splitlines() if line.strip()]
    cases = []
    for f in facts:
        if f["train_count"] < 30:
            continue
        prompt = f["train_templates"][0].format(f["subject"])
        if int(model.next_token_probs(prompt)[0].argmax()) == model.answer_id(f["object"]):
            cases.append((prompt, f["subject"], f["object"]))
        if len(cases) == n:
            break
    rows = {k: {"spearman": [], "same_peak_screen": [], "same_peak_verified": [], "same_cell": []}
            for k in ("hidden", "mlp", "attn")}
    opts = {"noise": "s3", "samples": 10, "window": window}
    t_approx = t_exact = 0.0
    for prompt, subject, obj in cases:
        r, dt = timed(lambda: approx_trace(model, prompt, subject, answer=obj, verify=verify, **opts))
        t_approx += dt
        peaks = verified_peaks(r)
        s, _ = r.subject_range
        for i, kind in enumerate(r.sites):
            ex, dt = timed(lambda: causal_trace(model, prompt, subject, kind=kind, answer=obj, **opts))
            t_exact += dt
            est = r.detail["estimate"][i]
            row = rows[kind]
            row["spearman"].append(spearman(est[s:].ravel(), ex.scores[s:].ravel()))
            t, l = np.unravel_index(int(np.argmax(est)), est.shape)
            top = ex.scores.max()
            row["same_peak_screen"].append(bool(ex.scores[t, l] >= top - 1e-6))
            row["same_peak_verified"].append(bool(ex.scores[peaks[kind]] >= top - 1e-6))
            row["same_cell"].append(bool((int(t), int(l)) == ex.peak()))
    out = {"n_facts": len(cases), "window": window, "verify": verify, "approx_s": t_approx, "exact_s": t_exact,
           "kinds": {}}
    for kind, row in rows.items():
        rho = np.array(row["spearman"], dtype=float)
        out["kinds"][kind] = {"spearman_mean": float(np.nanmean(rho)), "spearman_min": float(np.nanmin(rho)),
                              "n_defined": int(np.isfinite(rho).sum()),
                              **{k: float(np.mean(v)) for k, v in row.items() if k != "spearman"}}
        o = out["kinds"][kind]
        print(f"agreement window {window} {kind}: Spearman mean {o['spearman_mean']:.3f} (min {o['spearman_min']:.3f}, "
              f"{o['n_defined']} grids), same peak: screen {o['same_peak_screen']:.2f}, verified "
              f"{o['same_peak_verified']:.2f}, same cell {o['same_cell']:.2f}", flush=True)
    print(f"agreement window {window}: {len(cases)} facts, approx {t_approx:.1f}s vs exact ffkv trace {t_exact:.1f}s",
          flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", default=None, help="testbed folder (default: the shipped default testbed)")
    ap.add_argument("--n", type=int, default=20, help="known frequent facts for the agreement")
    ap.add_argument("--verify", type=int, default=3, help="cells per kind restored exactly")
    ap.add_argument("--windows", default="10,1", help="mlp/attn windows for the agreement (ROME's 10, and 1)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--rome-kinds", default="hidden", help="kinds of ROME's loop to time on GPT-2 small's shape")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    import torch

    from ffkv.testbed import default_testbed

    torch.set_num_threads(1)
    tb = Path(args.testbed) if args.testbed else Path(default_testbed(build_if_missing=False))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    res = {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "agreement": [] if args.skip_agreement else [agreement(tb, args.n, args.verify, int(w))
                                                        for w in args.windows.split(",")]}
    if not args.skip_speed:
        res["speed"] = speed(tb, args.verify, 10, args.rome_kinds.split(","))
    print(json.dumps(res))
    if args.out:
        from ffkv.io import write_json

        write_json(Path(args.out), res)


if __name__ == "__main__":
    main()
