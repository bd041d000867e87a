"""``ffkv edit``: edit facts (every method of :data:`ffkv.edit.registry.METHODS`), undo edits, precompute statistics.

    ffkv edit MODEL --method rome --prompt "{} is located in" --subject "Eiffel Tower" --target Rome --out DIR
    ffkv edit MODEL --method memit --requests FILE --hparams memit.yaml --set mom2_update_weight=1000 --out DIR
    ffkv edit undo DIR --out DIR2
    ffkv edit stats MODEL --layers 1-3

``ffkv edit MODEL ...`` is ``ffkv edit apply MODEL ...``: a first argument that is not a sub-command is the model.
The methods, their hyperparameters and what each means come from the registry, so ``ffkv edit --help`` lists
a new method as soon as it is registered.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..clikit import (FfkvGroup, emit_json, hparams_options, json_option, layers_option, load_model_from_options,
                      model_options, parse_layers, parse_settings, quiet_option, show_progress)
from ..errors import FfkvError
from ..io import check_output_target
from ..models import distributed
from ..models.loading import tiny_model
from ..models.memory_id import MemoryId
from .api import EDIT_MANIFEST, apply_edits, edit_outcome, save_edited, target_scores, undo_folder
from .hparams import load_hparams
from .kn_edit import erase_relation
from .registry import METHODS, get_method
from .requests import EditRequest, load_requests, target_ids
from .stats import layer_stats


# ------------------------------------------------------------------------------------ hyperparameters
def method_hparams(model, method: str, hparams: str | None = None, settings=(), layer: str | None = None
                   ) -> tuple[dict, dict]:
    """``(overrides, defaults)`` of ``method`` on ``model``: ``--hparams`` (JSON, or a .json/.yaml/.yml file,
    read by :func:`ffkv.edit.hparams.load_hparams`), then ``--set key=value``, then ``--layer``; later wins.

    A name that is not one of the method's hyperparameters is one FfkvError naming the known ones, before
    any work. ``ffkv edit`` and ``ffkv evaluate`` both read their hyperparameters through here.
    """
    defaults = get_method(method).defaults(model)
    overrides = {**(load_hparams(hparams) if hparams else {}), **parse_settings(settings),
                 **_layer_overrides(defaults, method, layer, model.n_layers)}
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise FfkvError(f"unknown {method} hyperparameter(s): {', '.join(unknown)}",
                        f"known: {', '.join(sorted(defaults))} (see ffkv edit --help)")
    return overrides, defaults


class _PerModel:
    def __repr__(self):
        return "per model"


PER_MODEL = _PerModel()  # a default that depends on the model (e.g. the edited layer)


def static_defaults(method: str) -> dict:
    """The defaults of ``method`` that hold on every model: each name's default on two tiny models of
    different family and depth, or :data:`PER_MODEL` where they differ."""
    spec = get_method(method)
    a = spec.defaults(tiny_model("gpt2", n_layers=4, check=False))
    b = spec.defaults(tiny_model("llama", n_layers=8, check=False))
    return {k: (a[k] if k in b and b[k] == a[k] else PER_MODEL) for k in a}


def _methods_help(formatter: click.HelpFormatter) -> None:
    with formatter.section("Methods (--method) and their hyperparameters (--hparams, --set)"):
        for name in sorted(METHODS):
            spec = METHODS[name]
            formatter.write_text(f"{name}: {spec.summary}" + (" [batched]" if spec.batched else ""))
            defaults = static_defaults(name)
            rows = []
            for key in sorted(set(spec.hparam_docs) | set(defaults)):
                doc = spec.hparam_docs.get(key, "")
                rows.append((key, f"{doc} [default: {defaults[key]!r}]" if key in defaults else doc))
            with formatter.indentation():
                formatter.write_dl(rows)
            formatter.write_paragraph()


class DefaultToApply(FfkvGroup):
    """A group whose first argument, when it is not a sub-command name, is the MODEL of ``apply``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["apply", *args]
        return super().parse_args(ctx, args)

    def format_epilog(self, ctx, formatter):
        _methods_help(formatter)


class ApplyCommand(click.Command):
    def format_epilog(self, ctx, formatter):
        _methods_help(formatter)


@click.group("edit", cls=DefaultToApply)
def edit():
    """Edit a fact in MODEL (ROME, MEMIT, knowledge neurons, ...), or undo an edit.

    \b
    ffkv edit MODEL --method rome --prompt "{} is located in" --subject "Eiffel Tower" --target Rome --out DIR
    ffkv edit undo DIR --out DIR2
    Options of an edit: ffkv edit apply --help.
    """


