"""The edit API: ``apply_edits`` dispatches to ROME, MEMIT or a knowledge-neuron edit and keeps the journal.

    from ffkv.edit import EditRequest, apply_edits
    journal = apply_edits(model, [EditRequest("{} is located in", "Eiffel Tower", " Rome")], method="rome")
    journal.undo(model)                      # bit for bit
    journal.save("out/journal"); Journal.load("out/journal").replay(fresh_model)

Every request is validated before any weight changes; if any update is refused (non-finite, norm out of
range) the edits of this call are undone, so the model is left exactly as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import FfkvError
from .hparams import resolve_hparams
from .journal import Journal
from .requests import EditRequest, as_requests, render_batch, target_ids


def check_requests(model, requests: Sequence[EditRequest]) -> None:
    """Refuse requests this model cannot edit: no tokenizer, subject or target without tokens."""
    model._require_tokenizer()
    for r in requests:
        target_ids(model, r)
        render_batch(model, [("", r)])


def edit_layers(hp: dict) -> list[int]:
    if hp["method"] == "rome":
        return [hp["layer"]]
    if hp["method"] == "memit":
        return list(hp["layers"])
    return []


def apply_edits(model, requests: EditRequest | Sequence[EditRequest], method: str = "rome",
                hparams: dict | None = None, stats_dir: str | Path | None = None,
                journal: Journal | None = None, corpus=None, progress: bool = True) -> Journal:
    """Edit ``model`` in place and return the journal (``journal`` extended when given).

    method: "rome" applies the requests one after another, each a rank-one update of one layer; "memit"
    applies them as one batch spread over its layers; "kn" moves the requests' knowledge neurons' values
    from the old object toward the new one. hparams: overrides of :func:`default_hparams`. Statistics
    C = E[k k^T] come from :func:`layer_stats` (cached under ``stats_dir``; ``corpus`` overrides the
    hyperparameter of the same name).
    """
    requests = as_requests(requests)
    hp = resolve_hparams(model, method, hparams)
    if corpus is not None:
        hp["corpus"] = corpus if isinstance(corpus, (str, Path)) else "texts"
    check_requests(model, requests)
    if method == "rome" and hp["layer"] == "trace":
        from .trace import trace_layer

        hp["layer"] = trace_layer(model, requests, noise=hp["trace_noise"], seed=hp["seed"])
    journal = journal if journal is not None else Journal()
    journal.attach(model)
    start = len(journal)
    try:
        if method == "kn":
            from .kn_edit import kn_edit

            for r in requests:
                kn_edit(model, r, hp, journal)
            return journal
        from .compute_key import context_prefixes
        from .stats import layer_stats

        stats = layer_stats(model, edit_layers(hp), corpus=corpus if corpus is not None else hp["corpus"],
                            n_tokens=hp["stats_tokens"], stats_dir=stats_dir, progress=progress)
        prefixes = context_prefixes(model, hp["prefixes"], hp["seed"])
        if method == "rome":
            from tqdm import tqdm

            from .rome import rome_edit

            for r in tqdm(requests, desc="ROME", disable=not progress or len(requests) < 2, leave=False):
                rome_edit(model, r, hp, stats[hp["layer"]], journal, prefixes)
        elif method == "memit":
            from .memit import memit_edit

            memit_edit(model, requests, hp, stats, journal, prefixes)
    except BaseException:
        journal.undo(model, len(journal) - start)
        raise
    return journal


# ----------------------------------------------------------------------------------------------------
# Edited model folders: DIR/model (save_pretrained) + DIR/journal.


def save_edited(model, journal: Journal, out: str | Path) -> Path:
    """Write ``out/model`` (``save_pretrained``, safetensors, tokenizer, ``ffkv_edit.json``) and ``out/journal``."""
    from ..io import atomic_path, provenance

    out = Path(out)
    with atomic_path(out / "model", is_dir=True) as tmp:
        model.hf.save_pretrained(tmp, safe_serialization=True)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        src = Path(str(model.name_or_path))
        if (src / "testbed.json").exists():  # keeps the testbed corpus resolvable for the statistics
            (tmp / "testbed.json").write_text((src / "testbed.json").read_text())
        meta = provenance(journal.base_identity, n_edits=len(journal))
        meta.update(base_model=journal.base_identity, n_edits=len(journal),
                    edits=[{"method": e.method, "layer": e.layer, "requests": e.requests} for e in journal])
        (tmp / "ffkv_edit.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    journal.save(out / "journal")
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
    ``out/journal`` (the remaining edits). Returns a summary."""
    from ..models.loading import load_model

    src = Path(src)
    journal = Journal.load(src)
    model = load_model(model_folder(src), check=False)
    journal.attach(model)
    undone = journal.undo(model, n)
    save_edited(model, journal, out)
    return {"undone": undone, "remaining": len(journal), "out": str(out),
            "layers": sorted({int(k) for k in journal.base}), "fingerprint": model.identity["fingerprint"]}
