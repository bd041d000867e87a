"""``ffkv testbed``: build a world of known facts, train a small model on it, report its recall."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("testbed")
def testbed():
    """Worlds of known facts and small models trained on them (the ground truth for every method)."""


@testbed.command("build")
@click.option("--preset", type=click.Choice(["tiny", "default"]), default="default", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Testbed folder to write (model/, data/, report.json).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--arch", type=click.Choice(["gpt2", "llama"]), default="gpt2", show_default=True,
              help="gpt2: GELU FFN; llama: gated SiLU FFN.")
@click.option("--steps", type=int, default=None, help="Override the preset's training steps.")
@click.option("--pararel", "pararel", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Real world: T-REx facts rendered through PARAREL patterns from this folder "
                   "(e.g. ../shared/data/pararel).")
@click.option("--no-report", is_flag=True, help="Skip the recall report.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (paths and report).")
def build_cmd(preset, out, seed, arch, steps, pararel, no_report, as_json):
    """Generate the world, write its data sets, train the model, report recall."""
    from ..io import read_json
    from .build import build

    world = None
    if pararel is not None:
        from .pararel import pararel_world

        world = pararel_world(pararel, seed=seed, preset=preset)
    build(preset, out, seed, arch, steps=steps, report=not no_report, world=world)
    rep = read_json(out / "report.json") if not no_report else None
    if as_json:
        click.echo(json.dumps({"testbed": str(out), "model": str(out / "model"), "data": str(out / "data"),
                               "report": rep}))
        return
    click.echo(f"testbed written to {out}")
    if rep:
        from .report import format_table

        click.echo(format_table(rep))


@testbed.command("report")
@click.argument("testbed_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--samples", default=10, show_default=True, help="Samples per prompt at temperature 1.")
@click.option("--max-facts-per-bucket", default=1000, show_default=True,
              help="Seeded sample of facts per frequency bucket (0: all).")
@click.option("--templates-per-fact", default=2, show_default=True,
              help="Training templates scored per fact (0: all); every held-out template is scored.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def report_cmd(testbed_dir, samples, max_facts_per_bucket, templates_per_fact, as_json):
    """Recall of the testbed's facts by frequency bucket: training vs held-out templates, greedy vs sampled."""
    from .build import testbed_report
    from .report import format_table

    rep = testbed_report(testbed_dir, n_samples=samples, max_facts_per_bucket=max_facts_per_bucket or None,
                         templates_per_fact=templates_per_fact or None)
    if as_json:
        click.echo(json.dumps(rep))
    else:
        click.echo(format_table(rep))


@testbed.command("world")
@click.option("--preset", type=click.Choice(["tiny", "default", "incontext"]), default="default", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--text", is_flag=True, help="Also write the training text (train.txt).")
def world_cmd(preset, out, seed, text):
    """Write a world's data sets only (no training): facts.jsonl, counterfact.json, known_facts.json."""
    from ..io import write_text
    from .world import generate_world

    world = generate_world(seed, preset)
    paths = world.write_datasets(out)
    if world.context_facts:  # in-context preset: the subjects seen only in their profile document
        paths["context_facts"] = write_text(out / "context_facts.jsonl", "".join(
            json.dumps(f.to_json()) + "\n" for f in world.context_facts))
    if text:
        paths["text"] = write_text(out / "train.txt", world.training_text() + "\n")
    click.echo(json.dumps({k: str(v) for k, v in paths.items()} | {"summary": world.summary()}))


@testbed.command("default")
@click.option("--arch", type=click.Choice(["gpt2", "llama"]), default="gpt2", show_default=True)
def default_cmd(arch):
    """Print the path of the shipped default testbed (building it if missing)."""
    from .build import default_testbed

    click.echo(str(default_testbed(arch)))
