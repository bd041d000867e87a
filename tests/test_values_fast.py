"""The fast atlas analyses equal the direct ones (ffkv.memory.reference): the bf16-screened head argmax
(HeadScreen), the values pass that also yields composition's memory tokens, and composition without the LM head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffkv.memory import corpus as corpus_mod
from ffkv.memory.composition import composition_and_refinement, memory_tokens, sample_units
from ffkv.memory.reference import (reference_composition, reference_memory_tokens,
                                   reference_project_values)
from ffkv.memory.values import HeadScreen, head_input, project_values
from ffkv.models.loading import tiny_model

FAMILIES = ("gpt2", "gptj", "gemma2", "opt")  # plain head, head bias, final soft-cap, final projection


@pytest.fixture(scope="module")
def heads():
    return {f: tiny_model(f, vocab=512, d_model=48, seed=3) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_head_input_is_what_unembed_feeds_its_unembedding(heads, family):
    m = heads[family]
    x = torch.randn(7, m.d_model, generator=torch.Generator().manual_seed(1))
    for norm in (True, False):
        assert torch.equal(m.scale_logits(m.unembedding(head_input(m, x, norm))), m.unembed(x, norm=norm))


@pytest.mark.parametrize("family", FAMILIES)
def test_screened_argmax_equals_the_float32_head(heads, family):
    m = heads[family]
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(300, m.d_model, generator=g), 40 * torch.randn(20, m.d_model, generator=g)])
    screen = HeadScreen(m, candidates=6, screen=True, chunk=128)
    for norm in (True, False):
        for largest in (True, False):
            z = m.unembed(x, norm=norm)
            want = z.argmax(-1) if largest else z.argmin(-1)
            assert torch.equal(screen.top1(x, norm=norm, largest=largest), want)
    assert screen.n_rows == 4 * len(x)


def test_ties_and_near_ties_are_resolved_as_argmax_does():
    m = tiny_model("gpt2", vocab=256, d_model=32, seed=5)
    E = m.unembedding.weight
    with torch.no_grad():
        E[17] = E[200]  # an exact tie: argmax takes the lower id
        E[90] = E[40] * (1 + 3e-6)  # closer than any bf16 product can tell: decided on float32 candidates
        for k in range(20):  # more near ties than candidates: the screen cannot certify, float32 decides
            E[100 + k] = E[60] * (1 + k * 1e-6)
    x = torch.stack([m.final_norm(E[200] * 50), m.final_norm(E[40] * 50), m.final_norm(-E[40] * 50),
                     m.final_norm(E[60] * 50)]).detach()
    screen = HeadScreen(m, screen=True, candidates=16)
    z = m.unembed(x, norm=False)
    assert torch.equal(screen.top1(x, norm=False), z.argmax(-1))
    assert torch.equal(screen.top1(x, norm=False, largest=False), z.argmin(-1))
    assert screen.top1(x[:1], norm=False).item() == 17
    assert screen.n_fallback == 1  # the row of 20 near ties was recomputed with the float32 head, not guessed


def test_values_pass_equals_the_direct_projection_and_gives_the_memory_tokens(planted):
    m = planted.model
    ref_tokens = reference_memory_tokens(m)
    for layer in range(m.n_layers):
        targets = np.arange(m.d_ffn) % 7 - 1  # -1: no target
        got = project_values(m, layer, top_n=5, chunk=16, targets=targets, extremes=True)
        ref = reference_project_values(m, layer, top_n=5, chunk=16, targets=targets)
        for k, v in ref.items():
            assert np.array_equal(got[k], v), k
        assert torch.equal(got["argmax"], ref_tokens[layer][0]) and torch.equal(got["argmin"], ref_tokens[layer][1])
        screened = memory_tokens(m, screen=HeadScreen(m, screen=True))[layer]
        assert torch.equal(screened[0], ref_tokens[layer][0]) and torch.equal(screened[1], ref_tokens[layer][1])


@pytest.fixture(scope="module")
def planted_text(tmp_path_factory, planted):
    """Sentences of the planted model's words, some stating its facts ("... tower paris .")."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    words = [w for w in planted.model.tokenizer.get_vocab() if w.isalpha()][:60]
    rng = np.random.default_rng(0)
    lines = [" ".join(list(rng.choice(words, size=int(rng.integers(2, 9))))
                      + (["tower", "paris"] if rng.random() < 0.3 else [])) + " ." for _ in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("arch", ["planted", "planted_llama"])
@pytest.mark.parametrize("norm,threshold", [(False, None), (True, None), (False, 0.05)])
def test_composition_equals_the_direct_reference(request, arch, norm, threshold, planted_text):
    m = request.getfixturevalue(arch).model
    units = sample_units(m, corpus_mod.CorpusSpec(str(planted_text)), n_units=12)
    ref = reference_composition(m, units, norm=norm, active_threshold=threshold, batch_tokens=64)
    for screen in (True, False):
        got = composition_and_refinement(m, units, norm=norm, active_threshold=threshold, batch_tokens=64,
                                         screen=HeadScreen(m, screen=screen))
        assert got == ref
    shared = composition_and_refinement(m, units, norm=norm, active_threshold=threshold, batch_tokens=64,
                                        value_tokens=reference_memory_tokens(m, norm=norm))
    assert shared == ref


def test_removal_reads_every_variant_off_two_passes_per_unit(planted, planted_text, tmp_path):
    from ffkv.memory.atlas import Atlas
    from ffkv.memory.miner import mine
    from ffkv.memory.patterns import removal_effects
    from ffkv.memory.reference import reference_removal

    mine(planted.model, planted_text, tmp_path / "a", top_k=4, batch_tokens=96, progress=False)
    atlas = Atlas(tmp_path / "a", model=planted.model)
    got = removal_effects(atlas, keys_per_layer=24, triggers_per_key=2, batch_tokens=64)
    ref = reference_removal(atlas, keys_per_layer=24, triggers_per_key=2)
    assert [l["n"] for l in got["layers"]] == [l["n"] for l in ref["layers"]] and got["layers"][0]["n"] > 0
    for a, b in zip(got["layers"], ref["layers"]):
        for k, v in b.items():
            assert a[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k  # the same coefficients, other lengths
