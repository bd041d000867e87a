"""Mixture-of-experts: the expert axis, per-expert capture, the load-time check, census and expert edits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ffkv.errors import AdapterCheckFailed, FfkvError
from ffkv.models.hooks import intervene
from ffkv.models.loading import load_model
from ffkv.models.memory_id import MemoryId
from ffkv.models.moe import (ExpertEdit, MoEModel, check_moe, expert_intervene, get_moe_spec, moe_census,
                             moe_model_types, routed_coefficients, switch_expert_memories, tiny_moe_config,
                             tiny_moe_model)

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.fixture(scope="module")
def moe_models():
    return {mt: tiny_moe_model(mt) for mt in FAMILIES}


def _ids(model, B=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (B, T), generator=g)


def _manual_experts(model, l, x):
    """Routing and coefficients from the model's own router module and the raw fused tensors."""
    ex = model.hf.model.layers[l].mlp.experts
    _, weights, index = model.hf.model.layers[l].mlp.gate(x)
    F = ex.down_proj.shape[2]
    out = {}
    for e in range(ex.down_proj.shape[0]):
        tok, slot = torch.where(index == e)
        order = torch.argsort(tok)
        tok, slot = tok[order], slot[order]
        gate = x[tok] @ ex.gate_up_proj[e, :F].T
        up = x[tok] @ ex.gate_up_proj[e, F:].T
        out[e] = (tok, weights[tok, slot], ex.act_fn(gate) * up)
    return out


def test_the_four_families_have_specs():
    assert set(FAMILIES) == set(moe_model_types())
    for mt in FAMILIES:
        arch, moe = get_moe_spec(mt)
        assert mt in arch.model_types and mt in moe.model_types


@pytest.mark.parametrize("mt", FAMILIES)
def test_check_passes_on_every_family(moe_models, mt):
    m = moe_models[mt]
    assert isinstance(m, MoEModel)
    r = m.adapter_check
    assert r["passed"] and len(r["layers"]) == m.n_layers == 2
    assert all(row["n_experts"] == 4 for row in r["layers"])
    assert m.n_experts(0) == 4 and m.top_k == 2 and m.d_expert(0, 1) == 32
    assert m.has_shared_expert(0) == (mt == "qwen2_moe")


@pytest.mark.parametrize("impl", ["eager", "batched_mm"])
def test_check_passes_under_other_experts_implementations_and_dense_layers(impl):
    m = tiny_moe_model("qwen2_moe", experts_implementation=impl, mlp_only_layers=[0])
    assert m.adapter_check["passed"] and m.moe_layers == [1] and m.n_experts(0) == 0
    assert m.hf.config._experts_implementation == impl


@pytest.mark.parametrize("mt", FAMILIES)
@pytest.mark.parametrize("broken", ["swap_gate_up", "flip_topk_norm", "missing_activation"])
def test_check_fails_on_a_broken_spec_naming_family_and_layer(moe_models, mt, broken):
    m = moe_models[mt]
    good = m.moe_spec
    norm = bool(getattr(m.config, "norm_topk_prob", False)) if good.norm_topk is None else good.norm_topk
    change = {"swap_gate_up": dict(gate_first=False), "flip_topk_norm": dict(norm_topk=not norm),
              "missing_activation": dict(act="not_there")}[broken]
    m.moe_spec = dataclasses.replace(good, **change)
    try:
        assert not check_moe(m, raise_on_fail=False)["passed"]
        with pytest.raises(AdapterCheckFailed, match=rf"family '{good.family}' at layer 0"):
            check_moe(m)
    finally:
        m.moe_spec = good
    assert check_moe(m)["passed"]


def test_check_fails_without_the_shared_expert_gate(moe_models):
    m = moe_models["qwen2_moe"]
    good = m.moe_spec
    m.moe_spec = dataclasses.replace(good, shared_gate=None)
    try:
        with pytest.raises(AdapterCheckFailed, match="qwen2-moe' at layer 0"):
            check_moe(m)
    finally:
        m.moe_spec = good


@pytest.mark.parametrize("mt", FAMILIES)
def test_replacement_forward_equals_the_original(mt):
    ids = _ids(tiny_moe_model(mt, check=False))
    for impl, exact in (("eager", True), ("grouped_mm", False), ("batched_mm", False)):
        m = tiny_moe_model(mt, experts_implementation=impl, check=False)
        reads = [("ffn_out", l) for l in range(m.n_layers)]
        with intervene(m, reads=reads) as ref:
            logits = m.hf(input_ids=ids).logits
        with intervene(m, reads=reads) as rec, expert_intervene(m, reads=m.moe_layers, outputs=True) as caps:
            logits2 = m.hf(input_ids=ids).logits
        assert caps[1, 0].coef.shape[1] == 32
        pairs = [(logits2, logits)] + [(rec["ffn_out", l], ref["ffn_out", l]) for l in range(m.n_layers)]
        for a, b in pairs:
            if exact:
                assert torch.equal(a, b)
            else:
                assert (a - b).abs().max() <= 1e-6
        ex = m.experts_module(0)
        assert "forward" not in ex.__dict__  # restored on exit


