"""Edit, measure, undo: the CounterFact evaluation loop.

    cases, info = load_cases("counterfact.json", limit=50)
    result = evaluate_edits(model, cases, method="rome")
    result.summary["rome"]["post"]["ES"]   # {"mean": 100.0, "ci95": 0.0, "n": 50}

Every case is measured on the unedited model first (ROME's "pre" row), then edited through
:func:`ffkv.edit.apply_edits` (a method of :data:`ffkv.edit.registry.METHODS`: a batched one such as MEMIT
takes ``batch_size`` cases of distinct subjects at once, the others one case at a time),
measured again ("post"), and the edit is undone through its journal before the next case, so each case
sees the original weights. A fingerprint of the weights is checked after every undo.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from ..edit.api import apply_edits
from ..edit.context import EditContext
from ..edit.hparams import resolve_hparams as resolve_edit_hparams
from ..edit.registry import EditMethod, get_method
from ..errors import FfkvError
from ..io import provenance, write_json, write_parquet
from ..models.loading import weights_fingerprint
from .datasets import repeated_subjects, subject_batches
from .metrics import EASYEDIT_KEYS, ROME_KEYS, measure_cases, summarize

# editor(model, cases) -> a journal with .undo(model): how an evaluation makes its edits.
Editor = Callable[[object, Sequence], object]


def make_editor(method: str | EditMethod, hparams=None, stats_dir=None, shared_journal: bool = False,
                context: EditContext | None = None) -> Editor:
    """An editor that applies ``cases`` with :func:`ffkv.edit.apply_edits` (edits in place).

    All its calls share one :class:`ffkv.edit.context.EditContext` (``context``, else a new one): the
    statistics and context prefixes are computed once. shared_journal: every call extends one journal (and
    returns it), so that a long run of sequential edits keeps one copy of each layer's base weights instead
    of one per edit.
    """
    m = get_method(method)
    state = {"journal": None, "context": context if context is not None else EditContext()}

    def edit(model, cases):
        journal = apply_edits(model, [c.edit_request() for c in cases], method=m, hparams=hparams,
                              stats_dir=stats_dir, journal=state["journal"], progress=False,
                              context=state["context"])
        if shared_journal:
            state["journal"] = journal
        return journal

    return edit


def resolve_hparams(model, method: str | EditMethod, hparams=None):
    """The method's hyperparameters on ``model``: its defaults updated by ``hparams`` (a dict, JSON string or
    .json/.yaml file) and checked, as ``ffkv edit`` does (:func:`ffkv.edit.hparams.resolve_hparams`).
    Any other container (an external editor's config object) is returned as it is."""
    if hparams is None or isinstance(hparams, (dict, str, Path)):
        return resolve_edit_hparams(model, method, hparams)
    return hparams


def hparams_record(hparams) -> dict | None:
    """Hyperparameters as a JSON-able dict, whatever their container."""
    if hparams is None:
        return None
    if dataclasses.is_dataclass(hparams):
        return dataclasses.asdict(hparams)
    if hasattr(hparams, "to_dict"):
        return hparams.to_dict()
    if isinstance(hparams, dict):
        return dict(hparams)
    return {"repr": repr(hparams)}


@dataclass
class EvalResult:
    """Per-case rows (fractions) and the summary tables (percent, as published)."""

    rows: list[dict]
    summary: dict
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**self.summary, **self.meta}

    def write_rows(self, path: str | Path) -> Path:
        """Per-case rows to ``.parquet`` (or ``.json``), atomically, with provenance."""
        path = Path(path)
        cols = ["case_id", "layout", "subject", "target_new", "target_true", "edit_seconds", "batch", "refused"]
        cols += [f"{s}_{k}" for s in ("pre", "post") for k in (*ROME_KEYS, *EASYEDIT_KEYS, "neighborhood_acc",
                                                                 "GE", "p_new", "p_true")]
        table = {c: [_cell(r.get(c)) for r in self.rows] for c in cols}
        table["post_generations"] = [list(r.get("post_generations") or []) for r in self.rows]
        if path.suffix == ".json":
            return write_json(path, {"rows": [dict(zip(table, vals)) for vals in zip(*table.values())],
                                     **self.meta})
        import pyarrow as pa

        text = ("case_id", "layout", "subject", "target_new", "target_true", "refused")
        arrays = {c: pa.array([None if x is None else str(x) for x in v], type=pa.string()) if c in text
                  else pa.array(v) for c, v in table.items()}
        return write_parquet(path, pa.table(arrays), meta=self.meta)


def _cell(v):
    return v if v is None or isinstance(v, (int, float, str, bool)) else str(v)


def _fingerprint(model) -> str:
    return weights_fingerprint(model.hf)


