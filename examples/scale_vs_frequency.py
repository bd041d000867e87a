"""Scale versus frequency: does a larger model recall a rarely seen fact much better? (experiment, not a test)

Trains testbed models of several sizes on the *same* world (``generate_world(seed, "default")``) for the same
number of steps, then measures, for each size and each training-frequency bucket, recall from weights alone
(top-1 of the object's first token on held-out paraphrase templates, among the relation's candidates) next to
in-context accuracy (the fact stated in the prompt first, as the world's own sentences). Writes a results JSON
(with provenance) and ``docs/figures/recall_scale.png``.

``--world incontext`` trains and evaluates on the in-context world preset (profile documents that restate facts,
and people who appear only in their profile), so that reading facts from the context is rewarded in training;
``evaluate`` then also reports the same-frame in-context accuracy and, on the context-only people's own
training documents, accuracy at the statement against the restatement.

    OMP_WAIT_POLICY=PASSIVE nohup python examples/scale_vs_frequency.py train --out /tmp/recall-scale \
        > /tmp/recall-scale.log 2>&1 &
    python examples/scale_vs_frequency.py evaluate --out /tmp/recall-scale \
        --model 6x128=/path/to/default/testbed/model

The default size (6 x 128) is the shipped default testbed model, trained by the testbed with the same world,
steps and learning rate, so it is passed in with ``--model`` rather than trained again.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {"2x64": dict(n_layer=2, d_model=64, n_head=2, d_ffn=256),
         "4x64": dict(n_layer=4, d_model=64, n_head=2, d_ffn=256),
         "4x96": dict(n_layer=4, d_model=96, n_head=4, d_ffn=384),
         "4x128": dict(n_layer=4, d_model=128, n_head=4, d_ffn=512),
         "6x128": dict(n_layer=6, d_model=128, n_head=4, d_ffn=512)}


def train_sizes(out: Path, sizes: list[str], seed: int, steps: int | None, world_preset: str = "default",
                checkpoint_every: int | None = None):
    """Train one model per size on the same world with the default preset's schedule."""
    import torch

    from ffkv.testbed.train import TRAIN_PRESETS, train_model
    from ffkv.testbed.world import generate_world

    torch.set_num_threads(1)
    world = generate_world(seed, world_preset)
    for name in sizes:
        target = out / name / "model"
        if (target / "config.json").exists():
            print(f"{name}: already trained at {target}", flush=True)
            continue
        preset = replace(TRAIN_PRESETS["default"], **SIZES[name])
        print(f"{name}: training {preset}", flush=True)
        train_model(world, "gpt2", preset, target, seed=seed, steps=steps, threads=1,
                    checkpoint_every=checkpoint_every)
        print(f"{name}: saved {target}", flush=True)


def same_frame_accuracy(model, facts: list[dict], others: list[dict], candidates: dict[str, list[str]],
                        seed: int) -> dict[str, float]:
    """In-context accuracy when the query repeats the statement's own frame, by bucket.

    ``"X was born in Paris. <distractor> X was born in"`` -> Paris?  (the issue's example; the recall
    capability's table queries through a held-out frame instead, which needs paraphrase as well as copying)
    """
    import random
    from collections import defaultdict

    from ffkv.recall.incontext import batched_logits, statement, top1
    from ffkv.testbed.buckets import bucket_of

    rng = random.Random(f"scale-same-frame-{seed}")
    prompts, targets, cids, buckets = [], [], [], []
    cand_first = {r: [model.answer_id(o) for o in objs] for r, objs in candidates.items()}
    for f in facts:
        t = rng.choice(f["train_templates"])
        g = rng.choice([o for o in others if o["subject"] != f["subject"]])
        prompts.append(" ".join([statement(f, t), statement(g, rng.choice(g["train_templates"])),
                                 t.format(f["subject"])]))
        targets.append(model.answer_id(f["object"]))
        cids.append(cand_first[f["relation_id"]])
        buckets.append(bucket_of(int(f["train_count"])))
    vocab, _ = top1(batched_logits(model, prompts), targets, cids)
    by = defaultdict(list)
    for b, v in zip(buckets, vocab):
        by[b].append(bool(v))
    return {b: sum(v) / len(v) for b, v in by.items()}


def profile_restatement_accuracy(model, world, n: int, seed: int) -> dict[str, float]:
    """On context-only subjects' own training documents: top-1 of the object at its statement and at its
    restatement (the document up to the object). Copying shows as restatement >> statement."""
    import random

    import torch

    from ffkv.recall.incontext import batched_logits

    groups: dict[str, list] = {}
    for f in world.context_facts:
        groups.setdefault(f.subject, []).append(f)
    if not groups:
        return {}
    docs = world.documents()
    first, again, targets = [], [], []
    for s in random.Random(f"scale-profile-{seed}").sample(sorted(groups), min(n, len(groups))):
        d = next(d for d in docs if s in d)
        f = groups[s][0]
        i = d.index(f" {f.object}.", d.index(s))
        j = d.index(f" {f.object}.", d.index(s, i))
        first.append(d[:i])
        again.append(d[:j])
        targets.append(model.answer_id(f.object))
    t = torch.tensor(targets)
    return {"n": len(targets),
            "statement": float((batched_logits(model, first).argmax(-1) == t).float().mean()),
            "restatement": float((batched_logits(model, again).argmax(-1) == t).float().mean())}