def _layer_overrides(defaults: dict, method: str, text: str | None, n_layers: int) -> dict:
    """``--layer`` as the method's own hyperparameter: ``layer`` (one layer, or ``trace``) or ``layers``."""
    if text is None:
        return {}
    if "layer" in defaults:
        if text.strip() == "trace":
            return {"layer": "trace"}
        layers = parse_layers(text, n_layers, option="--layer")
        if len(layers) != 1:
            raise FfkvError(f"{method} edits one layer, --layer {text!r} names {len(layers)}",
                            "pass one layer, or 'trace' to pick it by causal tracing")
        return {"layer": layers[0]}
    if "layers" in defaults:
        if text.strip() == "trace":
            raise FfkvError(f"--layer trace picks one layer; {method} edits a list of layers",
                            "pass layers, e.g. --layer 3-8")
        return {"layers": parse_layers(text, n_layers, option="--layer")}
    raise FfkvError(f"{method} has no layer hyperparameter", "leave out --layer")


def entry_memories(entry) -> list[str]:
    """The memories a journal entry changed, when its method records them (``info["neurons"]``: indices in
    the entry's layer, or memory names), as ``L<layer>.<index>``."""
    out = []
    for n in entry.info.get("neurons", []) or []:
        out.append(str(MemoryId(entry.layer, n) if isinstance(n, int) else MemoryId.parse(n)))
    return out


@edit.command("apply", cls=ApplyCommand)
@click.argument("model")
@click.option("--method", type=click.Choice(sorted(METHODS)), default="rome", show_default=True,
              help="The edit method (see the list below).")
@click.option("--prompt", default=None, help="Prompt template with {} for the subject.")
@click.option("--subject", default=None, help="The subject, as it fills {} in the prompt.")
@click.option("--target", default=None,
              help="New object, e.g. Rome (a leading space is implied: Rome and ' Rome' are one target).")
@click.option("--target-true", default=None, help="The current object (optional; KN edits start from it).")
@click.option("--requests", "requests_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="JSON/JSONL of requests (prompt, subject, target) or CounterFact records.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N requests of --requests.")
@click.option("--layer", "layers", default=None, metavar="LAYER|LIST|trace",
              help="The edited layer (one-layer methods; 'trace' picks the peak of `ffkv trace --kind mlp`) or "
                   "layers ('3-8' or '3,4,5'); sets the method's layer / layers hyperparameter.")
@hparams_options
@click.option("--stats-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache of the key statistics (default $FFKV_STATS_DIR or ~/.cache/ffkv/stats).")
@click.option("--corpus", default=None, help="Corpus of the statistics: auto, wikitext, or a text file/folder.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Writes OUT/model (the edited model) and OUT/journal.")
@json_option
@quiet_option
@model_options
def apply_cmd(model, method, prompt, subject, target, target_true, requests_file, limit, layers, hparams, settings,
              stats_dir, corpus, out, as_json, quiet, **load):
    """Edit MODEL and write OUT/model and OUT/journal.

    Hyperparameters: the method's defaults for MODEL, then --hparams, then --set, then --layer.
    """
    check_output_target(out, "edit", EDIT_MANIFEST)  # an unrelated --out is refused before any work
    if requests_file is not None:
        requests = load_requests(requests_file)[:limit]
    else:
        if prompt is None or subject is None or target is None:
            raise FfkvError("an edit needs --prompt, --subject and --target (or --requests FILE)",
                            "e.g. --prompt '{} is located in' --subject 'Eiffel Tower' --target Rome")
        requests = [EditRequest(prompt, subject, target, target_true)]
    for r in requests:
        r.validate()
    mm = load_model_from_options(model, **load)
    overrides, _ = method_hparams(mm, method, hparams, settings, layers)
    before = target_scores(mm, requests)
    journal = apply_edits(mm, requests, method=method, hparams=overrides, stats_dir=stats_dir, corpus=corpus,
                          progress=show_progress(quiet))
    outcome = edit_outcome(before, target_scores(mm, requests), requests)
    edits = [{"layer": e.layer, "rank": e.rank, "update_norm": e.info.get("update_norm"),
              "target_prob": e.info.get("target_prob"), "memories": entry_memories(e)} for e in journal]
    result = {"status": outcome["status"], "out": str(out), "model": str(Path(out) / "model"),
              "journal": str(Path(out) / "journal"), "method": method, "n_edits": len(requests),
              "layers": journal.layers,
              # the first token the edit writes, as the edit itself tokenizes the target
              "requests": [{**r.to_json(), "target_id": target_ids(mm, r)[0]} for r in requests],
              "memories": sorted({m for e in edits for m in e["memories"]}, key=MemoryId.parse),
              "edits": edits, "probs": outcome["probs"]}
    if outcome["status"] == "failed":
        # Nothing is written: an edit that did not make its target more likely is not an edit.
        f = outcome["failed"][0]
        line = FfkvError(f"the edit failed: {len(outcome['failed'])} of {len(requests)} target(s) did not become "
                         f"more likely (e.g. {f['target']!r} for {f['subject']!r}: p {f['prob_before']:.3g} -> "
                         f"{f['prob_after']:.3g}); nothing was written to {out}",
                         "try other hyperparameters (--set v_lr=..., v_num_grad_steps=...) or another layer")
        if as_json:
            emit_json({**result, "out": None, "model": None, "journal": None, "error": line.line()})
            click.echo(f"ffkv: error: {line.line()}", err=True)
            click.get_current_context().exit(2)
        raise line
    save_edited(mm, journal, out)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"edited {len(requests)} fact(s) with {method} on layer(s) "
                   f"{', '.join(str(l) for l in journal.layers)}; wrote {out}/model and {out}/journal")


