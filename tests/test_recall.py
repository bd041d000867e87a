"""Tests of ffkv.recall on planted-memory models (ground truth) and synthetic data (statistics)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ffkv.errors import FfkvError
from ffkv.recall.consistency import self_consistency, temperature_table, tempered_probs
from ffkv.recall.stats import auroc, best_threshold, bootstrap_ci, fit_logistic, ranks, sigmoid, spearman
from ffkv.locate.interventions import ablation_curve
from ffkv.recall.strength import (curve_area, k_half, memory_attribution, storage_strength, survival,
                                  trace_concentration)
from ffkv.recall.verdict import FEATURES, VerdictModel, fit_verdict, judge, query_signals

PROMPTS = {"tower": "the old tower", "castle": "the old castle", "river": "the old river"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pm(request, planted, planted_llama):
    return planted if request.param == "gpt2" else planted_llama


# ----------------------------------------------------------------------------------------------- storage


def test_ablating_the_planted_memory_kills_the_fact(pm):
    m, f = pm.model, pm.fact("tower")
    curve = ablation_curve(m, PROMPTS["tower"], f.target_id, f.memories, ks=(0, 1), positions="all")
    assert [c["k"] for c in curve] == [0, 1]
    assert curve[0]["prob"] > 0.99 and curve[1]["prob"] < 0.01 and curve[1]["flip_rate"] == 1.0


def test_attribution_ranks_the_planted_memory_first(pm):
    m = pm.model
    for trigger in ("tower", "castle"):
        f = pm.fact(trigger)
        a = memory_attribution(m, PROMPTS[trigger], f.target_id)
        assert a.shape == (m.n_layers, m.d_ffn)
        layer, index = divmod(int(a.reshape(-1).argmax()), m.d_ffn)
        assert (layer, index) == tuple(f.memories[0])


def test_single_memory_fact_is_weak_next_to_a_redundant_one(pm):
    m = pm.model
    tower = storage_strength(m, PROMPTS["tower"], "paris", subject="tower")
    river = storage_strength(m, PROMPTS["river"], "rome", subject="river")
    assert tower.p_answer > 0.99 and river.p_answer > 0.99
    assert tower.redundancy == 1
    # The four planted memories are found (the adaptive ranking follows the GPT-2 model's backup memories,
    # which stay silent until the first two are off) and the fact survives until all four are off.
    assert river.redundancy == 4
    assert {tuple(t) for t in river.top[:4]} == set(pm.fact("river").memories)
    assert tower.strength < 0.1 < river.strength
    assert tower.survival == pytest.approx(tower.strength)  # p_0 = 1: absolute and relative areas agree
    assert tower.margin > 0 and tower.rank == 0


def test_one_shot_ranking_misses_the_gpt2_backup_memories(planted):
    river = storage_strength(planted.model, PROMPTS["river"], "rome", adaptive=False)
    adaptive = storage_strength(planted.model, PROMPTS["river"], "rome", adaptive=True)
    assert river.redundancy > adaptive.redundancy


def test_greedy_answer_is_the_default(planted):
    s = storage_strength(planted.model, PROMPTS["castle"])
    assert s.answer.strip() == "london" and s.rank == 0


def test_trace_concentration_peaks_at_the_planted_layer(planted):
    f = planted.fact("tower")
    tr = trace_concentration(planted.model, PROMPTS["tower"], "tower", f.target_id, noise=3.0)
    assert tr["peak_layer"] == 1 and tr["peak_token"] == 2
    assert tr["high_score"] > tr["low_score"] + 0.3
    assert 0.5 < tr["concentration"] <= 1.0


def test_curve_summaries():
    s = survival(np.array([0.5, 0.5, 0.6, 0.1]))
    assert s.tolist() == [1.0, 1.0, 1.0, 0.2]
    assert curve_area(np.array([1.0, 1.0, 1.0])) == 1.0
    assert curve_area(np.array([1.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert k_half([0, 1, 2, 4], np.array([1.0, 0.9, 0.4, 0.1])) == 2
    assert k_half([0, 1, 2], np.array([1.0, 0.9, 0.8])) == 3


def test_subject_not_in_prompt_is_an_error(planted):
    with pytest.raises(FfkvError, match="does not occur"):
        storage_strength(planted.model, PROMPTS["tower"], "paris", subject="castle")


# ----------------------------------------------------------------------------------------------- sampling


def test_self_consistency_of_a_stored_and_an_absent_fact(planted):
    m = planted.model
    stored = self_consistency(m, PROMPTS["tower"], n=50, temperature=1.0)
    assert stored.greedy.strip() == "paris" and stored.agreement == 1.0
    absent = self_consistency(m, "the old", n=50, temperature=1.5, answer="paris")
    assert absent.agreement < 0.9 and len(absent.distribution) > 3
    assert abs(sum(absent.distribution.values()) - 1.0) < 1e-9
    assert absent.answer_agreement is not None
    greedy = self_consistency(m, "the old", n=20, temperature=0.0)
    assert greedy.agreement == 1.0 and greedy.expected_agreement == 1.0


def test_temperature_changes_confidence_not_greedy_accuracy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=g) * 2
    answers = torch.where(torch.rand(200, generator=g) < 0.6, logits.argmax(-1), torch.randint(0, 50, (200,),
                                                                                                 generator=g))
    rows = temperature_table(logits, answers, temperatures=(0.0, 0.5, 1.0, 1.5))
    acc = [r["greedy_accuracy"] for r in rows]
    conf = [r["confidence"] for r in rows]
    assert len(set(acc)) == 1
    assert all(a > b for a, b in zip(conf, conf[1:]))
    assert rows[0]["confidence_when_wrong"] == 1.0
    assert rows[0]["sampled_accuracy"] == pytest.approx(acc[0])


def test_tempered_probs_rejects_negative_temperature():
    with pytest.raises(FfkvError):
        tempered_probs(torch.zeros(3), -1.0)


# ----------------------------------------------------------------------------------------------- statistics


def test_auroc_equals_pairwise_probability():
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=60).round(1), rng.random(60) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert auroc(s, y) == pytest.approx(np.mean(pairs))
    assert auroc(np.arange(10), np.arange(10) >= 5) == 1.0


def test_spearman_and_ranks():
    assert ranks([3, 1, 1, 2]).tolist() == [4.0, 1.5, 1.5, 3.0]
    x = np.arange(20.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    est, lo, hi = bootstrap_ci(spearman, x, x + np.random.default_rng(1).normal(0, 5, 20), n_boot=200)
    assert lo <= est <= hi


def test_logistic_regression_recovers_a_separating_direction():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 2))
    y = (rng.random(400) < sigmoid(3 * X[:, 0])).astype(float)
    w, b = fit_logistic(X, y)
    assert w[0] > 2 and abs(w[1]) < 0.5
    t, acc = best_threshold(sigmoid(X @ w + b), y)
    assert acc > 0.75


# ----------------------------------------------------------------------------------------------- verdict


@pytest.fixture(scope="module")
def planted_weights(planted, tmp_path_factory):
    """A verdict fitted on planted-model queries: stored facts are right, trigger-less prompts wrong."""
    m = planted.model
    prompts = [("the old tower", 1), ("the old castle", 1), ("the old river", 1), ("a big tower", 1),
               ("the old", 0), ("a new", 0), ("the big king", 0), ("north of the", 0)]
    X, y = [], []
    for p, label in prompts:
        f = query_signals(m, p, subject=p.split()[-1], n_samples=10)["features"]
        X.append([f[k] for k in FEATURES])
        y.append(label)
    vm = fit_verdict(np.array(X), np.array(y), provenance={"note": "test fit on the planted model"},
                     signal_settings={"n_samples": 10, "temperature": 1.0, "adaptive": True})
    path = tmp_path_factory.mktemp("verdict") / "w.json"
    vm.save(path)
    return path


def test_verdict_roundtrip_and_scores(planted, planted_weights):
    vm = VerdictModel.load(planted_weights)
    assert vm.features == list(FEATURES) and vm.signal_settings["n_samples"] == 10
    rep = judge(planted.model, "the old tower", subject="tower", answer="paris", weights=planted_weights)
    assert rep["verdict"] in ("recall", "retrieve") and 0 <= rep["score"] <= 1
    assert rep["answer"]["greedy_matches_answer"] and rep["answer"]["p"] > 0.99
    weak = judge(planted.model, "a new", subject="new", weights=planted_weights)
    with pytest.raises(FfkvError, match="subject"):
        judge(planted.model, "a new", weights=planted_weights)
    assert rep["score"] > weak["score"]
    assert set(rep["signals"]) == set(FEATURES)


def test_verdict_needs_both_classes():
    with pytest.raises(FfkvError):
        fit_verdict(np.zeros((4, len(FEATURES))), np.ones(4))


def test_shipped_weights_have_provenance():
    vm = VerdictModel.load()
    assert vm.features == list(FEATURES)
    assert vm.provenance["model"]["fingerprint"] and vm.provenance["hyperparameters"]["testbed"]
    assert 0 < vm.threshold < 1 and vm.fit["n"] >= 50


def test_cli_prints_one_json_object(planted, planted_weights, tmp_path, capsys):
    from ffkv.cli import main
    from ffkv.testbed.planted import save_planted

    path = save_planted(planted, tmp_path / "planted")
    main(["recall", str(path), "--prompt", "the old tower", "--subject", "tower", "--answer", "paris", "--json",
          "--weights", str(planted_weights)])
    out = json.loads(capsys.readouterr().out)
    assert {"signals", "score", "verdict", "threshold", "answer"} <= set(out)
    assert out["answer"]["greedy_matches_answer"] is True


def test_cli_bad_input_is_one_line(planted, tmp_path, capsys):
    from ffkv.cli import main
    from ffkv.testbed.planted import save_planted

    path = save_planted(planted, tmp_path / "planted")
    with pytest.raises(SystemExit) as e:
        main(["recall", str(path), "--prompt", "the old tower", "--subject", "castle", "--json"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("ffkv:")]
    assert len(lines) == 1 and "does not occur" in lines[0] and "Traceback" not in err
