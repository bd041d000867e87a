"""The expert axis wired into the capabilities: atlas per expert, tracing, ROME / MEMIT on one expert, undo."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from ffkv.edit.api import apply_edits
from ffkv.edit.compute_key import routed_experts
from ffkv.edit.journal import Journal
from ffkv.edit.methods.rome import pick_expert
from ffkv.edit.requests import EditRequest
from ffkv.edit.stats import layer_stats, load_second_moment, token_windows
from ffkv.errors import FfkvError
from ffkv.locate.trace import causal_trace, causal_trace_reference
from ffkv.memory import corpus as corpus_mod
from ffkv.memory.atlas import Atlas
from ffkv.memory.merge import merge_atlases
from ffkv.memory.miner import POSITION_BITS, mine, mining_groups
from ffkv.memory.oracle import brute_force_triggers
from ffkv.models.loading import tiny_model
from ffkv.models.memory_id import MemoryId
from ffkv.models.moe import MoEModel, expert_intervene, routed_coefficients, tiny_moe_config
from ffkv.testbed.planted import WORDS, word_tokenizer

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _moe(model_type: str, seed: int = 0, **config) -> MoEModel:
    """A tiny random MoE model with the testbed's word tokenizer (73 ids < the tiny vocabulary of 128)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_moe_config(model_type, **config))
    return MoEModel.from_hf_checked(hf, word_tokenizer(), f"tiny-{model_type}", True)


@pytest.fixture(scope="module")
def models():
    return {mt: _moe(mt) for mt in FAMILIES}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = random.Random(0)
    lines = []
    for _ in range(24):
        lines += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + " .", ""]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n".join(lines))
    return path


def _dense(atlas, layer, kind, expert):
    tm = atlas.trigger_matrix(layer, kind, expert=expert)
    g = np.where(tm["unit"] >= 0, (tm["unit"] << POSITION_BITS) + tm["position"], -1)
    return g, tm["coef"]

# --------------------------------------------------------------------------------------------- atlas
@pytest.mark.parametrize("mt", FAMILIES)
def test_mining_per_expert_equals_brute_force(models, corpus_file, mt, tmp_path):
    model = models[mt]
    mine(model, corpus_file, tmp_path / "a", top_k=6, batch_tokens=64, progress=False)
    atlas = Atlas(tmp_path / "a", model=model)
    units = list(corpus_mod.iter_units(model.tokenizer, corpus_mod.CorpusSpec(str(corpus_file))))
    ref = brute_force_triggers(model, units, top_k=6, batch_tokens=64)
    groups = mining_groups(model)
    assert [(l, e) for l, e, _ in groups] == atlas.groups == list(ref)
    assert atlas.has_experts and sum(e is not None for _, e in atlas.groups) == 2 * 4
    assert (mt == "qwen2_moe") == any(e is None for _, e in atlas.groups)  # the shared expert is dense
    short = 0
    for l, e in atlas.groups:
        for kind in ("top", "bottom"):
            g, c = _dense(atlas, l, kind, e)
            assert (g == ref[l, e][kind]).all(), (l, e, kind)
            assert np.array_equal(c, ref[l, e][kind + "_coef"].astype(np.float32), equal_nan=True)
            assert not np.isnan(c[g >= 0]).any()  # no "not active" entry ranked
            short += int((g < 0).any())
    # every trigger of an expert key is a prefix routed to that expert
    with expert_intervene(model, reads=[0]) as rec:
        for r in atlas.memory_triggers("L0.E1.3", n=6):
            ids = torch.tensor([atlas.prefix(r["unit"], r["position"])])
            model.hf(input_ids=ids)
            cap = rec[0, 1]
            assert int(ids.shape[1] - 1) in cap.position.tolist()
            got = cap.coef[cap.position.tolist().index(ids.shape[1] - 1), 3]
            assert abs(float(got) - r["coef"]) <= 1e-5 * max(1.0, abs(r["coef"]))
    assert atlas.memory_triggers(MemoryId(0, 3, 1)) == atlas.memory_triggers(0, 3, expert=1)
    with pytest.raises(FfkvError):
        atlas.memory_triggers("L0.E9.3")
    if mt != "qwen2_moe":
        with pytest.raises(FfkvError, match="no dense FFN"):
            atlas.memory_triggers("L0.3")


