"""Integrated gradients, knowledge neurons and interventions (ffkv.locate) on planted memories, and `ffkv neurons`."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from ffkv.models.engine import Cost
from ffkv.locate.attribution import (DAI_IG, attribution_patching, completeness, grad_x_activation,
                                     integrated_gradients, integrated_gradients_reference, riemann_path)
from ffkv.locate.interventions import ablation_curve, intervention_effects
from ffkv.locate.neurons import knowledge_neurons
from ffkv.models.hooks import Intervention, intervene
from ffkv.models.model import MemoryModel
from ffkv.testbed.buckets import bucket_of
from ffkv.testbed.planted import planted_model, word_tokenizer


def top_memories(attr: torch.Tensor, k: int) -> set[tuple[int, int]]:
    d = attr.shape[1]
    return {(int(j) // d, int(j) % d) for j in attr.flatten().topk(k).indices}


@pytest.mark.parametrize("fixture", ["planted", "planted_llama"])
def test_ig_finds_the_planted_memories(fixture, request):
    pm = request.getfixturevalue(fixture)
    m = pm.model
    for trigger, prompt in (("tower", "the old tower"), ("castle", "a big castle")):
        fact = pm.fact(trigger)
        attr = integrated_gradients(m, prompt, " " + fact.target)
        assert attr.shape == (m.n_layers, m.d_ffn)
        assert top_memories(attr, len(fact.memories)) == set(fact.memories), (fixture, trigger)


@pytest.fixture(scope="module")
def unsaturated():
    """Planted memories that do not drive P(answer) to 1, so that redundant copies each matter."""
    return planted_model(value_gain=0.3, unembed_gain=2.0)


def test_ig_and_redundant_storage(planted, unsaturated):
    river = planted.fact("river")
    attr = integrated_gradients(unsaturated.model, "the river", " rome")
    assert top_memories(attr, 4) == set(river.memories)
    # Dai et al.'s IG scales one layer at a time: when the other layer's copies alone already give P = 1,
    # every path keeps P = 1 and all attributions vanish (a known blind spot, reported in docs/locate.md).
    saturated = integrated_gradients(planted.model, "the river", " rome")
    assert planted.model.next_token_probs("the river")[0, river.target_id] > 0.999
    assert float(saturated.abs().max()) < 1e-4


def test_ig_equals_dai_loop_and_is_cheaper(planted):
    m = planted.model
    c_fast, c_ref = Cost(), Cost()
    fast = integrated_gradients(m, "the red river", " rome", cost=c_fast, **DAI_IG)
    ref = integrated_gradients_reference(m, "the red river", " rome", cost=c_ref)
    torch.testing.assert_close(fast, ref, atol=1e-6 * float(ref.abs().max()), rtol=1e-4)
    assert c_fast.forward_passes < c_ref.forward_passes
    assert c_fast.layer_tokens + c_fast.backward_layer_tokens < (c_ref.layer_tokens + c_ref.backward_layer_tokens) / 2


def test_ig_rules_equal_the_loop_and_eleutherai_linspace(unsaturated):
    m = unsaturated.model
    alphas, weights = riemann_path(5, "linspace")
    torch.testing.assert_close(alphas, torch.linspace(0, 1, 5, dtype=torch.float64))  # EleutherAI's scaled_input
    assert torch.allclose(weights, torch.full((5,), 0.2, dtype=torch.float64))
    for rule in ("linspace", "right", "geometric"):
        fast = integrated_gradients(m, "the old tower", "paris", steps=5, rule=rule)
        ref = integrated_gradients_reference(m, "the old tower", "paris", steps=5, rule=rule)
        assert float(ref.abs().max()) > 1e-3
        torch.testing.assert_close(fast, ref, atol=1e-6 * float(ref.abs().max()), rtol=1e-4, msg=rule)


def test_ig_equals_dai_loop_multi_token_every_family(tiny_models):
    for mt, tm in tiny_models.items():
        m = MemoryModel(tm.hf, word_tokenizer())
        fast = integrated_gradients(m, "the old tower is in", " paris city", steps=4, rule="left", max_rows=4)
        ref = integrated_gradients_reference(m, "the old tower is in", " paris city", steps=4)
        scale = float(ref.abs().max())
        assert scale > 0, mt
        torch.testing.assert_close(fast, ref, atol=1e-4 * scale, rtol=1e-3, msg=mt)


def test_ig_completeness():
    """sum_i IG_i^(l) = P(o | m) - P(o | m^(l) = 0) up to the Riemann-sum error.

    Stated tolerance: 20 steps, left rule (Dai et al.): 5% of the probability difference; midpoint rule: 1%.
    The planted model is made less saturated (P ~ 0.14) so that the path integral is not a step function.
    """
    pm = planted_model(value_gain=0.3, unembed_gain=2.0)
    m = pm.model
    prompt, answer = "the old tower", " paris"
    a = m.answer_id(answer)
    ids = m.encode(prompt)["input_ids"]
    last = ids.shape[1] - 1
    with torch.no_grad():
        p = torch.softmax(m.hf(input_ids=ids).logits[0, -1], -1)[a].item()
    left = integrated_gradients(m, prompt, answer, steps=20, rule="left")
    mid = integrated_gradients(m, prompt, answer, steps=20, rule="midpoint")
    checked = 0
    for l in range(m.n_layers):
        with torch.no_grad(), intervene(m, edits=[Intervention("coef", l, "off", positions=[last])]):
            p0 = torch.softmax(m.hf(input_ids=ids).logits[0, -1], -1)[a].item()
        diff = p - p0
        if abs(diff) < 1e-3:
            continue
        checked += 1
        assert float(left[l].sum()) == pytest.approx(diff, rel=0.05)
        assert float(mid[l].sum()) == pytest.approx(diff, rel=0.01)
    assert checked >= 1  # layer 1 holds the planted memory


def test_screens_rank_the_planted_memory_first(planted, unsaturated):
    # Gradients vanish where P(answer) saturates at 1, so screens are checked on the unsaturated model.
    m = unsaturated.model
    gxa = grad_x_activation(m, "a big castle", " london")
    ap = attribution_patching(m, "a big castle", " london")
    assert top_memories(gxa, 1) == {(0, 7)}
    torch.testing.assert_close(ap, -gxa)


def test_knowledge_neurons_and_interventions(planted, unsaturated):
    m = planted.model
    prompts = ["the old tower", "a big tower", "the red tower"]
    kn = knowledge_neurons(m, prompts, " paris")
    assert [(l, i) for l, i, _ in kn.neurons] == [(1, 5)]
    assert kn.neurons[0][2] > 0 and len(kn.per_prompt) == 3
    screened = knowledge_neurons(unsaturated.model, prompts, " paris", method="screen", candidates=5)
    assert [(l, i) for l, i, _ in screened.neurons] == [(1, 5)]
    eff = intervention_effects(m, prompts, " paris", kn.neurons, unrelated=[("a big castle", " london")])
    own = eff["own"]
    assert own["suppress"]["found"]["relative_change"] < -0.9 and own["suppress"]["found"]["flip_rate"] == 1.0
    assert abs(own["suppress"]["random"]["relative_change"]) < 0.05
    assert own["amplify"]["found"]["prob_after"] >= own["amplify"]["found"]["prob_before"] - 1e-6
    assert abs(eff["unrelated"]["suppress"]["found"]["relative_change"]) < 0.05
    # the generic-neuron filter: a neuron that other facts also use is dropped, one they do not use is kept
    kept = knowledge_neurons(m, prompts, " paris", background=[("a big castle", " london"), ("the river", " rome")])
    assert [(l, i) for l, i, _ in kept.neurons] == [(1, 5)] and kept.dropped == []
    gone = knowledge_neurons(m, prompts, " paris", background=[("the new tower", " paris")])
    assert gone.neurons == [] and [(l, i) for l, i, _ in gone.dropped] == [(1, 5)]
    river = unsaturated.fact("river")
    um = unsaturated.model
    kn_r = knowledge_neurons(um, ["the river", "a blue river"], " rome")
    assert {(l, i) for l, i, _ in kn_r.neurons} == set(river.memories)
    curve = ablation_curve(um, ["the river"], " rome", kn_r.neurons)
    assert [c["k"] for c in curve] == list(range(len(kn_r.neurons) + 1))
    assert curve[-1]["prob"] < curve[0]["prob"] * 0.5  # all four memories removed: the fact is gone


def test_neurons_run_on_every_family(tiny_models):
    for mt, tm in tiny_models.items():
        m = MemoryModel(tm.hf, word_tokenizer())
        kn = knowledge_neurons(m, ["the old tower", "a big tower"], " paris", steps=4)
        assert all(0 <= l < m.n_layers and 0 <= i < m.d_ffn for l, i, _ in kn.neurons), mt
        assert len(kn.per_prompt[0]) >= 1


def test_cli_neurons_json(planted, tmp_path):
    from ffkv.cli import main
    from ffkv.testbed.planted import save_planted

    path = save_planted(planted, tmp_path / "planted")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["neurons", str(path), "--prompt", "the old tower", "--prompt", "a big tower", "--answer", " paris",
              "--unrelated", "a big castle| london", "--json"])
    obj = json.loads(buf.getvalue())
    assert [n[:2] for n in obj["neurons"]] == [[1, 5]]
    assert obj["effects"]["own"]["suppress"]["found"]["relative_change"] < -0.9
    assert obj["provenance"]["hyperparameters"]["steps"] == 20
    with pytest.raises(SystemExit) as e:
        main(["neurons", str(path), "--prompt", "the old tower", "--answer", " paris", "--unrelated", "no bar"])
    assert e.value.code == 2


def test_planted_ground_truth(planted):
    from ffkv.locate.ground_truth import planted_ground_truth

    rows = {r["fact"]: r for r in planted_ground_truth(planted, samples=3)}
    for fact in ("tower -> paris", "castle -> london"):
        assert rows[fact]["trace_agrees"] and rows[fact]["ig_recall"] == 1.0, rows[fact]
    assert rows["river -> rome"]["trace_peak_token"] == "river"


def test_neurons_and_ground_truth_on_the_testbed():
    import ffkv
    from ffkv.errors import FfkvError
    from ffkv.locate.average import knows, load_known
    from ffkv.locate.ground_truth import load_testbed_facts, testbed_ground_truth
    from ffkv.testbed import default_testbed

    try:
        tb = default_testbed(build_if_missing=False)
    except FfkvError as e:
        pytest.skip(f"default testbed not installed ({e})")
    m = ffkv.load_model(tb / "model")
    r = next(r for r in load_known(tb) if knows(m, r)[0])
    answer = " " + r["attribute"]
    fast = integrated_gradients(m, r["prompt"], answer, steps=5, rule="left")
    ref = integrated_gradients_reference(m, r["prompt"], answer, steps=5)
    torch.testing.assert_close(fast, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-3)
    kn = knowledge_neurons(m, [r["prompt"]], answer, steps=5)
    assert kn.neurons and all(0 <= l < m.n_layers for l, _, _ in kn.neurons)
    facts = sorted(load_testbed_facts(tb), key=lambda f: -f["train_count"])[:40]
    gt = testbed_ground_truth(m, facts, per_bucket=1, samples=2, n_prompts=1, n_unrelated=1, progress=False)
    row = gt["facts"][0]
    assert gt["overall"]["n_sampled"] == 1 and row["bucket"] == bucket_of(facts[0]["train_count"])
    if row["known"]:
        assert 0 <= row["storage_layer"] < m.n_layers and row["high_score"] > 1 / m.vocab_size  # the top answer


# ----------------------------------------------------------------------------------------------- honest attribution
def test_default_quadrature_is_complete_on_planted_and_testbed(unsaturated, testbed_model, default_testbed):
    """The default (adaptive) rule keeps sum_i IG_i^(l) within 5 % of the exact P(m) - P(m^(l) = 0) on every
    layer, where Dai et al.'s 20 left steps are off by more (the testbed's layer 0: a step-like path)."""
    from ffkv.locate.average import knows, load_known

    cases = [(unsaturated.model, "the old tower", " paris"), (unsaturated.model, "the river", " rome")]
    records = [r for r in load_known(default_testbed)[:12] if knows(testbed_model, r)[0]][:6]
    cases += [(testbed_model, r["prompt"], r["attribute"]) for r in records]
    worst_dai = 0.0
    for m, prompt, answer in cases:
        for c in completeness(m, prompt, answer, integrated_gradients(m, prompt, answer)):
            if abs(c["exact"]) >= 1e-3:
                assert abs(c["error"]) <= 0.05 * abs(c["exact"]), (prompt, c)
        if m is testbed_model:
            c0 = completeness(m, prompt, answer, integrated_gradients(m, prompt, answer, layers=[0], **DAI_IG),
                              layers=[0])[0]
            worst_dai = max(worst_dai, abs(c0["error"]) / abs(c0["exact"]))
    assert worst_dai > 0.05  # the reference setting is not within 5 % there (so the test can tell them apart)


def test_neurons_report_completeness_specificity_and_caps(unsaturated):
    m = unsaturated.model
    kn = knowledge_neurons(m, ["the river", "a blue river"], " rome", unrelated=[("a big castle", " london")])
    assert len(kn.completeness) == 2 and {c["layer"] for c in kn.completeness[0]} == set(range(m.n_layers))
    err = kn.completeness_error()
    assert err["n_paths"] >= 2 and err["max_relative_error"] < 0.05
    spec = kn.specificity
    assert spec["fact"]["relative_change"] < -0.5  # suppressing the four memories removes the fact
    assert abs(spec["unrelated"]["relative_change"]) < 0.05 and abs(spec["random"]["relative_change"]) < 0.05
    assert spec["random"]["n"] == 2 * 3
    obj = json.loads(json.dumps(kn.to_json()))
    assert obj["rule"] == "adaptive" and obj["completeness"]["max_relative_error"] < 0.05 and obj["specificity"]
    # caps: at most max_neurons coarse neurons per prompt; the default curve has at most MAX_CURVE_POINTS points
    one = knowledge_neurons(m, ["the river"], " rome", max_neurons=1, threshold=0.0, check=False)
    assert len(one.per_prompt[0]) == 1 and one.specificity is None and one.completeness == []
    from ffkv.locate.interventions import MAX_CURVE_POINTS, curve_grid

    grid = curve_grid(170)
    assert len(grid) <= MAX_CURVE_POINTS and grid[:2] == [0, 1] and grid[-1] == 170
    ranking = [(l, i) for l in range(m.n_layers) for i in range(m.d_ffn)][:40]
    curve = ablation_curve(m, "the river", " rome", ranking)
    assert [c["k"] for c in curve] == curve_grid(40) and len(curve) <= MAX_CURVE_POINTS
    full = ablation_curve(m, "the river", " rome", ranking, max_points=None)
    assert [c["k"] for c in full] == list(range(41))
    by_k = {c["k"]: c["prob"] for c in full}
    assert all(c["prob"] == pytest.approx(by_k[c["k"]], abs=1e-6) for c in curve)
