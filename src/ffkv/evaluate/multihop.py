"""Multi-hop accuracy after edits (MQuAKE, Zhong et al. 2023), for any model and any registered edit method.

For each case (:class:`ffkv.evaluate.datasets.MultiHopCase`):

1. unedited: each of the case's multi-hop questions is asked (``template.format(question)``) and the model's
   greedy continuation is compared with the unedited answer and its aliases;
2. the case's requested rewrites are applied together with a method of :data:`ffkv.edit.registry.METHODS`
   (:func:`ffkv.edit.api.apply_edits`, journaled);
3. edited: the questions are asked again and compared with ``new_answer`` / ``new_answer_alias`` (and with the
   old answers, to see what survived); each rewrite's own prompt is checked for its new object (edit efficacy);
4. the edits are undone from the journal (exactly; the next case starts from the unedited weights).

A case is answered when *any* of its questions is (MQuAKE's multi-hop accuracy). An answer matches when the
normalised continuation (lower case, leading spaces and quotes stripped) equals an alias or starts with it
followed by a non-alphanumeric character. MQuAKE's own evaluation prompts large models with few-shot
chain-of-thought demonstrations; here the question is asked once with ``template`` (default ``"Q: {} A:"``),
which any causal language model can continue.

:func:`testbed_two_hop` asks whether a testbed model can answer two-hop questions at all, unedited: it composes
two known facts (``person --employer--> company --headquarters--> city`` and ``person --birthplace--> city
--country--> country``) into one prompt ("The employer of Ana Boll is headquartered in") and scores the first
token of the composed object.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

import torch

from ..edit.api import apply_edits
from ..edit.context import EditContext
from ..edit.registry import get_method
from ..errors import FfkvError
from ..io import provenance
from ..models.model import MemoryModel
from ..progress import track
from .datasets import MultiHopCase

DEFAULT_TEMPLATE = "Q: {} A:"


def normalise(text: str) -> str:
    return re.sub(r"^[\s\"'`:]+", "", str(text)).strip().lower()


def matches(continuation: str, answers: Sequence[str]) -> bool:
    """Whether a continuation gives one of ``answers`` (see the module docstring)."""
    c = normalise(continuation)
    for a in answers:
        a = normalise(a)
        if a and (c == a or (c.startswith(a) and not c[len(a)].isalnum())):
            return True
    return False


@torch.no_grad()
def greedy_continuation(model: MemoryModel, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy continuation of ``prompt`` (``max_new_tokens`` tokens), decoded."""
    tok = model.require_tokenizer()
    batch = model.encode(prompt)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.hf.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def _budget(model: MemoryModel, answers: Sequence[str], cap: int = 16) -> int:
    return min(cap, 1 + max(len(model.answer_tokens(a)) for a in answers if str(a).strip()))


def _ask(model, questions, template, answers, max_new_tokens) -> tuple[bool, list[str]]:
    outs = [greedy_continuation(model, template.format(q), max_new_tokens) for q in questions]
    return any(matches(o, answers) for o in outs), outs


def multihop_accuracy(model: MemoryModel, cases: Sequence[MultiHopCase], method: str = "rome", hparams=None,
                      template: str = DEFAULT_TEMPLATE, max_new_tokens: int | None = None,
                      stats_dir=None, corpus=None, context: EditContext | None = None,
                      progress: bool = False) -> dict:
    """MQuAKE's multi-hop accuracy of ``model`` before and after each case's edits (module docstring).

    method / hparams: the edit method and its overrides (:func:`ffkv.edit.api.apply_edits`). template: how a
    question is asked (``"{}"`` is the question). max_new_tokens: per answer (default: the longest alias's
    tokens + 1, at most 16). Returns ``{"n_cases", "multihop_acc_unedited", "multihop_acc_edited",
    "old_answer_after_edit", "new_answer_unedited", "edit_efficacy", "cases": [...], "provenance"}``.
    """
    if not cases:
        raise FfkvError("no multi-hop cases given", "pass MQuAKE cases (ffkv.evaluate.datasets.load_mquake)")
    if "{}" not in template:
        raise FfkvError(f"question template {template!r} has no '{{}}'", "e.g. 'Q: {} A:'")
    m = get_method(method)
    context = context if context is not None else EditContext()
    rows = []
    for case in track(list(cases), desc=f"multi-hop ({m.name})", unit="case", enabled=progress):
        budget = max_new_tokens or _budget(model, case.answers + case.new_answers)
        base_ok, base_out = _ask(model, case.questions, template, case.answers, budget)
        base_new = any(matches(o, case.new_answers) for o in base_out)
        journal = apply_edits(model, case.edit_requests(), m, hparams, stats_dir=stats_dir, corpus=corpus,
                              progress=False, context=context)
        try:
            new_ok, new_out = _ask(model, case.questions, template, case.new_answers, budget)
            old_after = any(matches(o, case.answers) for o in new_out)
            eff = [matches(greedy_continuation(model, r.rewrite_prompt, _budget(model, [r.target_new])),
                           [r.target_new]) for r in case.rewrites]
        finally:
            journal.undo(model)
        rows.append({"case_id": case.case_id, "unedited_correct": base_ok, "edited_correct": new_ok,
                     "old_answer_after_edit": old_after, "new_answer_unedited": base_new,
                     "edit_efficacy": sum(eff) / len(eff), "unedited_outputs": base_out, "edited_outputs": new_out})
    n = len(rows)
    mean = lambda k: sum(float(r[k]) for r in rows) / n  # noqa: E731
    return {"n_cases": n, "method": m.name, "template": template,
            "multihop_acc_unedited": mean("unedited_correct"), "multihop_acc_edited": mean("edited_correct"),
            "old_answer_after_edit": mean("old_answer_after_edit"),
            "new_answer_unedited": mean("new_answer_unedited"), "edit_efficacy": mean("edit_efficacy"),
            "cases": rows,
            "provenance": provenance(model.identity, method=m.name, hparams=hparams, template=template,
                                     max_new_tokens=max_new_tokens, n_cases=n)}


