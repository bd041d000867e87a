"""ffkv.recall on the tiny testbed: every signal on a model trained on a world of known facts.

The tiny testbed is built once for this module (about half a minute on an idle core); set
FFKV_TINY_TESTBED to a folder made by `ffkv testbed build --preset tiny` to reuse one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ffkv.recall.consistency import self_consistency
from ffkv.recall.data import fact_queries, stratified_facts, unseen_facts
from ffkv.recall.incontext import in_context_table
from ffkv.recall.stats import auroc
from ffkv.recall.strength import storage_strength
from ffkv.recall.verdict import FEATURES, query_signals


@pytest.fixture(scope="module")
def tiny_testbed(tmp_path_factory) -> Path:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    given = os.environ.get("FFKV_TINY_TESTBED")
    if given:
        yield Path(given)
    else:
        from ffkv.testbed.build import build

        yield build("tiny", tmp_path_factory.mktemp("recall") / "tb", seed=0, report=False, progress=False)
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tb(tiny_testbed):
    import ffkv
    from ffkv.recall.data import load_testbed_facts

    model = ffkv.load_model(str(tiny_testbed / "model"))
    facts, candidates = load_testbed_facts(tiny_testbed)
    return model, facts, candidates


def test_storage_signals_on_trained_facts(tb):
    model, facts, _ = tb
    rng = random.Random(0)
    rows = []
    for f in stratified_facts(facts, 6, seed=1):
        q = fact_queries(f, "train", rng)
        rows.append(storage_strength(model, q.prompt, f["object"], subject=f["subject"]))
    recalled = [s for s in rows if s.rank == 0]
    missed = [s for s in rows if s.rank > 0]
    assert len(recalled) >= 4, "the tiny testbed should recall most of its training-template facts"
    for s in recalled:
        assert s.margin > 0 and 0 < s.strength < 1 and 0 < s.survival < 1 and s.redundancy >= 1
        assert s.strength <= s.survival + 1e-9  # p_k <= min(p_0, p_k / p_0 * p_0) and p_0 <= 1
        assert s.curve[0] == pytest.approx(s.p_answer, rel=1e-4)
        # Switching off the answer's most attributed memories removes it.
        assert s.curve[-1] < 0.5 * s.curve[0]
    for s in missed:
        assert s.margin < 0


def test_self_consistency_estimates_the_greedy_probability(tb):
    model, facts, _ = tb
    rng = random.Random(2)
    for f in facts[:4]:
        q = fact_queries(f, "heldout", rng)
        sc = self_consistency(model, q.prompt, n=400, temperature=1.0, seed=3)
        assert abs(sc.agreement - sc.expected_agreement) < 0.1
        assert sc.greedy == model.decode([int(model.next_token_logits(q.prompt)[0].argmax())])


def test_signals_separate_right_from_wrong_recall(tb):
    model, facts, candidates = tb
    rng = random.Random(4)
    queries = [fact_queries(f, "heldout", rng) for f in stratified_facts(facts, 12, seed=5)]
    queries += [fact_queries(f, "heldout", rng) for f in unseen_facts(facts, candidates, 8, seed=5)]
    feats, correct = [], []
    for q in queries:
        sig = query_signals(model, q.prompt, q.subject, n_samples=10)
        assert set(sig["features"]) == set(FEATURES)
        assert all(np.isfinite(v) for v in sig["features"].values())
        feats.append(sig["features"])
        correct.append(sig["strength"].answer_id == model.answer_id(" " + q.object))
    correct = np.array(correct)
    assert 0 < correct.sum() < len(correct)
    assert auroc([f["log_p"] for f in feats], correct) > 0.6


def test_unseen_subjects_are_new_and_not_recalled(tb):
    model, facts, candidates = tb
    unseen = unseen_facts(facts, candidates, 30, seed=0)
    known = {f["subject"] for f in facts}
    assert not known & {u["subject"] for u in unseen}
    assert all(u["train_count"] == 0 and u["object"] in candidates[u["relation_id"]] for u in unseen)
    tab = in_context_table(model, stratified_facts(facts, 20, seed=0), candidates, unseen=unseen, progress=False)
    b = tab["buckets"]
    assert b["0"]["n"] == 30 and b["0"]["weights"] < 0.35
    for row in b.values():
        for k in ("weights", "in_context", "counterfactual_follows", "counterfactual_sticks"):
            assert 0.0 <= row[k] <= 1.0
    ex = tab["rows"][0]
    assert ex["context_prompt"].endswith(ex["query"]) and ex["object"] in ex["context_prompt"]


def test_the_testbed_build_writes_its_worlds_index(tiny_testbed):
    """``ffkv testbed build`` leaves data/index.sqlite: every fact's training statements, searchable."""
    from ffkv.recall.data import load_testbed_facts
    from ffkv.recall.index import open_index

    facts, _ = load_testbed_facts(tiny_testbed)
    with open_index(tiny_testbed / "data" / "index.sqlite") as ix:
        assert len(ix) == sum(len(f["train_templates"]) for f in facts)
        f = facts[0]
        hits = ix.search(f["train_templates"][0].format(f["subject"]), 3)
        assert hits and hits[0].doc.startswith(f"fact:{f['fact_id']}:")
        assert ix.provenance["hyperparameters"]["testbed"] == str(tiny_testbed)
