"""In context versus weights: the same facts recalled from the weights and read from the prompt.

For a fact (s, r, o) and a query prompt q (a held-out paraphrase of r about s):

    weights          q                                  -> o ?
    in context       "<s r o>. <distractor>. " + q      -> o ?   (the fact stated first, as in training text)
    counterfactual   "<s r o'>. <distractor>. " + q     -> o' ?  (o' another object of r; does the model follow
                                                                   the context or its stored o?)
    unseen           invented subjects (train_count 0) with random objects, with and without the statement.

Statements use the relation's *training* templates and end with a period, and sentences are joined by
spaces, as in the testbed's training documents; the distractor is a statement of another subject's fact,
so reading the answer needs the subject, not just the last sentence. Accuracy is top-1 of the object's first
token over the whole vocabulary and, separately, among the relation's candidate objects.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

from ..models.model import MemoryModel
from ..testbed.buckets import BUCKET_NAMES, bucket_of


def statement(fact: dict, template: str, obj: str | None = None) -> str:
    """A training-text sentence stating the fact: ``"Ana Boll was born in Paris."``."""
    return f"{template.format(fact['subject'])} {obj or fact['object']}."


def context_prompt(fact: dict, query_template: str, rng: random.Random, others: list[dict],
                   obj: str | None = None, distractors: int = 1) -> str:
    """``statement [distractor ...] query``: the fact (or a counterfactual object) stated before the query."""
    parts = [statement(fact, rng.choice(fact["train_templates"]), obj)]
    pool = [g for g in others if g["subject"] != fact["subject"]]
    for g in rng.sample(pool, min(distractors, len(pool))):
        parts.append(statement(g, rng.choice(g["train_templates"])))
    return " ".join(parts + [query_template.format(fact["subject"])])


@torch.no_grad()
def batched_logits(model: MemoryModel, prompts: list[str], batch_size: int = 64, progress: bool = False):
    """Next-token logits for every prompt, (N, vocab) float32 on CPU."""
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="prompts", leave=False):
        out.append(model.next_token_logits(prompts[i:i + batch_size]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.vocab_size)


def first_token(model: MemoryModel, obj: str) -> int:
    """The object's first token as the query's continuation (the model's answer rule)."""
    return model.answer_id(obj)


def top1(logits: torch.Tensor, target_ids, candidate_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 correctness over the vocabulary and among each row's candidate first tokens. (N,), (N,)"""
    t = torch.as_tensor(target_ids)
    vocab = (logits.argmax(-1) == t).numpy()
    cand = np.array([int(c[int(logits[i, c].argmax())] == int(t[i])) for i, c in enumerate(candidate_ids)], bool)
    return vocab, cand


def in_context_table(model: MemoryModel, facts: list[dict], candidates: dict[str, list[str]],
                     unseen: list[dict] | None = None, distractors: int = 1, seed: int = 0,
                     progress: bool = True) -> dict:
    """Accuracy from weights, in context, and under a counterfactual context, by training-frequency bucket.

    facts: testbed facts (each needs subject, relation_id, object, train_count, train/heldout templates);
    unseen: invented facts with train_count 0 (see :func:`ffkv.recall.data.unseen_facts`). Returns
    ``{"buckets": {name: {n, weights, in_context, counterfactual_follows, counterfactual_sticks, ...}}, "rows"}``.
    """
    rng = random.Random(f"recall-incontext-{seed}")
    allf = list(facts) + list(unseen or [])
    cand_ids = {r: [first_token(model, o) for o in objs] for r, objs in candidates.items()}
    rows, prompts = [], {"weights": [], "context": [], "counter": []}
    for f in allf:
        q = rng.choice(f["heldout_templates"])
        others = [o for o in candidates[f["relation_id"]] if o != f["object"]]
        new = rng.choice(others)
        prompts["weights"].append(q.format(f["subject"]))
        prompts["context"].append(context_prompt(f, q, rng, facts, distractors=distractors))
        prompts["counter"].append(context_prompt(f, q, rng, facts, obj=new, distractors=distractors))
        rows.append({"subject": f["subject"], "relation_id": f["relation_id"], "object": f["object"],
                     "counterfactual": new, "train_count": int(f["train_count"]),
                     "bucket": bucket_of(int(f["train_count"])), "query": prompts["weights"][-1],
                     "context_prompt": prompts["context"][-1]})
    true_ids = [first_token(model, r["object"]) for r in rows]
    new_ids = [first_token(model, r["counterfactual"]) for r in rows]
    cids = [cand_ids[r["relation_id"]] for r in rows]
    res = {}
    for name, ps in prompts.items():
        logits = batched_logits(model, ps, progress=progress)
        res[name] = {"true": top1(logits, true_ids, cids), "new": top1(logits, new_ids, cids)}
    for i, r in enumerate(rows):
        r["weights_correct"] = bool(res["weights"]["true"][0][i])
        r["context_correct"] = bool(res["context"]["true"][0][i])
        r["counter_follows"] = bool(res["counter"]["new"][0][i])
        r["counter_sticks"] = bool(res["counter"]["true"][0][i])
    by = defaultdict(list)
    for i, r in enumerate(rows):
        by[r["bucket"]].append(i)
    buckets = {}
    for name in BUCKET_NAMES:
        idx = by.get(name)
        if not idx:
            continue
        m = lambda a: float(np.mean(a[idx]))  # noqa: E731
        buckets[name] = {
            "n": len(idx),
            "weights": m(res["weights"]["true"][0]), "weights_among_candidates": m(res["weights"]["true"][1]),
            "in_context": m(res["context"]["true"][0]), "in_context_among_candidates": m(res["context"]["true"][1]),
            "counterfactual_follows": m(res["counter"]["new"][0]),
            "counterfactual_sticks": m(res["counter"]["true"][0]),
            "counterfactual_follows_among_candidates": m(res["counter"]["new"][1]),
        }
    return {"buckets": buckets, "rows": rows, "distractors": distractors}