# ----------------------------------------------------------------------------------------------- testbed
# first hop (a person's relation whose object is the subject of other facts) -> how it is described in a prompt
FIRST_HOPS = {"P108": "the employer of {}", "P19": "the birthplace of {}"}


@torch.no_grad()
def testbed_two_hop(model: MemoryModel, facts: list[dict], n: int = 50, seed: int = 0) -> dict:
    """Two-hop questions composed from a testbed's facts, asked of the unedited model (module docstring).

    Of ``n`` sampled compositions (first hop in :data:`FIRST_HOPS`, second hop any fact of its object) it reports
    how many have both hops answered (top-1 first token on the first training template) and, of those, how many
    composed prompts the model answers. Returns ``{"n", "both_hops_known", "two_hop_correct",
    "two_hop_acc_given_hops_known", "two_hop_acc", "majority_baseline", "examples"}``.
    """
    by_subject: dict[str, list[dict]] = {}
    for f in facts:
        by_subject.setdefault(f["subject"], []).append(f)
    pairs = [(a, b) for a in facts if a["relation_id"] in FIRST_HOPS for b in by_subject.get(a["object"], [])
             if any(t.startswith("{} ") for t in b["train_templates"])]
    if not pairs:
        raise FfkvError("the facts compose no two-hop questions", "use a testbed with employer/birthplace facts")
    rng = random.Random(f"two-hop-{seed}")
    pairs = rng.sample(pairs, min(n, len(pairs)))

    def top1(prompt: str, obj: str) -> bool:
        return int(model.next_token_logits(prompt)[0].argmax()) == model.answer_id(obj)

    rows = []
    for a, b in pairs:
        second = next(t for t in b["train_templates"] if t.startswith("{} "))
        described = FIRST_HOPS[a["relation_id"]].format(a["subject"])
        composed = second.format(described[0].upper() + described[1:])
        hop1 = top1(a["train_templates"][0].format(a["subject"]), a["object"])
        hop2 = top1(b["train_templates"][0].format(b["subject"]), b["object"])
        rows.append({"prompt": composed, "answer": b["object"], "hop1": hop1, "hop2": hop2,
                     "correct": top1(composed, b["object"]), "first_relation": a["relation_id"],
                     "second_relation": b["relation_id"]})
    known = [r for r in rows if r["hop1"] and r["hop2"]]
    # the share a constant guess of each second relation's most common object gets: what "no composition" scores
    common: dict[str, dict[str, int]] = {}
    for r in rows:
        common.setdefault(r["second_relation"], {}).setdefault(r["answer"], 0)
        common[r["second_relation"]][r["answer"]] += 1
    majority = sum(max(c.values()) for c in common.values()) / len(rows)
    return {"majority_baseline": majority,"n": len(rows), "both_hops_known": len(known), "two_hop_correct": sum(r["correct"] for r in rows),
            "two_hop_acc": sum(r["correct"] for r in rows) / len(rows),
            "two_hop_acc_given_hops_known": (sum(r["correct"] for r in known) / len(known)) if known else None,
            "examples": rows[:10]}