def evaluate_edits(model, cases: Sequence, method: str | EditMethod = "rome", hparams=None, stats_dir=None,
                   batch_size: int | None = None, editor: Editor | None = None, n_gen_prompts: int = 2,
                   gen_tokens: int = 20, score_batch: int = 32, check_restore: bool = True,
                   progress: bool = True, data_info: dict | None = None) -> EvalResult:
    """Edit each case (or each batch of ``batch_size`` cases), measure it, undo it; summarize.

    method: a registered edit method (:data:`ffkv.edit.registry.METHODS`); a batched one (MEMIT) edits
    ``batch_size`` cases at once (default: all, in batches of distinct subjects), the others one at a time
    (default ``batch_size`` 1). hparams: overrides of the method's defaults (:func:`resolve_hparams`).
    editor: ``editor(model, cases) -> journal`` (``journal.undo(model)`` restores the weights); default
    :func:`make_editor`. Generation entropy uses ``n_gen_prompts`` prompts x ``gen_tokens`` tokens per case.
    """
    if not cases:
        raise FfkvError("no cases to evaluate", "pass a non-empty edit-data file or a larger --limit")
    m = get_method(method)
    if batch_size is None:
        batch_size = len(cases) if m.batched else 1
    if batch_size < 1:
        raise FfkvError(f"batch size must be at least 1, got {batch_size}", "pass --batch-size 1 or more")
    if editor is None:
        hparams = resolve_hparams(model, m, hparams)
        editor = make_editor(m, hparams, stats_dir)
    method = m.name

    gen = dict(n_gen_prompts=n_gen_prompts, gen_tokens=gen_tokens, batch_size=score_batch)
    t0 = time.perf_counter()
    pre = measure_cases(model, cases, **gen)
    t_pre = time.perf_counter() - t0
    rows = []
    for c, m in zip(cases, pre):
        row = {"case_id": c.case_id, "layout": c.layout, "subject": c.subject, "target_new": c.target_new,
               "target_true": c.target_true}
        row.update({f"pre_{k}": v for k, v in m.items()})
        rows.append(row)
    before = _fingerprint(model) if check_restore else None
    edit_time = 0.0
    # A batch holds distinct subjects where the data allows (see spread_subjects): same-subject requests
    # share one key, and MEMIT would store the average of their values.
    batches = subject_batches(list(cases), batch_size)
    shared = repeated_subjects(batches, list(cases))
    bar = tqdm(total=len(cases), desc=f"evaluate {method}", disable=not progress, unit="case")
    t_post = 0.0
    for b, idx in enumerate(batches):
        sub = [cases[i] for i in idx]
        t1 = time.perf_counter()
        try:
            journal, refused = editor(model, sub), None
        except FfkvError as e:
            # A refused edit (e.g. an update norm over the method's limit) leaves the model unchanged and
            # counts as a failed edit, as it would for a user; the run goes on.
            journal, refused = None, e.line()
        dt = time.perf_counter() - t1
        edit_time += dt
        try:
            t2 = time.perf_counter()
            post = measure_cases(model, sub, pre_locality=[rows[i]["pre_nb_pred"] for i in idx], **gen)
            t_post += time.perf_counter() - t2
        finally:
            if journal is not None:
                journal.undo(model)
        if check_restore and _fingerprint(model) != before:
            raise FfkvError(f"undoing the edit of case {sub[0].case_id} did not restore the weights",
                            "this is a bug in the edit journal; please report it")
        for i, m in zip(idx, post):
            rows[i].update({f"post_{k}": v for k, v in m.items()})
            rows[i]["edit_seconds"] = dt / len(idx)
            rows[i]["batch"] = b
            rows[i]["refused"] = refused
        bar.update(len(idx))
    bar.close()
    for r in rows:
        r.pop("pre_nb_pred", None)
        r.pop("post_nb_pred", None)
    summary = summarize(rows)
    hp = hparams_record(hparams)
    meta = {
        "method": method,
        "counts": {"cases": len(cases), "batches": len(batches), "batch_size": batch_size,
                   "cases_sharing_a_subject_in_batch": shared,
                   "refused": sum(1 for r in rows if r.get("refused"))},
        "refusals": sorted({r["refused"] for r in rows if r.get("refused")})[:5],
        "data": data_info or {},
        "timing": {"edit_seconds_per_case": edit_time / len(cases), "pre_seconds": t_pre,
                   "post_seconds": t_post},
        "hparams": hp,
        "provenance": provenance(model.identity, method=method, batch_size=batch_size, hparams=hp,
                                 n_gen_prompts=n_gen_prompts, gen_tokens=gen_tokens,
                                 data=(data_info or {}).get("path")),
    }
    return EvalResult(rows=rows, summary=summary, meta=meta)


def table_rows(summary: dict) -> list[tuple[str, str, str]]:
    """``(metric, pre, post)`` strings for a printed table."""
    def fmt(st):
        if st is None or st.get("mean") is None:
            return "-"
        return f"{st['mean']:.1f}" + (f" ± {st['ci95']:.1f}" if st.get("ci95") is not None else "")

    out = []
    names = {"ES": "efficacy score ES", "EM": "efficacy magnitude EM", "PS": "paraphrase score PS",
             "PM": "paraphrase magnitude PM", "NS": "neighborhood score NS", "NM": "neighborhood magnitude NM",
             "GE": "generation entropy GE (x100)"}
    rome = summary.get("rome", {})
    for k, name in names.items():
        out.append((f"ROME {name}", fmt(rome.get("pre", {}).get(k)), fmt(rome.get("post", {}).get(k))))
        if k == "NM":
            s = [rome.get(st, {}).get("S") for st in ("pre", "post")]
            out.append(("ROME score S = hmean(ES, PS, NS)", *("-" if v is None else f"{v:.1f}" for v in s)))
    ee = summary.get("easyedit", {})
    for k in ("reliability", "generalization", "locality", "neighborhood_acc"):
        out.append((f"EasyEdit {k}" if k != "neighborhood_acc" else "neighborhood top-1 accuracy",
                    fmt(ee.get("pre", {}).get(k)), fmt(ee.get("post", {}).get(k))))
    return out
