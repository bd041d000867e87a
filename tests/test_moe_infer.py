"""Mixture-of-experts adapters inferred from the module structure (ffkv.models.moe_infer)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from ffkv.errors import AdapterCheckFailed, FfkvError
from ffkv.models.infer import Refusal
from ffkv.models.loading import from_hf, load_model, tiny_model
from ffkv.models.moe import MoEModel, check_moe, expert_intervene, moe_census
from ffkv.models.moe_infer import describe_routing, infer_moe_spec, moe_from_hf, select_routing
from ffkv.models.tiny import tiny_config

# one model type per group: (model type, routing rule, shared expert, dense layers)
GROUPS = {
    "deepseek_v3": ("sigmoid", True, True),      # sigmoid + score-correction bias, scaled; first_k_dense_replace
    "glm4_moe": ("sigmoid", True, True),
    "ernie4_5_moe": ("softmax", True, True),     # softmax + bias for the choice only
    "granitemoe": ("softmax", False, False),     # block_sparse_moe.router; residual_multiplier
    "minimax_m2": ("sigmoid", False, False),     # sigmoid + the block's own score-correction bias
    "qwen3_next": ("softmax", True, False),      # linear-attention mixer, gated shared expert
    "flex_olmo": ("softmax", False, False),      # no pre-norms; writes through post_feedforward_layernorm
}


def _build(model_type, seed=0, **overrides):
    cfg = tiny_config(model_type, 2, 32, 64, 128)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).float()


def _randomise_bias(hf, scale=0.3, seed=3):
    g = torch.Generator().manual_seed(seed)
    for name, buf in hf.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def models():
    return {mt: tiny_model(mt) for mt in GROUPS}


@pytest.mark.parametrize("model_type", list(GROUPS))
def test_inferred_families_pass_the_moe_check(models, model_type):
    mm = models[model_type]
    rule, shared, dense = GROUPS[model_type]
    assert isinstance(mm, MoEModel) and mm.spec.inferred and mm.moe_spec.inferred
    assert mm.adapter_check["passed"]
    assert mm.moe_spec.routing == rule
    assert any(mm.has_shared_expert(l) for l in range(mm.n_layers)) == shared
    assert (len(mm.moe_layers) < mm.n_layers) == dense
    assert "routing: " in mm.spec.notes and describe_routing(mm.moe_spec) in mm.spec.notes


@pytest.mark.parametrize("model_type", ["deepseek_v3", "granitemoe"])
def test_engine_coefficients_are_the_routed_tokens(models, model_type):
    mm = models[model_type]
    ids = torch.randint(0, mm.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    l = mm.moe_layers[-1]
    from ffkv.models.hooks import intervene

    with intervene(mm, reads=[("ffn_in", l)]) as ref, expert_intervene(mm, reads=[l]) as rec:
        mm.hf(input_ids=ids, use_cache=False)
    x = ref["ffn_in", l].reshape(-1, mm.d_model)
    idx, _ = mm.route(l, x)
    for e in range(mm.n_experts(l)):
        cap = rec[l, e]
        assert cap.token.equal(torch.where((idx == e).any(-1))[0])
        torch.testing.assert_close(cap.coef, mm.coefficients_from_input(l, x[cap.token], e))


def test_score_bias_scaling_and_rule_are_each_needed():
    hf = _build("deepseek_v3")
    _randomise_bias(hf)
    mm = from_hf(hf, None, "tiny-deepseek_v3")
    m = mm.moe_spec
    assert m.routing == "sigmoid" and m.score_bias == "mlp.gate.e_score_correction_bias" and m.norm_topk
    assert m.routed_scaling == pytest.approx(hf.config.routed_scaling_factor) and m.routed_scaling != 1.0
    for wrong in (dict(score_bias=None), dict(routed_scaling=1.0), dict(routing="softmax"), dict(norm_topk=False)):
        mm.moe_spec = dataclasses.replace(m, **wrong)
        with pytest.raises(AdapterCheckFailed):
            check_moe(mm)
    mm.moe_spec = m
    assert check_moe(mm)["passed"]


@pytest.mark.parametrize("group_score,model_type,extra", [
    ("top2sum", "deepseek_v3", {}),
    ("max", "deepseek_v2", {"topk_method": "group_limited_greedy", "num_experts_per_tok": 2}),
])
def test_grouped_top_k(group_score, model_type, extra):
    hf = _build(model_type, n_group=2, topk_group=1, n_routed_experts=8, num_experts=8, num_local_experts=8,
                **extra)
    if model_type == "deepseek_v3":
        _randomise_bias(hf)
    mm = from_hf(hf, None, f"tiny-{model_type}")
    assert mm.n_experts(mm.moe_layers[0]) == 8
    assert (mm.moe_spec.n_group, mm.moe_spec.topk_group, mm.moe_spec.group_score) == (2, 1, group_score)
    right = mm.moe_spec
    other = "max" if group_score == "top2sum" else "top2sum"
    for wrong in (dict(n_group=1), dict(group_score=other)):
        mm.moe_spec = dataclasses.replace(right, **wrong)
        with pytest.raises(AdapterCheckFailed):
            check_moe(mm, seq_len=32)


@pytest.mark.parametrize("model_type,reason,words", [
    ("phimoe", "mixture-of-experts", "routing of its PhimoeTopKRouter"),   # sparsemixer routing
    ("jetmoe", "mixture-of-experts", "not fused"),                         # experts as ParallelExperts modules
    ("llama4_text", "mixture-of-experts", "not called as experts(x, top_k_index, top_k_weights)"),
])
def test_refusals_are_one_line(model_type, reason, words):
    with pytest.raises(Refusal) as ei:
        tiny_model(model_type)
    assert ei.value.reason == reason and words in ei.value.problem
    assert "\n" not in ei.value.line()


def test_unknown_routing_is_refused_not_loosened():
    hf = _build("granitemoe")
    arch, moe = infer_moe_spec(hf)
    mm = MoEModel(hf, None, spec=arch, moe_spec=moe)
    router = mm.router(mm.moe_layers[0])
    orig = type(router).forward

    def tempered(self, x):  # softmax at temperature 2: no rule of ffkv's reproduces it
        logits, w, i = orig(self, x)
        p = torch.softmax(logits.float() / 2, dim=-1)
        w2 = p.gather(1, i)
        return logits, w2 / w2.sum(-1, keepdim=True), i

    for l in mm.moe_layers:
        mm.router(l).forward = tempered.__get__(mm.router(l))
    with pytest.raises(Refusal) as ei:
        select_routing(mm)
    assert "matches none of ffkv's rules" in ei.value.problem


def test_load_model_reads_an_inferred_moe_folder(tmp_path, models):
    models["glm4_moe"].hf.save_pretrained(tmp_path)
    mm = load_model(str(tmp_path), tokenizer=False)
    assert isinstance(mm, MoEModel) and mm.adapter_check["passed"] and mm.moe_spec.routing == "sigmoid"
    with pytest.raises(FfkvError):
        moe_from_hf(_build("phimoe"))


def test_post_norm_moe_writes_through_its_norm(models):
    from ffkv.models.hooks import intervene

    mm = models["flex_olmo"]
    assert mm.spec.post_ffn_norm == "post_feedforward_layernorm" and mm.spec.pre_ffn_norm is None
    ids = torch.randint(0, mm.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    l = mm.moe_layers[0]
    with intervene(mm, reads=[("ffn_out", l), ("ffn_write", l)]) as rec:
        mm.hf(input_ids=ids, use_cache=False)
    assert not torch.allclose(rec["ffn_out", l], rec["ffn_write", l])
    torch.testing.assert_close(mm.write_from_ffn_out(l, rec["ffn_out", l]), rec["ffn_write", l])
    # a spec that forgets the post norm fails the check
    mm2 = MoEModel(mm.hf, None, spec=dataclasses.replace(mm.spec, post_ffn_norm=None), moe_spec=mm.moe_spec)
    with pytest.raises(AdapterCheckFailed):
        check_moe(mm2)


def test_census_of_an_inferred_family(models):
    mm = models["deepseek_v3"]
    c = moe_census(mm)
    assert c["total_params"] == sum(p.numel() for p in mm.hf.parameters())
    assert c["moe_layers"] == len(mm.moe_layers) and c["dense_slots"] > 0 and c["shared_slots"] > 0
    E, F = mm.n_experts(mm.moe_layers[0]), mm.d_expert(mm.moe_layers[0], 0)
    assert c["expert_slots"] == len(mm.moe_layers) * E * F and c["top_k"] == mm.top_k