def test_replacement_is_restored_on_error_and_refuses_nesting(moe_models):
    m = moe_models["mixtral"]
    ex = m.experts_module(1)
    with pytest.raises(ZeroDivisionError):
        with expert_intervene(m, reads=[1]):
            1 / 0
    assert "forward" not in ex.__dict__ and not m.layer(1).mlp._forward_pre_hooks
    with expert_intervene(m, reads=[1]):
        with pytest.raises(FfkvError, match="already inside"):
            with expert_intervene(m, reads=[(1, 0)]):
                pass
    assert "forward" not in ex.__dict__


@pytest.mark.parametrize("mt", FAMILIES)
def test_capture_matches_a_manual_computation_from_the_routing(moe_models, mt):
    m = moe_models[mt]
    ids = _ids(m)
    B, T = ids.shape
    with intervene(m, reads=[("ffn_in", l) for l in range(m.n_layers)]) as rec, \
            expert_intervene(m, reads=m.moe_layers) as caps:
        m.hf(input_ids=ids)
    for l in m.moe_layers:
        x = rec["ffn_in", l].reshape(-1, m.d_model)
        for e, (tok, w, coef) in _manual_experts(m, l, x).items():
            cap = caps[l, e]
            assert torch.equal(cap.token, tok)
            assert torch.equal(cap.batch, tok // T) and torch.equal(cap.position, tok % T)
            torch.testing.assert_close(cap.weight, w, rtol=0, atol=1e-7)
            torch.testing.assert_close(cap.coef, coef, rtol=1e-5, atol=1e-7)
        assert caps.routing[l][0].shape == (B, T, m.top_k)


@pytest.mark.parametrize("mt", FAMILIES)
def test_unrouted_tokens_are_not_active(moe_models, mt):
    m = moe_models[mt]
    ids = _ids(m, B=3, T=5)
    with expert_intervene(m, reads=[0]) as caps:
        m.hf(input_ids=ids)
    routed = torch.zeros(3, 5, dtype=torch.long)
    for e in range(m.n_experts(0)):
        cap = caps[0, e]
        dense = cap.dense()
        assert dense.shape == (3, 5, m.d_expert(0, e))
        # NaN exactly where the token was not routed: no coefficient of 0 stands in for "not active"
        assert torch.equal(torch.isnan(dense).all(-1), ~cap.mask())
        assert not torch.isnan(dense[cap.mask()]).any()
        assert torch.equal(dense[cap.batch, cap.position], cap.coef)
        routed += cap.mask().long()
    assert (routed == m.top_k).all()  # every token is active in exactly k experts


def test_switching_expert_memories_off_removes_exactly_their_writes(moe_models):
    m = moe_models["qwen3_moe"]
    ids = _ids(m)
    l, e, idx = 1, 2, [3, 7, 11]
    with intervene(m, reads=[("ffn_out", l)]) as ref, expert_intervene(m, reads=[(l, e)]) as caps:
        m.hf(input_ids=ids)
    edits = switch_expert_memories([str(MemoryId(l, i, expert=e)) for i in idx])
    assert edits == [ExpertEdit(l, e, "off", indices=idx)]
    with intervene(m, reads=[("ffn_out", l)]) as off, expert_intervene(m, reads=[(l, e)], edits=edits) as caps2:
        m.hf(input_ids=ids)
    cap = caps[l, e]
    assert (caps2[l, e].coef[:, idx] == 0).all()
    # the block loses w_e * sum_{i in idx} m_i v_i at the routed tokens and nothing elsewhere
    lost = cap.weight[:, None] * (cap.coef[:, idx] @ m.values(l, e)[:, idx].T)
    diff = (ref["ffn_out", l] - off["ffn_out", l]).reshape(-1, m.d_model)
    torch.testing.assert_close(diff[cap.token], lost, rtol=1e-4, atol=1e-7)
    others = torch.ones(diff.shape[0], dtype=torch.bool)
    others[cap.token] = False
    assert (diff[others] == 0).all()
    with pytest.raises(FfkvError, match="not an expert memory"):
        switch_expert_memories(["L1.3"])


def test_expert_edit_selects_positions_and_forces_values(moe_models):
    m = moe_models["mixtral"]
    ids = _ids(m)
    with expert_intervene(m, reads=[(0, 1)], edits=[ExpertEdit(0, 1, "on", value=5.0, indices=[0, 2],
                                                               positions=[1, 2, 3], batch=[1])]) as caps:
        m.hf(input_ids=ids)
    cap = caps[0, 1]
    sel = (cap.batch == 1) & (cap.position >= 1) & (cap.position <= 3)
    assert (cap.coef[sel][:, [0, 2]] == 5.0).all()
    assert not (cap.coef[~sel][:, [0, 2]] == 5.0).any()
    with pytest.raises(FfkvError):
        ExpertEdit(0, 1, "scale")
    with pytest.raises(FfkvError, match="out of range"):
        with expert_intervene(m, edits=[ExpertEdit(0, 9, "off")]):
            pass


@pytest.mark.parametrize("mt", FAMILIES)
def test_census_totals_equal_parameter_counts(moe_models, mt):
    m = moe_models[mt]
    c = moe_census(m)
    assert c["total_params"] == sum(p.numel() for p in m.hf.parameters())
    assert c == moe_census(tiny_moe_config(mt))  # from the config alone, on the meta device
    L, E, F, D = 2, 4, 32, m.d_model
    assert c["expert_params"] == L * E * 3 * F * D and c["expert_slots"] == L * E * F
    assert c["shared_slots"] == (L * 64 if mt == "qwen2_moe" else 0)
    assert c["memory_slots"] == c["expert_slots"] + c["shared_slots"] + c["dense_slots"]
    assert c["active_params"] == c["total_params"] - c["expert_params"] // 2  # top-2 of 4 experts
    assert c["per_layer"][0] == {"layer": 0, "n_experts": E, "d_expert": F, "expert_slots": E * F,
                                 "shared_slots": 64 if mt == "qwen2_moe" else 0, "dense_slots": 0}


def test_census_counts_dense_layers_of_a_partly_sparse_model():
    m = tiny_moe_model("qwen3_moe", mlp_only_layers=[1])
    c = moe_census(m)
    assert c["total_params"] == sum(p.numel() for p in m.hf.parameters())
    assert c["moe_layers"] == 1 and c["dense_slots"] == 64 and c["components"]["dense_ffn"] == 3 * 64 * 32


@pytest.mark.parametrize("mt", FAMILIES)
def test_editing_one_expert_changes_only_its_output_and_undo_is_bit_exact(moe_models, mt):
    m = moe_models[mt]
    ids = _ids(m)
    l, e, cols = 1, 0, slice(4, 12)
    param, where = m.value_param(l, e), m.value_slice(l, e)
    assert param[where].data_ptr() == m.values(l, e).data_ptr()  # a view of the fused tensor
    state = {k: v.clone() for k, v in m.hf.state_dict().items()}
    logits = m.hf(input_ids=ids).logits
    with intervene(m, reads=[("ffn_out", l)]) as ref, expert_intervene(m, reads=[l], outputs=True) as before:
        m.hf(input_ids=ids)
    saved = m.values(l, e)[:, cols].clone()
    with torch.no_grad():
        m.values(l, e)[:, cols] += 0.5
    with intervene(m, reads=[("ffn_out", l)]) as new, expert_intervene(m, reads=[l], outputs=True) as after:
        m.hf(input_ids=ids)
    for k in range(m.n_experts(l)):
        same = torch.equal(after[l, k].out, before[l, k].out)
        assert same == (k != e)
    diff = (new["ffn_out", l] - ref["ffn_out", l]).reshape(-1, m.d_model).abs().amax(-1)
    routed = before[l, e].token
    assert (diff[routed] > 0).all()
    others = torch.ones_like(diff, dtype=torch.bool)
    others[routed] = False
    assert (diff[others] == 0).all()
    changed = [k for k in state if not torch.equal(state[k], m.hf.state_dict()[k])]
    assert changed == [f"model.layers.{l}.mlp.experts.down_proj"]
    with torch.no_grad():
        m.values(l, e)[:, cols] = saved
    assert all(torch.equal(state[k], v) for k, v in m.hf.state_dict().items())
    assert torch.equal(m.hf(input_ids=ids).logits, logits)


def test_routed_coefficients_are_the_statistics_input_without_padding(moe_models):
    m = moe_models["olmoe"]
    ids = _ids(m, B=2, T=6)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    cap = routed_coefficients(m, {"input_ids": ids, "attention_mask": mask}, 1, 3)
    assert cap.n_tokens > 0 and bool(mask[cap.batch, cap.position].all())
    with expert_intervene(m, reads=[(1, 3)]) as caps:
        m.hf(input_ids=ids, attention_mask=mask)
    full = caps[1, 3]
    keep = mask.bool()[full.batch, full.position]
    assert torch.equal(cap.coef, full.coef[keep]) and torch.equal(cap.token, full.token[keep])
    assert cap.coef.shape[1] == m.d_expert(1, 3)


def test_keys_values_and_dense_sites_on_moe_layers(moe_models):
    m = moe_models["qwen2_moe"]
    ex = m.experts_module(0)
    F = m.d_expert(0, 2)
    assert m.keys(0, 2).data_ptr() == ex.gate_up_proj[2, :F].data_ptr()
    assert m.up_keys(0, 2).data_ptr() == ex.gate_up_proj[2, F:].data_ptr()
    assert m.values(0, 2).shape == (m.d_model, F)
    # expert=None on a Qwen2-MoE layer is the shared expert, a dense FFN read through hooks.intervene
    assert m.values(0) is m.layer(0).mlp.shared_expert.down_proj.weight and m.d_expert(0) == 64
    ids = _ids(m)
    with intervene(m, reads=[("ffn_in", 0), ("coef", 0), ("ffn_out", 0)]) as rec:
        m.hf(input_ids=ids)
    torch.testing.assert_close(m.coefficients_from_input(0, rec["ffn_in", 0]), rec["coef", 0])
    block = m.moe_output_from_input(0, rec["ffn_in", 0].reshape(-1, m.d_model))
    torch.testing.assert_close(block, rec["ffn_out", 0].reshape(-1, m.d_model), rtol=1e-5, atol=1e-7)
    assert m.site_module("ffn_write", 0) == m.site_module("ffn_out", 0) == (m.layer(0).mlp, "post")
    mix = moe_models["mixtral"]
    with pytest.raises(FfkvError, match="no dense FFN"):
        mix.values(0)
    with pytest.raises(FfkvError, match="no dense FFN"):
        with intervene(mix, reads=[("coef", 0)]):
            pass
    assert mix.check_memory("L1.E3.31") == MemoryId(1, 31, 3)
    for bad in ("L1.E4.0", "L1.E0.32", "L1.5"):
        with pytest.raises(FfkvError):
            mix.check_memory(bad)


def test_load_model_builds_a_checked_moe_model_from_a_folder(moe_models, tmp_path):
    src = moe_models["mixtral"]
    src.hf.save_pretrained(tmp_path)
    m = load_model(str(tmp_path), tokenizer=False)
    assert isinstance(m, MoEModel) and m.adapter_check["passed"]
    assert torch.equal(m.values(1, 2), src.values(1, 2))
    assert m.identity["n_experts"] == [4, 4] and m.identity["top_k"] == 2


PUBLISHED = {  # model card figures: (total, active) parameters in billions
    "mixtral-8x7b": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                           num_local_experts=8, num_experts_per_tok=2), 46.7, 12.9),
    "qwen1.5-moe-a2.7b": ("Qwen2MoeConfig", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                                                 num_key_value_heads=16, vocab_size=151936, intermediate_size=5632,
                                                 moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                                 num_experts=60, num_experts_per_tok=4), 14.3, 2.7),
    "olmoe-1b-7b": ("OlmoeConfig", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                                        intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                                        vocab_size=50304), 6.9, 1.3),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                             num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                                             num_experts=128, num_experts_per_tok=8, vocab_size=151936,
                                             intermediate_size=6144), 30.5, 3.3),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_census_matches_published_total_and_active_parameters(name):
    import transformers

    cls, kw, total, active = PUBLISHED[name]
    c = moe_census(getattr(transformers, cls)(**kw))
    assert c["total_params"] / 1e9 == pytest.approx(total, abs=0.06)  # cards round to 0.1B (3.35 -> "3.3B")
    assert c["active_params"] / 1e9 == pytest.approx(active, abs=0.06)


def test_gradients_flow_through_expert_coefficients(moe_models):
    m = moe_models["olmoe"]
    ids = _ids(m)
    alpha = torch.tensor(1.0, requires_grad=True)
    with expert_intervene(m, reads=[(1, 2)], edits=[ExpertEdit(1, 2, "scale", value=alpha, indices=[0, 1, 2])],
                          keep_grad=True) as caps:
        logits = m.hf(input_ids=ids).logits
    assert caps[1, 2].coef.requires_grad
    logits[:, -1].logsumexp(-1).sum().backward()
    assert alpha.grad is not None and alpha.grad.abs() > 0
    m.hf.zero_grad(set_to_none=True)
