"""One owner per method: the edit layer is the peak of `ffkv trace --kind mlp`, the KN edit's neurons are
`knowledge_neurons`', recall's attribution is the one integrated gradients, and the duplicates are gone."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ffkv.edit.hparams import resolve_hparams
from ffkv.edit.journal import Journal
from ffkv.edit.kn_edit import kn_edit
from ffkv.edit.requests import EditRequest
from ffkv.errors import FfkvError
from ffkv.locate.attribution import integrated_gradients
from ffkv.locate.interventions import ablation_curve, memories_off
from ffkv.locate.layer_choice import trace_layer
from ffkv.locate.neurons import knowledge_neurons
from ffkv.locate.plots import plot_locate
from ffkv.locate.registry import LOCATORS, locate
from ffkv.locate.trace import causal_trace
from ffkv.models.hooks import intervene
from ffkv.testbed.buckets import BUCKET_NAMES, BUCKETS, bucket_of, stratified_facts
from ffkv.testbed.planted import PlantedFact, planted_model, save_planted

SRC = Path(__file__).resolve().parents[1] / "src" / "ffkv"


def cli_json(args: list[str]) -> dict:
    from ffkv.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(args)
    return json.loads(buf.getvalue())


# ----------------------------------------------------------------------------------------------- layer choice
@pytest.fixture(scope="module")
def two_sites():
    """3 layers: tower -> paris stored in layer 1 alone, castle -> london in layer 0 alone."""
    return planted_model(facts=(PlantedFact("tower", "paris", [(1, 5)]), PlantedFact("castle", "london", [(0, 7)])),
                         n_layers=3)


def test_trace_layer_is_the_peak_of_ffkv_trace_kind_mlp(two_sites, tmp_path):
    m = two_sites.model
    path = save_planted(two_sites, tmp_path / "planted")
    # A planted key reads one channel with gain 3: only large noise hides the trigger; window 1 so a layer is one.
    opts = {"noise": 100.0, "window": 1, "samples": 4}
    for subject, stored in (("tower", 1), ("castle", 0)):
        req = EditRequest("the old {}", subject, " rome")
        trace = cli_json(["trace", str(path), "--prompt", req.text, "--subject", subject, "--kind", "mlp",
                          "--noise", "100", "--window", "1", "--samples", "4", "--json"])
        row = np.asarray(trace["scores"])[trace["subject_range"][1] - 1]
        assert trace_layer(m, [req], **opts) == int(np.argmax(row[:m.n_layers - 1])) == stored
    # Averaged over requests: the mean of the rows at each subject's last token.
    reqs = [EditRequest("the old {}", "tower", " rome"), EditRequest("a big {}", "tower", " rome")]
    rows = [causal_trace(m, r.text, r.subject, kind="mlp", **opts) for r in reqs]
    mean = np.mean([r.scores[r.subject_range[1] - 1] for r in rows], 0)
    assert trace_layer(m, reqs, **opts) == int(np.argmax(mean[:-1])) == 1


def test_trace_layer_on_the_testbed_with_ffkv_trace_defaults(testbed_model, default_testbed):
    from ffkv.locate.average import knows, load_known

    m = testbed_model
    records = [r for r in load_known(default_testbed)[:40] if knows(m, r)[0]][:2]
    assert len(records) == 2
    reqs = [EditRequest(r["prompt"], r["subject"], " Nowhere", target_true=r["attribute"]) for r in records]
    rows = []
    for r in reqs:
        tr = causal_trace(m, r.text, r.subject, kind="mlp")  # `ffkv trace --kind mlp`'s defaults
        assert tr.answer_id == m.answer_id(r.target_true)  # a known fact: the top prediction is the true object
        rows.append(tr.scores[tr.subject_range[1] - 1])
    expected = int(np.argmax(np.mean(rows, 0)[:m.n_layers - 1]))
    assert trace_layer(m, reqs) == expected


# ----------------------------------------------------------------------------------------------- knowledge neurons
def kn_edit_neurons(model, request: EditRequest, hparams: dict) -> set[tuple[int, int]]:
    hp = resolve_hparams(model, "kn", hparams)
    journal = Journal()
    journal.attach(model)
    entries = kn_edit(model, request, hp, journal)
    found = {(e.layer, int(i)) for e in entries for i in torch.nonzero(e.v[:, 0]).flatten()}
    journal.undo(model)
    return found


@pytest.mark.parametrize("settings", [{}, {"max_neurons": 2}, {"ig_steps": 20, "threshold": 0.1}])
def test_kn_edit_uses_the_knowledge_neurons_of_ffkv_neurons(settings):
    pm = planted_model(value_gain=0.3, unembed_gain=2.0)  # river -> rome is stored in four memories
    m = pm.model
    req = EditRequest("the {}", "river", " paris", target_true=" rome")
    hp = resolve_hparams(m, "kn", settings)
    kn = knowledge_neurons(m, [req.text], "rome", steps=hp["ig_steps"], threshold=hp["threshold"],
                           max_neurons=hp["max_neurons"], layers=hp["layers"])
    assert kn_edit_neurons(m, req, settings) == {(n.layer, n.index) for n in kn.neurons}
    assert len(kn.neurons) == min(hp["max_neurons"], 4)
    assert {(n.layer, n.index) for n in kn.neurons} <= set(pm.fact("river").memories)


# ----------------------------------------------------------------------------------------------- integrated gradients
def test_joint_path_completeness_over_the_whole_network():
    """Recall's variant (one path over every layer and position, centered logit):
    sum_{l,i} IG ~= f(m) - f(0), f = z_y - mean(z), up to the Riemann-sum error (64 midpoint steps: 1%)."""
    m = planted_model(value_gain=0.3, unembed_gain=2.0).model
    prompt, y = "the old river", m.answer_id("rome")
    ig = integrated_gradients(m, prompt, y, steps=64, rule="midpoint", target="centered_logit", path="joint",
                              positions="all")
    ids = m.encode(prompt)["input_ids"]
    with torch.no_grad():
        z = m.hf(input_ids=ids).logits[0, -1].float()
        every = [(l, i) for l in range(m.n_layers) for i in range(m.d_ffn)]
        with intervene(m, edits=memories_off(every)):
            z0 = m.hf(input_ids=ids).logits[0, -1].float()
    diff = float((z[y] - z.mean()) - (z0[y] - z0.mean()))
    assert abs(diff) > 1.0
    assert float(ig.sum()) == pytest.approx(diff, rel=0.01)


def test_answer_rule_and_bad_options(planted):
    m = planted.model
    torch.testing.assert_close(integrated_gradients(m, "the old tower", "paris", steps=4),
                               integrated_gradients(m, "the old tower", " paris", steps=4))
    with pytest.raises(FfkvError, match="joint"):
        integrated_gradients(m, "the old tower", "paris", positions="all")
    with pytest.raises(FfkvError, match="rule"):
        integrated_gradients(m, "the old tower", "paris", rule="simpson")


def test_one_ablation_curve_for_locate_and_recall(planted):
    m, f = planted.model, planted.fact("river")
    last = ablation_curve(m, "the old river", "rome", f.memories)
    every = ablation_curve(m, "the old river", "rome", f.memories, ks=(0, 2, 4), positions="all")
    assert [c["k"] for c in last] == [0, 1, 2, 3, 4] and [c["k"] for c in every] == [0, 2, 4]
    assert last[0]["prob"] == pytest.approx(every[0]["prob"]) and every[-1]["prob"] < 0.5 * every[0]["prob"]


# ----------------------------------------------------------------------------------------------- locators
def test_every_locator_returns_scores_over_site_token_layer(planted, tmp_path):
    m = planted.model
    assert set(LOCATORS) == {"trace-hidden", "trace-mlp", "trace-attn", "integrated-gradients", "approx-trace"}
    for name in LOCATORS:
        opts = {"samples": 3, "noise": 3.0, "window": 1} if "trace" in name else {"steps": 8}
        opts.update({"kinds": ["mlp"]} if name == "approx-trace" else {})
        r = locate(m, name, "the old tower", "tower", "paris", **opts)
        assert r.scores.shape == (1, 3, m.n_layers) and r.answer_id == m.answer_id("paris")
        assert r.clean == pytest.approx(float(m.next_token_probs("the old tower")[0, r.answer_id]), rel=1e-5)
        json.dumps(r.to_json())
        assert plot_locate(r, tmp_path / f"{name}.png").stat().st_size > 0
    tr = locate(m, "trace-mlp", "the old tower", "tower", "paris", samples=3, noise=3.0, window=1)
    assert tr.peak() == ("mlp", 2, 1) and tr.corrupted < tr.clean  # planted: trigger token, layer 1
    ig = locate(m, "integrated-gradients", "the old tower", "tower", "paris")
    assert ig.peak() == ("coef", 2, 1) and np.isnan(ig.scores[0, 0]).all()


# ----------------------------------------------------------------------------------------------- buckets
def test_frequency_buckets_are_the_readmes():
    assert [b.name for b in BUCKETS] == ["1", "2-3", "4-7", "8-15", "16-31", "32+"]
    assert [bucket_of(c) for c in (0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 500)] == \
        ["0", "1", "2-3", "2-3", "4-7", "4-7", "8-15", "8-15", "16-31", "16-31", "32+", "32+"]
    facts = [{"fact_id": i, "train_count": c} for i, c in enumerate([1, 1, 1, 2, 40, 40, 9])]
    chosen = stratified_facts(facts, 2, seed=0)
    assert sorted(bucket_of(f["train_count"]) for f in chosen) == ["1", "1", "2-3", "32+", "32+", "8-15"]
    assert BUCKET_NAMES[0] == "0"


# ----------------------------------------------------------------------------------------------- duplicates gone
def sources() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text() for p in SRC.rglob("*.py")}


def defined_in(pattern: str) -> set[str]:
    return {f for f, text in sources().items() if re.search(pattern, text, re.M)}


def test_each_method_is_defined_once():
    assert not (SRC / "edit" / "trace.py").exists()
    assert defined_in(r"^def integrated_gradients\(") == {"locate/attribution.py"}
    assert defined_in(r"^def knowledge_neurons\(") == {"locate/neurons.py"}
    assert defined_in(r"^def ablation_curve\(") == {"locate/interventions.py"}
    assert defined_in(r"^def trace_layer\(") == {"locate/layer_choice.py"}
    assert defined_in(r"^def bucket_of\(") == {"testbed/buckets.py"}
    assert defined_in(r"^BUCKETS\s*=") == {"testbed/buckets.py"}
    # Gradients of a model's output w.r.t. memory coefficients are taken in one file; ROME's value optimisation,
    # MEMIT's post-norm target mapping (a solve through one norm, no model run) and the testbed's training are
    # the other backward passes.
    assert defined_in(r"autograd\.grad\(|\.backward\(") <= {"locate/attribution.py", "edit/compute_value.py",
                                                           "edit/memit.py", "testbed/train.py"}
    # Memories are switched off by ffkv.models.hooks.switch_memories only.
    assert defined_in(r"Intervention\(\s*\"coef\"[^)]*\"off\"") == {"models/hooks.py"}


OWN = ["locate/attribution.py", "locate/neurons.py", "locate/interventions.py", "locate/average.py",
       "locate/ground_truth.py", "locate/plots.py", "locate/layer_choice.py", "locate/registry.py",
       "locate/result.py", "edit/kn_edit.py", "recall/strength.py", "recall/data.py", "recall/consistency.py",
       "recall/incontext.py", "recall/verdict.py", "recall/stats.py", "testbed/report.py", "testbed/buckets.py"]


def test_no_hand_made_answer_tokens_nor_hidden_imports():
    src = sources()
    for f in OWN:
        text = src[f]
        assert '" " +' not in text, f  # the answer rule is MemoryModel.answer_tokens / answer_id
        assert "except ImportError" not in text and "__dict__" not in text, f
        hidden = re.findall(r"^[ \t]+from \.\.(\w+)", text, re.M)  # a function-level import of another capability
        assert not hidden, (f, hidden)
