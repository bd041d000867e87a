"""Causal traces averaged over a data set, by ROME's token groups.

Records are read in ROME's ``known_1000`` layout (``known_id, subject, attribute, template, prediction, prompt,
relation_id``), as ``../shared/data/known_facts/known_1000.json`` and the testbed's ``data/known_facts.json`` are
written. A prompt the model gets wrong (its top next token is not the attribute's first token, ``model.answer_id``)
is skipped and counted, so that every averaged trace explains a fact the model knows.

Token groups (ROME, Fig. 2 / Table of average indirect effects), for a prompt of T tokens with subject [s, e):

    first subject token      s
    middle subject tokens    s+1 .. e-2 (mean; absent for subjects of one or two tokens)
    last subject token       e-1
    first subsequent token   e
    further tokens           e+1 .. T-2 (mean; absent when e+1 > T-2)
    last token               T-1

As in ROME's summaries, a token may belong to two groups (e.g. the first subsequent token is also the last token
of a prompt that ends right after the subject). Average indirect effect (AIE) of a group and layer:
``mean over prompts of (score - low_score)``; average total effect (ATE): ``mean of (high_score - low_score)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import validate
from ..errors import FfkvError
from ..io import read_json
from ..models.model import MemoryModel
from ..models.engine import Cost
from ..progress import track
from .trace import DEFAULT_SEED, causal_traces, noise_setting

GROUPS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
          "further tokens", "last token")


def load_known(path: str | Path, limit: int | None = None) -> list[dict]:
    """Records in ROME's known_1000 layout from a JSON file (or a testbed folder's data/known_facts.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "data" / "known_facts.json" if (path / "data").is_dir() else path / "known_facts.json"
    records = validate.records(path, required=("subject", "prompt", "attribute"), what="known_1000 record")
    if not records:
        raise FfkvError(f"{path} holds no records", "pass known_1000.json or a testbed's data/known_facts.json")
    return records[:limit] if limit else records


def group_rows(scores: np.ndarray, subject_range: tuple[int, int]) -> dict[str, np.ndarray]:
    """ROME's token groups of one trace: {group: (layers,) scores}; absent groups are left out."""
    s, e = subject_range
    T = scores.shape[0]
    out = {"first subject token": scores[s], "last subject token": scores[e - 1], "last token": scores[T - 1]}
    if e - 2 >= s + 1:
        out["middle subject tokens"] = scores[s + 1:e - 1].mean(0)
    if e < T:
        out["first subsequent token"] = scores[e]
    if e + 1 <= T - 2:
        out["further tokens"] = scores[e + 1:T - 1].mean(0)
    return out


def knows(model: MemoryModel, record: dict) -> tuple[bool, int]:
    """Whether the model's top next token is the first token of the record's answer; and that token."""
    answer_id = model.answer_id(record["attribute"].strip())
    top = int(model.next_token_probs(record["prompt"])[0].argmax())
    return top == answer_id, answer_id


def average_traces(model: MemoryModel, records: list[dict], kinds=("hidden", "mlp", "attn"), noise="s3",
                   samples: int = 10, window: int = 10, seed: int = DEFAULT_SEED, progress: bool = False,
                   keep_traces: bool = False, subjects=None) -> dict:
    """Trace every record the model knows and average by token group.

    Returns ``{"n_records", "n_skipped", "skipped": [known_id...], "noise_level", "cost", kind: {"groups",
    "indirect": (groups, layers), "n": per-group counts, "ate"}, "noise_subjects", "traces": [...] (keep_traces)}``.
    The s3 level is computed from all records' subjects, as ROME does with its known facts (``subjects``: another
    data set, :func:`ffkv.locate.trace.noise_subjects`). progress: a bar over the records (:mod:`ffkv.progress`).
    """
    given = subjects
    subjects = given if given is not None else [r["subject"] for r in records]
    level, mode, source = noise_setting(model, noise, subjects)
    if given is None and source != "fixed level":
        source = f"the records' subjects ({len(subjects)})"  # ROME: the known facts it averages over
    spec = level if mode == "gaussian" else noise
    cost = Cost()
    sums = {k: {g: np.zeros(model.n_layers) for g in GROUPS} for k in kinds}
    counts = {k: {g: 0 for g in GROUPS} for k in kinds}
    ate = {k: [] for k in kinds}
    skipped, traces = [], []
    for r in track(records, desc="tracing", unit="fact", enabled=progress):
        ok, answer_id = knows(model, r)
        if not ok:
            skipped.append(r.get("known_id"))
            continue
        traces_r = causal_traces(model, r["prompt"], r["subject"], kinds, answer=answer_id, noise=spec,
                                 samples=samples, window=window, seed=seed, subjects=subjects, cost=cost)
        for k in kinds:
            tr = traces_r[k]
            ate[k].append(tr.total_effect)
            for g, row in group_rows(tr.indirect_effects, tr.subject_range).items():
                sums[k][g] += row
                counts[k][g] += 1
            if keep_traces:
                traces.append({**tr.to_json(), "known_id": r.get("known_id")})
    out = {"n_records": len(records), "n_skipped": len(skipped), "skipped": skipped, "noise_level": level,
           "noise_subjects": source, "cost": cost.as_dict()}
    for k in kinds:
        groups = [g for g in GROUPS if counts[k][g]]
        out[k] = {"groups": groups, "indirect": [(sums[k][g] / counts[k][g]).tolist() for g in groups],
                  "n": {g: counts[k][g] for g in groups}, "ate": float(np.mean(ate[k])) if ate[k] else None}
    if keep_traces:
        out["traces"] = traces
    return out
