"""Edit benchmarks, measured side by side in one run (CPU, one thread unless --threads).

1. Statistics throughput: tokens/s of ``accumulate_second_moments`` (C = E[k k^T], all requested layers in one
   pass) over tokens/s of a plain forward pass over the same tokens. Target >= 0.7.
2. ROME wall time per edit: ``apply_edits(method="rome")`` (all context prefixes in one batch) against a direct
   implementation of the same algorithm (one text per forward pass, C^-1 k by ``torch.linalg.solve``),
   with the updates shown equal.
3. MEMIT wall time per N edits (default 100): targets optimised for the whole batch together against one
   request at a time, the rest identical, with the updates shown equal.

    python bench/bench_edit.py [MODEL] [--n-memit 100] [--json]

MODEL defaults to the shipped default testbed. Prints one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def load(model_path):
    import ffkv

    if model_path is None:
        from ffkv.testbed import default_testbed

        model_path = default_testbed(build_if_missing=False) / "model"
    return ffkv.load_model(str(model_path)), str(model_path)


def counterfact_requests(model_path, n):
    """The first n CounterFact requests of the testbed the model belongs to (its data/ folder), taken in
    ``spread_subjects`` order: a MEMIT batch of distinct subjects, as evaluations use."""
    from pathlib import Path

    from ffkv.evaluate.datasets import load_cases, spread_subjects

    for cand in (Path(model_path).parent / "data" / "counterfact.json", Path(model_path) / "data" / "counterfact.json"):
        if cand.exists():
            return [c.edit_request() for c in spread_subjects(load_cases(cand)[0])[:n]]
    raise SystemExit(f"no data/counterfact.json beside {model_path}")


# ----------------------------------------------------------------------------------------------------
def bench_stats(model, layers_sets, n_tokens=40_000, window=128, batch_size=8):
    from ffkv.edit.stats import accumulate_second_moments, token_windows
    from ffkv.memory.corpus import open_corpus

    texts = open_corpus("auto", model).texts_list()
    window = min(window, model.context_length)
    windows = token_windows(model, texts, n_tokens, window)
    out = {"tokens": windows.numel()}

    def forward_all():
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                model.hf(input_ids=windows[i:i + batch_size])

    forward_all()  # warm-up
    t = time.perf_counter()
    forward_all()
    fwd = time.perf_counter() - t
    out["forward_tok_s"] = windows.numel() / fwd
    for name, layers in layers_sets.items():
        t = time.perf_counter()
        accumulate_second_moments(model, windows, layers, batch_size, progress=False)
        st = time.perf_counter() - t
        out[name] = {"layers": layers, "stats_tok_s": windows.numel() / st, "ratio_vs_forward": fwd / st}
    return out


# ----------------------------------------------------------------------------------------------------
def direct_rome_update(model, request, hp, C, prefixes):
    """ROME written plainly: one forward pass per text, gradients summed text by text, C^-1 k by solve()."""
    from ffkv.edit.requests import EditRequest, render_batch
    from ffkv.models.hooks import Intervention, intervene

    layer = hp["layer"]
    ks = []
    for p in prefixes:
        b = render_batch(model, [(p, request)])
        with torch.no_grad(), intervene(model, reads=[("coef", layer)]) as rec:
            model.hf(**b.inputs)
        ks.append(rec["coef", layer][0, int(b.subject_last[0])].float())
    k = torch.stack(ks).mean(0)

    rw = [render_batch(model, [(p, request)], with_target=True) for p in prefixes]
    klb = render_batch(model, [("", EditRequest(hp["kl_prompt"], request.subject, request.target))])
    with torch.no_grad(), intervene(model, reads=[("ffn_out", layer)]) as rec:
        model.hf(**rw[0].inputs)
    h = rec["ffn_out", layer][0, int(rw[0].subject_last[0])].float()
    with torch.no_grad():
        kl_ref = torch.log_softmax(model.hf(**klb.inputs).logits[0, int(klb.last[0])].float(), -1)
    delta = torch.zeros(model.d_model, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp["v_lr"])
    for p_ in model.hf.parameters():
        p_.requires_grad_(False)

    def add(pos):
        return Intervention("ffn_out", layer, "fn", value=lambda x: x + delta.to(x.dtype), positions=[pos])

    for it in range(hp["v_num_grad_steps"]):
        opt.zero_grad()
        total = 0.0
        for b in rw:
            with intervene(model, edits=[add(int(b.subject_last[0]))]):
                logits = model.hf(**b.inputs).logits[0]
            lp = torch.log_softmax(logits[b.target_pos[0]].float(), -1)
            nll = -lp.gather(-1, b.target_tok[0][:, None])[:, 0].mean() / len(rw)
            total = total + nll.detach()
            if it < hp["v_num_grad_steps"] - 1:
                nll.backward()
        with intervene(model, edits=[add(int(klb.subject_last[0]))]):
            lp_new = torch.log_softmax(model.hf(**klb.inputs).logits[0, int(klb.last[0])].float(), -1)
        kl = hp["kl_factor"] * (lp_new.exp() * (lp_new - kl_ref)).sum()
        wd = hp["v_weight_decay"] * delta.pow(2).sum() / h.pow(2).sum()
        loss = total + kl.detach() + wd.detach()
        if loss < hp["early_stop_loss"] or it == hp["v_num_grad_steps"] - 1:
            break
        (kl + wd).backward()
        opt.step()
        with torch.no_grad():
            mx = hp["clamp_norm_factor"] * h.norm()
            if delta.norm() > mx:
                delta.mul_(mx / delta.norm())
    for p_ in model.hf.parameters():
        p_.requires_grad_(True)
    W, bias = model.values(layer).double(), model.value_bias(layer)
    kd = k.double()
    v_star = W @ kd + (bias.double() if bias is not None else 0) + delta.detach().double()
    Cinv_k = torch.linalg.solve(C.double(), kd)
    residual = v_star - W @ kd - (bias.double() if bias is not None else 0)
    return torch.outer(residual, Cinv_k / (kd @ Cinv_k)).detach()


def bench_rome(model, requests, context):
    from ffkv.edit import Journal, apply_edits, default_hparams
    from ffkv.edit.journal import delta_matrix

    hp = default_hparams(model, "rome")
    # the context computed the statistics and prefixes once: every timed apply_edits below reuses them
    C = context.layer_stats(model, [hp["layer"]], hp)[hp["layer"]].C
    prefixes = context.context_prefixes(model, hp["prefixes"], hp["seed"])
    fast_t, direct_t, diffs = 0.0, 0.0, []
    for r in requests:
        t = time.perf_counter()
        j = apply_edits(model, [r], "rome", progress=False, journal=Journal(), context=context)
        fast_t += time.perf_counter() - t
        ours = delta_matrix(j[0].u, j[0].v)
        j.undo(model)
        t = time.perf_counter()
        ref = direct_rome_update(model, r, hp, C, prefixes)
        direct_t += time.perf_counter() - t
        diffs.append(float((ours - ref).norm() / ref.norm()))
    n = len(requests)
    return {"edits": n, "ffkv_s_per_edit": fast_t / n, "direct_s_per_edit": direct_t / n,
            "speedup": direct_t / fast_t, "max_relative_difference_of_updates": max(diffs)}


def bench_memit(model, requests, context):
    from ffkv.edit import Journal, apply_edits, default_hparams
    from ffkv.edit import compute_value, memit
    from ffkv.edit.journal import delta_matrix

    hp = default_hparams(model, "memit")
    context.layer_stats(model, hp["layers"], hp)  # statistics and prefixes before the clock starts
    context.context_prefixes(model, hp["prefixes"], hp["seed"])
    t = time.perf_counter()
    j = apply_edits(model, requests, "memit", progress=False, journal=Journal(), context=context)
    batched = time.perf_counter() - t
    ours = [delta_matrix(e.u, e.v) for e in j]
    probs = [t["target_prob"] for t in j[0].info["targets"]]
    j.undo(model)

    real = compute_value.compute_targets

    def one_at_a_time(model_, reqs, site, layer, hparams, prefixes, progress=False):
        parts = [real(model_, [r], site, layer, hparams, prefixes) for r in reqs]
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return compute_value.TargetResult(cat("delta"), cat("h"), cat("nll"), cat("target_prob"), cat("steps"))

    memit.compute_targets = one_at_a_time
    try:
        t = time.perf_counter()
        j2 = apply_edits(model, requests, "memit", progress=False, journal=Journal(), context=context)
        direct = time.perf_counter() - t
    finally:
        memit.compute_targets = real
    ref = [delta_matrix(e.u, e.v) for e in j2]
    j2.undo(model)
    diff = max(float((a - b).norm() / b.norm()) for a, b in zip(ours, ref))
    return {"edits": len(requests), "layers": hp["layers"], "ffkv_batched_s": batched, "one_at_a_time_s": direct,
            "speedup": direct / batched, "max_relative_difference_of_updates": diff,
            "mean_optimised_target_prob": sum(probs) / len(probs)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--n-rome", type=int, default=5)
    ap.add_argument("--n-memit", type=int, default=100)
    ap.add_argument("--stats-tokens", type=int, default=40_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stats-dir", default="/tmp/ffkv-bench-stats")
    ap.add_argument("--skip", default="", help="comma list of stats,rome,memit to skip")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ffkv.edit import EditContext, default_hparams

    model, path = load(a.model)
    context = EditContext(stats_dir=a.stats_dir, progress=False)  # one context: statistics computed once
    skip = set(a.skip.split(","))
    res = {"model": path, "threads": a.threads}
    if "stats" not in skip:
        res["stats"] = bench_stats(model, {"rome_layer": [default_hparams(model, "rome")["layer"]],
                                           "memit_layers": default_hparams(model, "memit")["layers"],
                                           "all_layers": list(range(model.n_layers))}, a.stats_tokens)
        print(f"stats: {json.dumps(res['stats'])}", file=sys.stderr)
    reqs = counterfact_requests(path, max(a.n_rome, a.n_memit))
    if "rome" not in skip:
        res["rome"] = bench_rome(model, reqs[: a.n_rome], context)
        print(f"rome: {json.dumps(res['rome'])}", file=sys.stderr)
    if "memit" not in skip:
        res["memit"] = bench_memit(model, reqs[: a.n_memit], context)
        print(f"memit: {json.dumps(res['memit'])}", file=sys.stderr)
    print(json.dumps(res, indent=None if a.json else 2))


if __name__ == "__main__":
    main()
