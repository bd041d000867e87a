"""``ffkv atlas mine`` and ``ffkv edit stats`` on one process and under ``torchrun`` (gloo), side by side, with
the results shown equal.

    python bench/bench_distributed.py                          # the default testbed model, its corpus, 2 ranks
    python bench/bench_distributed.py --nproc 4 --max-units 50000 --out figures.json
    python bench/bench_distributed.py --model PATH --corpus wikitext --device cuda --nproc 8

Each run is the CLI in fresh processes (one thread each, OMP_NUM_THREADS=1), so startup (imports, model load,
the group's rendezvous) counts on both sides:

    mine 1      ffkv atlas mine MODEL --corpus C --max-units U            (one process)
    mine N      torchrun --standalone --nproc_per_node N $(which ffkv) atlas mine ...  (N ranks, one atlas)
    stats 1/N   ffkv edit stats MODEL --layers L --texts T                (ROME/MEMIT's record sample)

Printed: wall seconds, the mining seconds of ``run.json`` (the slowest rank's, without startup), tokens per
second, the speed-up N-ranks / 1, and the checks: every trigger table and ``units.parquet`` equal byte for byte,
``atlas.json`` equal but for ``world_size``; C equal to 1e-6 relative with the same token counts. The speed-up
needs N free cores (or devices): on a machine with fewer, the ranks share them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "FFKV_PROGRESS": "0"}


def _run(args: list[str], nproc: int) -> tuple[float, subprocess.CompletedProcess]:
    head = [sys.executable, "-m", "ffkv.cli"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
         "ffkv.cli"]
    t = time.perf_counter()
    res = subprocess.run(head + args, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(head + args)}\n{res.stderr[-3000:]}")
    return wall, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "src" / "ffkv" / "testbed" / "assets" / "default" / "model"))
    ap.add_argument("--corpus", default="testbed")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--max-units", type=int, default=20_000)
    ap.add_argument("--top-k", type=int, default=25)
    ap.add_argument("--layers", default="2-3", help="layers of the statistics")
    ap.add_argument("--texts", type=int, default=5_000, help="records of the statistics sample")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    a = ap.parse_args()
    dev = ["--device", a.device] if a.device else []
    work = Path(tempfile.mkdtemp(prefix="ffkv-bench-dist-"))
    fig: dict = {"model": a.model, "corpus": a.corpus, "nproc": a.nproc, "max_units": a.max_units,
                 "top_k": a.top_k, "device": a.device or "cpu", "cpus": os.cpu_count()}
    try:
        runs = {}
        for n in (1, a.nproc):
            out = work / f"atlas-{n}"
            wall, _ = _run(["atlas", "mine", a.model, "--corpus", a.corpus, "--out", str(out), "--max-units",
                            str(a.max_units), "--top-k", str(a.top_k), "--threads", "1", *dev], n)
            meta = json.loads((out / "atlas.json").read_text())
            run = json.loads((out / "run.json").read_text())
            runs[n] = {"wall_s": round(wall, 2), "mining_s": run["seconds"], "tokens": meta["tokens"],
                       "tokens_per_s": round(meta["tokens"] / run["seconds"], 1), "world_size": meta["world_size"]}
        one, many = work / "atlas-1", work / f"atlas-{a.nproc}"
        files = sorted(p.relative_to(one) for p in one.rglob("*.parquet"))
        same = files == sorted(p.relative_to(many) for p in many.rglob("*.parquet")) and \
            all((one / f).read_bytes() == (many / f).read_bytes() for f in files)
        m1, mn = (json.loads((d / "atlas.json").read_text()) for d in (one, many))
        m1.pop("world_size"), mn.pop("world_size")
        fig["mine"] = {"1": runs[1], str(a.nproc): runs[a.nproc],
                       "speedup_wall": round(runs[1]["wall_s"] / runs[a.nproc]["wall_s"], 2),
                       "speedup_mining": round(runs[1]["mining_s"] / runs[a.nproc]["mining_s"], 2),
                       "tables_equal_bytes": same, "parquet_files": len(files), "atlas_json_equal": m1 == mn}

        import torch  # after the runs: the CLI processes are the measurement

        from ffkv.io import load_safetensors

        stats = {}
        for n in (1, a.nproc):
            wall, res = _run(["edit", "stats", a.model, "--layers", a.layers, "--corpus", a.corpus, "--texts",
                              str(a.texts), "--stats-dir", str(work / f"stats-{n}"), "--json", "--threads", "1",
                              *dev], n)
            stats[n] = (wall, json.loads(res.stdout)["layers"])
        rel, counts = 0.0, True
        for layer, s1 in stats[1][1].items():
            sn = stats[a.nproc][1][layer]
            c1, cn = load_safetensors(s1["path"])[0]["C"], load_safetensors(sn["path"])[0]["C"]
            rel = max(rel, float((cn - c1).abs().max() / c1.abs().max()))
            counts &= s1["n_tokens"] == sn["n_tokens"]
        fig["stats"] = {"layers": a.layers, "texts": a.texts, "tokens": next(iter(stats[1][1].values()))["n_tokens"],
                        "wall_s_1": round(stats[1][0], 2), f"wall_s_{a.nproc}": round(stats[a.nproc][0], 2),
                        "max_relative_difference": rel, "counts_equal": counts, "equal_1e-6": rel < 1e-6}
        fig["torch"] = torch.__version__
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mine = fig["mine"]
    print(f"mine   1 process: {mine['1']['wall_s']:7.2f} s wall, {mine['1']['mining_s']:7.2f} s mining, "
          f"{mine['1']['tokens_per_s']:9.1f} tok/s")
    mn = mine[str(a.nproc)]
    print(f"mine   {a.nproc} ranks  : {mn['wall_s']:7.2f} s wall, {mn['mining_s']:7.2f} "
          f"s mining, {mn['tokens_per_s']:9.1f} tok/s   speed-up {mine['speedup_wall']}x wall, "
          f"{mine['speedup_mining']}x mining")
    print(f"       tables equal byte for byte: {mine['tables_equal_bytes']} ({mine['parquet_files']} files), "
          f"atlas.json equal but world_size: {mine['atlas_json_equal']}")
    st = fig["stats"]
    print(f"stats  {st['tokens']} tokens of {st['texts']} texts, layers {st['layers']}: {st['wall_s_1']} s (1) vs "
          f"{st[f'wall_s_{a.nproc}']} s ({a.nproc}); max relative difference {st['max_relative_difference']:.2e}, "
          f"counts equal: {st['counts_equal']}")
    if a.out:
        a.out.write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
