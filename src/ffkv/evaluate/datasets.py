"""Edit-evaluation cases read from the layouts the field uses, into one :class:`EvalCase`.

Layouts (detected from the first record's keys, so a file is read the same whatever its name):

    rome       ROME's CounterFact and ffkv's testbed ``counterfact.json``: ``case_id``,
               ``requested_rewrite{prompt ("{} is in"), subject, target_new{str}, target_true{str}}``,
               ``paraphrase_prompts`` (2), ``neighborhood_prompts`` (10), ``generation_prompts``.
    flat       EasyEdit / MEND CounterFact: ``case_id, prompt, subject, ground_truth, target_new,
               rephrase_prompt, locality_prompt, locality_ground_truth``. One paraphrase and one
               locality prompt per case; the locality prompt is CounterFact's neighborhood prompt.
    zsre       MEND's zsRE: ``subject, src, pred, rephrase, alt, answers, loc, loc_ans``. As EasyEdit
               reads it: the edit target is ``alt``, the true answer ``answers[0]``; the locality
               prompt is an NQ question with its answer ``loc_ans``.

Targets are kept as continuations with their leading space (``" Rome"``), as ROME scores them.

Multi-hop editing cases (MQuAKE, Zhong et al. 2023) are read by :func:`load_mquake` into :class:`MultiHopCase`:
``case_id``, ``requested_rewrite`` (a list of ROME-layout rewrites, each with its ``question``), ``questions``
(3 phrasings of one multi-hop question), ``answer`` / ``answer_alias`` (before the edits), ``new_answer`` /
``new_answer_alias`` (after them), ``single_hops`` / ``new_single_hops`` (``question, cloze, answer,
answer_alias`` per hop). The published files (MQuAKE-CF-3k, MQuAKE-CF, MQuAKE-T, MQuAKE-hard) share this layout;
the default file is ``$FFKV_SHARED_DATA/mquake/MQuAKE-hard.json`` (``../shared/data`` beside the project).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..edit.requests import EditRequest
from .. import validate
from ..errors import FfkvError
from ..io import read_json
from ..memory.corpus import SHARED_DATA

LAYOUTS = ("rome", "flat", "zsre")


@dataclass
class EvalCase:
    """One requested rewrite and the prompts that test it.

    neighborhood: ``(prompt, true continuation)`` pairs the edit must not change. In ROME's CounterFact
    every neighbor's true continuation is the case's ``target_true``; in zsRE it is the NQ answer.
    """

    case_id: int | str
    prompt: str  # template with "{}" for the subject
    subject: str
    target_new: str  # " Rome"
    target_true: str | None  # " Paris"
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood: list[tuple[str, str]] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    layout: str = "rome"
    extra: dict = field(default_factory=dict)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)

    def edit_request(self) -> EditRequest:
        """The case as an :class:`ffkv.edit.EditRequest`."""
        return EditRequest(prompt=self.prompt, subject=self.subject, target=self.target_new,
                           target_true=self.target_true,
                           case_id=self.case_id if isinstance(self.case_id, int) else None)


def continuation(text: str | None) -> str | None:
    """A target as a continuation: with exactly one leading space, as ROME tokenizes ``f" {target}"``."""
    if text is None:
        return None
    text = str(text)
    return text if text.startswith(" ") else " " + text


def template_of(prompt: str, subject: str, where: str) -> str:
    """``"BBC One, by"``, ``"BBC One"`` -> ``"{}, by"``; braces already in the prompt are escaped."""
    if not subject or subject not in prompt:
        raise FfkvError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}",
                        "fix the record or drop it")
    i = prompt.index(subject)
    esc = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return esc(prompt[:i]) + "{}" + esc(prompt[i + len(subject):])


def detect_layout(record: dict) -> str:
    """``"rome"``, ``"flat"`` or ``"zsre"`` from a record's keys; an unknown layout is an error."""
    if not isinstance(record, dict):
        raise FfkvError(f"an edit record must be a JSON object, got {type(record).__name__}",
                        "pass a CounterFact (ROME or EasyEdit layout) or zsRE file")
    keys = set(record)
    if "requested_rewrite" in keys:
        return "rome"
    if {"prompt", "subject", "target_new", "ground_truth"} <= keys:
        return "flat"
    if {"src", "subject", "alt", "answers", "rephrase"} <= keys:
        return "zsre"
    raise FfkvError(f"unknown edit-data layout (record keys: {sorted(keys)[:12]})",
                    "pass CounterFact in ROME layout (requested_rewrite, paraphrase_prompts, ...), "
                    "EasyEdit layout (prompt, subject, ground_truth, target_new, ...) or MEND zsRE")


