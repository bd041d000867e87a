"""Facts to judge: testbed facts as queries, and subjects the model never saw.

Frequency buckets are the testbed's (:mod:`ffkv.testbed.buckets`); their names are re-exported here for the
callers of this module.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import FfkvError
from ..testbed.buckets import BUCKET_NAMES, bucket_of, stratified_facts
from ..testbed.datasets import load_facts
from ..testbed.world import _word

__all__ = ["Query", "load_testbed_facts", "fact_queries", "unseen_facts", "BUCKET_NAMES", "bucket_of",
           "stratified_facts"]


@dataclass
class Query:
    """One prompt asking for one fact's object."""

    fact_id: int
    subject: str
    relation_id: str
    object: str
    train_count: int
    prompt: str
    template: str
    kind: str  # "train" (a training template) or "heldout" (a held-out paraphrase)

    @property
    def bucket(self) -> str:
        return bucket_of(self.train_count)


def load_testbed_facts(path: str | Path) -> tuple[list[dict], dict[str, list[str]]]:
    """``(facts, candidates)`` from a testbed folder (``data/facts.jsonl``), its data folder or the file."""
    return load_facts(path)


def fact_queries(fact: dict, kind: str, rng: random.Random) -> Query:
    """One query of a fact through a random template of ``kind`` ("train" or "heldout")."""
    templates = fact["train_templates"] if kind == "train" else fact["heldout_templates"]
    if not templates:
        raise FfkvError(f"fact {fact['subject']!r} has no {kind} templates", "rebuild the testbed")
    t = rng.choice(templates)
    return Query(fact.get("fact_id", -1), fact["subject"], fact["relation_id"], fact["object"],
                 int(fact["train_count"]), t.format(fact["subject"]), t, kind)


def unseen_facts(facts: list[dict], candidates: dict[str, list[str]], n: int, seed: int = 0) -> list[dict]:
    """n facts about invented subjects the model never saw (train_count 0), with random true objects.

    Names are made the way the testbed makes them (syllables), checked against every known subject, so
    the model cannot know them; each gets a relation of a real fact (same templates) and a random object.
    """
    rng = random.Random(f"recall-unseen-{seed}")
    taken = {f["subject"].lower() for f in facts}
    taken |= {w.split()[0].lower() for f in facts for w in [f["subject"]]}
    person_like = [f for f in facts if f.get("subject_type", "person") == "person"] or facts
    out = []
    while len(out) < n:
        name = f"{_word(rng, rng.choice([1, 2]))} {_word(rng, 2)}"
        if name.lower() in taken or name.split()[0].lower() in taken:
            continue
        taken.add(name.lower())
        base = rng.choice(person_like)
        objs = candidates.get(base["relation_id"]) or [base["object"]]
        out.append({**base, "subject": name, "object": rng.choice(objs), "train_count": 0,
                    "fact_id": -1 - len(out)})
    return out
