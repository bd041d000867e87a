"""The expert axis wired into the capabilities: atlas per expert, tracing, ROME / MEMIT on one expert, undo."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ffkv.errors import FfkvError
from ffkv.memory import corpus as corpus_mod
from ffkv.memory.atlas import Atlas
from ffkv.memory.merge import merge_atlases
from ffkv.memory.miner import POSITION_BITS, mine, mining_groups
from ffkv.memory.oracle import brute_force_triggers
from ffkv.models.memory_id import MemoryId
from ffkv.models.moe import MoEModel, expert_intervene, tiny_moe_config
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