def _rome_case(r: dict, i: int) -> EvalCase:
    rw = r["requested_rewrite"]
    prompt = rw["prompt"]
    if "{}" not in prompt:
        prompt = template_of(prompt, rw["subject"], f"case {r.get('case_id', i)}")
    true = rw.get("target_true")
    true = true.get("str") if isinstance(true, dict) else true
    new = rw["target_new"]
    new = new.get("str") if isinstance(new, dict) else new
    true = continuation(true)
    neighborhood = []
    for n in r.get("neighborhood_prompts", []):
        # ROME's zsRE export stores neighbors as {"prompt", "target"}; CounterFact as plain prompts.
        if isinstance(n, dict):
            neighborhood.append((n["prompt"], continuation(n["target"])))
        elif true is not None:
            neighborhood.append((n, true))
    extra = {k: r[k] for k in ("train_count", "fact_id", "pararel_idx") if k in r}
    extra["relation_id"] = rw.get("relation_id")
    return EvalCase(case_id=r.get("case_id", i), prompt=prompt, subject=rw["subject"],
                    target_new=continuation(new), target_true=true,
                    paraphrase_prompts=list(r.get("paraphrase_prompts", [])), neighborhood=neighborhood,
                    generation_prompts=list(r.get("generation_prompts", [])), layout="rome", extra=extra)


def _flat_case(r: dict, i: int) -> EvalCase:
    where = f"case {r.get('case_id', i)}"
    rephrase = r.get("rephrase_prompt") or r.get("rephrase") or []
    loc = r.get("locality_prompt")
    loc_true = r.get("locality_ground_truth")
    return EvalCase(case_id=r.get("case_id", i), prompt=template_of(r["prompt"], r["subject"], where),
                    subject=r["subject"], target_new=continuation(r["target_new"]),
                    target_true=continuation(r["ground_truth"]),
                    paraphrase_prompts=[rephrase] if isinstance(rephrase, str) else list(rephrase),
                    neighborhood=[(loc, continuation(loc_true))] if loc and loc_true else [],
                    layout="flat")


def _zsre_case(r: dict, i: int) -> EvalCase:
    where = f"zsRE record {i}"
    answers = r.get("answers") or []
    return EvalCase(case_id=r.get("case_id", i), prompt=template_of(r["src"], r["subject"], where),
                    subject=r["subject"], target_new=continuation(r["alt"]),
                    target_true=continuation(answers[0]) if answers else None,
                    paraphrase_prompts=[r["rephrase"]] if r.get("rephrase") else [],
                    neighborhood=[(r["loc"], continuation(r["loc_ans"]))] if r.get("loc") else [],
                    layout="zsre")


_READERS = {"rome": _rome_case, "flat": _flat_case, "zsre": _zsre_case}


