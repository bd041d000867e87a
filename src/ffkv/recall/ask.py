"""Answer a question from the weights or from retrieved passages, as the recall verdict says.

    route = "weights"     greedy answer to the question alone
    route = "retrieval"   the top-k passages of the index (BM25) placed before the question, then greedy
    route = "auto"        the verdict (:func:`ffkv.recall.verdict.judge`): "recall" -> weights, "retrieve" -> retrieval

The retrieval prompt is ``p_1 p_2 ... p_k question``: the passages in rank order, space-joined, as the testbed's
in-context prompts state a fact before the query (docs/recall.md). Passages that would not fit the model's
context are dropped from the lowest rank up. The answer is the greedy continuation up to the first
sentence end or newline (at most ``max_new_tokens`` tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import FfkvError
from ..models.engine import run
from ..progress import bar
from .index import Index, Passage
from .verdict import judge

__all__ = ["Answer", "ask", "greedy_answer", "ROUTES"]

ROUTES = ("auto", "weights", "retrieval")
_STOP = (".", "\n", "!", "?")


@dataclass
class Answer:
    question: str
    answer: str
    route: str                              # "weights" or "retrieval", as taken
    passages: list[Passage] = field(default_factory=list)
    prompt: str = ""
    verdict: dict | None = None             # the judge's score / threshold / verdict under route="auto"

    def to_dict(self) -> dict:
        v = None if self.verdict is None else {k: self.verdict[k] for k in ("score", "threshold", "verdict",
                                                                            "imputed")}
        return {"question": self.question, "answer": self.answer, "route": self.route, "prompt": self.prompt,
                "passages": [p.to_dict() for p in self.passages], "verdict": v}


@torch.no_grad()
def greedy_answer(model, prompt: str, max_new_tokens: int = 8) -> str:
    """The greedy continuation of ``prompt`` up to a sentence end or newline, stripped."""
    tok = model.require_tokenizer()
    ids = model.encode(prompt)["input_ids"]
    out: list[int] = []
    for _ in range(max_new_tokens):
        if ids.shape[1] >= model.context_length:
            break
        nxt = int(run(model, ids, head="last").logits[0].argmax())
        if tok.eos_token_id is not None and nxt == tok.eos_token_id:
            break
        out.append(nxt)
        text = tok.decode(out)
        if any(s in text for s in _STOP):
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], 1)
    text = tok.decode(out)
    for s in _STOP:
        text = text.split(s)[0]
    return text.strip()


def _fit(model, passages: list[Passage], question: str) -> tuple[str, list[Passage]]:
    kept = list(passages)
    while True:
        prompt = " ".join([p.text for p in kept] + [question])
        if len(model.token_ids(prompt)) < model.context_length or not kept:
            return prompt, kept
        kept = kept[:-1]


def ask(model, question: str, index: Index | None = None, route: str = "auto", k: int = 3,
        subject: str | None = None, max_new_tokens: int = 8, weights=None, progress: bool = False) -> Answer:
    """Answer ``question`` by ``route`` (module docstring). ``index`` is needed unless route is "weights".
    progress: a bar over the steps (the verdict, the search, the answer; :mod:`ffkv.progress`)."""
    if route not in ROUTES:
        raise FfkvError(f"unknown route {route!r}", f"use one of {', '.join(ROUTES)}")
    if not question.strip():
        raise FfkvError("the question is empty", "pass --question TEXT")
    if route != "weights" and index is None:
        raise FfkvError(f"route '{route}' needs a document index", "pass --index DB (ffkv index build)")
    model.check_length(len(model.token_ids(question)), "the question")
    verdict = None
    taken = route
    with bar(total=3 if route == "auto" else 2, desc="ask", unit="step", enabled=progress) as b:
        if route == "auto":
            # Without a subject its familiarity is imputed at the fitted mean (docs/recall.md, "Retrieval").
            verdict = judge(model, question, subject=subject, weights=weights, impute_missing=subject is None)
            taken = "weights" if verdict["verdict"] == "recall" else "retrieval"
            b.update(1)
        if taken == "weights":
            b.update(1)
            answer = greedy_answer(model, question, max_new_tokens)
            b.update(1)
            return Answer(question, answer, "weights", [], question, verdict)
        hits = index.search(question if subject is None else f"{subject} {question}", k=k)
        prompt, kept = _fit(model, hits, question)
        b.update(1)
        answer = greedy_answer(model, prompt, max_new_tokens)
        b.update(1)
    return Answer(question, answer, "retrieval", kept, prompt, verdict)