def evaluate_sizes(args):
    """Recall by frequency bucket (weights) and in-context accuracy for every trained size; JSON + plot."""
    import json

    import torch

    import ffkv
    from ffkv.io import provenance, read_json, write_json
    from ffkv.recall.data import unseen_facts
    from ffkv.recall.incontext import in_context_table
    from ffkv.testbed.buckets import BUCKET_NAMES, stratified_facts
    from ffkv.testbed.world import generate_world

    torch.set_num_threads(1)
    world = generate_world(args.seed, args.world)
    facts = [f.to_json() for f in world.facts]
    context_only = [f.to_json() for f in world.context_facts]
    candidates = world.candidates
    per_bucket = max(1, args.max_facts // (len(BUCKET_NAMES) - 1))  # the seen buckets; "0" is the unseen
    chosen = stratified_facts(facts, per_bucket, args.seed)
    # Names are checked against the context-only subjects too, so "0" means never seen anywhere.
    unseen = unseen_facts(facts + context_only, candidates, args.unseen, args.seed)
    models = {name: args.out / name / "model" for name in args.sizes.split(",") if name}
    models.update(dict(m.split("=", 1) for m in args.model))
    results = {"world": world.summary(), "sizes": {},
               "provenance": provenance({}, seed=args.seed, world=args.world, facts_per_bucket=per_bucket,
                                        unseen=args.unseen, distractors=1,
                                        query="held-out template; same_frame: the statement's own template")}
    for name, path in models.items():
        path = Path(path)
        if not (path / "config.json").exists():
            print(f"{name}: no model at {path}, skipped", flush=True)
            continue
        model = ffkv.load_model(str(path))
        meta = read_json(path / "testbed.json") if (path / "testbed.json").exists() else {}
        tab = in_context_table(model, chosen, candidates, unseen=unseen, distractors=1, seed=args.seed,
                               progress=False)
        same = same_frame_accuracy(model, chosen + unseen, chosen, candidates, args.seed)
        for b, r in tab["buckets"].items():
            r["in_context_same_frame"] = same.get(b)
        results["sizes"][name] = {
            "model": model.identity, "path": str(path),
            "n_parameters": sum(p.numel() for p in model.hf.parameters()),
            "train_steps": (meta.get("hyperparameters", {}).get("train") or {}).get("steps"),
            "train_seconds": meta.get("train_seconds"), "final_loss": meta.get("final_loss"),
            "buckets": tab["buckets"],
            "context_only_profiles": profile_restatement_accuracy(model, world, args.unseen, args.seed)}
        print(name, json.dumps({b: [round(r[k], 3) for k in ("weights", "in_context", "in_context_same_frame",
                                                              "counterfactual_follows", "counterfactual_sticks")]
                                for b, r in tab["buckets"].items()}),
              results["sizes"][name]["context_only_profiles"], flush=True)
    out_json = args.figure.with_suffix(".json")
    write_json(out_json, results)
    plot_sizes(results, args.figure)
    print(f"wrote {out_json} and {args.figure}", flush=True)


def plot_sizes(results, figure: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ffkv.testbed.buckets import BUCKET_NAMES

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, r) in enumerate(sorted(results["sizes"].items(), key=lambda kv: kv[1]["n_parameters"])):
        names = [b for b in BUCKET_NAMES if b in r["buckets"]]
        x = np.arange(len(names))
        label = f"{name} ({r['n_parameters'] / 1e6:.2f}M)"
        ax.plot(x, [r["buckets"][b]["weights"] for b in names], marker="o", color=f"C{i}",
                label=f"{label}: from weights")
        ax.plot(x, [r["buckets"][b]["in_context"] for b in names], marker="s", ls="--", color=f"C{i}",
                label=f"{label}: in context")
        ax.set_xticks(x, names)
    ax.set_xlabel("times the fact was seen in training (0 = invented subject)")
    ax.set_ylabel("top-1 accuracy, held-out paraphrase")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("Scale vs frequency: recall from weights by model size, and in context", fontsize=9)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["train", "evaluate"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/recall-scale"))
    ap.add_argument("--sizes", default="2x64,4x128")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", default="default", choices=["default", "incontext", "incontext-dense"],
                    help="the world preset: incontext adds profile documents that restate facts")
    ap.add_argument("--checkpoint-every", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="default: the default preset's steps")
    ap.add_argument("--model", action="append", default=[], help="NAME=PATH of an already trained size")
    ap.add_argument("--max-facts", type=int, default=1500)
    ap.add_argument("--unseen", type=int, default=100, help="invented, never-seen subjects (bucket 0)")
    ap.add_argument("--figure", type=Path, default=REPO / "docs" / "figures" / "recall_scale.png")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.stage == "train":
        train_sizes(args.out, args.sizes.split(","), args.seed, args.steps, args.world, args.checkpoint_every)
    else:
        evaluate_sizes(args)


if __name__ == "__main__":
    sys.exit(main())