def read_cases(records: list, limit: int | None = None, skip_bad: bool = True) -> tuple[list[EvalCase], dict]:
    """Cases from already-parsed records; returns ``(cases, info)``.

    info: ``layout``, ``n_records``, ``n_skipped`` and the first few ``skipped`` reasons. Records whose
    subject is not in the prompt (a few in zsRE) are skipped when ``skip_bad``, else an error.
    """
    if isinstance(records, dict):  # {"data": [...]} or {case_id: record}
        records = records.get("data") or records.get("cases") or list(records.values())
    if not isinstance(records, list) or not records:
        raise FfkvError("the edit-data file holds no records", "pass a non-empty JSON list of edit cases")
    layout = detect_layout(records[0])
    reader = _READERS[layout]
    cases, skipped = [], []
    for i, r in enumerate(records):
        if limit is not None and len(cases) >= limit:
            break
        try:
            if detect_layout(r) != layout:
                raise FfkvError(f"record {i} is in the {detect_layout(r)} layout, not {layout}", None)
            c = reader(r, i)
            if not c.target_new or not c.target_new.strip():
                raise FfkvError(f"record {i} has an empty target_new", None)
            cases.append(c)
        except KeyError as e:  # a record without a field its layout needs is a broken file, not a skippable case
            raise FfkvError(f"record {i + 1} of the {layout} data lacks the field {e.args[0]!r}",
                            "fix or remove that record") from None
        except (FfkvError, TypeError, AttributeError, IndexError) as e:
            why = e.line() if isinstance(e, FfkvError) else f"record {i} lacks or mangles field {e}"
            if not skip_bad:
                raise FfkvError(why, "fix the record or pass skip_bad=True") from None
            skipped.append(why)
    if not cases:
        raise FfkvError(f"no usable {layout} records ({skipped[0] if skipped else 'empty'})",
                        "check the file's layout")
    info = {"layout": layout, "n_records": len(records), "n_cases": len(cases), "n_skipped": len(skipped),
            "skipped": skipped[:5]}
    return cases, info


def load_cases(path: str | Path, limit: int | None = None, skip_bad: bool = True) -> tuple[list[EvalCase], dict]:
    """Read an edit-data file (JSON list, or JSON lines) in any supported layout; see :func:`read_cases`.

    ``path`` may also be a testbed folder (its ``data/counterfact.json`` is read).
    """
    path = Path(path)
    if path.is_dir():
        for cand in (path / "data" / "counterfact.json", path / "counterfact.json"):
            if cand.exists():
                path = cand
                break
        else:
            raise FfkvError(f"folder {path} has no counterfact.json", "pass the edit-data file itself")
    records = validate.records(path, what="edit case") if path.suffix == ".jsonl" else read_json(path)
    cases, info = read_cases(records, limit=limit, skip_bad=skip_bad)
    info["path"] = str(path)
    return cases, info


def spread_subjects(cases: list[EvalCase]) -> list[EvalCase]:
    """The cases reordered round-robin over subjects: each subject's first case, then each one's second, ...

    Requests about one subject (with the subject first in the prompt) share their key k* at every layer, and
    a layer maps one key to one value: MEMIT given two of them in one batch stores their average, and a
    sequential editor overwrites the first with the second. Batches and edit sequences built from this order
    hold distinct subjects for as long as the data allows, as CounterFact's own cases (almost all of distinct
    subjects) do. The order within a subject is kept.
    """
    by_subject: dict[str, list[EvalCase]] = {}
    for c in cases:
        by_subject.setdefault(c.subject, []).append(c)
    out: list[EvalCase] = []
    rank = 0
    while len(out) < len(cases):
        out.extend(group[rank] for group in by_subject.values() if rank < len(group))
        rank += 1
    return out


def subject_batches(cases: list[EvalCase], batch_size: int) -> list[list[int]]:
    """Indices of ``cases`` in batches of ``batch_size`` whose subjects are distinct where the data allows.

    Cases are taken in :func:`spread_subjects` order; results are reported per case, so the order does not
    change any case's metrics beyond which other cases share its batch.
    """
    if batch_size < 1:
        raise FfkvError(f"batch size must be at least 1, got {batch_size}", "pass a batch size of 1 or more")
    pos = {id(c): i for i, c in enumerate(cases)}
    order = [pos[id(c)] for c in spread_subjects(list(cases))]
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def repeated_subjects(batch: list[list[int]], cases: list[EvalCase]) -> int:
    """How many cases share their batch with an earlier case of the same subject."""
    n = 0
    for idx in batch:
        subjects = [cases[i].subject for i in idx]
        n += len(subjects) - len(set(subjects))
    return n


