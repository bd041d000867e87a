"""``ffkv evaluate``: edit, measure, undo, over a CounterFact / zsRE file; or a sequential stress test.

Hyperparameters are read as ``ffkv edit`` reads them (:func:`ffkv.edit.cli.method_hparams`): the method's
defaults for the model, then ``--hparams JSON-or-FILE``, then ``--set key=value``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .. import validate
from ..clikit import (emit_json, hparams_options, json_option, load_model_from_options, model_options,
                      quiet_option, show_progress)
from ..edit.cli import method_hparams
from ..edit.registry import METHODS
from ..errors import FfkvError
from ..io import write_json, write_text
from ..testbed import default_testbed
from .datasets import load_cases, load_mquake, spread_subjects
from .metrics import generation_prompts
from .multihop import multihop_accuracy
from .run import evaluate_edits, table_rows
from .sequential import probe_pairs, sequential_edits


def _resolve_model_and_data(model: str, data: str | None) -> tuple[str, str]:
    """MODEL may be a model folder / hub name, a testbed folder (model/ + data/), or ``testbed``."""
    p = Path(model)
    if model == "testbed":
        p = Path(default_testbed(build_if_missing=False))
    if p.is_dir() and (p / "model").is_dir():
        if data is None and (p / "data" / "counterfact.json").exists():
            data = str(p / "data" / "counterfact.json")
        return str(p / "model"), data
    return model, data


@click.command("evaluate")
@click.argument("model")
@click.option("--data", "data", type=click.Path(exists=True), default=None,
              help="Edit cases: CounterFact (ROME or EasyEdit layout), zsRE (MEND layout), or a testbed's "
                   "counterfact.json. Default for a testbed MODEL: its data/counterfact.json.")
@click.option("--method", type=click.Choice(sorted(METHODS)), default="rome", show_default=True,
              help="The edit method (ffkv edit --help lists each with its hyperparameters).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate the first N cases.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Cases edited together (default: all for a batched method such as MEMIT, else 1).")
@click.option("--gen-prompts", type=click.IntRange(min=0), default=2, show_default=True,
              help="Generation prompts per case for fluency (0: skip GE).")
@click.option("--gen-tokens", type=click.IntRange(min=1), default=20, show_default=True,
              help="Greedy tokens per generation.")
@click.option("--stats-dir", type=click.Path(file_okay=False), default=None, help="Cache of key covariance statistics.")
@hparams_options
@click.option("--sequential", type=click.IntRange(min=1), default=None,
              help="Stress test: apply N edits one after another (MEMIT: --batch-size per step) and track "
                   "retention, neighborhood and fluency.")
@click.option("--every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Sequential: measure every K edits.")
@click.option("--probes", type=click.IntRange(min=0), default=50, show_default=True,
              help="Sequential: unedited cases (after the N edited ones) whose facts form the probe set.")
@click.option("--out", type=click.Path(), default=None,
              help="Per-case rows, in the format its extension names: .parquet, .csv, .json or .jsonl (.csv and "
                   ".jsonl with the provenance beside them in OUT.meta.json); with --sequential a folder for "
                   "curves + figure.")
@click.option("--multihop", is_flag=True,
              help="Read --data (default: ../shared/data/mquake) as MQuAKE and report multi-hop accuracy after "
                   "each case's edits (undone after each case).")
@json_option
@quiet_option
@model_options
def evaluate(model, data, method, limit, batch_size, gen_prompts, gen_tokens, stats_dir, hparams, settings,
             sequential, every, probes, out, multihop, as_json, quiet, **load):
    """Edit each case of a data set, measure ROME's CounterFact metrics (ES, PS, NS, S, GE, magnitudes)
    and EasyEdit's accuracies (reliability, generalization, locality) before and after, undo, repeat."""
    if multihop:
        if sequential is not None or out is not None:
            raise FfkvError("--multihop takes neither --sequential nor --out", "run them separately")
        cases = load_mquake(data, limit=limit)
        mm = load_model_from_options(model, **load)
        overrides, defaults = method_hparams(mm, method, hparams, settings)
        r = multihop_accuracy(mm, cases, method, {**defaults, **check_layer_settings(overrides, mm.n_layers)},
                              stats_dir=stats_dir, progress=show_progress(quiet))
        if as_json:
            emit_json(r)
        else:
            click.echo(json.dumps({k: v for k, v in r.items() if k not in ("cases", "provenance")}))
        return
    model_path, data = _resolve_model_and_data(model, data)
    if data is None:
        raise FfkvError("no edit data given", "pass --data FILE (CounterFact, zsRE or a testbed counterfact.json)")
    check_out(out, sequential is not None)
    n_needed = sequential + probes if sequential is not None else None
    # A sequential run reads every case and spreads subjects (datasets.spread_subjects), so that its edits
    # are of distinct subjects for as long as the data allows and no edit silently overwrites another.
    cases, info = load_cases(data, limit=None if sequential is not None else limit)
    if sequential is not None:
        cases = spread_subjects(cases)[:n_needed]
        info["order"] = "spread_subjects"
    mm = load_model_from_options(model_path, **load)
    overrides, defaults = method_hparams(mm, method, hparams, settings)
    overrides = check_layer_settings(overrides, mm.n_layers)
    hp = {**defaults, **overrides}
    progress = show_progress(quiet)
    if sequential is not None:
        _run_sequential(mm, cases, info, method, hp, stats_dir, sequential, batch_size or 1, every,
                        gen_prompts, gen_tokens, out, as_json, progress)
        return
    res = evaluate_edits(mm, cases, method=method, hparams=hp, stats_dir=stats_dir, batch_size=batch_size,
                         n_gen_prompts=gen_prompts, gen_tokens=gen_tokens, data_info=info, progress=progress)
    if out:
        write_rows(res, out)
        res.meta["rows_file"] = str(out)
    if as_json:
        emit_json(res.to_json())
        return
    t = Table(title=f"{method} on {info.get('path')} ({len(cases)} cases, {info['layout']} layout)")
    t.add_column("metric")
    t.add_column("pre-edit", justify="right")
    t.add_column("post-edit", justify="right")
    for row in table_rows(res.summary):
        t.add_row(*row)
    Console(file=sys.stdout).print(t)
    click.echo(f"edit time {res.meta['timing']['edit_seconds_per_case']:.2f} s/case"
               + (f"; rows in {out}" if out else ""))


