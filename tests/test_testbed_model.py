"""Testbed models: a tiny one trains, saves as an ordinary Hugging Face folder and loads through
ffkv.load_model; the shipped default model recalls its frequent facts and its data files are the
generator's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ffkv
from ffkv.errors import FfkvError
from ffkv.testbed.build import ASSETS, build, is_testbed
from ffkv.testbed.datasets import load_facts
from ffkv.testbed.report import BUCKETS, recall_report, score_prompts
from ffkv.testbed.train import TRAIN_PRESETS, train_model
from ffkv.testbed.world import generate_world

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pararel"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return build("tiny", out / "tb", seed=0, arch="gpt2", progress=False)


def test_tiny_testbed_loads_like_any_hf_model(tiny_testbed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_testbed
    assert is_testbed(d)
    tok = AutoTokenizer.from_pretrained(d / "model")
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token == tok.eos_token and tok.pad_token == "<|pad|>"
    hf = AutoModelForCausalLM.from_pretrained(d / "model")
    assert hf.config.model_type == "gpt2" and hf.config.n_layer == TRAIN_PRESETS["tiny"].n_layer
    m = ffkv.load_model(str(d / "model"))
    assert m.n_layers == TRAIN_PRESETS["tiny"].n_layer and m.tokenizer is not None
    assert m.identity["model_type"] == "gpt2"
    meta = json.loads((d / "model" / "testbed.json").read_text())
    assert meta["hyperparameters"]["train"]["steps"] == TRAIN_PRESETS["tiny"].steps
    assert meta["final_loss"] < meta["loss_every_50"][0] / 3


def test_tiny_model_learned_its_facts(tiny_testbed):
    rep = json.loads((tiny_testbed / "report.json").read_text())
    rows = [b for b in rep["buckets"] if b["n_facts"]]
    assert rows and sum(b["n_facts"] for b in rows[:-1] if b["bucket"] != "frequent (>=30)") > 0
    # facts seen 8-15 times are recalled on training templates far above chance (1/20 among candidates)
    b = next(b for b in rep["buckets"] if b["bucket"] == "8-15")
    assert b["train"]["greedy"] >= 0.6
    assert b["train"]["candidates"] >= b["train"]["greedy"]
    assert "provenance" in rep and rep["provenance"]["model"]["model_type"] == "gpt2"


def test_cli_report_prints_one_json_object(tiny_testbed, tmp_path):
    from click.testing import CliRunner

    from ffkv.cli import cli

    res = CliRunner().invoke(cli, ["testbed", "report", str(tiny_testbed), "--json", "--samples", "2"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [b["bucket"] for b in rep["buckets"]][-1] == "frequent (>=30)"
    res = CliRunner().invoke(cli, ["testbed", "world", "--preset", "tiny", "--out", str(tmp_path / "w")])
    assert res.exit_code == 0 and (tmp_path / "w" / "counterfact.json").exists()
    with pytest.raises(FfkvError, match="not a testbed folder"):
        CliRunner().invoke(cli, ["testbed", "report", str(tmp_path / "w")], catch_exceptions=False)


def test_training_is_deterministic_for_a_seed(tmp_path):
    world = generate_world(0, "tiny")
    a = train_model(world, "gpt2", "tiny", tmp_path / "a", seed=0, steps=3, progress=False)
    b = train_model(world, "gpt2", "tiny", tmp_path / "b", seed=0, steps=3, progress=False)
    c = train_model(world, "gpt2", "tiny", tmp_path / "c", seed=1, steps=3, progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_llama_arch_is_a_gated_model(tmp_path):
    world = generate_world(0, "tiny")
    out = train_model(world, "llama", "tiny", tmp_path / "llama", steps=2, progress=False)
    m = ffkv.load_model(str(out))
    assert m.identity["model_type"] == "llama" and m.gated


def test_unknown_arch_is_an_ffkv_error(tmp_path):
    with pytest.raises(FfkvError, match="architecture"):
        build("tiny", tmp_path / "x", arch="mamba", progress=False)


def test_score_prompts_on_a_known_distribution():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.1, 0.3]])
    obj = torch.tensor([1, 2])
    s = score_prompts(probs, obj, [[1, 2], [1, 2]], n_samples=2000, generator=torch.Generator().manual_seed(0))
    assert s["greedy"].tolist() == [1.0, 0.0]
    assert s["candidates"].tolist() == [1.0, 1.0]  # among {1, 2}, token 2 wins in row 2
    assert abs(s["sampled"][0].item() - 0.7) < 0.05 and abs(s["sampled"][1].item() - 0.3) < 0.05
    assert s["self_consistency"].tolist() == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------- shipped


DEFAULT = ASSETS / "default"


def test_shipped_default_data_are_the_generators(tmp_path):
    from ffkv.testbed import default_testbed

    assert is_testbed(DEFAULT), f"the default testbed is not shipped at {DEFAULT}"
    assert default_testbed(build_if_missing=False) == DEFAULT
    generate_world(0, "default").write_datasets(tmp_path)
    for name in ("facts.jsonl", "counterfact.json", "known_facts.json"):
        assert (tmp_path / name).read_bytes() == (DEFAULT / "data" / name).read_bytes(), name
    made, shipped = (json.loads(p.read_text()) for p in (tmp_path / "world.json", DEFAULT / "data" / "world.json"))
    assert made["relations"] == shipped["relations"] and made["summary"] == shipped["summary"]
    meta = json.loads((DEFAULT / "model" / "testbed.json").read_text())
    assert meta["hyperparameters"]["world"] == made["summary"]


def test_shipped_default_recalls_frequent_facts():
    facts, candidates = load_facts(DEFAULT)
    m = ffkv.load_model(str(DEFAULT / "model"))
    rep = recall_report(m, facts, candidates, n_samples=4, max_facts_per_bucket=150, templates_per_fact=1,
                        progress=False)
    by = {b["bucket"]: b for b in rep["buckets"]}
    frequent = by["frequent (>=30)"]
    assert frequent["n_facts"] >= 200
    assert frequent["heldout"]["greedy"] >= 0.95
    assert frequent["train"]["greedy"] >= 0.95
    # recall falls with frequency: facts seen once are recalled far less often than frequent ones
    assert by["1"]["heldout"]["greedy"] < frequent["heldout"]["greedy"] - 0.3
    assert [b for b, _, _ in BUCKETS] == [b["bucket"] for b in rep["buckets"][:len(BUCKETS)]]


# ---------------------------------------------------------------------------------------------- PARAREL


@pytest.mark.shared_data
def test_pararel_world_renders_trex_through_patterns(tmp_path):
    if not SHARED.exists():
        pytest.skip(f"../shared/data/pararel is absent ({SHARED})")
    from ffkv.testbed.pararel import pararel_world

    w = pararel_world(SHARED, seed=0, preset="tiny")
    assert len(w.relation_ids) == 5
    for f in w.facts:
        assert f.train_templates and f.heldout_templates
        assert not set(f.train_templates) & set(f.heldout_templates)
        assert all(t.count("{}") == 1 for t in f.train_templates + f.heldout_templates)
        assert f.object in w.candidates[f.relation_id]
    paths = w.write_datasets(tmp_path)
    cases = json.loads(paths["counterfact"].read_text())
    assert cases and all(c["requested_rewrite"]["subject"] in p for c in cases for p in c["paraphrase_prompts"])
