"""Every capability at real shapes on one device: tokens/s, ratio to a plain forward pass, peak memory.

Random models built from configs (no download) of GPT-2-XL's shape (48 x 1600, d_ffn 6400) and LLaMA-7B's
(32 x 4096, d_ffn 11008), in bf16, with the default testbed's tokenizer. For each capability the script times
a plain forward pass over the corpus in the same process, just before it, and prints

    shape   capability   seconds   tokens/s   x forward   peak GiB

``x forward`` is the capability's time over a plain forward pass's over the same tokens: the corpus (batched as
mining batches it) for mining and the statistics, the prompt alone (one row) for tracing, neurons and edits.
Rows: a plain forward pass; mining (``ffkv.memory.mine``); the statistics pass (``accumulate_second_moments``,
one layer); exact tracing (``causal_trace``, the three kinds) with its speed-up over ROME's per-cell loop
(``causal_trace_reference``, ``x_rome_loop``) and the largest difference of their grids; the approximate trace;
knowledge neurons on one prompt; a ROME edit; a MEMIT batch of 10 (small statistics samples, so the edit
itself is timed). Peak memory is ``torch.cuda.max_memory_allocated`` over the row (NaN on a CPU).

Batch sizes come from the free device memory (``torch.cuda.mem_get_info``, :func:`batch_plan`); a capability
that fails (e.g. out of memory) is recorded with its error and the run goes on, so it finishes unattended.

    python bench/bench_gpu.py --out bench-gpu.json               # gpt2-xl and llama-7b, bf16 on CUDA
    python bench/bench_gpu.py --smoke --out smoke.json           # the same code on tiny shapes on the CPU
    python bench/bench_gpu.py --budget-s 480 --out $OUT/gpu.json  # under a 10-minute limit: later rows skipped
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import ffkv  # noqa: E402
from ffkv.edit.api import apply_edits  # noqa: E402
from ffkv.edit.requests import EditRequest  # noqa: E402
from ffkv.edit.stats import accumulate_second_moments  # noqa: E402
from ffkv.io import atomic_path, provenance  # noqa: E402
from ffkv.locate.approx import approx_trace  # noqa: E402
from ffkv.locate.neurons import knowledge_neurons  # noqa: E402
from ffkv.locate.trace import causal_trace, causal_trace_reference  # noqa: E402
from ffkv.memory.miner import mine  # noqa: E402
from ffkv.models.engine import run  # noqa: E402
from ffkv.models.loading import from_hf  # noqa: E402
from ffkv.testbed import default_testbed  # noqa: E402

# family, n_layers, d_model, d_ffn
SHAPES = {
    "tiny-gpt2": ("gpt2", 2, 64, 256),
    "tiny-llama": ("llama", 2, 64, 172),
    "gpt2-small": ("gpt2", 12, 768, 3072),
    "gpt2-xl": ("gpt2", 48, 1600, 6400),
    "llama-7b": ("llama", 32, 4096, 11008),
}
PROMPT, SUBJECT, ANSWER = "The native language of Quoux Kurte is", "Quoux Kurte", " Dutch"
STATS_WINDOW = 16


def build(shape: str, tokenizer, device: str, dtype: torch.dtype):
    """A randomly initialised model of ``shape`` (seed 0) in ``dtype`` on ``device``, as a MemoryModel."""
    import transformers as T

    family, L, d, f = SHAPES[shape]
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = T.GPT2Config(n_layer=L, n_embd=d, n_head=max(1, d // 64), n_inner=f, vocab_size=len(tokenizer),
                           n_positions=1024, bos_token_id=0, eos_token_id=0)
        cls = T.GPT2LMHeadModel
    else:  # LLaMA: head dimension 128 (one head below that)
        h = max(1, d // 128)
        cfg = T.LlamaConfig(num_hidden_layers=L, hidden_size=d, intermediate_size=f, num_attention_heads=h,
                            num_key_value_heads=h, vocab_size=len(tokenizer), max_position_embeddings=2048)
        cls = T.LlamaForCausalLM
    with torch.device(device):
        hf = cls(cfg).to(dtype).eval()
    return from_hf(hf, tokenizer, name_or_path=f"random-{shape}")


def batch_plan(mm, device: str, share: float = 0.25) -> dict:
    """Batch sizes from the free device memory: ``share`` of it for the activations of one batch.

    Mining holds every layer's coefficients of a batch at once (n_layers x d_ffn values per token, plus the
    float32 copy of one layer that the top-k merge reads); the forward pass and the statistics batches use the
    same token budget. Tracing rows hold one prompt each (~ T x (4 d_model + d_ffn) values per layer while a
    layer runs). On a CPU: ffkv's defaults.
    """
    if not device.startswith("cuda"):
        return {"batch_tokens": 2048, "trace_rows": 400, "free_gib": None}
    free, _ = torch.cuda.mem_get_info()
    elem = torch.finfo(mm.dtype).bits // 8
    per_token = mm.n_layers * mm.d_ffn * elem + 2 * mm.d_ffn * 4
    tokens = int(max(512, min(131072, share * free / per_token)))
    per_row = 32 * (4 * mm.d_model + mm.d_ffn) * elem * 4
    rows = int(max(64, min(4096, share * free / per_row)))
    return {"batch_tokens": tokens, "trace_rows": rows, "free_gib": free / 2 ** 30}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    """(result, seconds, peak GiB) of ``fn()``; the peak is NaN off CUDA."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else float("nan")
    return out, time.perf_counter() - t, peak