# ----------------------------------------------------------------------------------------------- MQuAKE
MQUAKE_FILES = ("MQuAKE-hard.json", "MQuAKE-CF-3k.json", "MQuAKE-CF.json", "MQuAKE-T.json")
MQUAKE_KEYS = {"requested_rewrite", "questions", "new_answer"}


@dataclass
class MultiHopCase:
    """One MQuAKE case: the rewrites to apply together and the multi-hop question they change.

    rewrites: the case's edits as :class:`EvalCase`\ s (ROME layout; ``extra["question"]`` is the rewrite's own
    question). Answers are kept as published (no leading space): ``answers`` = [answer] + answer_alias,
    ``new_answers`` = [new_answer] + new_answer_alias.
    """

    case_id: int | str
    rewrites: list[EvalCase]
    questions: list[str]
    answer: str
    answer_alias: list[str]
    new_answer: str
    new_answer_alias: list[str]
    single_hops: list[dict] = field(default_factory=list)
    new_single_hops: list[dict] = field(default_factory=list)

    @property
    def answers(self) -> list[str]:
        return [self.answer, *self.answer_alias]

    @property
    def new_answers(self) -> list[str]:
        return [self.new_answer, *self.new_answer_alias]

    def edit_requests(self) -> list[EditRequest]:
        """The case's rewrites as :class:`ffkv.edit.EditRequest`\ s, in the published order."""
        return [c.edit_request() for c in self.rewrites]


def _mquake_case(r: dict, i: int) -> MultiHopCase:
    cid = r.get("case_id", i)
    rewrites = []
    for j, rw in enumerate(r["requested_rewrite"]):
        c = _rome_case({"case_id": cid, "requested_rewrite": rw}, i)
        c.extra["question"] = rw.get("question")
        c.extra["rewrite_index"] = j
        rewrites.append(c)
    if not rewrites or not r["questions"]:
        raise FfkvError(f"MQuAKE case {cid} has no rewrites or no questions", None)
    return MultiHopCase(cid, rewrites, list(r["questions"]), str(r["answer"]), list(r.get("answer_alias") or []),
                        str(r["new_answer"]), list(r.get("new_answer_alias") or []),
                        list(r.get("single_hops") or []), list(r.get("new_single_hops") or []))


def mquake_path(path: str | Path | None = None) -> Path:
    """The MQuAKE file: ``path`` (a file, or a folder holding one of :data:`MQUAKE_FILES`), default the shared
    data's ``mquake/`` folder; absent is one clear error."""
    where = Path(path) if path is not None else SHARED_DATA / "mquake"
    if where.is_dir():
        for name in MQUAKE_FILES:
            if (where / name).exists():
                return where / name
    elif where.exists():
        return where
    raise FfkvError(f"no MQuAKE file at {where}",
                    "pass the file (MQuAKE-CF-3k.json, MQuAKE-hard.json, ...) or set FFKV_SHARED_DATA to the folder "
                    "that holds mquake/")


def read_mquake(records, limit: int | None = None) -> list[MultiHopCase]:
    """MQuAKE cases from parsed records (a JSON list); a record without the MQuAKE keys is an error."""
    if not isinstance(records, list) or not records:
        raise FfkvError("the MQuAKE file holds no records", "pass a non-empty JSON list of MQuAKE cases")
    cases = []
    for i, r in enumerate(records[:limit] if limit is not None else records):
        if not isinstance(r, dict) or not MQUAKE_KEYS <= set(r):
            got = sorted(r)[:8] if isinstance(r, dict) else type(r).__name__
            raise FfkvError(f"record {i} is not an MQuAKE case (needs {sorted(MQUAKE_KEYS)}, has {got})",
                            "pass a file in MQuAKE's published layout")
        try:
            cases.append(_mquake_case(r, i))
        except (KeyError, TypeError, AttributeError) as e:
            raise FfkvError(f"MQuAKE record {i} lacks or mangles field {e}", "fix the record") from None
    return cases


def load_mquake(path: str | Path | None = None, limit: int | None = None) -> list[MultiHopCase]:
    """Read MQuAKE as published (see the module docstring); ``path`` as :func:`mquake_path`."""
    return read_mquake(read_json(mquake_path(path)), limit=limit)