ROW_FORMATS = (".parquet", ".csv", ".json", ".jsonl")


def check_out(out: str | None, sequential: bool) -> None:
    """``--out``: a row file whose extension names its format (:data:`ROW_FORMATS`), or with ``--sequential``
    a folder; refused before any work."""
    if out is None:
        return
    p = Path(out)
    if sequential:
        if p.suffix.lower() in ROW_FORMATS or p.is_file():
            raise FfkvError(f"--out {p.name}: --sequential writes a folder (curves and a figure), not a file",
                            "pass a folder name, e.g. --out sequential-rome")
        return
    if p.suffix not in ROW_FORMATS:
        raise FfkvError(f"--out {p.name}: unknown format ({p.suffix or 'no extension'})",
                        f"end the file name in {', '.join(ROW_FORMATS)}")
    if p.is_dir():
        raise FfkvError(f"--out {p} is a folder", "pass a file name")


def check_layer_settings(overrides: dict, n_layers: int) -> dict:
    """The ``layer`` / ``layers`` of ``--hparams`` / ``--set`` checked against the model (``"trace"`` and
    None are the methods' own choices); ``layers`` may be written as ``--layers`` is, "3-5" or "3,4,5"."""
    out = dict(overrides)
    top = f" (the model has {n_layers} layers)"
    if out.get("layer") not in (None, "trace"):
        try:
            out["layer"] = validate.integer(out["layer"], "hyperparameter layer", 0, n_layers - 1)
        except FfkvError as e:
            raise FfkvError(e.problem + (top if "out of range" in e.problem else ""), e.fix) from None
    if out.get("layers") is not None:
        v = out["layers"]
        if isinstance(v, str):
            out["layers"] = validate.layers(v, n_layers, option="hyperparameter layers")
        elif isinstance(v, (list, tuple)):
            try:
                out["layers"] = [validate.integer(x, "hyperparameter layer", 0, n_layers - 1) for x in v]
            except FfkvError as e:
                raise FfkvError(e.problem + (top if "out of range" in e.problem else ""), e.fix) from None
        else:
            raise FfkvError(f"hyperparameter layers must be a list of layers, got {v!r}", "e.g. --set layers=[3,4]")
    return out


def write_rows(res, out: str | Path) -> Path:
    """Per-case rows of an :class:`~ffkv.evaluate.run.EvalResult` in the format ``out``'s extension names.

    .parquet and .json: :meth:`EvalResult.write_rows` (provenance inside). .csv and .jsonl: the same rows (list
    cells as JSON text in CSV), written atomically, with the provenance in ``OUT.meta.json`` beside them.
    """
    out = Path(out)
    if out.suffix in (".parquet", ".json"):
        return res.write_rows(out)
    with tempfile.TemporaryDirectory(prefix="ffkv-rows-") as d:
        table = json.loads(res.write_rows(Path(d) / "rows.json").read_text())
    rows = table.pop("rows")
    if out.suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        fields = list(rows[0]) if rows else []
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
        text = buf.getvalue()
    write_json(out.with_name(out.name + ".meta.json"), table)
    return write_text(out, text)


def _run_sequential(mm, cases, info, method, hparams, stats_dir, n, batch_size, every, gen_prompts, gen_tokens,
                    out, as_json, progress):
    if len(cases) < n:
        raise FfkvError(f"the data has {len(cases)} usable cases, fewer than the {n} sequential edits asked",
                        "pass a smaller --sequential or a larger data file")
    edited, probe_cases = cases[:n], cases[n:]
    prompts = [p for c in probe_cases[:gen_prompts * 5] for p in generation_prompts(c)[:1]]
    res = sequential_edits(mm, edited, method=method, hparams=hparams, stats_dir=stats_dir,
                           batch_size=batch_size, every=every, probes=probe_pairs(probe_cases),
                           gen_prompts=prompts, gen_tokens=gen_tokens, progress=progress)
    res.meta["data"] = info
    if out:
        paths = res.write(out, title=f"sequential {method} on {mm.name_or_path}")
        res.meta["files"] = {k: str(v) for k, v in paths.items()}
    if as_json:
        emit_json(res.to_json())
        return
    t = Table(title=f"sequential {method}, {n} edits (batch {batch_size})")
    cols = ["n_edits", "retention_ES", "efficacy_at_edit", "retention_PS", "edited_NS", "probe_acc", "GE", "ppl"]
    heads = ["edits", "ES now", "ES when made", "PS now", "NS", "probe acc", "GE", "ppl"]
    for h in heads:
        t.add_column(h, justify="right")
    for r in res.curve:
        t.add_row(*(str(r[c]) if c == "n_edits" else f"{r[c]:.3f}" for c in cols))
    Console(file=sys.stdout).print(t)
    for level in ("onset", "collapse"):
        c = res.collapse[level]
        click.echo(f"{level}: first failure at {c['first']} edits "
                   f"(retention {c['retention_ES']}, probe {c['probe_acc']}, GE {c['GE']}, ppl {c['ppl']})")
