"""Edit requests and the token bookkeeping every method needs.

A request is ROME's ``requested_rewrite``: a prompt template with ``{}`` where the subject goes, the
subject, and the new object as the continuation of the prompt (``" Rome"``, with its leading space):

    EditRequest("{} is located in", "Eiffel Tower", " Rome", target_true=" Paris")

Texts are built as ``prefix + prompt.format(subject)``; the subject's *last token* is where ROME reads the
key and writes the value (``fact_token = subject_last``). Target tokens are those of the target as the
prompt's continuation (:func:`target_ids`), appended to every rendered prompt's tokens (as ROME does), so
that the edit teaches exactly the ids an evaluation scores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .. import validate
from ..errors import FfkvError
from ..io import read_json


@dataclass
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should continue with ``target``.

    prompt: template with one ``{}`` (a prompt that spells the subject out is accepted and turned into one).
    target: the new object as a continuation, leading space included (``" Rome"``).
    target_true: the object the model knows now (optional; used by KN edits and evaluation).
    """

    prompt: str
    subject: str
    target: str
    target_true: str | None = None
    case_id: int | None = None

    def __post_init__(self):
        self.prompt = str(self.prompt)
        self.subject = str(self.subject or "")
        # The one answer rule (MemoryModel.answer_tokens): a target continues the prompt, so it gets a leading
        # space unless it has one; `--target Rome` and `--target " Rome"` edit towards the same token.
        self.target = _continuation(self.target) if str(self.target or "").strip() else str(self.target or "")
        if self.target_true is not None and str(self.target_true).strip():
            self.target_true = _continuation(self.target_true)
        if "{}" not in self.prompt and self.subject and self.subject in self.prompt:
            self.prompt = self.prompt.replace(self.subject, "{}", 1)

    # ------------------------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The prompt with the subject in place: ``"Eiffel Tower is located in"``."""
        return self.prompt.replace("{}", self.subject, 1)

    def validate(self, need_target: bool = True) -> "EditRequest":
        """Refuse a request no method can apply, with one line that names the problem and the fix."""
        if not self.subject.strip():
            raise FfkvError(f"edit request {self.prompt!r} has an empty subject", "pass the subject to edit")
        if self.prompt.count("{}") != 1:
            raise FfkvError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}",
                            "write the prompt with one '{}' where the subject goes, or spell the subject "
                            "exactly as it appears in the prompt")
        if need_target and not self.target.strip():
            raise FfkvError(f"edit request '{self.text}' has an empty target",
                            "pass the new object as the continuation, e.g. ' Rome'")
        if need_target and self.target_true is not None and self.target_true.strip() == self.target.strip():
            raise FfkvError(f"edit request '{self.text}' asks for the object it already has ({self.target!r})",
                            "pass a different target")
        return self

    @classmethod
    def from_counterfact(cls, record: dict) -> "EditRequest":
        """From a CounterFact record (ROME layout, ``requested_rewrite``) or its rewrite dict itself.

        CounterFact stores objects without their leading space (``"Rome"``); the continuation gets one.
        """
        rw = record.get("requested_rewrite", record)
        if isinstance(rw, list):  # MQuAKE-style lists: the first rewrite
            rw = rw[0]
        try:
            prompt, subject = rw["prompt"], rw["subject"]
            new = rw["target_new"]["str"] if isinstance(rw["target_new"], dict) else rw["target_new"]
            true = rw.get("target_true")
            true = true["str"] if isinstance(true, dict) else true
        except (KeyError, TypeError) as e:
            raise FfkvError(f"record is not a CounterFact rewrite (missing {e})",
                            "give records with requested_rewrite: prompt, subject, target_new.str") from None
        return cls(prompt, subject, _continuation(new), _continuation(true) if true else None,
                   case_id=record.get("case_id"))

    @classmethod
    def from_json(cls, d: dict) -> "EditRequest":
        if not isinstance(d, dict):
            raise FfkvError(f"edit request {str(d)[:80]} is not an object",
                            "give {prompt, subject, target} objects or CounterFact records")
        if "requested_rewrite" in d or "target_new" in d:
            return cls.from_counterfact(d)
        missing = {"prompt", "subject"} - set(d) | ({"target"} - set(d) if "target_true" not in d else set())
        if missing:
            raise FfkvError(f"edit request {d} lacks {sorted(missing)}",
                            "give prompt, subject and target (or a CounterFact record)")
        return cls(d["prompt"], d["subject"], d.get("target", ""), d.get("target_true"), d.get("case_id"))

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _continuation(obj: str) -> str:
    obj = str(obj)
    return obj if obj[:1].isspace() else " " + obj


