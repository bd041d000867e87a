"""What the load-time checks of ``ffkv.load_model`` cost (``ffkv.models.integrity``), beside the load itself.

On a randomly initialised model of GPT-2 small's shape (``transformers.GPT2Config()`` defaults: 12 x 768,
d_ffn 3072, 50,257 vocabulary rows; 124 M parameters), saved as one safetensors file:

- ``check_checkpoint``: the safetensors header and every tensor's byte range (reads the header only);
- the shape check against the model built from config.json on the ``meta`` device;
- ``nonfinite_weights``: one ``sum`` per tensor (``isfinite`` only where the sum is not finite), beside the
  plain ``isfinite(W).all()`` per tensor it replaces, on the loaded float32 weights;
- ``from_pretrained`` alone and ``ffkv.load_model`` whole (checks, load, adapter check), best of ``--repeat``.

    python bench/bench_load_integrity.py [--layers 12] [--repeat 3] [--out FILE.json]

One thread. Every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, GPT2Config
    from transformers.initialization import no_init_weights
    from transformers.utils import logging as hf_logging

    import ffkv
    from ffkv.io import provenance
    from ffkv.models.integrity import check_checkpoint, check_shapes, nonfinite_weights

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config = GPT2Config(n_layer=args.layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-small-shape"
        model.save_pretrained(folder, safe_serialization=True)
        size = (folder / "model.safetensors").stat().st_size
        del model
        ck = check_checkpoint(folder)
        t_header = best(lambda: check_checkpoint(folder), args.repeat)
        def shapes():
            with torch.device("meta"), no_init_weights():  # as ffkv.models.loading builds it
                check_shapes(ck, AutoModelForCausalLM.from_config(config), folder)

        t_shapes = best(shapes, args.repeat)
        t_load = best(lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), args.repeat)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert nonfinite_weights(hf) == []
        t_scan = best(lambda: nonfinite_weights(hf), args.repeat)
        t_isfinite = best(lambda: [bool(torch.isfinite(p).all()) for p in hf.parameters()], args.repeat)
        t_whole = best(lambda: ffkv.load_model(folder, tokenizer=False), args.repeat)
    checks = t_header + t_shapes + t_scan
    result = {
        "model": f"random GPT2Config(n_layer={args.layers}) (GPT-2 small shape), {n_params:,} parameters, "
                 f"{size / 1e6:.0f} MB safetensors",
        "threads": 1, "repeat": args.repeat,
        "seconds": {"header_and_byte_ranges": t_header, "shapes_vs_meta_model": t_shapes,
                    "nonfinite_scan_sum": t_scan, "nonfinite_scan_isfinite_all": t_isfinite,
                    "from_pretrained": t_load, "load_model_whole": t_whole},
        "checks_share_of_load_model": checks / t_whole,
        "scan_sum_vs_isfinite": t_scan / t_isfinite,
        "scan_gb_per_s": n_params * 4 / t_scan / 1e9,
        "provenance": provenance({"model": "random GPT-2 small shape"}, layers=args.layers, repeat=args.repeat),
    }
    for k, v in result["seconds"].items():
        print(f"{k:32s} {v * 1e3:9.1f} ms")
    print(f"checks (header + shapes + scan) = {checks * 1e3:.1f} ms = {result['checks_share_of_load_model']:.1%} of "
          f"load_model; sum scan / isfinite scan = {result['scan_sum_vs_isfinite']:.2f}; "
          f"scan {result['scan_gb_per_s']:.1f} GB/s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
