"""Scale versus frequency: does a larger model recall a rarely seen fact much better? (experiment, not a test)

Trains testbed models of several sizes on the *same* world (``generate_world(seed, "default")``) for the same
number of steps, then measures, for each size and each training-frequency bucket, recall from weights alone
(top-1 of the object's first token on held-out paraphrase templates, among the relation's candidates) next to
in-context accuracy (the fact stated in the prompt first, as the world's own sentences). Writes a results JSON
(with provenance) and ``docs/figures/recall_scale.png``.

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
         "4x128": dict(n_layer=4, d_model=128, n_head=4, d_ffn=512),
         "6x128": dict(n_layer=6, d_model=128, n_head=4, d_ffn=512)}


def train_sizes(out: Path, sizes: list[str], seed: int, steps: int | None):
    """Train one model per size on the default world with the default preset's schedule."""
    import torch

    from ffkv.testbed.train import TRAIN_PRESETS, train_model
    from ffkv.testbed.world import generate_world

    torch.set_num_threads(1)
    world = generate_world(seed, "default")
    for name in sizes:
        target = out / name / "model"
        if (target / "config.json").exists():
            print(f"{name}: already trained at {target}", flush=True)
            continue
        preset = replace(TRAIN_PRESETS["default"], **SIZES[name])
        print(f"{name}: training {preset}", flush=True)
        train_model(world, "gpt2", preset, target, seed=seed, steps=steps, threads=1)
        print(f"{name}: saved {target}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["train", "evaluate"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/recall-scale"))
    ap.add_argument("--sizes", default="2x64,4x128")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: the default preset's steps")
    ap.add_argument("--model", action="append", default=[], help="NAME=PATH of an already trained size")
    ap.add_argument("--max-facts", type=int, default=1500)
    ap.add_argument("--figure", type=Path, default=REPO / "docs" / "figures" / "recall_scale.png")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.stage == "train":
        train_sizes(args.out, args.sizes.split(","), args.seed, args.steps)
    else:
        evaluate_sizes(args)


if __name__ == "__main__":
    sys.exit(main())
