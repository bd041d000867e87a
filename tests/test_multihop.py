"""MQuAKE: the reader (a fixture in the published layout, and the real file when ../shared is there) and multi-hop
accuracy after edits on the planted-memory model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ffkv.errors import FfkvError
from ffkv.evaluate.datasets import load_mquake, mquake_path, read_mquake
from ffkv.evaluate.multihop import matches, multihop_accuracy
from ffkv.testbed.planted import WORDS, planted_model

FAST = {"layer": 1, "v_num_grad_steps": 10, "v_lr": 5.0, "prefixes": [[4, 3]], "stats_tokens": 3000,
        "max_update_ratio": 1000.0}


def rewrite(subject, new, true, prompt="the old {}"):
    return {"prompt": prompt, "relation_id": "P0", "subject": subject, "target_new": {"str": new, "id": "Q1"},
            "target_true": {"str": true, "id": "Q2"}, "question": prompt.format(subject)}


def hop(question, answer):
    return {"question": question, "cloze": question, "answer": answer, "answer_alias": []}


CASES = [
    # the rewrite changes the answer of the question: edited accuracy needs the new answer
    {"case_id": 1, "requested_rewrite": [rewrite("tower", "rome", "paris")],
     "questions": ["the old tower", "the big tower"], "answer": "paris", "answer_alias": ["paris city"],
     "new_answer": "rome", "new_answer_alias": ["rome city"],
     "single_hops": [hop("the old tower", "paris")], "new_single_hops": [hop("the old tower", "rome")]},
    # the rewrite touches another subject: the question keeps its old answer, the "new" one is never given
    {"case_id": 2, "requested_rewrite": [rewrite("tower", "rome", "paris")],
     "questions": ["the old castle"], "answer": "london", "answer_alias": [],
     "new_answer": "oslo", "new_answer_alias": [], "single_hops": [], "new_single_hops": []},
]


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("mquake") / "MQuAKE-CF-3k.json"
    p.write_text(json.dumps(CASES))
    return p


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(400)]


def test_reader_reads_the_published_layout(fixture_file):
    cases = load_mquake(fixture_file)
    assert [c.case_id for c in cases] == [1, 2]
    c = cases[0]
    assert c.new_answers == ["rome", "rome city"] and c.answers == ["paris", "paris city"]
    (req,) = c.edit_requests()
    assert (req.prompt, req.subject, req.target, req.target_true) == ("the old {}", "tower", " rome", " paris")
    assert c.rewrites[0].extra["question"] == "the old tower"
    assert load_mquake(fixture_file.parent)[0].case_id == 1  # a folder holding a published file name


def test_reader_refuses_in_one_line(tmp_path):
    with pytest.raises(FfkvError, match="no MQuAKE file") as e:
        mquake_path(tmp_path / "absent")
    assert "\n" not in e.value.line()
    with pytest.raises(FfkvError, match="not an MQuAKE case"):
        read_mquake([{"case_id": 0, "prompt": "x"}])
    with pytest.raises(FfkvError, match="no records"):
        read_mquake([])


def test_matches_needs_a_word_boundary():
    assert matches(" Arabic language.", ["Arabic"]) and matches(' "ar"', ["ar"])
    assert not matches(" area", ["ar"]) and not matches(" Paris", ["London", "UK"])


def test_multihop_accuracy_after_edits(fixture_file, corpus, tmp_path):
    m = planted_model().model
    before = {k: v.detach().clone() for k, v in m.hf.state_dict().items()}
    r = multihop_accuracy(m, load_mquake(fixture_file), "rome", FAST, template="{}", stats_dir=tmp_path / "stats",
                          corpus=corpus)
    one, two = r["cases"]
    assert one["unedited_correct"] and not one["new_answer_unedited"]
    assert one["edited_correct"] and not one["old_answer_after_edit"] and one["edit_efficacy"] == 1.0
    assert two["unedited_correct"] and not two["edited_correct"] and two["old_answer_after_edit"]
    assert r["multihop_acc_unedited"] == 1.0 and r["multihop_acc_edited"] == 0.5
    assert r["provenance"]["hyperparameters"]["method"] == "rome"
    after = m.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every case's edits undone exactly


def test_multihop_refuses_a_template_without_slot(fixture_file):
    m = planted_model().model
    with pytest.raises(FfkvError, match="template"):
        multihop_accuracy(m, load_mquake(fixture_file), template="Q: A:")


def test_reads_the_real_mquake(shared_data):
    path = shared_data / "mquake"
    if not any(path.glob("MQuAKE*.json")):
        pytest.skip(f"no MQuAKE file in {path}")
    cases = load_mquake(path)
    assert len(cases) >= 100
    for c in cases[:50]:
        assert c.questions and c.new_answer and c.rewrites
        for req in c.edit_requests():
            assert req.prompt.count("{}") == 1 and req.target.startswith(" ")
