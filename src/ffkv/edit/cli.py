"""``ffkv edit``: edit facts (ROME, MEMIT, knowledge neurons), undo edits, precompute statistics.

    ffkv edit MODEL --method rome --prompt "{} is located in" --subject "Eiffel Tower" --target " Rome" --out DIR
    ffkv edit MODEL --method memit --requests FILE --out DIR
    ffkv edit undo DIR --out DIR2
    ffkv edit stats MODEL --layers 1,2,3

``ffkv edit MODEL ...`` is ``ffkv edit apply MODEL ...``: a first argument that is not a sub-command is the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..models.cli import emit_json, load_from_options, model_options


class DefaultToApply(click.Group):
    """A group whose first argument, when it is not a sub-command name, is the MODEL of ``apply``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["apply", *args]
        return super().parse_args(ctx, args)


@click.group("edit", cls=DefaultToApply)
def edit():
    """Edit a fact in MODEL (ROME, MEMIT, knowledge neurons), or undo an edit.

    \b
    ffkv edit MODEL --method rome --prompt "{} is located in" --subject "Eiffel Tower" --target " Rome" --out DIR
    ffkv edit undo DIR --out DIR2
    """


def _parse_layers(text: str | None):
    if text is None:
        return None
    out = []
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part.strip():
            out.append(int(part))
    return out


@edit.command("apply")
@click.argument("model")
@click.option("--method", type=click.Choice(["rome", "memit", "kn"]), default="rome", show_default=True)
@click.option("--prompt", default=None, help="Prompt template with {} for the subject.")
@click.option("--subject", default=None)
@click.option("--target", default=None, help="New object as a continuation (a leading space is added if missing).")
@click.option("--target-true", default=None, help="The current object (optional).")
@click.option("--requests", "requests_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="JSON/JSONL of requests (prompt, subject, target) or CounterFact records.")
@click.option("--limit", type=int, default=None, help="Use the first N requests of --requests.")
@click.option("--layer", "layers", default=None, help="Layer (ROME; 'trace' picks it by causal tracing) or layers (MEMIT: '3-8' or '3,4,5').")
@click.option("--hparams", default=None, help="JSON object or JSON file of hyperparameter overrides.")
@click.option("--stats-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache of the key statistics (default $FFKV_STATS_DIR or ~/.cache/ffkv/stats).")
@click.option("--corpus", default=None, help="Corpus of the statistics: auto, wikitext, or a text file/folder.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Writes OUT/model (the edited model) and OUT/journal.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@model_options
def apply_cmd(model, method, prompt, subject, target, target_true, requests_file, limit, layers, hparams,
              stats_dir, corpus, out, as_json, **load_kw):
    """Edit MODEL and write OUT/model and OUT/journal."""
    from ..errors import FfkvError
    from .api import apply_edits, save_edited
    from .hparams import resolve_hparams
    from .requests import EditRequest, load_requests

    if requests_file is not None:
        requests = load_requests(requests_file)[:limit]
    else:
        if prompt is None or subject is None or target is None:
            raise FfkvError("an edit needs --prompt, --subject and --target (or --requests FILE)",
                            "e.g. --prompt '{} is located in' --subject 'Eiffel Tower' --target ' Rome'")
        if target.strip() and not target.startswith(" "):
            target = " " + target
        requests = [EditRequest(prompt, subject, target, target_true)]
    for r in requests:
        r.validate()
    overrides = json.loads(Path(hparams).read_text()) if hparams and Path(hparams).exists() else \
        (json.loads(hparams) if hparams else {})
    ls = _parse_layers(layers) if layers != "trace" else ["trace"]
    if ls is not None:
        overrides["layer" if method == "rome" else "layers"] = ls[0] if method == "rome" else ls
    mm = load_from_options(model, **load_kw)
    resolve_hparams(mm, method, overrides)  # refuse bad hyperparameters before any work
    journal = apply_edits(mm, requests, method=method, hparams=overrides, stats_dir=stats_dir, corpus=corpus,
                          progress=True)
    save_edited(mm, journal, out)
    result = {"out": str(out), "model": str(Path(out) / "model"), "journal": str(Path(out) / "journal"),
              "method": method, "n_edits": len(requests),
              "edits": [{"layer": e.layer, "rank": e.rank, "update_norm": e.info.get("update_norm"),
                         "target_prob": e.info.get("target_prob")} for e in journal]}
    if as_json:
        emit_json(result)
    else:
        click.echo(f"edited {len(requests)} fact(s) with {method.upper()} on layer(s) "
                   f"{', '.join(str(l) for l in journal.layers)}; wrote {out}/model and {out}/journal", err=False)


@edit.command("undo")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Writes OUT/model (edits undone) and OUT/journal (the edits that remain).")
@click.option("-n", "n", type=int, default=None, help="Undo the last N edits (default: all).")
@click.option("--json", "as_json", is_flag=True)
def undo_cmd(src, out, n, as_json):
    """Undo the edits of SRC (a folder written by `ffkv edit`), bit for bit; write OUT/model."""
    from .api import undo_folder

    result = undo_folder(src, out, n)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"undid {result['undone']} edit(s), {result['remaining']} remain; wrote {out}/model")


@edit.command("stats")
@click.argument("model")
@click.option("--layers", "layers", required=True, help="e.g. '17' or '13-17'.")
@click.option("--corpus", default="auto", show_default=True)
@click.option("--tokens", "n_tokens", type=int, default=100_000, show_default=True)
@click.option("--stats-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--recompute", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@model_options
def stats_cmd(model, layers, corpus, n_tokens, stats_dir, recompute, as_json, **load_kw):
    """Compute (or find cached) the key statistics C = E[k k^T] of MODEL's layers."""
    from .stats import layer_stats

    mm = load_from_options(model, **load_kw)
    stats = layer_stats(mm, _parse_layers(layers), corpus=corpus, n_tokens=n_tokens, stats_dir=stats_dir,
                        recompute=recompute)
    result = {str(l): {"path": str(s.path), "n_tokens": s.n_tokens, "corpus": s.corpus,
                       "trace": float(s.C.trace())} for l, s in stats.items()}
    if as_json:
        emit_json(result)
    else:
        for l, s in result.items():
            click.echo(f"layer {l}: {s['n_tokens']} tokens of {s['corpus']} -> {s['path']}", file=sys.stdout)


@edit.command("erase")
@click.argument("model")
@click.option("--requests", "requests_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Prompts of one relation with their true objects (target_true).")
@click.option("--min-share", type=float, default=0.5, show_default=True,
              help="Erase neurons found for at least this share of the prompts.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@model_options
def erase_cmd(model, requests_file, min_share, out, as_json, **load_kw):
    """Erase a relation: zero the values of the knowledge neurons its prompts share (Dai et al.)."""
    from .api import save_edited
    from .kn_edit import erase_relation
    from .requests import load_requests

    mm = load_from_options(model, **load_kw)
    journal = erase_relation(mm, load_requests(requests_file), {"min_share": min_share})
    save_edited(mm, journal, out)
    neurons = [[e.layer, i] for e in journal for i in e.info.get("neurons", [])]
    if as_json:
        emit_json({"out": str(out), "erased_neurons": neurons})
    else:
        click.echo(f"erased {len(neurons)} neuron(s); wrote {out}/model and {out}/journal")
