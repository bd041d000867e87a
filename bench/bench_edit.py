"""Edit benchmarks, measured side by side in one run (CPU, one thread unless --threads).

1. Statistics throughput: tokens/s of ``accumulate_second_moments`` (C = E[k k^T], all requested layers in one
   pass) over tokens/s of a plain forward pass over the same tokens. Target >= 0.7.
2. ROME wall time per edit: ``apply_edits(method="rome")`` against kmeng01's algorithm written directly
   (rome/compute_u + compute_v: all of a request's prompts in one padded batch, the full LM head at every
   position, the loss / early stop / clamp as the reference computes them), same hyperparameters, statistics
   and context prefixes on both sides; the updates shown equal (relative difference) and the Adam steps taken.
3. MEMIT wall time per batch of N edits (default 50): ffkv's batch against kmeng01's memit_main written
   directly (compute_z one request at a time, then compute_ks / residual / solve per layer), updates shown equal.
4. ROME per edit on a randomly initialised GPT-2-small shape (12 x 768, 50,257 vocabulary rows), as 2.

    python bench/bench_edit.py [MODEL] [--n-memit 50] [--n-small 1] [--json]

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
# kmeng01's algorithm, written directly (rome/compute_u.py, compute_v.py, memit/compute_z.py, compute_ks.py,
# memit_main.py): every prompt of a request in ONE padded batch, the full LM head at every position, a hook
# adding delta at each row's subject token, the loss / early stop / clamp as the reference computes them.


def kmeng_delta(model, request, site, layer, hp, prefixes):
    """(delta, h) of one request: kmeng01's compute_v (site ffn_out) / compute_z (site resid_post) loop."""
    from ffkv.edit.compute_value import stack_batches
    from ffkv.edit.requests import EditRequest, render_batch
    from ffkv.models.hooks import Intervention, intervene

    tok = model.require_tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rw = render_batch(model, [(p, request) for p in prefixes], with_target=True)
    kl = render_batch(model, [("", EditRequest(hp["kl_prompt"], request.subject, request.target))])
    b = stack_batches(rw, kl, pad)
    P = len(prefixes)
    rows = torch.arange(P + 1)
    for p_ in model.hf.parameters():
        p_.requires_grad_(False)
    with torch.no_grad(), intervene(model, reads=[(site, layer)]) as rec:
        logits0 = model.hf(**b.inputs).logits
    h = rec[site, layer][0, int(b.subject_last[0])].float()
    kl_init = torch.log_softmax(logits0[P, int(b.last[P])].float(), -1)
    delta = torch.zeros(model.d_model, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp["v_lr"])
    fn = lambda x: x.index_put((rows, b.subject_last), x[rows, b.subject_last] + delta.to(x.dtype))  # noqa: E731
    squared = hp.get("v_weight_decay_form", "reference") == "squared"
    steps = 0
    for it in range(hp["v_num_grad_steps"]):
        opt.zero_grad()
        with intervene(model, edits=[Intervention(site, layer, "fn", value=fn)]):
            logits = model.hf(**b.inputs).logits  # (P + 1, T, V): the full head, as the reference
        lp = torch.log_softmax(logits[:P].float(), -1)
        tok_lp = lp[torch.arange(P)[:, None], b.target_pos, b.target_tok]  # (P, L)
        m = b.target_mask.float()
        nll = -((tok_lp * m).sum(1) / m.sum(1)).mean()
        kl_lp = torch.log_softmax(logits[P, int(b.last[P])].float(), -1)
        kl_loss = hp["kl_factor"] * (kl_lp.exp() * (kl_lp - kl_init)).sum()
        wd = hp["v_weight_decay"] * ((delta.pow(2).sum() if squared else torch.norm(delta)) / h.pow(2).sum())
        loss = nll + kl_loss + wd
        if loss < hp["early_stop_loss"] or it == hp["v_num_grad_steps"] - 1:
            break
        loss.backward()
        opt.step()
        steps += 1
        mx = hp["clamp_norm_factor"] * h.norm()
        if delta.norm() > mx:
            with torch.no_grad():
                delta[...] = delta * mx / delta.norm()
    for p_ in model.hf.parameters():
        p_.requires_grad_(True)
    return delta.detach(), h, steps