def test_expert_atlas_resumes_and_merges_to_one_run(models, corpus_file, tmp_path):
    model = models["qwen2_moe"]
    mine(model, corpus_file, tmp_path / "full", top_k=4, batch_tokens=48, progress=False)
    part = mine(model, corpus_file, tmp_path / "r", top_k=4, batch_tokens=48, progress=False, max_batches=2,
                checkpoint_every=1)
    assert part["status"] == "partial"
    mine(model, corpus_file, tmp_path / "r", top_k=4, batch_tokens=48, progress=False)
    full, resumed = Atlas(tmp_path / "full", model=model), Atlas(tmp_path / "r", model=model)
    for l, e in full.groups:
        assert full.triggers(l, e).equals(resumed.triggers(l, e))
    text = corpus_file.read_text().split("\n\n")
    a, b = tmp_path / "p0.txt", tmp_path / "p1.txt"
    a.write_text("\n\n".join(text[:12]))
    b.write_text("\n\n".join(text[12:]))
    mine(model, a, tmp_path / "s0", top_k=4, batch_tokens=48, progress=False)
    mine(model, b, tmp_path / "s1", top_k=4, batch_tokens=48, progress=False)
    merged = merge_atlases([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m")
    assert merged["groups"] == full.meta["groups"]
    m = Atlas(tmp_path / "m", model=model)
    for l, e in full.groups:
        for kind in ("top", "bottom"):
            assert np.array_equal(m.trigger_matrix(l, kind, e)["coef"], full.trigger_matrix(l, kind, e)["coef"],
                                  equal_nan=True)

# --------------------------------------------------------------------------------------------- tracing
@pytest.mark.parametrize("mt,kind", [(mt, "mlp") for mt in FAMILIES] + [("qwen2_moe", "hidden")])
def test_trace_on_moe_equals_the_reference(models, mt, kind):

    model = models[mt]
    args = dict(kind=kind, noise=3.0, samples=3, window=2, seed=1)
    got = causal_trace(model, "the old tower is in", "old tower", **args)
    ref = causal_trace_reference(model, "the old tower is in", "old tower", **args)
    assert got.scores.shape == (5, model.n_layers)
    assert np.allclose(got.scores, ref.scores, atol=1e-5, rtol=1e-4)
    assert got.high_score == pytest.approx(ref.high_score, abs=1e-6)
    assert got.low_score == pytest.approx(ref.low_score, abs=1e-6)

# --------------------------------------------------------------------------------------------- ROME / MEMIT
def _texts(n=60, seed=1):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) for _ in range(n)]


def _params(model):
    return {n: p.detach().clone() for n, p in model.hf.named_parameters()}


def _target_prob(model, prompt, target):
    tok = model.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        p = torch.softmax(model.hf(input_ids=ids).logits[0, -1].float(), -1)
    t = model.answer_id(target)
    return float(p[t]), int(p.argmax()) == t


REQ = {"prompt": "in {}", "subject": "the old tower", "target": "lisbon"}


