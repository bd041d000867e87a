"""The foundation: adapters, the key-value view, hooks, logit lens, loading, census, CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import hook_count

import ffkv
from ffkv.errors import AdapterCheckFailed, FfkvError, UnsupportedArchitecture
from ffkv.models.adapters import SPECS, get_spec, supported_model_types
from ffkv.models.check import check_adapter
from ffkv.models.hooks import Intervention, intervene, run_with_hooks, switch_memories
from ffkv.models.model import MemoryModel

FAMILIES = supported_model_types()


def _ids(mm, b=2, t=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, mm.vocab_size, (b, t), generator=g)


def test_every_required_family_has_a_spec():
    families = {s.family for s in SPECS}
    for f in ("gpt2", "gpt-neo", "gpt-j", "gpt-neox", "opt", "bloom", "falcon", "llama", "mistral", "qwen2",
              "gemma", "phi3", "qwen3", "gemma2", "gemma3", "olmo2", "phi"):
        assert f in families


@pytest.mark.parametrize("mt", FAMILIES)
def test_adapter_check_passes_for_every_family(tiny_models, mt):
    result = check_adapter(tiny_models[mt], raise_on_fail=False)
    assert result["passed"], result
    assert result["max_abs_error"] < 1e-4
    assert len(result["layers"]) == tiny_models[mt].n_layers


@pytest.mark.parametrize("mt", ["gpt2", "llama", "phi3"])
def test_adapter_check_catches_a_wrong_spec(tiny_models, mt):
    good = tiny_models[mt]
    # A spec that forgets the gate (or, for non-gated models, claims one) must fail, naming family and layer.
    wrong = dataclasses.replace(good.spec, up=None, fused_gate_up=False) if good.gated else \
        dataclasses.replace(good.spec, up=good.spec.key)
    bad = MemoryModel(good.hf, spec=wrong)
    with pytest.raises(AdapterCheckFailed, match=rf"family '{good.family}' at layer 0"):
        check_adapter(bad)


@pytest.mark.parametrize("mt", FAMILIES)
def test_coefficients_rebuild_the_ffn_output(tiny_models, mt):
    mm = tiny_models[mt]
    ids = _ids(mm)
    reads = [(s, l) for l in range(mm.n_layers) for s in ("coef", "ffn_out")]
    logits, rec = run_with_hooks(mm, {"input_ids": ids}, reads=reads)
    for l in range(mm.n_layers):
        m = rec["coef", l]  # (B, T, d_ffn)
        v = mm.values(l)  # (d_model, d_ffn)
        rebuilt = torch.einsum("btf,df->btd", m, v)
        if mm.value_bias(l) is not None:
            rebuilt = rebuilt + mm.value_bias(l)
        torch.testing.assert_close(rebuilt, rec["ffn_out", l], rtol=1e-4, atol=1e-5)
    # Writing the rebuilt outputs back reproduces the model's logits.
    edits = [Intervention("ffn_out", l, "set",
                          value=mm.ffn_output_from_coefficients(l, rec["coef", l])) for l in range(mm.n_layers)]
    patched, _ = run_with_hooks(mm, {"input_ids": ids}, edits=edits)
    torch.testing.assert_close(patched, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mt", ["gpt2", "llama", "opt", "falcon"])
def test_hooks_leave_the_model_unchanged(tiny_models, mt):
    mm = tiny_models[mt]
    ids = _ids(mm)
    clean = mm.hf(input_ids=ids).logits
    before = hook_count(mm)
    with intervene(mm, reads=[("coef", 0)], edits=[switch_memories(0, range(10))]):
        edited = mm.hf(input_ids=ids).logits
    assert not torch.equal(edited, clean)
    assert hook_count(mm) == before
    assert torch.equal(mm.hf(input_ids=ids).logits, clean)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(mm, edits=[Intervention("resid_post", 0, "scale", value=0.0)]):
            mm.hf(input_ids=ids)
            raise RuntimeError("boom")
    assert hook_count(mm) == before
    assert torch.equal(mm.hf(input_ids=ids).logits, clean)


@pytest.mark.parametrize("mt", FAMILIES)
def test_patching_clean_activations_reproduces_clean_logits(tiny_models, mt):
    mm = tiny_models[mt]
    ids = _ids(mm)
    sites = ["resid_pre", "resid_post", "attn_out", "ffn_in", "coef", "ffn_out"]
    reads = [("embed", None)] + [(s, l) for l in range(mm.n_layers) for s in sites]
    clean, rec = run_with_hooks(mm, {"input_ids": ids}, reads=reads)
    edits = [Intervention(s, l, "patch", value=rec[s, l]) for (s, l) in reads]
    patched, _ = run_with_hooks(mm, {"input_ids": ids}, edits=edits)
    assert torch.equal(patched, clean)


def test_patch_restores_a_corrupted_run_exactly(tiny_models):
    mm = tiny_models["gpt2"]
    ids = _ids(mm, b=1)
    clean, rec = run_with_hooks(mm, {"input_ids": ids}, reads=[("resid_post", mm.n_layers - 1)])
    noise = Intervention("embed", None, "add", value=torch.randn(1, ids.shape[1], mm.d_model))
    corrupted, _ = run_with_hooks(mm, {"input_ids": ids}, edits=[noise])
    assert not torch.allclose(corrupted, clean)
    restore = Intervention("resid_post", mm.n_layers - 1, "patch", value=rec["resid_post", mm.n_layers - 1])
    restored, _ = run_with_hooks(mm, {"input_ids": ids}, edits=[noise, restore])
    assert torch.equal(restored, clean)


def test_intervention_ops_and_selection(tiny_models):
    mm = tiny_models["gpt2"]
    ids = _ids(mm, b=3)
    _, rec = run_with_hooks(mm, {"input_ids": ids}, reads=[("coef", 1), ("ffn_out", 1)])
    m, out = rec["coef", 1], rec["ffn_out", 1]
    # Switching memory 5 off at position 2 of batch row 1 removes exactly its sub-update m_5 v_5 there.
    e = Intervention("coef", 1, "off", indices=[5], positions=[2], batch=[1])
    _, rec2 = run_with_hooks(mm, {"input_ids": ids}, reads=[("ffn_out", 1)], edits=[e])
    expected = out.clone()
    expected[1, 2] -= m[1, 2, 5] * mm.values(1)[:, 5]
    torch.testing.assert_close(rec2["ffn_out", 1], expected, rtol=1e-5, atol=1e-6)
    # Forcing a memory on, scaling, adding and a function, each on its slice only.
    for op, value, check in (
        ("on", 3.0, lambda new: torch.all(new[:, :, 7] == 3.0)),
        ("scale", 2.0, lambda new: torch.allclose(new[:, :, 7], 2 * m[:, :, 7])),
        ("add", 1.0, lambda new: torch.allclose(new[:, :, 7], m[:, :, 7] + 1)),
        ("fn", lambda x: -x, lambda new: torch.allclose(new[:, :, 7], -m[:, :, 7])),
    ):
        _, r = run_with_hooks(mm, {"input_ids": ids}, reads=[("coef", 1)],
                              edits=[Intervention("coef", 1, op, value=value, indices=[7])])
        new = r["coef", 1]
        assert check(new), op
        others = torch.ones(m.shape[-1], dtype=torch.bool)
        others[7] = False
        assert torch.equal(new[:, :, others], m[:, :, others]), op


def test_bad_sites_and_layers_are_one_clear_error(tiny_models):
    mm = tiny_models["gpt2"]
    with pytest.raises(FfkvError, match="layer 9 is out of range for a 2-layer model"):
        with intervene(mm, reads=[("coef", 9)]):
            pass
    with pytest.raises(FfkvError, match="unknown site"):
        Intervention("mlp_thing", 0, "off")
    with pytest.raises(FfkvError, match="needs a value"):
        Intervention("coef", 0, "set")
    with pytest.raises(FfkvError, match="out of range"):
        run_with_hooks(mm, {"input_ids": _ids(mm)}, edits=[switch_memories(0, [10_000])])


@pytest.mark.parametrize("mt", FAMILIES)
def test_logit_lens_of_the_last_residual_is_the_output(tiny_models, mt):
    mm = tiny_models[mt]
    ids = _ids(mm)
    last = mm.n_layers - 1
    logits, rec = run_with_hooks(mm, {"input_ids": ids}, reads=[("resid_post", last)])
    lens = mm.unembed(rec["resid_post", last])
    torch.testing.assert_close(lens, logits, rtol=1e-4, atol=1e-4)
    # Without the norm the projection is E x, an explicit option.
    # Without the norm the projection is E x (through the family's logit scaling and soft-cap), an option.
    raw = mm.unembed(rec["resid_post", last], norm=False)
    torch.testing.assert_close(raw, mm.scale_logits(rec["resid_post", last] @ mm.unembedding.weight.T
                                                    + (mm.unembedding.bias if mm.unembedding.bias is not None
                                                       else 0)), rtol=1e-4, atol=1e-4)


def test_value_projection_ranks_the_planted_token_first(planted):
    mm = planted.model
    for fact in planted.facts:
        for layer, index in fact.memories:
            logits = mm.unembed(mm.values(layer)[:, index], norm=False)
            assert int(logits.argmax()) == fact.target_id


def test_switching_a_planted_memory_off_removes_its_fact(planted):
    mm = planted.model
    tower = planted.fact("tower")
    (layer, index), = tower.memories
    p = mm.next_token_probs(["the old tower"])[0, tower.target_id]
    with intervene(mm, edits=[switch_memories(layer, [index])]):
        p_off = mm.next_token_probs(["the old tower"])[0, tower.target_id]
    assert p > 0.9 and p_off < 0.05


def test_gated_coefficient_is_act_gate_times_up(tiny_models):
    mm = tiny_models["llama"]
    ids = _ids(mm)
    _, rec = run_with_hooks(mm, {"input_ids": ids}, reads=[("ffn_in", 0), ("coef", 0)])
    x = rec["ffn_in", 0]
    gate_only = torch.nn.functional.silu(x @ mm.keys(0).T)
    full = gate_only * (x @ mm.up_keys(0).T)
    torch.testing.assert_close(rec["coef", 0], full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rec["coef", 0], gate_only)


# ------------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, planted):
    from ffkv.testbed.planted import save_planted

    return save_planted(planted, tmp_path_factory.mktemp("m") / "planted")


def test_load_model_from_a_folder_with_and_without_tokenizer(planted_dir, tmp_path, planted):
    mm = ffkv.load_model(str(planted_dir))
    assert mm.tokenizer is not None and mm.adapter_check["passed"]
    ids = _ids(mm)
    assert torch.allclose(mm.hf(input_ids=ids).logits, planted.model.hf(input_ids=ids).logits, atol=1e-5)
    bare = tmp_path / "bare"
    planted.model.hf.save_pretrained(bare)
    mm2 = ffkv.load_model(str(bare))
    assert mm2.tokenizer is None
    with pytest.raises(FfkvError, match="has no tokenizer"):
        mm2.encode("the tower")
    bf = ffkv.load_model(str(planted_dir), dtype="bfloat16")
    assert bf.dtype == torch.bfloat16 and bf.adapter_check["passed"]


def test_load_errors_are_one_clear_line(tmp_path):
    with pytest.raises(FfkvError, match="not found"):
        ffkv.load_model(str(tmp_path / "missing"))
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    with pytest.raises(UnsupportedArchitecture, match="'t5' is not supported"):
        ffkv.load_model(str(tmp_path / "t5"))
    with pytest.raises(FfkvError, match="shipped config without weights"):
        ffkv.load_model("llama-2-7b")
    with pytest.raises(FfkvError, match="unknown dtype"):
        ffkv.load_model("llama-2-7b", dtype="float8")  # arguments are checked before anything is read
    with pytest.raises(UnsupportedArchitecture):
        get_spec("t5")


def test_trust_remote_code_is_off_by_default():
    import inspect

    from ffkv.models.loading import load_config, load_model

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert inspect.signature(load_config).parameters["trust_remote_code"].default is False


def test_find_subject(planted):
    mm = planted.model
    assert mm.find_subject("the old tower", "old tower") == (1, 3)
    with pytest.raises(FfkvError, match="does not occur in prompt"):
        mm.find_subject("the old tower", "castle")


# ------------------------------------------------------------------------------------------ census
PUBLISHED = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "gpt2-xl": 1_557_611_200,
             "mistral-7b": 7_241_732_096}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_census_matches_published_totals(name):
    c = ffkv.census(name)
    assert c["total_params"] == PUBLISHED[name]
    assert sum(c["components"].values()) == c["total_params"]
    assert c["ffn_params"] == c["components"]["ffn"]


def test_census_ffn_structure():
    c = ffkv.census("llama-2-7b")
    assert c["memory_slots"] == 32 * 11008 and c["gated"] and c["ffn_matrices"] == 3
    assert c["ffn_params"] == 32 * 3 * 4096 * 11008  # no biases
    g = ffkv.census("gpt2-xl")
    assert g["ffn_params"] == 48 * (2 * 1600 * 6400 + 6400 + 1600)
    assert g["tied_embeddings"] and g["components"]["unembedding"] == 0
    assert round(g["total_params"] / 1e9, 2) == 1.56


def test_census_of_a_loaded_model_equals_census_of_its_config(tiny_models):
    for mt in ("gpt2", "llama", "opt", "phi3"):
        mm = tiny_models[mt]
        assert ffkv.census(mm)["total_params"] == ffkv.census(mm.config)["total_params"] == \
            sum(p.numel() for p in mm.hf.parameters())


# ------------------------------------------------------------------------------------------ CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ffkv.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_census_and_inspect_json(planted_dir):
    r = _cli("census", "llama-3-8b", "--json")
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)
    assert c["total_params"] == PUBLISHED["llama-3-8b"] and {"ffn_params", "ffn_share", "memory_slots",
                                                             "components"} <= set(c)
    r = _cli("inspect", str(planted_dir), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["family"] == "gpt2" and info["layers"] == 2 and info["d_model"] == 64
    assert info["d_ffn"] == 128 and info["gated"] is False
    assert info["adapter_check"]["passed"] is True and info["adapter_check"]["max_abs_error"] < 1e-4


def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    r = _cli("inspect", str(tmp_path / "t5"), "--json")
    assert r.returncode != 0 and r.stdout == ""
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "not supported" in lines[0]
    r = _cli("census", str(tmp_path / "nothing-here"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1


def test_every_command_has_help():
    from ffkv.cli import COMMANDS, LazyGroup, cli

    r = _cli("--help")
    assert r.returncode == 0 and "census" in r.stdout
    for name in LazyGroup().list_commands(None):
        r = _cli(name, "--help")
        assert r.returncode == 0, (name, r.stderr)
        assert "Usage" in r.stdout
    assert set(LazyGroup().list_commands(None)) <= set(COMMANDS)


def test_top_level_package_reaches_its_subpackages_and_refuses_unknown_names():
    # `import ffkv; ffkv.testbed.default_testbed()` must work without importing ffkv.testbed first
    import subprocess
    import sys

    code = ("import ffkv, sys; assert 'ffkv.testbed' not in sys.modules; "
            "print(ffkv.testbed.default_testbed.__name__, ffkv.edit.apply_edits.__name__)\n"
            "try:\n    ffkv.no_such_thing\nexcept AttributeError as e:\n    print('refused', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["default_testbed apply_edits", "refused module 'ffkv' has no attribute 'no_such_thing'"]


# ------------------------------------------------------------------------------------------ house rules
OWNED = ("adapters", "spec", "infer", "model", "check", "loading", "tiny", "census", "families")


def test_models_imports_are_at_module_top():
    import ast
    from pathlib import Path

    root = Path(ffkv.__file__).parent / "models"
    for name in OWNED:
        tree = ast.parse((root / f"{name}.py").read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"models/{name}.py imports inside {fn.name}()"


def test_each_models_module_imports_first_without_a_cycle():
    # A cycle fails only for some import orders: import each module first, in a clean ffkv each time.
    code = ("import importlib, sys\n"
            f"for name in {OWNED + ('hooks',)!r}:\n"
            "    for m in [m for m in sys.modules if m == 'ffkv' or m.startswith('ffkv.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module('ffkv.models.' + name)\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-800:]


def test_context_length_is_one_rule(tiny_models, planted):
    assert tiny_models["gpt2"].context_length == tiny_models["gpt2"].config.n_positions == 128
    assert tiny_models["llama"].context_length == tiny_models["llama"].config.max_position_embeddings
    from types import SimpleNamespace as NS

    rule = MemoryModel.context_length.fget
    # None-safe: a None field is skipped for the next one, then the tokenizer's bound, then the default.
    assert rule(NS(text_config=NS(n_positions=None, max_position_embeddings=None, seq_length=512),
                   tokenizer=None)) == 512
    assert rule(NS(text_config=NS(max_position_embeddings=None), tokenizer=NS(model_max_length=300))) == 300
    assert rule(NS(text_config=NS(), tokenizer=NS(model_max_length=10**30))) == 1024


def test_padded_vocabulary_is_flagged(planted):
    from ffkv.models.loading import tiny_model

    tok = planted.model.tokenizer
    mm = tiny_model("gpt_neox", vocab=len(tok) + 8, tokenizer=tok)  # Pythia pads its unembedding rows
    assert mm.vocab_size == len(tok) + 8 and mm.tokenizer_vocab_size == len(tok)
    assert mm.padded_vocab_rows == 8 and mm.identity["tokenizer_vocab_size"] == len(tok)
    assert planted.model.padded_vocab_rows == 0


def test_ffn_write_site_is_the_post_norm_output(tiny_models):
    mm = tiny_models["gemma2"]
    module, kind = mm.site_module("ffn_write", 1)
    assert module is mm.post_norm(1) and kind == "post"
    assert mm.site_module("ffn_out", 1)[0] is mm.module(1, mm.spec.value)
    plain = tiny_models["llama"]
    assert plain.site_module("ffn_write", 0)[0] is plain.module(0, plain.spec.value) and plain.post_norm(0) is None
    x = torch.randn(3, plain.d_model)
    assert torch.equal(plain.write_from_ffn_out(0, x), x)