@edit.command("undo")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Writes OUT/model (edits undone) and OUT/journal (the edits that remain).")
@click.option("-n", "n", type=click.IntRange(min=1), default=None, help="Undo the last N edits (default: all).")
@json_option
@quiet_option
def undo_cmd(src, out, n, as_json, quiet):
    """Undo the edits of SRC (a folder written by `ffkv edit`), bit for bit; write OUT/model.

    The edited model is reloaded exactly as it was saved (no model options: another dtype or device would
    break the bit-for-bit undo).
    """
    check_output_target(out, "edit", EDIT_MANIFEST)
    result = undo_folder(src, out, n, progress=show_progress(quiet))
    if as_json:
        emit_json(result)
    else:
        click.echo(f"undid {result['undone']} edit(s), {result['remaining']} remain; wrote {out}/model")


@edit.command("stats")
@click.argument("model")
@layers_option(help="Layers, e.g. '17' or '13-17'.")
@click.option("--corpus", default="auto", show_default=True, help="auto, wikitext, or a text file/folder.")
@click.option("--tokens", "n_tokens", type=click.IntRange(min=1), default=None,
              help="Tokens of the corpus the statistics average over (default 100000; with --texts: no cap).")
@click.option("--texts", "n_texts", type=click.IntRange(min=1, max=100_000_000), default=None,
              help="Sample this many corpus records as ROME/MEMIT do (mom2_n_samples, e.g. 100000): the "
                   "statistics an edit with those defaults reads from the cache.")
@click.option("--stats-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache of the key statistics (default $FFKV_STATS_DIR or ~/.cache/ffkv/stats).")
@click.option("--recompute", is_flag=True, help="Recompute even when cached.")
@json_option
@quiet_option
@model_options
def stats_cmd(model, layers, corpus, n_tokens, n_texts, stats_dir, recompute, as_json, quiet, **load):
    """Compute (or find cached) the key statistics C = E[k k^T] of MODEL's layers.

    Under torchrun every process takes its share of the batches; the float64 sums are added over the
    processes and rank 0 writes the files (docs/distributed.md)."""
    if layers is None:
        raise FfkvError("ffkv edit stats needs --layers", "e.g. --layers 13-17")
    load["device"] = distributed.local_device(load.get("device"))
    mm = load_model_from_options(model, **load)
    if n_tokens is None and n_texts is None:
        n_tokens = 100_000
    stats = layer_stats(mm, parse_layers(layers, mm.n_layers), corpus=corpus, n_tokens=n_tokens, n_texts=n_texts,
                        stats_dir=stats_dir, recompute=recompute, progress=show_progress(quiet))
    main = distributed.is_main()
    distributed.close()
    if not main:
        return
    result = {str(l): {"path": str(s.path), "n_tokens": s.n_tokens, "n_texts": s.n_texts, "corpus": s.corpus,
                       "trace": float(s.C.trace())} for l, s in stats.items()}
    if as_json:
        emit_json({"layers": result})
    else:
        for l, s in result.items():
            click.echo(f"layer {l}: {s['n_tokens']} tokens of {s['corpus']} -> {s['path']}")


@edit.command("erase")
@click.argument("model")
@click.option("--requests", "requests_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Prompts of one relation with their true objects (target_true).")
@click.option("--min-share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Erase neurons found for at least this share of the prompts.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Writes OUT/model (neurons erased) and OUT/journal.")
@json_option
@model_options
def erase_cmd(model, requests_file, min_share, out, as_json, **load):
    """Erase a relation: zero the values of the knowledge neurons its prompts share (Dai et al.)."""
    check_output_target(out, "edit", EDIT_MANIFEST)
    mm = load_model_from_options(model, **load)
    journal = erase_relation(mm, load_requests(requests_file), {"min_share": min_share})
    save_edited(mm, journal, out)
    memories = [m for e in journal for m in entry_memories(e)]
    if as_json:
        emit_json({"out": str(out), "erased_neurons": [list(MemoryId.parse(m)[:2]) for m in memories],
                   "memories": memories})
    else:
        click.echo(f"erased {len(memories)} neuron(s); wrote {out}/model and {out}/journal")