@pytest.mark.parametrize("mt", FAMILIES)
def test_rome_on_the_routed_expert_writes_the_fact_only_there_and_undoes(mt, tmp_path):

    model = _moe(mt)
    req = EditRequest(REQ["prompt"], REQ["subject"], " " + REQ["target"])
    routed = routed_experts(model, req, 0)
    e = routed[0][0]
    assert len(routed) == model.top_k and routed[0][1] >= routed[1][1]
    assert pick_expert(model, req, 0, "top") == e and pick_expert(model, req, 0, 1) == 1
    unrouted = next(x for x in range(model.n_experts(0)) if x not in [r for r, _ in routed])
    before = _params(model)
    p0, _ = _target_prob(model, REQ["prompt"].format(REQ["subject"]), REQ["target"])
    # A tiny random model's block outputs are ~1e-3 (||h||), so ROME's clamp (4 ||h||) and weight decay
    # (relative to ||h||^2) would keep delta far below what moves its residual (~1): lift both.
    hp = {"layer": 0, "expert": e, "stats_tokens": 600, "v_num_grad_steps": 15, "prefixes": [[3, 2]],
          "clamp_norm_factor": 1000.0,
          "v_weight_decay": 0.0, "max_update_ratio": 1e5}
    with pytest.raises(FfkvError, match=re.escape(f"routed to experts {sorted(r for r, _ in routed)}")):
        apply_edits(model, req, "rome", {**hp, "expert": unrouted}, corpus=_texts(), stats_dir=tmp_path,
                    progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.hf.named_parameters())  # refusal left it unchanged
    j = apply_edits(model, req, "rome", hp, corpus=_texts(), stats_dir=tmp_path, progress=False)
    entry = j[0]
    assert entry.expert == e and entry.site == (0, e) and 0 < entry.info["routing_weight"] <= 1
    p1, top = _target_prob(model, REQ["prompt"].format(REQ["subject"]), REQ["target"])
    assert top and p1 > 1.5 * p0, (p0, p1)
    # the block moved by delta (not w_e delta): the edited model gives the probability the optimisation reached
    assert p1 == pytest.approx(entry.info["target_prob"], rel=0.05)
    down = f"model.layers.0.{model.moe_spec.experts}.{model.moe_spec.down}"
    for n, p in model.hf.named_parameters():
        if n == down:
            others = [x for x in range(model.n_experts(0)) if x != e]
            assert torch.equal(p[others], before[n][others]) and not torch.equal(p[e], before[n][e])
        else:
            assert torch.equal(p, before[n]), n
    # the journal saves and restores exactly that slice, also through a saved copy
    assert set(j.base) == {(0, e)} and j.base[0, e].shape == model.values(0, e).shape and j.base_layers == [0]
    j.save(tmp_path / "journal")
    loaded = Journal.load(tmp_path / "journal")
    assert loaded[0].expert == e and set(loaded.base) == {(0, e)}
    loaded.undo(model)
    assert all(torch.equal(p, before[n]) for n, p in model.hf.named_parameters())
    Journal.load(tmp_path / "journal").replay(model)  # bit-identical to the edited model
    assert _target_prob(model, REQ["prompt"].format(REQ["subject"]), REQ["target"])[0] == pytest.approx(p1)


