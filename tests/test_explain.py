"""ffkv explain: the candidates' logits decomposed by layer and memory, summing to the model's own logits."""

import json

import pytest
import torch
from click.testing import CliRunner

from ffkv.cli import cli as main
from ffkv.errors import FfkvError
from ffkv.memory.explain import explain, frozen_norm
from ffkv.models.loading import tiny_model


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "opt", "olmo2", "cohere", "bloom", "qwen2_moe"])
def test_terms_sum_to_the_models_logits(family, testbed_model):
    tok = testbed_model.tokenizer
    mm = tiny_model(family, vocab=len(tok), tokenizer=tok)
    e = explain(mm, "The native language of Quoux Kurte is", ["Dutch", "French", "English"])
    assert e.check["error"] < 1e-4
    # Reassemble one candidate's centred logit from the reported terms (pre-cap, so only without soft-capping).
    if e.check["softcap"] is None:
        c = "Dutch"
        total = e.embed[c] + e.constant[c] + sum(l["attn"][c] + l["ffn"][c] for l in e.layers)
        assert total == pytest.approx(e.check["actual"][c], abs=1e-4)
    assert len(e.layers) == mm.n_layers


def test_memories_sum_to_the_ffn_term_without_a_post_norm(testbed_model):
    e = explain(testbed_model, "The native language of Quoux Kurte is", ["Dutch", "French"], top_n=3)
    for layer in e.layers:
        assert layer["memories_sum_error"] < 1e-4
        assert len(layer["memories"]) == 3
    assert e.logit_diff == pytest.approx(e.logits["Dutch"] - e.logits["French"])


def test_the_planted_memory_promotes_its_target(planted):
    mm = planted.model
    fact = planted.fact("tower")
    other = planted.fact("castle")
    e = explain(mm, "the tower", [fact.target, other.target], top_n=3)
    top = e.promoting(fact.target, 1)[0]
    layer, index = fact.memories[0]
    assert top["memory"] == f"L{layer}.{index}"
    assert top["contribution"][fact.target] > 0


def test_frozen_norm_is_exact_for_layernorm_and_rmsnorm():
    torch.manual_seed(0)
    x = torch.randn(33)
    for norm in (torch.nn.LayerNorm(33), torch.nn.RMSNorm(33, eps=1e-6)):
        with torch.no_grad():
            norm.weight.normal_()
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_()
        lin, b = frozen_norm(norm, x)
        parts = torch.randn(4, 33)
        parts[-1] = x - parts[:-1].sum(0)
        assert torch.allclose(lin(parts).sum(0) + b, norm(x[None])[0].detach(), atol=2e-4)


def test_bad_candidates_are_refused(testbed_model):
    with pytest.raises(FfkvError, match="at least two"):
        explain(testbed_model, "The native language of Quoux Kurte is", ["Dutch"])
    with pytest.raises(FfkvError, match="same token"):
        explain(testbed_model, "The native language of Quoux Kurte is", ["Dutch", "Dutch people"])


def test_cli_json(default_testbed):
    r = CliRunner().invoke(main, ["explain", str(default_testbed / "model"), "--prompt",
                                  "The native language of Quoux Kurte is", "--candidates", "Dutch", "French",
                                  "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["candidates"] == ["Dutch", "French"] and len(d["layers"]) == 6
    assert {"attn", "ffn", "memories"} <= set(d["layers"][0])
    r = CliRunner().invoke(main, ["explain", str(default_testbed / "model"), "--prompt", "x", "--candidates", "A"])
    assert isinstance(r.exception, FfkvError) and "at least two" in str(r.exception)
