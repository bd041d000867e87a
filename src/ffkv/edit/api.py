"""The edit API: ``apply_edits`` runs a registered edit method (:mod:`.registry`) and keeps the journal.

    from ffkv.edit import EditRequest, apply_edits
    journal = apply_edits(model, [EditRequest("{} is located in", "Eiffel Tower", " Rome")], method="rome")
    journal.undo(model)                      # bit for bit
    journal.save("out/journal"); Journal.load("out/journal").replay(fresh_model)

Every request is validated before any weight changes; if any update is refused (non-finite, norm out of
range) the edits of this call are undone, so the model is left exactly as it was.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from ..errors import FfkvError
from ..io import output_dir, provenance, require_finite
from ..locate.layer_choice import trace_layer
from ..models.engine import run
from ..models.loading import load_model
from .compute_value import target_log_likelihood
from .context import EditContext
from .hparams import resolve_hparams
from .journal import Journal
from .registry import EditMethod, get_method
from .requests import EditRequest, as_requests, render_batch, target_ids

__all__ = ["EditContext", "apply_edits", "check_requests", "edit_layers", "save_edited", "model_folder",
           "undo_folder", "target_probs", "target_scores", "edit_outcome", "is_edit_output", "EDIT_MANIFEST"]


def check_requests(model, requests: Sequence[EditRequest]) -> None:
    """Refuse requests this model cannot edit: no tokenizer, subject or target without tokens."""
    model.require_tokenizer()
    for r in requests:
        target_ids(model, r)
        render_batch(model, [("", r)])


def edit_layers(hp: dict) -> list[int]:
    """The layers a resolved hparams dict edits (its method's ``layers``)."""
    return get_method(hp["method"]).layers(hp)


def apply_edits(model, requests: EditRequest | Sequence[EditRequest], method: str | EditMethod = "rome",
                hparams=None, stats_dir: str | Path | None = None, journal: Journal | None = None, corpus=None,
                progress: bool = True, context: EditContext | None = None) -> Journal:
    """Edit ``model`` in place with a registered method and return the journal (``journal`` extended when given).

    method: a name in :data:`ffkv.edit.registry.METHODS` ("rome": one rank-one update per request; "memit":
    one batch spread over its layers; "kn": the requests' knowledge neurons' values moved) or an
    :class:`EditMethod`. hparams: overrides of the method's defaults (a dict, JSON string or .json/.yaml
    file; :func:`.hparams.resolve_hparams`); ``layer="trace"`` picks the layer by causal tracing
    (:func:`ffkv.locate.layer_choice.trace_layer`). Statistics C = E[k k^T] come from
    :func:`.stats.layer_stats`, cached under ``stats_dir``; ``corpus`` (texts or a spec) overrides the
    hyperparameter of the same name. context: the :class:`EditContext` shared with other calls on this
    model (default: the journal's, else a new one), so sequential edits reuse statistics and prefixes.
    """
    m = get_method(method)
    requests = as_requests(requests)
    hp = resolve_hparams(model, m, hparams)
    if corpus is not None and "corpus" in hp:
        hp["corpus"] = str(corpus) if isinstance(corpus, (str, Path)) else "texts"
    check_requests(model, requests)
    if hp.get("layer") == "trace":
        hp["layer"] = trace_layer(model, requests, noise=hp["trace_noise"], seed=hp["seed"])
    journal = journal if journal is not None else Journal()
    if context is None:
        context = journal.context if journal.context is not None else EditContext()
    journal.attach(model, context.base_identity)
    context.base_identity = journal.base_identity
    journal.context = context
    run = context.using(stats_dir=stats_dir, corpus=corpus, progress=progress)
    start = len(journal)
    try:
        m.apply(model, requests, hp, journal, run)
    except BaseException:
        journal.undo(model, len(journal) - start)
        raise
    return journal


@torch.no_grad()
def target_scores(model, requests: EditRequest | Sequence[EditRequest], batch_size: int = 16
                  ) -> list[tuple[float, bool]]:
    """``(p, greedy)`` of each request's target after its prompt: p = P(target | prompt) as ROME reports it,
    ``exp(mean_j log p(t_j | prompt, t_<j))`` over the target's tokens t (teacher-forced), and whether every
    t_j is the argmax there (the model says the target). One engine run per batch, the head only at the target
    positions."""
    requests = as_requests(requests)
    out: list[tuple[float, bool]] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        b = render_batch(model, [("", r) for r in chunk], with_target=True)
        rows = torch.arange(len(chunk), device=b.input_ids.device)[:, None].expand_as(b.target_pos)
        logits = run(model, b.input_ids, attention_mask=b.attention_mask,
                     head=(rows.reshape(-1), b.target_pos.reshape(-1))).logits
        logits = logits.view(len(chunk), b.target_pos.shape[1], -1)  # (B, L, V)
        ll = target_log_likelihood(logits, b)  # (B,)
        greedy = ((logits.argmax(-1) == b.target_tok) | ~b.target_mask).all(1)  # (B,)
        out += [(math.exp(float(x)), bool(g)) for x, g in zip(ll, greedy)]
    return out


def target_probs(model, requests: EditRequest | Sequence[EditRequest], batch_size: int = 16) -> list[float]:
    """P(target | prompt) of each request (:func:`target_scores`)."""
    return [p for p, _ in target_scores(model, requests, batch_size)]


def edit_outcome(before: Sequence[tuple[float, bool]], after: Sequence[tuple[float, bool]],
                 requests: Sequence[EditRequest]) -> dict:
    """Whether the edits took, from :func:`target_scores` before and after:
    ``{"status": "edited" | "failed", "failed": [...], "probs": [...]}``.

    An edit *failed* when its target did not become more likely (p_after <= p_before, or p_after not finite),
    unless the edited model says the target anyway (greedy: a fact edited to what it already was); the
    command then reports the failure and writes nothing.
    """
    probs, failed = [], []
    for i, (r, (b, _), (a, greedy)) in enumerate(zip(requests, before, after)):
        row = {"request": i, "subject": r.subject, "target": r.target, "prob_before": b, "prob_after": a,
               "greedy_after": greedy}
        probs.append(row)
        if not math.isfinite(a) or not (a > b or greedy):
            failed.append(row)
    return {"status": "failed" if failed else "edited", "failed": failed, "probs": probs}


# ----------------------------------------------------------------------------------------------------
# Edited model folders: DIR/model (save_pretrained) + DIR/journal, one output written whole (ffkv.io.output_dir).

EDIT_MANIFEST = ("journal/journal.json", "model/ffkv_edit.json")


def is_edit_output(path: str | Path) -> bool:
    """Whether ``path`` is a folder ``ffkv edit`` wrote (model/ and journal/)."""
    path = Path(path)
    return any((path / m).exists() for m in EDIT_MANIFEST)


def save_edited(model, journal: Journal, out: str | Path) -> Path:
    """Write ``out/model`` (``save_pretrained``, safetensors, tokenizer, ``ffkv_edit.json``) and ``out/journal``
    as ONE output: both are written into a temporary folder beside ``out`` that is renamed in whole, so a
    crash or kill at any moment leaves the old ``out`` or the new one, never a model without its journal. An
    existing edit output at ``out`` is replaced; any other non-empty folder is refused. The edited layers'
    W_out must be finite."""
    out = Path(out)
    for site in journal.base:
        layer, expert = (site, None) if isinstance(site, int) else site
        require_finite(f"the edited W_out of layer {layer}" + ("" if expert is None else f" expert {expert}"),
                       model.value_param(layer) if expert is None else model.value_param(layer, expert))
    with output_dir(out, "edit", manifest=EDIT_MANIFEST) as tmp:
        folder = tmp / "model"
        model.hf.save_pretrained(folder, safe_serialization=True)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(folder)
        src = Path(str(model.name_or_path))
        if (src / "testbed.json").exists():  # keeps the testbed corpus resolvable for the statistics
            (folder / "testbed.json").write_text((src / "testbed.json").read_text())
        meta = provenance(journal.base_identity, n_edits=len(journal))
        meta.update(base_model=journal.base_identity, n_edits=len(journal),
                    edits=[{"method": e.method, "layer": e.layer, "requests": e.requests} for e in journal])
        (folder / "ffkv_edit.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        journal.write_into(tmp / "journal", model)
    return out


def model_folder(path: str | Path) -> Path:
    """``DIR/model`` for an ``ffkv edit`` output folder, else ``DIR`` itself."""
    path = Path(path)
    if (path / "model" / "config.json").exists():
        return path / "model"
    if (path / "config.json").exists():
        return path
    raise FfkvError(f"no edited model at {path}", "pass the folder `ffkv edit --out` wrote (with model/ and journal/)")


def undo_folder(src: str | Path, out: str | Path, n: int | None = None, progress: bool = True) -> dict:
    """Load ``src/model`` and ``src/journal``, undo ``n`` edits (all by default), write ``out/model`` and
    ``out/journal`` (the remaining edits) as one output (:func:`save_edited`). Returns a summary."""
    src = Path(src)
    journal = Journal.load(src)
    model = load_model(model_folder(src), check=False)
    journal.attach(model)
    undone = journal.undo(model, n)
    save_edited(model, journal, out)
    return {"undone": undone, "remaining": len(journal), "out": str(out),
            "layers": journal.base_layers, "fingerprint": model.identity["fingerprint"]}