def corpus_texts(n: int) -> list[str]:
    """``n`` sentences of the default testbed's facts: every training template of each fact in turn."""
    out = []
    with open(Path(default_testbed()) / "data" / "facts.jsonl") as fh:
        for line in fh:
            f = json.loads(line)
            for t in f["train_templates"]:
                out.append(f"{t.format(f['subject'])} {f['object']}.")
            if len(out) >= n:
                break
    return out[:n]


def bench_shape(shape: str, tok, device: str, dtype: torch.dtype, n_sentences: int, check_grids: bool,
                deadline: float = math.inf) -> dict:
    if time.perf_counter() > deadline:
        return {"skipped": "time budget (--budget-s) spent", "rows": []}
    mm = build(shape, tok, device, dtype)
    plan = batch_plan(mm, device)
    rows: list[dict] = []
    texts = corpus_texts(n_sentences)
    batch = mm.encode(texts)
    ids, mask = batch["input_ids"].to(mm.device), batch["attention_mask"].to(mm.device)
    n_tok = int(mask.sum())
    fwd_rows = max(1, plan["batch_tokens"] // ids.shape[1])

    p_ids = torch.tensor([mm.token_ids(PROMPT)], device=mm.device)
    p_tok = p_ids.shape[1]

    @torch.no_grad()
    def forward():
        for i in range(0, ids.shape[0], fwd_rows):
            run(mm, ids[i:i + fwd_rows], attention_mask=mask[i:i + fwd_rows], head="last")

    @torch.no_grad()
    def forward_prompt(repeat: int = 10):  # one prompt is too short to time once
        for _ in range(repeat):
            run(mm, p_ids, head="last")

    def reference(on: str) -> float:
        """Seconds of a plain forward pass over the capability's own tokens: the corpus or the prompt."""
        if on == "corpus":
            return timed(forward, device)[1]
        return timed(forward_prompt, device)[1] / 10

    def row(name, fn, on="corpus", tokens=None):
        if time.perf_counter() > deadline:  # unattended under a wall-clock limit: keep what was measured
            rows.append({"capability": name, "skipped": "time budget (--budget-s) spent"})
            print(f"{shape:>10} {name:<22} skipped: time budget spent", flush=True)
            return None
        t_f = reference(on)
        ref_tokens = tokens if tokens is not None else (n_tok if on == "corpus" else p_tok)
        if on == "corpus" and tokens is not None:
            t_f *= tokens / n_tok
        try:
            out, t, peak = timed(fn, device)
        except Exception as e:  # unattended: record it (an OOM at one shape must not lose the others)
            rows.append({"capability": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{shape:>10} {name:<22} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            return None
        x = t / t_f
        rows.append({"capability": name, "seconds": t, "tokens": ref_tokens, "tokens_per_s": ref_tokens / t,
                     "x_forward": x, "forward_over": on, "forward_seconds": t_f, "peak_gib": peak})
        print(f"{shape:>10} {name:<22} {t:8.3f} s {ref_tokens / t:10.0f} tok/s {x:9.2f} x fwd ({on}) "
              f"{peak:6.2f} GiB", flush=True)
        return out

    forward(), forward_prompt(2)  # warm-up: kernels, allocator
    row("forward", forward)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.txt").write_text("\n".join(texts) + "\n")
        row("mining", lambda: mine(mm, str(Path(tmp) / "corpus.txt"), Path(tmp) / "atlas",
                                   batch_tokens=plan["batch_tokens"], progress=False))
    L = mm.n_layers // 2
    win = ids[:, :STATS_WINDOW][mask[:, :STATS_WINDOW].all(1)]
    row("statistics (1 layer)", lambda: accumulate_second_moments(
        mm, win, [L], batch_size=max(1, plan["batch_tokens"] // STATS_WINDOW), progress=False),
        tokens=win.numel())
    for kind in ("hidden", "mlp", "attn"):
        ours = row(f"trace {kind}", lambda: causal_trace(mm, PROMPT, SUBJECT, kind=kind, seed=0,
                                                         max_rows=plan["trace_rows"]), on="prompt")
        if ours is None:
            continue
        ref, t_ref, _ = timed(lambda: causal_trace_reference(mm, PROMPT, SUBJECT, kind=kind, seed=0), device)
        rows[-1]["rome_loop_seconds"] = t_ref
        rows[-1]["x_rome_loop"] = t_ref / rows[-1]["seconds"]
        rows[-1]["max_diff_vs_rome"] = float(abs(ours.scores - ref.scores).max())
        print(f"{'':>10} {'':<22} ROME's loop {t_ref:.2f} s: ffkv {t_ref / rows[-1]['seconds']:.1f}x faster, "
              f"grids differ by {rows[-1]['max_diff_vs_rome']:.1e}", flush=True)
    row("approx trace (3 kinds)", lambda: approx_trace(mm, PROMPT, SUBJECT), on="prompt")
    row("neurons (1 prompt)", lambda: knowledge_neurons(mm, [PROMPT], ANSWER, check=False), on="prompt")
    stats_texts = texts[:64]
    req = [EditRequest("The native language of {} is", SUBJECT, " French")]
    with tempfile.TemporaryDirectory() as sd:
        j = row("ROME edit", lambda: apply_edits(mm, req, "rome", stats_dir=sd, corpus=stats_texts,
                                                 progress=False), on="prompt")
        reqs = [EditRequest("The native language of {} is", f"Person {i}", " French") for i in range(10)]
        row("MEMIT batch of 10", lambda: apply_edits(mm, reqs, "memit", stats_dir=sd, corpus=stats_texts,
                                                      journal=j, progress=False), on="prompt")
    if check_grids:
        bad = [r["capability"] for r in rows if r.get("max_diff_vs_rome", 0.0) > 1e-2]
        if bad:
            print(f"{shape}: grids differ from ROME's loop by more than 1e-2: {bad}", flush=True)
    res = {"model": mm.identity, "dtype": str(mm.dtype), "plan": plan, "corpus_tokens": n_tok,
           "prompt_tokens": p_tok, "rows": rows}
    del mm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--sentences", type=int, default=None, help="corpus sentences (default 4096; smoke 48)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the same code, in seconds")
    ap.add_argument("--out", type=Path, default=None, help="JSON of the results (rewritten after each shape)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock seconds after which the remaining rows are skipped (recorded as such)")
    args = ap.parse_args(argv)
    shapes = args.shapes or ("tiny-gpt2,tiny-llama" if args.smoke else "gpt2-xl,llama-7b")
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    sentences = args.sentences or (48 if args.smoke else 4096)
    dtype = getattr(torch, args.dtype)
    if device.startswith("cuda"):  # float32 rows mean float32 (no TF32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tok = ffkv.load_model(Path(default_testbed()) / "model").tokenizer
    results = {}
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s if args.budget_s else math.inf
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    for shape in shapes.split(","):
        results[shape] = bench_shape(shape, tok, device, dtype, sentences, check_grids=True, deadline=deadline)
        out = {"results": results, "device": dev, "torch": torch.__version__, "commit": git_commit(),
               "date": datetime.date.today().isoformat(), "seconds": time.perf_counter() - t0,
               "provenance": provenance(None, shapes=shapes, sentences=sentences, dtype=args.dtype,
                                        device=device, smoke=args.smoke, budget_s=args.budget_s)}
        if args.out:  # after each shape: a run cut short keeps the shapes it finished
            with atomic_path(args.out) as tmp:
                Path(tmp).write_text(json.dumps(out, indent=1, default=str))
    summary = {s: {r["capability"]: (round(r["x_forward"], 2) if "x_forward" in r
                                     else r.get("error", r.get("skipped", ""))[:40])
                   for r in v["rows"]} for s, v in results.items()}
    print(json.dumps(summary))
    failed = [(s, r["capability"]) for s, v in results.items() for r in v["rows"] if "error" in r]
    if failed:
        print(f"failed (recorded in the JSON): {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
