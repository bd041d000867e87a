"""Every capability at real shapes on one device: tokens/s, ratio to a plain forward pass, peak memory.

Random models built from configs (no download) of GPT-2-XL's shape (48 x 1600) and LLaMA-7B's (32 x 4096,
d_ffn 11008), in bf16 on CUDA (float32 on CPU), with the default testbed's tokenizer. For each capability the
script times the same tokens through a plain forward pass in the same process, interleaved, and prints

    capability   seconds   tokens/s   x forward   peak GiB

mining (``ffkv.memory.mine`` over a synthetic corpus), the statistics pass (``accumulate_second_moments``, one
layer), exact tracing (``causal_trace``, the three kinds) with its ratio to ROME's per-cell loop
(``causal_trace_reference``) and the equality of their grids, the approximate trace, knowledge neurons on one
prompt, a ROME edit and a MEMIT batch (small statistics so the edit itself is timed). Run unattended:

    python bench/bench_gpu.py --shapes gpt2-xl,llama-7b --device cuda --out bench-gpu.json   # a few minutes on an H200
    python bench/bench_gpu.py --shapes tiny --device cpu                                      # the CPU smoke run
"""

from __future__ import annotations

import argparse
import json
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
from ffkv.io import provenance  # noqa: E402
from ffkv.locate.approx import approx_trace  # noqa: E402
from ffkv.locate.neurons import knowledge_neurons  # noqa: E402
from ffkv.locate.trace import causal_trace, causal_trace_reference  # noqa: E402
from ffkv.memory.miner import mine  # noqa: E402
from ffkv.models.engine import run  # noqa: E402
from ffkv.models.loading import from_hf  # noqa: E402
from ffkv.testbed import default_testbed  # noqa: E402

SHAPES = {
    "tiny": ("gpt2", 4, 128, 512),
    "gpt2-small": ("gpt2", 12, 768, 3072),
    "gpt2-xl": ("gpt2", 48, 1600, 6400),
    "llama-7b": ("llama", 32, 4096, 11008),
}
PROMPT, SUBJECT = "The native language of Quoux Kurte is", "Quoux Kurte"


def build(shape: str, tokenizer, device: str, dtype: torch.dtype):
    import transformers as T

    family, L, d, f = SHAPES[shape]
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = T.GPT2Config(n_layer=L, n_embd=d, n_head=max(1, d // 64), n_inner=f, vocab_size=len(tokenizer),
                           n_positions=1024, bos_token_id=0, eos_token_id=0)
        cls = T.GPT2LMHeadModel
    else:
        cfg = T.LlamaConfig(num_hidden_layers=L, hidden_size=d, intermediate_size=f, num_attention_heads=d // 128,
                            num_key_value_heads=d // 128, vocab_size=len(tokenizer), max_position_embeddings=2048)
        cls = T.LlamaForCausalLM
    with torch.device(device):
        hf = cls(cfg).to(dtype).eval()
    return from_hf(hf, tokenizer, name_or_path=f"random-{shape}")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else float("nan")
    return out, time.perf_counter() - t, peak


def corpus_texts(n: int) -> list[str]:
    facts = [json.loads(l) for l in open(Path(default_testbed()) / "data" / "facts.jsonl")][:n]
    return [f"{t.format(f['subject'])} {f['object']}." for f in facts for t in f["train_templates"][:1]]


def bench_shape(shape, tok, device, dtype, n_sentences):
    mm = build(shape, tok, device, dtype)
    rows = []
    texts = corpus_texts(n_sentences)
    batch = mm.encode(texts)
    ids, mask = batch["input_ids"].to(mm.device), batch["attention_mask"].to(mm.device)
    n_tok = int(mask.sum())

    @torch.no_grad()
    def forward():
        for i in range(0, ids.shape[0], 64):
            run(mm, ids[i:i + 64], attention_mask=mask[i:i + 64], head="last")

    def row(name, fn, ref_tokens=n_tok, extra=None):
        _, t_f, _ = timed(forward, device)
        out, t, peak = timed(fn, device)
        scale = ref_tokens / n_tok
        rows.append({"capability": name, "seconds": t, "tokens_per_s": ref_tokens / t,
                     "x_forward": t / (t_f * scale), "peak_gib": peak, **(extra or {})})
        print(f"{shape:>10} {name:<22} {t:8.2f} s {ref_tokens / t:10.0f} tok/s {t / (t_f * scale):7.2f} x fwd "
              f"{peak:6.2f} GiB", flush=True)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.txt").write_text("\n".join(texts) + "\n")
        row("mining", lambda: mine(mm, str(Path(tmp) / "corpus.txt"), Path(tmp) / "atlas", progress=False))
    L = mm.n_layers // 2
    win = ids[:, :16][mask[:, :16].all(1)]
    row("statistics (1 layer)", lambda: accumulate_second_moments(mm, win, [L], progress=False),
        ref_tokens=win.numel())
    p_tok = len(mm.token_ids(PROMPT))
    for kind in ("hidden", "mlp", "attn"):
        ours = row(f"trace {kind}", lambda: causal_trace(mm, PROMPT, SUBJECT, kind=kind, seed=0),
                   ref_tokens=p_tok)
        _, t_ref, _ = timed(lambda: causal_trace_reference(mm, PROMPT, SUBJECT, kind=kind, seed=0), device)
        ref = causal_trace_reference(mm, PROMPT, SUBJECT, kind=kind, seed=0) if shape == "tiny" else None
        rows[-1]["x_rome_loop"] = t_ref / rows[-1]["seconds"]
        if ref is not None:
            rows[-1]["max_diff_vs_rome"] = float(abs(ours.scores - ref.scores).max())
        print(f"{'':>10} {'':<22} ROME's loop {t_ref:.2f} s: ffkv {t_ref / rows[-1]['seconds']:.1f}x faster",
              flush=True)
    row("approx trace (3 kinds)", lambda: approx_trace(mm, PROMPT, SUBJECT), ref_tokens=p_tok)
    row("neurons (1 prompt)", lambda: knowledge_neurons(mm, [PROMPT], "Dutch", check=False), ref_tokens=p_tok)
    stats_texts = texts[:64]
    req = [EditRequest("The native language of {} is", SUBJECT, " French")]
    with tempfile.TemporaryDirectory() as sd:
        j = row("ROME edit", lambda: apply_edits(mm, req, "rome", stats_dir=sd, corpus=stats_texts,
                                                 progress=False), ref_tokens=p_tok)
        reqs = [EditRequest("The native language of {} is", f"Person {i}", " French") for i in range(10)]
        row("MEMIT batch of 10", lambda: apply_edits(mm, reqs, "memit", stats_dir=sd, corpus=stats_texts,
                                                      journal=j, progress=False), ref_tokens=p_tok)
    return mm, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="gpt2-xl,llama-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tok = ffkv.load_model(Path(default_testbed()) / "model").tokenizer
    results = {}
    for shape in args.shapes.split(","):
        mm, rows = bench_shape(shape, tok, args.device, dtype, args.sentences)
        results[shape] = {"model": mm.identity, "rows": rows}
        del mm
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = {"results": results, "device": dev,
           "provenance": provenance(None, shapes=args.shapes, sentences=args.sentences, dtype=str(dtype))}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({s: {r["capability"]: round(r["x_forward"], 2) for r in v["rows"]} for s, v in results.items()}))


if __name__ == "__main__":
    main()