def kmeng_keys(model, requests, layer, prefixes):
    """compute_ks / compute_u: the key at each request's subject's last token, averaged over the prefixes;
    one batch of every (request, prefix) row. (n, d_ffn)"""
    from ffkv.edit.requests import render_batch
    from ffkv.models.hooks import intervene

    b = render_batch(model, [(p, r) for r in requests for p in prefixes])
    with torch.no_grad(), intervene(model, reads=[("coef", layer)]) as rec:
        model.hf(**b.inputs)
    k = rec["coef", layer][torch.arange(len(b.subject_last)), b.subject_last].float()
    return k.view(len(requests), len(prefixes), -1).mean(1)


def kmeng_rome(model, request, hp, C, prefixes):
    """ROME's update of one request, kmeng01's way (the averaged key in both places, as ffkv: r-ROME)."""
    layer = hp["layer"]
    k = kmeng_keys(model, [request], layer, prefixes)[0].double()
    delta, _, steps = kmeng_delta(model, request, "ffn_out", layer, hp, prefixes)
    W, bias = model.values(layer).detach().double(), model.value_bias(layer)
    left = torch.linalg.solve(C.double(), k)  # C^-1 k
    return torch.outer(delta.double(), left / (k @ left)), steps  # (v* - W k - b) = delta


def kmeng_memit(model, requests, hp, stats, prefixes):
    """MEMIT's batch, kmeng01's way: z_i by compute_z one request at a time, then layer by layer the keys,
    the remaining residual and ΔW = R K^T (λC + K K^T)^-1 (solve), written into the weights in float32.
    Returns the per-layer ΔW (the weights are restored)."""
    from ffkv.edit.compute_key import read_at_subject

    layers, top = hp["layers"], hp["layers"][-1]
    zs, steps = [], []
    for r in requests:
        d, h, s = kmeng_delta(model, r, "resid_post", top, hp, prefixes)
        zs.append(h + d)
        steps.append(s)
    Z = torch.stack(zs, 1).double()  # (d_model, n)
    saved = {l: model.values(l).detach().clone() for l in layers}
    out = []
    try:
        for i, l in enumerate(layers):
            K = kmeng_keys(model, requests, l, prefixes).T.double()  # (d_ffn, n)
            cur = read_at_subject(model, requests, "resid_post", top).T.double()
            R = (Z - cur) / (len(layers) - i)
            adj = torch.linalg.solve(hp["mom2_update_weight"] * stats[l].C.double() + K @ K.T, K)
            upd = R @ adj.T
            with torch.no_grad():
                model.values(l).copy_((model.values(l).double() + upd).to(model.values(l).dtype))
            out.append(upd)
    finally:
        with torch.no_grad():
            for l, w in saved.items():
                model.values(l).copy_(w)
    return out, steps


