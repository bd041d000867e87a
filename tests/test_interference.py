"""ffkv.edit.interference: the spill-over predicted before an edit is the change the edit then makes.

For every probe key k_j of the edited layer the prediction Δy_j = ΔW k_j (from C^-1 and the edit's key,
computed on the unedited model) must equal the measured change of that layer's output at the probe's
subject's last token after ffkv.edit.apply_edits, read through the engine. Planted model and the default
testbed (the shared fixtures: every edit is undone bit for bit, and checked).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ffkv.edit import EditRequest, apply_edits
from ffkv.edit.context import EditContext
from ffkv.edit.interference import (known_fact_probes, paraphrase_templates, predict_interference,
                                    probe_requests)
from ffkv.edit.requests import render_batch
from ffkv.errors import FfkvError
from ffkv.models.engine import run

PLANTED_FAST = {"v_num_grad_steps": 10, "v_lr": 5.0, "prefixes": [[4, 3]], "stats_tokens": 3000,
                "max_update_ratio": 1000.0}
TESTBED_FAST = {"stats_tokens": 20_000, "v_num_grad_steps": 10}


@torch.no_grad()
def layer_output(model, probes, layer):
    """W_out's output (ffn_out) at each probe's subject's last token: (n, d_model) float64."""
    reqs = probe_requests(probes)
    b = render_batch(model, [("", r) for r in reqs])
    h = run(model, b.inputs["input_ids"], attention_mask=b.inputs["attention_mask"], reads=[("ffn_out", layer)],
            head="none").rec["ffn_out", layer]
    return h[torch.arange(len(reqs)), b.subject_last].double()


def check_prediction(model, req, method, hp, probes, context, stats_dir):
    rep = predict_interference(model, [req], method, hp, probes, context=context, stats_dir=stats_dir,
                               trace_samples=3)
    before = {l: layer_output(model, probes, l) for l in rep.layers}
    journal = apply_edits(model, [req], method, hp, stats_dir=stats_dir, context=context, progress=False)
    try:
        measured = {l: layer_output(model, probes, l) - before[l] for l in rep.layers}
        # the update applied is the one predicted (the journal's factors)
        e = journal[0]
        U, V = rep.factors[e.layer]
        assert torch.allclose(U @ V.T, e.u.double() @ e.v.double().T, rtol=0,
                              atol=1e-6 * float((e.u.double() @ e.v.double().T).abs().max()))
    finally:
        journal.undo(model)
    return rep, before, measured


@pytest.fixture(scope="module")
def corpus():
    from ffkv.testbed.planted import WORDS

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(400)]


def test_planted_rome_prediction_equals_the_measured_change(planted, corpus, tmp_path):
    m = planted.model  # the session's: the edit is undone bit for bit below
    state = {k: v.clone() for k, v in m.hf.state_dict().items()}
    ctx = EditContext(corpus=corpus)
    req = EditRequest("the old {}", "tower", " rome")
    probes = [("the old {}", s) for s in ("castle", "river", "bridge", "house", "tower")] + \
             [("a big {}", s) for s in ("lake", "forest", "city")] + [("the {} of", "king")]
    hp = {**PLANTED_FAST, "layer": 1}
    rep, before, measured = check_prediction(m, req, "rome", hp, probes, ctx, tmp_path)
    assert all(torch.equal(state[k], v) for k, v in m.hf.state_dict().items())
    pred = rep.delta_out[1].double()
    scale = before[1].norm(dim=1, keepdim=True).clamp_min(1.0)
    assert torch.allclose(pred, measured[1], rtol=0, atol=1e-4 * float(scale.max()))
    # the edited key moves by about all of u (alpha = 1 at k*, the key averaged over context prefixes; the
    # bare prompt's key is close to it); another subject's key far less
    assert rep.alpha[1][4, 0] == pytest.approx(1.0, abs=0.05)
    assert rep.shift[1][4] > 10 * np.delete(rep.shift[1], 4).max()
    assert int(np.argmax(rep.shift[1])) == 4
    s = rep.summary()
    assert s["n_probes"] == len(probes) and s["max_relative"] == pytest.approx(rep.relative[1].max())
    d = rep.diagnostics[0]
    assert d.n_paraphrases == 1 and d.spread == pytest.approx(0.0, abs=1e-6)
    assert d.paraphrase_gain == pytest.approx(rep.alpha[1][4, 0])  # the bare prompt is the only phrasing


@pytest.fixture(scope="module")
def testbed_setup(default_testbed, testbed_model, tmp_path_factory):
    from ffkv.io import read_json

    cases = read_json(default_testbed / "data" / "counterfact.json")
    return testbed_model, cases, tmp_path_factory.mktemp("stats")


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_testbed_prediction_equals_the_measured_change(method, testbed_setup, default_testbed):
    model, cases, stats_dir = testbed_setup
    torch.set_num_threads(1)
    case = cases[40]
    req = EditRequest.from_counterfact(case)
    probes = known_fact_probes(default_testbed / "data" / "known_facts.json", exclude=[req.subject], limit=60)
    probes.append({"template": req.prompt, "subject": req.subject})  # the edited key itself
    ctx = EditContext()
    paras = [paraphrase_templates(case["paraphrase_prompts"], req.subject)]
    hp = dict(TESTBED_FAST)
    rep = predict_interference(model, [req], method, hp, probes, paraphrases=paras, context=ctx,
                               stats_dir=stats_dir, trace_samples=3)
    state = {k: v.clone() for k, v in model.hf.state_dict().items()}
    before = {l: layer_output(model, probes, l) for l in rep.layers}
    journal = apply_edits(model, [req], method, hp, stats_dir=stats_dir, context=ctx, progress=False)
    try:
        first = rep.layers[0]
        assert rep.exact[first]
        measured = layer_output(model, probes, first) - before[first]
        pred = rep.delta_out[first].double()
        scale = float(before[first].norm(dim=1).max())
        assert torch.allclose(pred, measured, rtol=0, atol=2e-5 * scale)
        # not vacuous: the edited key moves a lot, the prediction ranks it first
        assert float(measured[-1].norm()) > 0.05 * float(before[first][-1].norm())
        assert rep.moved(0.0)[0][0] == len(probes) - 1
        e = journal[0]
        U, V = rep.factors[e.layer]
        dW = e.u.double() @ e.v.double().T
        assert torch.allclose(U @ V.T, dW, rtol=0, atol=1e-6 * float(dW.abs().max()))
    finally:
        journal.undo(model)
    assert all(torch.equal(state[k], v) for k, v in model.hf.state_dict().items())
    d = rep.diagnostics[0]
    assert d.n_paraphrases == 1 + len(paras[0]) and 0.0 < d.spread < 1.0
    assert 0.0 <= d.concentration <= 1.0 and len(d.ie) == model.n_layers
    assert 0.0 < d.p_true <= 1.0


def test_refuses_what_it_cannot_predict(planted):
    m = planted.model
    with pytest.raises(FfkvError, match="rome, memit, alphaedit"):
        predict_interference(m, [EditRequest("the old {}", "tower", " rome")], "kn", probes=[])
    with pytest.raises(FfkvError, match="does not occur"):
        probe_requests([("no subject here", "tower")])
