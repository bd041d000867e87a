"""``ffkv testbed``: build a world of known facts, train a small model on it, report its recall."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..clikit import FfkvGroup, emit_json, json_option, quiet_option, show_progress
from ..io import output_dir, read_json, write_text
from .build import build, default_testbed, testbed_report
from .pararel import pararel_world
from .report import format_table
from .world import generate_world


WORLD_MANIFEST = ("facts.jsonl", "world.json")  # what makes an existing folder a world's data sets


@click.group("testbed", cls=FfkvGroup)
def testbed():
    """Worlds of known facts and small models trained on them (the ground truth for every method)."""


@testbed.command("build")
@click.option("--preset", type=click.Choice(["tiny", "default"]), default="default", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Testbed folder to write (model/, data/, report.json).")
@click.option("--seed", default=0, show_default=True, type=int, help="World and training seed.")
@click.option("--arch", type=click.Choice(["gpt2", "llama"]), default="gpt2", show_default=True,
              help="gpt2: GELU FFN; llama: gated SiLU FFN.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the preset's training steps.")
@click.option("--pararel", "pararel", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Real world: T-REx facts rendered through PARAREL patterns from this folder "
                   "(e.g. ../shared/data/pararel).")
@click.option("--no-report", is_flag=True, help="Skip the recall report.")
@json_option
@quiet_option
def build_cmd(preset, out, seed, arch, steps, pararel, no_report, as_json, quiet):
    """Generate the world, write its data sets, train the model, report recall."""
    world = pararel_world(pararel, seed=seed, preset=preset) if pararel is not None else None
    build(preset, out, seed, arch, steps=steps, report=not no_report, world=world, progress=show_progress(quiet))
    rep = read_json(out / "report.json") if not no_report else None
    if as_json:
        emit_json({"testbed": str(out), "model": str(out / "model"), "data": str(out / "data"), "report": rep})
        return
    click.echo(f"testbed written to {out}")
    if rep:
        click.echo(format_table(rep))


@testbed.command("report")
@click.argument("testbed_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--samples", type=click.IntRange(min=1), default=10, show_default=True,
              help="Samples per prompt at temperature 1.")
@click.option("--max-facts-per-bucket", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Seeded sample of facts per frequency bucket (0: all).")
@click.option("--templates-per-fact", type=click.IntRange(min=0), default=2, show_default=True,
              help="Training templates scored per fact (0: all); every held-out template is scored.")
@json_option
@quiet_option
def report_cmd(testbed_dir, samples, max_facts_per_bucket, templates_per_fact, as_json, quiet):
    """Recall of the testbed's facts by frequency bucket: training vs held-out templates, greedy vs sampled."""
    rep = testbed_report(testbed_dir, n_samples=samples, max_facts_per_bucket=max_facts_per_bucket or None,
                         templates_per_fact=templates_per_fact or None, progress=show_progress(quiet))
    if as_json:
        emit_json(rep)
    else:
        click.echo(format_table(rep))


@testbed.command("world")
@click.option("--preset", type=click.Choice(["tiny", "default", "incontext"]), default="default", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int, help="World seed.")
@click.option("--text", is_flag=True, help="Also write the training text (train.txt).")
def world_cmd(preset, out, seed, text):
    """Write a world's data sets only (no training): facts.jsonl, counterfact.json, known_facts.json.

    Prints one JSON object: the files written and the world's summary.
    """
    # One output, written whole: an existing world folder is replaced, any other non-empty folder refused
    # (and a second writer), before the world is generated.
    with output_dir(out, "world", manifest=WORLD_MANIFEST) as tmp:
        world = generate_world(seed, preset)
        paths = world.write_datasets(tmp)
        if world.context_facts:  # in-context preset: the subjects seen only in their profile document
            paths["context_facts"] = write_text(tmp / "context_facts.jsonl", "".join(
                json.dumps(f.to_json()) + "\n" for f in world.context_facts))
        if text:
            paths["text"] = write_text(tmp / "train.txt", world.training_text() + "\n")
    emit_json({k: str(out / Path(v).name) for k, v in paths.items()} | {"summary": world.summary()})


@testbed.command("default")
@click.option("--arch", type=click.Choice(["gpt2", "llama"]), default="gpt2", show_default=True)
def default_cmd(arch):
    """Print the path of the shipped default testbed (building it if missing)."""
    click.echo(str(default_testbed(arch)))
