"""Sequential editing stress test on a testbed: N edits one after another, curves and collapse points.

    python examples/sequential_stress.py run --testbed DIR --method rome --n 100 --every 10 --out runs/seq-rome
    python examples/sequential_stress.py run --testbed DIR --method memit --batch 10 --n 1000 --every 50 \
        --out runs/seq-memit
    python examples/sequential_stress.py plot runs/seq-rome runs/seq-memit --out runs/sequential.png

Cases are taken in ``spread_subjects`` order (each subject once before any twice: two edits of one subject
share a key, and the second overwrites the first). The first ``n`` cases are edited (ROME: one per step; MEMIT: ``--batch`` per step);
the next ``--probes`` cases are the fixed probe set of facts that are not edited. Curves are saved after every
measurement (curve.parquet, summary.json, curves.png under --out), so a long run killed half-way still
leaves its curve up to the last measurement. Run it in the background with one thread:

    OMP_WAIT_POLICY=PASSIVE nohup python examples/sequential_stress.py run ... > /tmp/seq.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args):
    import torch

    torch.set_num_threads(args.threads)
    import ffkv
    from ffkv.edit.hparams import parse_settings, resolve_hparams
    from ffkv.evaluate.datasets import load_cases, spread_subjects
    from ffkv.evaluate.metrics import generation_prompts
    from ffkv.evaluate.sequential import probe_pairs, sequential_edits
    from ffkv.testbed.build import default_testbed

    testbed = Path(args.testbed) if args.testbed else Path(default_testbed(build_if_missing=False))
    model = ffkv.load_model(str(testbed / "model"))
    if args.cases == "counterfact":
        cases, info = load_cases(testbed / "data" / "counterfact.json")
    else:
        # One case per subject (its most-mentioned fact) over the whole world, so that 1,000 and more edits
        # are of distinct subjects; facts seen rarely are included (an edit need not replace a known fact).
        from ffkv.evaluate.datasets import read_cases
        from ffkv.testbed.datasets import counterfact_cases
        from ffkv.testbed.world import generate_world

        world_file = testbed / "data" / "world.json"
        if not world_file.is_file():
            raise SystemExit(f"sequential_stress: error: {world_file} is missing: --cases subjects needs a testbed "
                             "built by ffkv (its data/world.json). Use --cases counterfact")
        world_info = json.loads(world_file.read_text())["summary"]
        records = counterfact_cases(generate_world(world_info["seed"], world_info["preset"]), min_count=1)
        best = {}
        for r in records:
            s = r["requested_rewrite"]["subject"]
            if s not in best or r["train_count"] > best[s]["train_count"]:
                best[s] = r
        cases, info = read_cases(list(best.values()))
        info["source"] = f"world {world_info['seed']}/{world_info['preset']}, one case per subject"
    cases = spread_subjects(cases)[:args.n + args.probes]
    info["order"] = "spread_subjects"
    if len(cases) < args.n + 1:
        raise SystemExit(f"only {len(cases)} cases in {testbed}")
    edited, probes = cases[:args.n], cases[args.n:]
    # overrides as `ffkv edit` reads them: an hparams file (JSON or YAML), then --set key=value
    hp = resolve_hparams(model, args.method, args.hparams, parse_settings(args.set))
    gen = [generation_prompts(c)[0] for c in probes[:args.gen_prompts]]
    out = Path(args.out)

    def save(res):
        res.meta["data"] = info
        res.write(out, title=f"sequential {args.method} (batch {args.batch}) on {testbed.name}")
        last = res.curve[-1]
        print(f"[{last['n_edits']:5d} edits, {last['seconds']:7.0f} s] retention ES {last['retention_ES']:.3f} "
              f"PS {last['retention_PS']:.3f} NS {last['edited_NS']:.3f} probe {last['probe_acc']:.3f} "
              f"GE {last['GE']:.3f} ppl {last['ppl']:.2f}", flush=True)

    res = sequential_edits(model, edited, method=args.method, hparams=hp, stats_dir=args.stats_dir,
                           batch_size=args.batch, every=args.every, probes=probe_pairs(probes),
                           gen_prompts=gen, gen_tokens=args.gen_tokens, on_measure=save, progress=True)
    res.meta["data"] = info
    paths = res.write(out, title=f"sequential {args.method} (batch {args.batch}) on {testbed.name}")
    print(json.dumps({"collapse": res.collapse, "files": {k: str(v) for k, v in paths.items()}}, indent=1))


def plot(args):
    import pyarrow.parquet as pq

    from ffkv.evaluate.sequential import SequentialResult, plot_curves

    results = {}
    for d in args.runs:
        d = Path(d)
        summary = json.loads((d / "summary.json").read_text())
        curve = pq.read_table(d / "curve.parquet").to_pylist()
        label = f"{summary.get('method')} b={summary.get('batch_size', 1)}"
        results[label] = SequentialResult(curve, [], summary.get("baseline", {}), summary.get("collapse", {}),
                                          {"method": summary.get("method")})
    path = plot_curves(results, args.out, title=args.title)
    print(path)


def main():
    from ffkv.edit.registry import METHODS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--testbed", default=None, help="testbed folder (default: the shipped default)")
    r.add_argument("--method", choices=list(METHODS), default="rome")
    r.add_argument("--n", type=int, default=100)
    r.add_argument("--cases", choices=["counterfact", "subjects"], default="counterfact",
                   help="counterfact: the testbed's counterfact.json (subjects spread); subjects: one case for "
                        "each of the world's subjects (enough distinct subjects for 1,000+ edits)")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--every", type=int, default=10)
    r.add_argument("--probes", type=int, default=100)
    r.add_argument("--gen-prompts", type=int, default=10)
    r.add_argument("--gen-tokens", type=int, default=20)
    r.add_argument("--stats-dir", default=None)
    r.add_argument("--hparams", default=None, help="hyperparameters: a .json/.yaml/.yml file or a JSON string")
    r.add_argument("--set", action="append", help="hyperparameter override key=value (value read as JSON)")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", required=True)
    p = sub.add_parser("plot")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default=None)
    args = ap.parse_args()
    from ffkv.errors import FfkvError

    try:
        run(args) if args.cmd == "run" else plot(args)
    except FfkvError as e:  # bad input (no model, no data): one line, not a traceback
        raise SystemExit(f"sequential_stress: error: {e.line()}") from None


if __name__ == "__main__":
    main()