def load_requests(path: str | Path) -> list[EditRequest]:
    """Requests from a JSON list or a JSONL file of request dicts or CounterFact records (one object alone is one
    request); a bad line or record is refused naming it (:func:`ffkv.validate.records`)."""
    data = validate.records(path, what="edit request")
    if not data:
        raise FfkvError(f"{path} holds no edit requests", "give a JSON list (or JSONL) of requests")
    out = []
    for i, d in enumerate(data, 1):
        try:
            out.append(EditRequest.from_json(d))
        except FfkvError as e:
            raise FfkvError(f"{path} record {i}: {e.problem}", e.fix) from None
    return out


def as_requests(requests, need_target: bool = True) -> list[EditRequest]:
    """Accept one request, a list of them, or dicts; validate each."""
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    out = [r if isinstance(r, EditRequest) else EditRequest.from_json(r) for r in requests]
    if not out:
        raise FfkvError("no edit requests given", "pass at least one EditRequest")
    return [r.validate(need_target) for r in out]


# ----------------------------------------------------------------------------------------------------
# Token bookkeeping.


def target_ids(model, request: EditRequest) -> list[int]:
    """Token ids of the target as the continuation of the prompt.

    Read off the tokenization of ``prompt + target`` when it starts with the prompt's own ids (the boundary
    tokenized as the model sees the whole string, the rule ``ffkv.evaluate`` scores with); otherwise the
    target tokenized alone.
    """
    tok = model.require_tokenizer()
    p = tok(request.text)["input_ids"]
    full = tok(request.text + request.target)["input_ids"]
    ids = full[len(p):] if len(full) > len(p) and full[: len(p)] == p else model.token_ids(request.target)
    if not ids:
        raise FfkvError(f"target {request.target!r} tokenizes to nothing", "give a non-empty target")
    return ids


@dataclass
class Batch:
    """A right-padded batch of rendered prompts.

    input_ids, attention_mask: (B, T). subject_last: (B,) position of each row's subject's last token.
    target_pos: (B, L) positions whose logits predict the target tokens ``target_tok`` (B, L);
    ``target_mask`` (B, L) marks real ones. last: (B,) position of each row's last prompt token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_last: torch.Tensor
    last: torch.Tensor
    target_pos: torch.Tensor | None = None
    target_tok: torch.Tensor | None = None
    target_mask: torch.Tensor | None = None

    @property
    def inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def render_batch(model, rows: Sequence[tuple[str, EditRequest]], with_target: bool = False) -> Batch:
    """Tokenize ``prefix + request.text`` for each ``(prefix, request)`` row; find the subject's last token.

    With ``with_target`` the target's tokens but the last are appended, so the logits at ``target_pos``
    predict ``target_tok`` (teacher forcing, as in ROME's ``compute_v``).
    """
    tok = model.require_tokenizer()
    texts, ends = [], []
    for prefix, req in rows:
        texts.append(prefix + req.text)
        ends.append(len(prefix) + req.prompt.index("{}") + len(req.subject))
    enc = tok(texts, return_offsets_mapping=True, add_special_tokens=True)
    ids_rows, subj, last, tpos, ttok = [], [], [], [], []
    for r, (text, end) in enumerate(zip(texts, ends)):
        ids = list(enc["input_ids"][r])
        offsets = enc["offset_mapping"][r]
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end]
        if not inside:
            raise FfkvError(f"subject {rows[r][1].subject!r} maps to no token of {text!r}", "check the tokenizer")
        subj.append(inside[-1])
        last.append(len(ids) - 1)
        model.check_length(len(ids) + (len(target_ids(model, rows[r][1])) - 1 if with_target else 0),
                           what=f"edit prompt {text[:60]!r}" + (" with its target" if with_target else ""))
        if with_target:
            t = target_ids(model, rows[r][1])
            tpos.append([len(ids) - 1 + j for j in range(len(t))])
            ttok.append(t)
            ids = ids + t[:-1]
        ids_rows.append(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    T = max(len(x) for x in ids_rows)
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, ids in enumerate(ids_rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        mask[r, :len(ids)] = 1
    dev = model.device
    batch = Batch(input_ids.to(dev), mask.to(dev), torch.tensor(subj, device=dev), torch.tensor(last, device=dev))
    if with_target:
        L = max(len(t) for t in ttok)
        batch.target_pos = torch.zeros((len(rows), L), dtype=torch.long)
        batch.target_tok = torch.zeros((len(rows), L), dtype=torch.long)
        batch.target_mask = torch.zeros((len(rows), L), dtype=torch.bool)
        for r, (p, t) in enumerate(zip(tpos, ttok)):
            batch.target_pos[r, :len(p)] = torch.tensor(p)
            batch.target_tok[r, :len(t)] = torch.tensor(t)
            batch.target_mask[r, :len(t)] = True
        batch.target_pos, batch.target_tok, batch.target_mask = (
            batch.target_pos.to(dev), batch.target_tok.to(dev), batch.target_mask.to(dev))
    return batch


def dump_requests(requests: Sequence[EditRequest]) -> str:
    return json.dumps([r.to_json() for r in requests])
