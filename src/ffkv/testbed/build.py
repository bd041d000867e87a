"""Build a testbed folder (world data sets + trained model + recall report), and find the shipped default.

A testbed folder:

    DIR/model/              Hugging Face model folder (safetensors) with its tokenizer and testbed.json
    DIR/data/facts.jsonl    every fact with its training frequency and templates
    DIR/data/counterfact.json, DIR/data/known_facts.json, DIR/data/world.json
    DIR/data/index.sqlite   the world's texts as a retrieval index (``ffkv ask --index``; SQLite FTS5, BM25)
    DIR/report.json         recall by frequency bucket (written by build; `ffkv testbed report` recomputes)

``build`` writes the folder whole or not at all (:func:`ffkv.io.output_dir`): everything is made in a
temporary folder beside DIR and renamed in; an existing testbed at DIR is replaced, any other non-empty
folder (a model folder, a home directory) is refused before any work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import FfkvError
from ..io import output_dir, provenance, write_json
from ..models.loading import load_model
from ..recall.index import build_index, world_passages
from .datasets import load_facts

ASSETS = Path(__file__).parent / "assets"
TESTBED_MANIFEST = ("data/facts.jsonl", "model/testbed.json")  # what makes an existing folder a testbed
DEFAULT_SEED = 0


def build(preset: str = "default", out: str | Path = "testbed", seed: int = DEFAULT_SEED, arch: str = "gpt2",
          steps: int | None = None, report: bool = True, progress: bool = True, world=None) -> Path:
    """Generate the world for ``(seed, preset)``, write its data sets, train an ``arch`` model, report recall.

    Returns ``out``. ``world`` overrides the generated world (e.g. :func:`~ffkv.testbed.pararel.pararel_world`).
    """
    from .train import TRAIN_PRESETS, train_model
    from .world import generate_world

    if preset not in TRAIN_PRESETS:
        raise FfkvError(f"unknown testbed preset {preset!r}", f"use one of {', '.join(TRAIN_PRESETS)}")
    if arch not in ("gpt2", "llama"):
        raise FfkvError(f"unknown testbed architecture {arch!r}", "use --arch gpt2 or --arch llama")
    out = Path(out)
    # Refused (an unrelated folder, a second writer) before the world is generated or the model trained.
    with output_dir(out, "testbed", manifest=TESTBED_MANIFEST) as tmp:
        world = world or generate_world(seed, preset)
        world.write_datasets(tmp / "data")
        write_world_index(tmp, record_as=out)
        train_model(world, arch, preset, tmp / "model", seed=seed, steps=steps, progress=progress)
        if report:
            rep = testbed_report(tmp, progress=progress, record_as=out)
            write_json(tmp / "report.json", rep)
    return out


def write_world_index(testbed_dir: str | Path, record_as: str | Path | None = None) -> Path:
    """Index the world's texts (every fact through each of its training templates, never-seen facts
    included) as ``DIR/data/index.sqlite``, the index ``ffkv ask --index`` retrieves from."""
    d = Path(testbed_dir)
    facts, _ = load_facts(d)
    return build_index(world_passages(facts), d / "data" / "index.sqlite", testbed=str(record_as or d))


def testbed_report(testbed_dir: str | Path, n_samples: int = 10, max_facts_per_bucket: int | None = 1000,
                   templates_per_fact: int | None = 2, progress: bool = True,
                   record_as: str | Path | None = None) -> dict:
    """Load ``DIR/model`` through ``ffkv.load_model`` and run :func:`recall_report` on ``DIR/data``.

    record_as: the folder the provenance names (the final DIR when the report is made in its temporary)."""
    import torch

    from .report import recall_report

    d = Path(testbed_dir)
    if not (d / "model" / "config.json").exists():
        raise FfkvError(f"{d} is not a testbed folder (no model/config.json)",
                        "build one with `ffkv testbed build --out DIR`")
    facts, candidates = load_facts(d)
    torch.set_num_threads(min(torch.get_num_threads(), int(os.environ.get("FFKV_THREADS", "1"))))
    model = load_model(str(d / "model"))
    rep = recall_report(model, facts, candidates, n_samples=n_samples, max_facts_per_bucket=max_facts_per_bucket,
                        templates_per_fact=templates_per_fact, progress=progress)
    identity = dict(model.identity)
    if record_as is not None:
        identity["name_or_path"] = str(Path(record_as) / "model")
    rep["provenance"] = provenance(identity, n_samples=n_samples, max_facts_per_bucket=max_facts_per_bucket,
                                   templates_per_fact=templates_per_fact, testbed=str(record_as or d))
    return rep


def is_testbed(d: Path) -> bool:
    return all((d / p).exists() for p in ("model/config.json", "model/model.safetensors", "model/tokenizer.json",
                                          "data/facts.jsonl", "data/counterfact.json", "data/known_facts.json"))


def default_testbed(arch: str = "gpt2", build_if_missing: bool = True) -> Path:
    """Path of the shipped default testbed folder (``model/`` + ``data/``), building it if it is missing.

    The GPT-2 default ships at ``ffkv/testbed/assets/default``; the LLaMA one, when shipped, at
    ``assets/default-llama``. A missing one is built (about 30 minutes on 2 cores) into the package
    folder if writable, else into ``$FFKV_CACHE`` or ``~/.cache/ffkv/testbed``.
    """
    name = "default" if arch == "gpt2" else f"default-{arch}"
    shipped = ASSETS / name
    if is_testbed(shipped):
        return shipped
    cache = Path(os.environ.get("FFKV_CACHE", Path.home() / ".cache" / "ffkv")) / "testbed" / name
    if is_testbed(cache):
        return cache
    if not build_if_missing:
        raise FfkvError(f"the default {arch} testbed is not installed", "run `ffkv testbed build --preset default`")
    target = shipped if os.access(ASSETS if ASSETS.exists() else ASSETS.parent, os.W_OK) else cache
    print(f"ffkv: building the default {arch} testbed at {target} (once; about 30 minutes on 2 cores)",
          file=sys.stderr)
    return build("default", target, DEFAULT_SEED, arch)
