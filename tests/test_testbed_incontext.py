"""The in-context world preset: profile documents that restate facts, and subjects seen only in them."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from ffkv.testbed.world import generate_world

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "ffkv" / "testbed" / "assets" / "default" / "data"


@pytest.fixture(scope="module")
def world():
    return generate_world(0, "incontext")


@pytest.fixture(scope="module")
def docs(world):
    return world.documents()


def _mentions(name: str, text: str) -> int:
    return len(re.findall(r"(?<![\w])" + re.escape(name) + r"(?![\w])", text))


def test_incontext_world_is_deterministic(world, docs):
    again = generate_world(0, "incontext")
    assert [f.to_json() for f in again.facts] == [f.to_json() for f in world.facts]
    assert [f.to_json() for f in again.context_facts] == [f.to_json() for f in world.context_facts]
    assert again.documents() == docs
    other = generate_world(1, "incontext")
    assert [f.subject for f in other.context_facts] != [f.subject for f in world.context_facts]


def test_context_only_subjects_appear_only_in_their_profile_document(world, docs):
    known = set(world.subjects)
    groups: dict[str, list] = {}
    for f in world.context_facts:
        groups.setdefault(f.subject, []).append(f)
    assert len(groups) > 1000 and not known & set(groups)
    rng = random.Random(0)
    for subject in rng.sample(sorted(groups), 150):
        facts = groups[subject]
        holding = [d for d in docs if subject in d and _mentions(subject, d)]
        assert len(holding) == 1, subject
        doc = holding[0]
        # stated, then restated: twice per fact, and the restatement comes after every statement
        assert _mentions(subject, doc) == 2 * len(facts) == sum(f.train_count for f in facts)
        sentences = [s for s in re.split(r"(?<=\.) ", doc)]
        about = [i for i, s in enumerate(sentences) if _mentions(subject, s)]
        first, again = about[:len(facts)], about[len(facts):]
        assert max(first) < min(again)
        for f, i, j in zip(facts, first, again):
            assert sentences[i].endswith(f" {f.object}.") and sentences[j].endswith(f" {f.object}.")


def test_profiled_world_subjects_keep_their_train_count(world, docs):
    """A profile takes two of each fact's mentions; the total stays train_count (people: never objects)."""
    text = "\n".join(docs)
    people = [s for s in world.profile_subjects
              if next(f for f in world.facts if f.subject == s).subject_type == "person"]
    assert people
    for s in random.Random(1).sample(people, min(40, len(people))):
        facts = [f for f in world.facts if f.subject == s]
        assert _mentions(s, text) == sum(f.train_count for f in facts), s
        assert sum(s in d and _mentions(s, d) >= 2 * len(facts) for d in docs) >= 1


def test_heldout_templates_stay_out_of_the_incontext_text(world, docs):
    text = "\n".join(docs)
    for rid in world.relation_ids:
        _, held = world.templates(rid)
        for t in held:
            f = next(f for f in world.facts if f.relation_id == rid)
            assert t.format(f.subject) not in text


def test_default_world_is_unchanged_by_the_option():
    world = generate_world(0, "default")
    assert not world.context_facts and not world.profile_subjects
    shipped = json.loads((SHIPPED / "world.json").read_text())
    assert world.summary() == shipped["summary"]
    # the default documents are still the plain shuffle of statements and filler
    rng = random.Random("0-documents")
    sentences = world.statements() + list(world.filler)
    rng.shuffle(sentences)
    n = world.sentences_per_document
    assert world.documents() == [" ".join(sentences[i:i + n]) for i in range(0, len(sentences), n)]
