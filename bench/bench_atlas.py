"""Mining throughput against a plain forward pass over the same corpus, in the same run; peak memory.

    python bench/bench_atlas.py                       # testbed model + GPT-2-sized model, WikiText-2 valid
    python bench/bench_atlas.py --model PATH --tokens 20000 --repeats 3

For each model the same batches (same units, same padding) go through
    forward   model.hf(**batch)                          (the plain forward, LM head included)
    body      the transformer body without the LM head   (ffkv.models.engine.run, head="none": what mining runs)
    mine      body + coefficient reads of every layer + top-k/bottom-k merge (k=25, repeated prefixes once)
    mine_e2e  ffkv.memory.mine() end to end: tokenization, batching, checkpoints, Parquet output
timed alternately (repeats, median), on one thread. Ratios are mine / forward. The top-k buffers of "mine"
over the first --check-tokens tokens are then compared with the brute-force reference (ffkv.memory.oracle
.brute_force_triggers: every coefficient kept, one full sort per key): "equal" must be true. Peak memory is the
resident set size of a child process that runs only that mode, sampled while it runs, also given as the
increase over the process with the model loaded (so modes do not share a peak).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FFKV_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_CORPUS = SHARED / "text" / "wikitext-2" / "valid.txt"


def load(model_arg: str, tokenizer_from: str | None):
    """A MemoryModel: a model folder, or "gpt2-config" (GPT-2 small built from its config, random weights,
    with the tokenizer of ``tokenizer_from``: token ids stay below its vocabulary, which is all mining needs)."""
    import torch

    import ffkv
    from ffkv.models.loading import from_hf

    if model_arg == "gpt2-config":
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(n_positions=1024)).eval()
        tok = AutoTokenizer.from_pretrained(tokenizer_from)
        return from_hf(hf, tok, name_or_path="gpt2-config")
    return ffkv.load_model(model_arg)


def make_batches(model, corpus: str, tokens: int, window: int, batch_tokens: int):
    from ffkv.memory.corpus import CorpusSpec, iter_units
    from ffkv.memory.miner import batches, encode_units

    units, n = [], 0
    for u in iter_units(model.tokenizer, CorpusSpec(corpus, split="sentence", window=window)):
        units.append(u)
        n += len(u.tokens)
        if n >= tokens:
            break
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for b in batches(iter(units), batch_tokens, window):
        ids, mask, hashes = encode_units(b, pad, model.device, hashes=True)
        out.append((ids, mask, __import__("torch").tensor([u.unit for u in b]), hashes))
    return units, out, n


def run_mode(mode: str, model, batches, k: int):
    import torch

    from ffkv.memory.miner import batch_coefficients
    from ffkv.memory.topk import TriggerBuffers
    from ffkv.models.engine import run

    with torch.no_grad():
        if mode == "forward":
            for ids, mask, *_ in batches:
                model.hf(input_ids=ids, attention_mask=mask)
        elif mode == "body":
            for ids, mask, *_ in batches:
                run(model, ids, attention_mask=mask, head="none", stop_after=model.n_layers - 1)
        elif mode == "mine":
            buf = TriggerBuffers(model.n_layers, model.d_ffn, k, dedup=True)
            for ids, mask, uids, hashes in batches:
                coefs, gids, h = batch_coefficients(model, ids, mask, uids, hashes=hashes)
                for l, c in enumerate(coefs):
                    buf.update(c, gids, layer=l, hashes=h)
            return buf


def check_brute_force(model, args) -> dict:
    """Mining's top-k/bottom-k buffers over the first ``args.check_tokens`` tokens == the brute-force oracle."""
    import numpy as np

    from ffkv.memory.oracle import brute_force_triggers

    units, batches, n = make_batches(model, args.corpus, args.check_tokens, args.window, args.batch_tokens)
    k = min(args.k, n)
    buf = run_mode("mine", model, batches, k)
    ref = brute_force_triggers(model, units, top_k=k, batch_tokens=args.batch_tokens, dedup=True)
    d, equal = model.d_ffn, True
    for l in range(model.n_layers):
        rows = slice(l * d, (l + 1) * d)
        equal &= np.array_equal(buf.top_g[rows].cpu().numpy(), ref[l]["top"])
        equal &= np.array_equal(buf.bot_g[rows].cpu().numpy(), ref[l]["bottom"])
        equal &= np.array_equal(buf.top_v[rows].cpu().numpy(), ref[l]["top_coef"].astype(np.float32))
        equal &= np.array_equal(-buf.bot_v[rows].cpu().numpy(), ref[l]["bottom_coef"].astype(np.float32))
    return {"tokens": n, "top_k": k, "equal": bool(equal)}


class RssPeak:
    """Peak resident set size while the block runs, sampled from /proc/self/statm every 2 ms."""

    def __enter__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.before = self.now()
        self.peak = self.before
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.now())
            self.stop.wait(0.002)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.now())


