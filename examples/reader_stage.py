"""A reading stage for a testbed model: continued training that teaches it to copy facts from its context.

The default testbed model recalls facts from its FFN memories but never reads a fact stated in its prompt: its
training text never rewards copying (docs/recall.md, section 4). This stage continues training with three kinds
of windows in every batch:

    world documents        the original training text (keeps the stored facts in use)
    reading episodes       fresh invented subjects whose facts are stated and asked again (ffkv.testbed.episodes)
    repeated sequences     random tokens repeated: the canonical curriculum for induction heads (copying)

Measured run (docs/recall.md, section 4d): from the shipped default model, phase 1 = 2,500 steps at a constant
lr 1e-3 with 8 episode and 12 repeat windows of 32 (induction accuracy 0.00 -> 0.95, the jump between steps 1,200
and 2,100), then phase 2 = 1,000 steps with lr decaying 1e-3 -> 1e-4 (cosine) and 6 + 6 windows, to give the
world's facts back some of the weight. Two threads, about 0.54 s per step.

    python examples/reader_stage.py train --init src/ffkv/testbed/assets/default/model --steps 2500 \\
        --schedule constant --episodes 8 --repeats 12 --out runs/reader-1
    python examples/reader_stage.py train --init runs/reader-1 --steps 1000 --schedule cosine \\
        --episodes 6 --repeats 6 --out runs/reader-2
    python examples/reader_stage.py evaluate runs/reader-2 src/ffkv/testbed/assets/default/model \\
        --out runs/reader-incontext.json --figure runs/reader-incontext.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def train(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ffkv.io import atomic_path, provenance
    from ffkv.models.loading import weights_fingerprint
    from ffkv.testbed.episodes import EpisodeWriter, episode_windows, induction_accuracy, repeated_sequences
    from ffkv.testbed.train import sample_batch, token_stream
    from ffkv.testbed.world import generate_world

    if not (Path(args.init) / "config.json").is_file():
        raise SystemExit(f"reader_stage: error: {args.init} is not a model folder (no config.json). "
                         "Pass a trained testbed model, e.g. src/ffkv/testbed/assets/default/model")
    if args.steps < 1 or args.episodes < 0 or args.repeats < 0:
        raise SystemExit("reader_stage: error: --steps must be positive and --episodes, --repeats not negative")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.init)
    model = AutoModelForCausalLM.from_pretrained(args.init)
    model.train()
    init_fingerprint = weights_fingerprint(model)
    world = generate_world(args.world_seed, args.world)
    stream = token_stream(tok, world.documents())
    writer = EpisodeWriter(world, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    B, T, V = args.batch, args.context, len(tok)
    n_world = B - args.episodes - args.repeats
    if n_world < 1:
        raise SystemExit(f"reader_stage: error: --episodes + --repeats must leave world windows in a batch of {B}. "
                         "Pass fewer episode or repeat windows")
    log = []
    t0 = time.time()
    for step in range(args.steps):
        f = min(1.0, (step + 1) / args.warmup)
        if args.schedule == "cosine":
            f *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = args.lr * f
        xs, ys = zip(sample_batch(stream, T, n_world, gen),
                     *([episode_windows(writer, tok, args.episodes, T)] if args.episodes else []),
                     *([repeated_sequences(args.repeats, T, V, gen)] if args.repeats else []))
        x, y = torch.cat(xs), torch.cat(ys)
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            ind = induction_accuracy(model, V)
            log.append({"step": step, "loss": round(loss.item(), 4), "induction_accuracy": round(ind, 4),
                        "seconds": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    meta = provenance({"name": "ffkv-testbed-reader", "init": str(args.init), "init_fingerprint": init_fingerprint},
                      **{k: v for k, v in vars(args).items() if k != "func"})
    meta["log"] = log
    with atomic_path(args.out, is_dir=True) as out:  # the folder appears whole or not at all
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        (out / "reader.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(args.out)


def evaluate(args):
    import torch

    import ffkv
    from ffkv.io import atomic_path, provenance, write_json
    from ffkv.recall.data import unseen_facts
    from ffkv.recall.incontext import in_context_table
    from ffkv.testbed.buckets import stratified_facts
    from ffkv.testbed.build import default_testbed
    from ffkv.testbed.datasets import load_facts
    from ffkv.testbed.episodes import induction_accuracy

    if args.per_bucket < 1:
        raise SystemExit("reader_stage: error: --per-bucket must be at least 1")
    torch.set_num_threads(args.threads)
    facts, cand = load_facts(args.testbed or default_testbed(build_if_missing=False))
    chosen = stratified_facts(facts, args.per_bucket, args.seed)
    unseen = unseen_facts(facts, cand, args.per_bucket, args.seed)
    results = {}
    for path in args.models:
        m = ffkv.load_model(str(path))
        t = in_context_table(m, chosen, cand, unseen=unseen, seed=args.seed, progress=False)
        results[str(path)] = {"identity": m.identity, "induction_accuracy": induction_accuracy(m.hf, m.vocab_size),
                              "buckets": t["buckets"]}
        print(path, f"induction {results[str(path)]['induction_accuracy']:.3f}")
        for b, v in t["buckets"].items():
            print(f"  {b:>6} n={v['n']:3d} weights {v['weights']:.2f} in context {v['in_context']:.2f} "
                  f"counterfactual followed {v['counterfactual_follows']:.2f} kept {v['counterfactual_sticks']:.2f}")
    write_json(args.out, {"results": results, "provenance": provenance(
        None, per_bucket=args.per_bucket, seed=args.seed, models=[str(p) for p in args.models])})
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
        for ax, (path, r) in zip(axes[0], results.items()):
            names = list(r["buckets"])
            for key, label, style in (("weights", "from weights", "o-"), ("in_context", "in context", "s-"),
                                      ("counterfactual_follows", "counterfactual context followed", "^--")):
                ax.plot(names, [r["buckets"][b][key] for b in names], style, label=label)
            ax.set_title(f"{Path(path).name} (induction {r['induction_accuracy']:.2f})")
            ax.set_xlabel("times the fact was seen in training")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("top-1 accuracy (held-out query)")
        fig.tight_layout()
        with atomic_path(args.figure) as tmp:
            fig.savefig(tmp, dpi=120, format=Path(args.figure).suffix.lstrip(".") or "png")
        print(args.figure)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--init", required=True, help="a trained testbed model folder")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=2500)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    t.add_argument("--episodes", type=int, default=8, help="reading-episode windows per batch")
    t.add_argument("--repeats", type=int, default=12, help="repeated-random-sequence windows per batch")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--context", type=int, default=128)
    t.add_argument("--world", default="default")
    t.add_argument("--world-seed", type=int, default=0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    e = sub.add_parser("evaluate")
    e.add_argument("models", nargs="+", type=Path)
    e.add_argument("--testbed", type=Path, default=None, help="facts of this testbed (default: the shipped one)")
    e.add_argument("--per-bucket", type=int, default=60)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--out", required=True)
    e.add_argument("--figure", default=None)
    args = ap.parse_args()
    from ffkv.errors import FfkvError

    try:
        train(args) if args.cmd == "train" else evaluate(args)
    except FfkvError as e:  # bad input (a model ffkv cannot load, a folder that is not a testbed): one line
        raise SystemExit(f"reader_stage: error: {e.line()}") from None
    except OSError as e:
        raise SystemExit(f"reader_stage: error: cannot read {e.filename or e}. Check the paths given") from None


if __name__ == "__main__":
    main()