def bench_rome(model, requests, context, hp_over=None):
    from ffkv.edit import Journal, apply_edits, resolve_hparams
    from ffkv.edit.journal import delta_matrix

    hp = resolve_hparams(model, "rome", hp_over)
    # the context computed the statistics and prefixes once: every timed call below reuses them
    C = context.layer_stats(model, [hp["layer"]], hp)[hp["layer"]].C
    prefixes = context.context_prefixes(model, hp["prefixes"], hp["seed"])
    fast_t, direct_t, diffs, steps = 0.0, 0.0, [], []
    for r in requests:
        t = time.perf_counter()
        j = apply_edits(model, [r], "rome", hp_over, progress=False, journal=Journal(), context=context)
        fast_t += time.perf_counter() - t
        ours = delta_matrix(j[0].u, j[0].v)
        ours_steps = j[0].info["v_steps"]
        j.undo(model)
        t = time.perf_counter()
        ref, ref_steps = kmeng_rome(model, r, hp, C, prefixes)
        direct_t += time.perf_counter() - t
        diffs.append(float((ours - ref).norm() / ref.norm()))
        steps.append((ours_steps, ref_steps))
    n = len(requests)
    return {"edits": n, "layer": hp["layer"], "prefixes": len(prefixes), "v_weight_decay_form":
            hp["v_weight_decay_form"], "ffkv_s_per_edit": fast_t / n, "kmeng01_direct_s_per_edit": direct_t / n,
            "speedup": direct_t / fast_t, "max_relative_difference_of_updates": max(diffs),
            "adam_steps_ffkv_vs_direct": steps}


def bench_memit(model, requests, context, hp_over=None):
    from ffkv.edit import Journal, apply_edits, resolve_hparams
    from ffkv.edit.journal import delta_matrix

    hp = resolve_hparams(model, "memit", hp_over)
    stats = context.layer_stats(model, hp["layers"], hp)  # statistics and prefixes before the clock starts
    prefixes = context.context_prefixes(model, hp["prefixes"], hp["seed"])
    t = time.perf_counter()
    j = apply_edits(model, requests, "memit", hp_over, progress=False, journal=Journal(), context=context)
    batched = time.perf_counter() - t
    ours = [delta_matrix(e.u, e.v) for e in j]
    ours_steps = [t["v_steps"] for t in j[0].info["targets"]]
    j.undo(model)
    t = time.perf_counter()
    ref, ref_steps = kmeng_memit(model, requests, hp, stats, prefixes)
    direct = time.perf_counter() - t
    diff = max(float((a - b).norm() / b.norm()) for a, b in zip(ours, ref))
    return {"edits": len(requests), "layers": hp["layers"], "ffkv_batch_s": batched, "kmeng01_direct_batch_s": direct,
            "speedup": direct / batched, "max_relative_difference_of_updates": diff,
            "same_adam_steps": sum(a == b for a, b in zip(ours_steps, ref_steps)), "requests": len(ref_steps)}


def gpt2_small_shape(tokenizer_dir):
    """A randomly initialised model of GPT-2 small's shape (GPT2Config(): 12 x 768, 50,257 rows) with the
    testbed's tokenizer (its ids stay below the vocabulary, which is all an edit needs)."""
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    from ffkv.models.loading import from_hf

    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    return from_hf(AutoModelForCausalLM.from_config(GPT2Config()).eval(), tok, name_or_path="gpt2-config")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--n-rome", type=int, default=5)
    ap.add_argument("--n-memit", type=int, default=50)
    ap.add_argument("--n-small", type=int, default=1, help="ROME edits on the GPT-2-small shape (0: skip)")
    ap.add_argument("--stats-tokens", type=int, default=40_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stats-dir", default="/tmp/ffkv-bench-stats")
    ap.add_argument("--skip", default="", help="comma list of stats,rome,memit,small to skip")
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
    if "small" not in skip and a.n_small > 0:
        from pathlib import Path

        from ffkv.edit.stats import resolve_corpus

        small = gpt2_small_shape(Path(path))
        # statistics of the small shape over a stream of the testbed's text (both sides read the same C)
        texts = resolve_corpus(model, "auto")[1][:2000]
        ctx = EditContext(stats_dir=a.stats_dir, progress=False, corpus=texts)
        res["rome_gpt2_small_shape"] = bench_rome(small, reqs[: a.n_small], ctx, {"stats_tokens": a.stats_tokens})
        print(f"rome (GPT-2-small shape): {json.dumps(res['rome_gpt2_small_shape'])}", file=sys.stderr)
    print(json.dumps(res, indent=None if a.json else 2))


if __name__ == "__main__":
    main()
