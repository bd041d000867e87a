"""Knowledge neurons of one routed expert: integrated gradients over m^(l,e) at the prediction position."""

import json

import pytest
import torch

from ffkv.errors import FfkvError
from ffkv.locate.attribution import DAI_IG, completeness, integrated_gradients, riemann_path
from ffkv.locate.neurons import knowledge_neurons
from ffkv.models.memory_id import MemoryId
from ffkv.models.moe import ExpertEdit, expert_intervene, tiny_moe_model
from ffkv.testbed.planted import WORDS, word_tokenizer

FAMILIES = ["mixtral", "qwen3_moe"]
LAYER = 1


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    m = tiny_moe_model(request.param, dtype=torch.float64, experts_implementation="eager")  # exact changes are ~1e-6: float32 noise is ~1e-9
    m.tokenizer = word_tokenizer()
    prompt = " ".join(WORDS[3:8])
    ids = m.encode(prompt)["input_ids"]
    with torch.no_grad(), expert_intervene(m, reads=[LAYER]) as rec:
        logits = m.hf(input_ids=ids).logits[0, -1]
    routed = rec.routing[LAYER][0][0, -1].tolist()
    unrouted = next(e for e in range(m.n_experts(LAYER)) if e not in routed)
    return m, prompt, int(logits.argmax()), routed[0], unrouted


def _hooks(m):
    return sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) + ("forward" in mod.__dict__)
               for mod in m.hf.modules())


def _direct_riemann(m, prompt, gold, e):
    """Dai et al.'s left Riemann sum over expert e's routed coefficients, written out with expert_intervene."""
    ids = m.encode(prompt)["input_ids"]
    t = ids.shape[1] - 1
    with torch.no_grad(), expert_intervene(m, reads=[(LAYER, e)]) as rec:
        m.hf(input_ids=ids)
    cap = rec[LAYER, e]
    m0 = cap.coef[(cap.position == t).nonzero()[0, 0]]
    alphas, w = riemann_path(20, "left")
    total = torch.zeros_like(m0, dtype=torch.float64)
    for a, wk in zip(alphas.tolist(), w.tolist()):
        x = (a * m0).clone().requires_grad_(True)
        with torch.enable_grad(), expert_intervene(m, edits=[ExpertEdit(LAYER, e, "fn", value=lambda cur: x,
                                                                        positions=[t])], keep_grad=True):
            p = torch.softmax(m.hf(input_ids=ids).logits[0, t].float(), -1)[gold]
            (g,) = torch.autograd.grad(p, [x])
        total += wk * (m0 * g).double()
    return total


def test_expert_ig_matches_direct_riemann_sum(case):
    m, prompt, gold, e, _ = case
    before = _hooks(m)
    ig = integrated_gradients(m, prompt, gold, experts={LAYER: e}, **DAI_IG)
    assert _hooks(m) == before
    assert ig.shape == (m.n_layers, m.d_expert(LAYER, e))
    assert ig[[l for l in range(m.n_layers) if l != LAYER]].abs().sum() == 0
    ref = _direct_riemann(m, prompt, gold, e)
    assert ref.abs().max() > 0
    torch.testing.assert_close(ig[LAYER].double(), ref, rtol=1e-4, atol=1e-9)


def test_expert_ig_default_completeness(case):
    m, prompt, gold, e, _ = case
    ig = integrated_gradients(m, prompt, gold, experts={LAYER: e})
    (c,) = completeness(m, prompt, gold, ig, experts={LAYER: e})
    # the exact change F(m) - F(m^(l,e) := 0), computed here independently
    ids = m.encode(prompt)["input_ids"]
    t = ids.shape[1] - 1
    with torch.no_grad():
        p = torch.softmax(m.hf(input_ids=ids).logits[0, t].float(), -1)[gold]
        with expert_intervene(m, edits=[ExpertEdit(LAYER, e, "off", positions=[t])]):
            p0 = torch.softmax(m.hf(input_ids=ids).logits[0, t].float(), -1)[gold]
    exact = float(p - p0)
    assert c["exact"] == pytest.approx(exact, rel=1e-4, abs=1e-10) and abs(exact) > 0
    assert abs(float(ig[LAYER].double().sum()) - exact) <= 0.05 * abs(exact)


def test_expert_neurons_named_with_their_expert(case):
    m, prompt, gold, e, _ = case
    before = _hooks(m)
    kn = knowledge_neurons(m, [prompt], gold, experts={LAYER: e}, max_neurons=3)
    assert _hooks(m) == before
    assert kn.neurons and all(n.layer == LAYER and n.expert == e for n in kn.neurons)
    assert all(l == LAYER for l, _, _ in kn.neurons)  # unpacking stays (layer, index, attribution)
    assert kn.memories[0] == MemoryId(LAYER, kn.neurons[0].index, e)
    js = json.loads(json.dumps(kn.to_json()))
    assert js["memories"][0] == f"L{LAYER}.E{e}.{kn.neurons[0].index}"
    (row,) = js["completeness"]["per_prompt"][0]  # the random model's change is ~1e-6, under the 1e-3 default
    assert row["layer"] == LAYER and row["relative_error"] < 0.05
    assert kn.completeness_error(min_change=0)["n_paths"] == 1
    assert js["experts"] == {str(LAYER): e}


def test_unrouted_expert_refused(case):
    m, prompt, gold, _, unrouted = case
    before = _hooks(m)
    with pytest.raises(FfkvError) as err:
        integrated_gradients(m, prompt, gold, experts={LAYER: unrouted}, **DAI_IG)
    msg = str(err.value)
    assert "\n" not in msg and f"expert {unrouted}" in msg and "routed: E" in msg
    with pytest.raises(FfkvError):
        knowledge_neurons(m, [prompt], gold, experts={LAYER: unrouted})
    assert _hooks(m) == before