@pytest.mark.parametrize("mt", FAMILIES)
def test_memit_on_an_expert_per_layer_and_undo(mt, tmp_path):

    model = _moe(mt)
    req = EditRequest(REQ["prompt"], REQ["subject"], " " + REQ["target"])
    experts = [routed_experts(model, req, l)[0][0] for l in range(model.n_layers)]
    before = _params(model)
    p0, _ = _target_prob(model, REQ["prompt"].format(REQ["subject"]), REQ["target"])
    hp = {"layers": [0, 1], "expert": experts, "stats_tokens": 600, "v_num_grad_steps": 15, "prefixes": [[3, 2]],
          "clamp_norm_factor": 1000.0, "v_weight_decay": 0.0, "max_update_ratio": 1e5, "mom2_update_weight": 1.0}
    j = apply_edits(model, [req], "memit", hp, corpus=_texts(), stats_dir=tmp_path, progress=False)
    assert [(x.layer, x.expert) for x in j] == [(0, experts[0]), (1, experts[1])]
    p1, top = _target_prob(model, REQ["prompt"].format(REQ["subject"]), REQ["target"])
    assert top and p1 > 1.5 * p0, (p0, p1)
    for l in range(model.n_layers):
        down = f"model.layers.{l}.{model.moe_spec.experts}.{model.moe_spec.down}"
        others = [x for x in range(model.n_experts(l)) if x != experts[l]]
        assert torch.equal(dict(model.hf.named_parameters())[down][others], before[down][others])
    changed = {n for n, p in model.hf.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers.{l}.{model.moe_spec.experts}.{model.moe_spec.down}" for l in (0, 1)}
    j.undo(model)
    assert all(torch.equal(p, before[n]) for n, p in model.hf.named_parameters())
    # one expert for every layer: refused (model unchanged) where the subject is not routed to it
    unrouted = next(x for x in range(model.n_experts(0)) if x not in [r for r, _ in routed_experts(model, req, 0)])
    with pytest.raises(FfkvError, match="cannot hold the fact"):
        apply_edits(model, [req], "memit", {**hp, "expert": unrouted}, corpus=_texts(), stats_dir=tmp_path,
                    progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.hf.named_parameters())


def test_expert_statistics_are_over_the_routed_tokens_and_cached_per_expert(models, tmp_path):

    model = models["olmoe"]
    got = layer_stats(model, [(1, 2), (0, 1)], corpus=_texts(), n_tokens=300, stats_dir=tmp_path, window=32,
                      progress=False)
    windows = token_windows(model, _texts(), 300, 32)
    for l, e in [(1, 2), (0, 1)]:
        S, n = 0, 0
        for i in range(0, windows.shape[0], 8):
            cap = routed_coefficients(model, {"input_ids": windows[i:i + 8]}, l, e)
            S, n = S + (cap.coef.T.double() @ cap.coef.double()), n + cap.n_tokens
        sm = got[l, e]
        assert sm.expert == e and sm.n_tokens == n < windows.numel()
        torch.testing.assert_close(sm.C, S / n, rtol=1e-5, atol=1e-12)
        assert f"-L{l}-E{e}-" in sm.path.name
        assert torch.equal(load_second_moment(sm.path, model.identity, l, e).C, sm.C)
        with pytest.raises(FfkvError, match="expert"):
            load_second_moment(sm.path, model.identity, l, None)
    assert not torch.equal(got[1, 2].C, got[0, 1].C)
    with pytest.raises(FfkvError):
        layer_stats(model, [0], corpus=_texts(), n_tokens=300, stats_dir=tmp_path, progress=False)  # no dense FFN


def test_mining_per_expert_without_dedup_equals_brute_force(models, corpus_file, tmp_path):
    model = models["olmoe"]
    mine(model, corpus_file, tmp_path / "a", top_k=5, batch_tokens=80, progress=False, dedup=False)
    atlas = Atlas(tmp_path / "a", model=model)
    units = list(corpus_mod.iter_units(model.tokenizer, corpus_mod.CorpusSpec(str(corpus_file))))
    ref = brute_force_triggers(model, units, top_k=5, batch_tokens=80, dedup=False)
    for l, e in atlas.groups:
        for kind in ("top", "bottom"):
            g, c = _dense(atlas, l, kind, e)
            assert (g == ref[l, e][kind]).all() and np.array_equal(c, ref[l, e][kind + "_coef"], equal_nan=True)


def test_rome_on_the_shared_expert_accounts_for_its_gate(tmp_path):
    model = _moe("qwen2_moe")
    req = EditRequest(REQ["prompt"], REQ["subject"], " " + REQ["target"])
    before = _params(model)
    p0, _ = _target_prob(model, REQ["prompt"].format(REQ["subject"]), REQ["target"])
    hp = {"layer": 0, "stats_tokens": 600, "v_num_grad_steps": 15, "prefixes": [[3, 2]], "clamp_norm_factor": 1000.0,
          "v_weight_decay": 0.0, "max_update_ratio": 1e5}
    j = apply_edits(model, req, "rome", hp, corpus=_texts(), stats_dir=tmp_path, progress=False)
    assert j[0].expert is None and 0 < j[0].info["shared_gate"] < 1
    p1, top = _target_prob(model, REQ["prompt"].format(REQ["subject"]), REQ["target"])
    assert top and p1 > 1.5 * p0 and p1 == pytest.approx(j[0].info["target_prob"], rel=0.05)
    changed = {n for n, p in model.hf.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.0.mlp.shared_expert.down_proj.weight"}
    j.undo(model)
    assert all(torch.equal(p, before[n]) for n, p in model.hf.named_parameters())


def test_edit_refusals_name_the_fix(models, planted, tmp_path):
    req = EditRequest(REQ["prompt"], REQ["subject"], " " + REQ["target"])
    model = models["mixtral"]
    with pytest.raises(FfkvError, match="no dense FFN"):  # expert=None on a layer that has only experts
        apply_edits(model, req, "rome", {"layer": 0, "stats_tokens": 200}, corpus=_texts(), stats_dir=tmp_path,
                    progress=False)
    with pytest.raises(FfkvError, match="out of range"):
        apply_edits(model, req, "rome", {"layer": 0, "expert": 7, "stats_tokens": 200}, corpus=_texts(),
                    stats_dir=tmp_path, progress=False)
    with pytest.raises(FfkvError, match="one expert per layer"):
        apply_edits(model, [req], "memit", {"layers": [0, 1], "expert": [1]}, corpus=_texts(), stats_dir=tmp_path,
                    progress=False)
    dense_req = EditRequest("{} is in", "the old tower", " paris")
    with pytest.raises(FfkvError, match="no experts"):
        apply_edits(planted.model, dense_req, "rome", {"layer": 0, "expert": 1, "stats_tokens": 200},
                    corpus=_texts(), stats_dir=tmp_path, progress=False)


@pytest.mark.parametrize("mt", ["deepseek_v3", "flex_olmo"])
def test_inferred_moe_families_atlas_rome_memit(mt, corpus_file, tmp_path):
    """Families whose MoE spec is inferred: DeepSeek-V3 (sigmoid router, scaled weights, ungated shared expert,
    a dense first layer) and FlexOlmo (post-FFN norms: MEMIT maps the residual change through the norm first)."""
    model = tiny_model(mt)
    model.tokenizer = word_tokenizer()
    mine(model, corpus_file, tmp_path / "a", top_k=4, batch_tokens=64, progress=False)
    atlas = Atlas(tmp_path / "a", model=model)
    units = list(corpus_mod.iter_units(model.tokenizer, corpus_mod.CorpusSpec(str(corpus_file))))
    ref = brute_force_triggers(model, units, top_k=4, batch_tokens=64)
    for l, e in atlas.groups:
        for kind in ("top", "bottom"):
            assert (_dense(atlas, l, kind, e)[0] == ref[l, e][kind]).all(), (l, e, kind)
    req = EditRequest(REQ["prompt"], REQ["subject"], " " + REQ["target"])
    before = _params(model)
    p0, _ = _target_prob(model, REQ["prompt"].format(REQ["subject"]), REQ["target"])
    common = {"stats_tokens": 600, "v_num_grad_steps": 15, "prefixes": [[3, 2]], "clamp_norm_factor": 1000.0,
              "v_weight_decay": 0.0, "max_update_ratio": 1e5}
    L = max(model.moe_layers)
    j = apply_edits(model, req, "rome", {"layer": L, "expert": "top", **common}, corpus=_texts(),
                    stats_dir=tmp_path, progress=False)
    assert j[0].expert == pick_expert(model, req, L, "top")
    p1, top = _target_prob(model, REQ["prompt"].format(REQ["subject"]), REQ["target"])
    assert top and p1 > 1.5 * p0
    j.undo(model)
    assert all(torch.equal(p, before[n]) for n, p in model.hf.named_parameters())
    experts = [routed_experts(model, req, l)[0][0] if model.is_moe_layer(l) else None for l in range(model.n_layers)]
    j = apply_edits(model, [req], "memit", {"layers": list(range(model.n_layers)), "expert": experts,
                                            "mom2_update_weight": 1.0, **common},
                    corpus=_texts(), stats_dir=tmp_path, progress=False)
    assert [x.expert for x in j] == experts
    assert _target_prob(model, REQ["prompt"].format(REQ["subject"]), REQ["target"])[1]
    j.undo(model)
    assert all(torch.equal(p, before[n]) for n, p in model.hf.named_parameters())
