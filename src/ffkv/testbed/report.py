"""Recall report: does the model complete each fact's prompt with the fact's object, and how does that
depend on how often the fact was seen in training?

Recall is scored on the object's FIRST token (objects are single tokens for all but the employer relation,
whose objects are two-word company names with distinct first tokens). For a prompt ``x`` with object first
token ``o``:

    greedy        [argmax_v p(v | x) = o]                          over the whole vocabulary
    candidates    [argmax_{c ∈ C_r} p(c | x) = o]                  among the relation's candidate objects
    sampled       (1/n) Σ_j [v_j = o],  v_j ~ p(· | x) (temperature 1)
    self-consistency  [o is sampled strictly more often than any other token among the n samples]
    p_object      p(o | x)

Each is averaged over prompts, then over facts, by frequency bucket (:mod:`ffkv.testbed.buckets`: 1, 2-3, 4-7,
8-15, 16-31, 32+, and "frequent" = seen 30 times or more), separately for training templates and held-out
paraphrase templates.
Prompts are batched (right-padded, logits read at the last real token).
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import FfkvError
from ..models.loading import load_model
from .buckets import BUCKETS, FREQUENT, OPEN, bucket_of, group_by_bucket
from .datasets import load_facts

__all__ = ["BUCKETS", "FREQUENT", "bucket_of", "select_facts", "prompt_rows", "next_token_distributions",
           "score_prompts", "recall_report", "format_table"]

METRICS = ("greedy", "candidates", "sampled", "self_consistency", "p_object")


def select_facts(facts: list[dict], max_per_bucket: int | None, seed: int = 0) -> list[dict]:
    """At most ``max_per_bucket`` facts from each frequency bucket (a seeded sample), all frequent facts kept."""
    if not max_per_bucket:
        return list(facts)
    rng = random.Random(f"{seed}-report")
    keep = set()
    for name, group in group_by_bucket(facts).items():
        chosen = group if len(group) <= max_per_bucket else rng.sample(group, max_per_bucket)
        keep.update(id(f) for f in chosen)
    keep.update(id(f) for f in facts if FREQUENT.holds(f["train_count"]))
    return [f for f in facts if id(f) in keep]


def prompt_rows(facts: list[dict], templates_per_fact: int | None, seed: int = 0) -> list[tuple[int, str, str]]:
    """(fact index, "train"|"heldout", prompt) for each fact: every held-out template and up to
    ``templates_per_fact`` training templates (a seeded choice; all when None)."""
    rng = random.Random(f"{seed}-templates")
    rows = []
    for i, f in enumerate(facts):
        train = list(f["train_templates"])
        if templates_per_fact and len(train) > templates_per_fact:
            train = rng.sample(train, templates_per_fact)
        rows += [(i, "train", t.format(f["subject"])) for t in train]
        rows += [(i, "heldout", t.format(f["subject"])) for t in f["heldout_templates"]]
    return rows


def next_token_distributions(model, prompts: list[str], batch_size: int = 256, progress: bool = True):
    """Next-token probabilities after each prompt, (len(prompts), vocab), float32, in batches."""
    out = []
    with torch.no_grad():
        for s in tqdm(range(0, len(prompts), batch_size), desc="recall", disable=not progress, leave=False):
            out.append(model.next_token_probs(prompts[s:s + batch_size]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def score_prompts(probs, object_ids, candidate_ids, n_samples: int, generator) -> dict:
    """Per-prompt scores. probs (P, V); object_ids (P,); candidate_ids: list of P lists of token ids."""
    greedy = (probs.argmax(-1) == object_ids).float()
    cand = torch.tensor([ids[int(probs[i, ids].argmax())] for i, ids in enumerate(candidate_ids)])
    candidates = (cand == object_ids).float()
    samples = torch.multinomial(probs, n_samples, replacement=True, generator=generator)  # (P, n)
    sampled = (samples == object_ids[:, None]).float().mean(-1)
    # Self-consistency: the object is sampled strictly more often than any other token (a tie is no consensus).
    same = (samples[:, :, None] == samples[:, None, :]).sum(-1)  # (P, n): how often each sample occurs
    is_obj = samples == object_ids[:, None]
    obj_counts = is_obj.sum(-1)
    other_max = same.masked_fill(is_obj, 0).max(-1).values
    self_consistency = (obj_counts > other_max).float()
    p_object = probs.gather(1, object_ids[:, None]).squeeze(1)
    return {"greedy": greedy, "candidates": candidates, "sampled": sampled,
            "self_consistency": self_consistency, "p_object": p_object}


def recall_report(model, facts: list[dict] | str | Path, candidates: dict[str, list[str]] | None = None,
                  n_samples: int = 10, max_facts_per_bucket: int | None = 1000, templates_per_fact: int | None = 2,
                  batch_size: int = 256, seed: int = 0, progress: bool = True) -> dict:
    """Recall of the facts by frequency bucket, greedy and sampled, training vs held-out templates.

    model: a MemoryModel (or a path to load); facts: facts.jsonl records or a testbed folder.
    Returns ``{"buckets": [{bucket, n_facts, train: {metric: value}, heldout: {...}}, ...],
    "by_relation": {...}, "n_prompts", "settings"}``.
    """
    if isinstance(facts, (str, Path)):
        facts, candidates = load_facts(facts)
    if candidates is None:
        raise FfkvError("recall_report needs each relation's candidate objects", "pass candidates=...")
    if isinstance(model, (str, Path)):
        model = load_model(str(model))
    model.require_tokenizer()

    chosen = select_facts(facts, max_facts_per_bucket, seed)
    rows = prompt_rows(chosen, templates_per_fact, seed)
    first = {}  # relation -> {object: first token id}
    for rid, objs in candidates.items():
        first[rid] = {o: model.answer_id(o) for o in objs}
    object_ids = torch.tensor([first[chosen[i]["relation_id"]][chosen[i]["object"]] for i, _, _ in rows])
    cand_ids = [sorted(set(first[chosen[i]["relation_id"]].values())) for i, _, _ in rows]

    probs = next_token_distributions(model, [p for _, _, p in rows], batch_size, progress)
    gen = torch.Generator().manual_seed(seed)
    scores = score_prompts(probs, object_ids, cand_ids, n_samples, gen)

    # prompt scores -> fact scores (mean over a fact's templates of each kind)
    per_fact = defaultdict(lambda: defaultdict(list))  # (fact, kind) -> metric -> [values]
    for r, (i, kind, _) in enumerate(rows):
        for m in METRICS:
            per_fact[i, kind][m].append(float(scores[m][r]))

    def summarize(indices) -> dict:
        out = {"n_facts": len(indices)}
        for kind in ("train", "heldout"):
            out[kind] = {m: round(sum(sum(per_fact[i, kind][m]) / len(per_fact[i, kind][m]) for i in indices)
                                  / len(indices), 4) if indices else None for m in METRICS}
        return out

    buckets = []
    for name, lo, hi in (*BUCKETS, FREQUENT):
        idx = [i for i, f in enumerate(chosen) if lo <= f["train_count"] <= hi]
        buckets.append({"bucket": name, "min_count": lo, "max_count": None if hi >= OPEN else hi,
                        **summarize(idx)})
    by_relation = {}
    for rid in candidates:
        idx = [i for i, f in enumerate(chosen) if f["relation_id"] == rid and FREQUENT.holds(f["train_count"])]
        by_relation[rid] = {"relation": next((f.get("relation", rid) for f in chosen if f["relation_id"] == rid),
                                             rid), "frequent": summarize(idx)}
    multi = sorted(o for rid, objs in candidates.items()
                   for o in objs if len(model.answer_tokens(o)) > 1)
    return {
        "buckets": buckets,
        "by_relation_frequent": by_relation,
        "n_facts_total": len(facts),
        "n_facts_scored": len(chosen),
        "n_prompts": len(rows),
        "multi_token_objects": len(multi),
        "settings": {"n_samples": n_samples, "temperature": 1.0, "max_facts_per_bucket": max_facts_per_bucket,
                     "templates_per_fact": templates_per_fact, "seed": seed,
                     "scored_on": "first token of the object (with its leading space)"},
    }


def format_table(report: dict) -> str:
    """The report as a Markdown table (held-out and training, greedy/candidates/sampled)."""
    lines = ["| times seen | facts | held-out greedy | held-out among candidates | held-out sampled | "
             "held-out self-consistency | train greedy | train among candidates | train sampled |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b in report["buckets"]:
        if not b["n_facts"]:
            continue
        h, t = b["heldout"], b["train"]
        lines.append(f"| {b['bucket']} | {b['n_facts']} | {h['greedy']:.3f} | {h['candidates']:.3f} | "
                     f"{h['sampled']:.3f} | {h['self_consistency']:.3f} | {t['greedy']:.3f} | "
                     f"{t['candidates']:.3f} | {t['sampled']:.3f} |")
    return "\n".join(lines)
