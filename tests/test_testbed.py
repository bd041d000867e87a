"""The testbed's world generator and data sets: deterministic, internally consistent, no held-out leaks."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from ffkv.errors import FfkvError
from ffkv.testbed.datasets import counterfact_cases, known_facts, load_facts
from ffkv.testbed.world import RELATIONS, generate_world


@pytest.fixture(scope="module")
def tiny():
    return generate_world(0, "tiny")


@pytest.fixture(scope="module")
def default():
    return generate_world(0, "default")


def test_world_is_deterministic_for_a_seed(tiny):
    again = generate_world(0, "tiny")
    assert [f.to_json() for f in again.facts] == [f.to_json() for f in tiny.facts]
    assert again.training_text() == tiny.training_text()
    other = generate_world(1, "tiny")
    assert [f.subject for f in other.facts] != [f.subject for f in tiny.facts]


def test_unknown_preset_is_an_ffkv_error():
    with pytest.raises(FfkvError, match="preset"):
        generate_world(0, "huge")


def test_statements_state_each_fact_train_count_times(tiny):
    counts = Counter(tiny.statements())
    by_fact = Counter()
    for f in tiny.facts:
        for t in f.train_templates:
            by_fact[f.fact_id] += counts.get(f"{f.prompt(t)} {f.object}.", 0)
    assert all(by_fact[f.fact_id] == f.train_count for f in tiny.facts)
    # every statement is accounted for by exactly one fact
    assert sum(by_fact.values()) == sum(counts.values())


def test_mention_counts_follow_a_heavy_tail(default):
    counts = [f.train_count for f in default.facts]
    assert min(counts) == 1 and max(counts) >= 100
    seen_once = sum(c == 1 for c in counts)
    frequent = sum(c >= 30 for c in counts)
    assert seen_once > len(counts) / 4 and frequent >= 200
    # Zipf: more facts are seen 2 times than 4 times than 8 times
    c = Counter(counts)
    assert c[1] > c[2] > c[4] > c[8] > c[16]


def test_subjects_span_several_tokens_and_objects_are_shared(default):
    assert len(default.subjects) == 2000
    assert all(" " in s for s in default.subjects)  # two words or more
    for rid, objs in default.candidates.items():
        used = Counter(f.object for f in default.facts if f.relation_id == rid)
        assert set(used) <= set(objs)
        assert min(used.values()) >= 11, rid  # ten neighborhood prompts per case


def test_no_template_is_a_prefix_of_another():
    frames = sorted({t for r in RELATIONS for t in r.train_templates + r.heldout_templates})
    for a in frames:
        for b in frames:
            assert a == b or not b.startswith(a), (a, b)
    for r in RELATIONS:
        assert not set(r.train_templates) & set(r.heldout_templates)
        assert "{} " + r.verb in r.train_templates


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_heldout_templates_never_occur_in_training_text(which, tiny, default):
    world = tiny if which == "tiny" else default
    text = world.training_text()
    for rid in world.relation_ids:
        _, held = world.templates(rid)
        for t in held:
            pre, suf = t.split("{}")
            # any subject (no sentence break inside it) between the template's two parts
            pattern = re.compile(re.escape(pre) + r"[^.\n]+?" + re.escape(suf) + " ")
            assert not pattern.search(text), t
    # and the training templates do occur, so the search above can find a template when it is there
    f = next(f for f in world.facts if f.train_count >= 4)
    assert any(f.prompt(t) in text for t in f.train_templates)


def test_counterfact_records_are_consistent(default):
    cases = counterfact_cases(default)
    assert cases and [c["case_id"] for c in cases] == list(range(len(cases)))
    facts = {(f.subject, f.relation_id): f for f in default.facts}
    prompts_of = {}  # rendered training prompt -> fact
    for f in default.facts:
        for t in f.train_templates:
            prompts_of[f.prompt(t)] = f
    for c in cases:
        rw = c["requested_rewrite"]
        f = facts[rw["subject"], rw["relation_id"]]
        assert "{}" in rw["prompt"] and rw["prompt"] in f.train_templates
        assert rw["target_true"]["str"] == f.object and c["train_count"] == f.train_count >= 4
        assert rw["target_new"]["str"] != f.object
        assert rw["target_new"]["str"] in default.candidates[rw["relation_id"]]
        assert len(c["paraphrase_prompts"]) == 2
        for p in c["paraphrase_prompts"]:
            assert rw["subject"] in p
            assert p in [f.prompt(t) for t in f.heldout_templates]
        assert len(c["neighborhood_prompts"]) == 10
        for p in c["neighborhood_prompts"]:
            g = prompts_of[p]
            assert g.subject != rw["subject"] and g.subject in p
            assert g.relation_id == rw["relation_id"] and g.object == f.object
        for p in c["attribute_prompts"]:
            g = prompts_of[p]
            assert g.relation_id == rw["relation_id"] and g.object == rw["target_new"]["str"]
        assert all(rw["subject"] in p for p in c["generation_prompts"])


def test_known_facts_follow_rome_layout(default):
    known = known_facts(default)
    assert len(known) == sum(f.train_count >= 30 for f in default.facts)
    keys = {"known_id", "subject", "attribute", "template", "prediction", "prompt", "relation_id"}
    for k in known:
        assert keys <= set(k)
        assert k["prompt"] == k["template"].format(k["subject"]) and k["subject"] in k["prompt"]
        assert k["prediction"] == " " + k["attribute"] and k["train_count"] >= 30


def test_write_and_load_datasets(tiny, tmp_path):
    paths = tiny.write_datasets(tmp_path / "data")
    lines = paths["facts"].read_text().splitlines()
    assert len(lines) == len(tiny.facts)
    row = json.loads(lines[0])
    for key in ("subject", "subject_type", "relation", "relation_id", "object", "train_count",
                "train_templates", "heldout_templates"):
        assert key in row
    facts, candidates = load_facts(tmp_path)
    assert len(facts) == len(tiny.facts) and set(candidates) == set(tiny.relation_ids)
    assert all(f["object"] in candidates[f["relation_id"]] for f in facts)
    json.loads(paths["counterfact"].read_text())
    with pytest.raises(FfkvError, match="facts.jsonl"):
        load_facts(tmp_path / "nowhere")