def child(args):
    """One mode in this process: the RSS before it and its peak while it runs (for the memory figure)."""
    import torch

    torch.set_num_threads(1)
    model = load(args.model, args.tokenizer_from)
    batches = None
    if args.child != "mine_e2e":
        _, batches, _ = make_batches(model, args.corpus, args.tokens, args.window, args.batch_tokens)
    rss = RssPeak()
    with rss:
        if args.child == "mine_e2e":
            from ffkv.memory.miner import mine

            with tempfile.TemporaryDirectory() as d:
                mine(model, args.corpus, Path(d) / "a", top_k=args.k, batch_tokens=args.batch_tokens,
                     progress=False, window=args.window, max_units=args.max_units)
        else:
            run_mode(args.child, model, batches, args.k)
    print(json.dumps({"mode": args.child, "rss_before_mb": rss.before / 2**20, "peak_rss_mb": rss.peak / 2**20,
                      "peak_increase_mb": (rss.peak - rss.before) / 2**20}))


def bench_model(args, model_arg: str) -> dict:
    import torch

    from ffkv.memory.miner import mine

    torch.set_num_threads(1)
    model = load(model_arg, args.tokenizer_from)
    units, batches, n_tok = make_batches(model, args.corpus, args.tokens, args.window, args.batch_tokens)
    run_mode("forward", model, batches[:1], args.k)  # warm-up
    times = {m: [] for m in ("forward", "body", "mine", "mine_e2e")}
    for _ in range(args.repeats):
        for m in ("forward", "body", "mine"):
            t = time.perf_counter()
            run_mode(m, model, batches, args.k)
            times[m].append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            mine(model, args.corpus, Path(d) / "a", top_k=args.k, batch_tokens=args.batch_tokens, progress=False,
                 window=args.window, max_units=len(units))
            times["mine_e2e"].append(time.perf_counter() - t)
    med = {m: statistics.median(v) for m, v in times.items()}
    res = {"model": model_arg, "n_layers": model.n_layers, "d_model": model.d_model, "d_ffn": model.d_ffn,
           "vocab": model.vocab_size, "tokens": n_tok, "batches": len(batches), "top_k": args.k,
           "seconds": {m: round(v, 3) for m, v in med.items()},
           "tokens_per_s": {m: round(n_tok / v, 1) for m, v in med.items()},
           "ratio_mine_vs_forward": round(med["mine"] / med["forward"], 3),
           "ratio_mine_vs_body": round(med["mine"] / med["body"], 3),
           "ratio_mine_e2e_vs_forward": round(med["mine_e2e"] / med["forward"], 3),
           "buffer_mb": round(model.n_layers * model.d_ffn * args.k * 2 * 20 / 2**20, 2)}
    if args.check_tokens:
        res["brute_force"] = check_brute_force(model, args)
    if not args.no_memory:
        mem = {}
        for m in ("forward", "mine", "mine_e2e"):
            cmd = [sys.executable, __file__, "--child", m, "--model", model_arg, "--tokens", str(n_tok),
                   "--corpus", args.corpus, "--window", str(args.window), "--batch-tokens", str(args.batch_tokens),
                   "--k", str(args.k), "--max-units", str(len(units))]
            if args.tokenizer_from:
                cmd += ["--tokenizer-from", args.tokenizer_from]
            outp = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            mem[m] = json.loads(outp)
        res["peak_rss_mb"] = {m: round(v["peak_rss_mb"], 1) for m, v in mem.items()}
        res["peak_increase_over_loaded_model_mb"] = {m: round(v["peak_increase_mb"], 1) for m, v in mem.items()}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model folder or gpt2-config (repeatable)")
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--tokens", type=int, default=None, help="tokens per model (default 40000; 3000 for GPT-2 size)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer-from", default=None, help="tokenizer folder for gpt2-config")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--check-tokens", type=int, default=2000,
                    help="tokens of the brute-force equality check (0: skip it)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-units", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if not Path(args.corpus).exists():
        sys.exit(f"corpus {args.corpus} not found (set FFKV_SHARED_DATA or pass --corpus)")
    if args.child:
        args.model = args.model[0]
        child(args)
        return
    if not args.model:
        from ffkv.testbed.build import default_testbed

        try:
            tb = str(default_testbed(build_if_missing=False) / "model")
        except Exception as e:  # noqa: BLE001
            sys.exit(f"no default testbed ({e}); pass --model")
        args.model = [tb, "gpt2-config"]
        args.tokenizer_from = args.tokenizer_from or tb
    results = []
    for m in args.model:
        tokens = args.tokens or (3000 if m == "gpt2-config" else 40000)
        a = argparse.Namespace(**{**vars(args), "tokens": tokens})
        r = bench_model(a, m)
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
