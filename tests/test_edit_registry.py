"""ffkv.edit.registry and ffkv.edit.hparams: methods as plug-ins, one way to read and override hyperparameters.

A toy method registered at runtime (one module object and one registry entry, no other source touched) runs
through apply_edits, the journal (undo and replay bit for bit), hyperparameter checks and evaluation.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from ffkv.errors import FfkvError

FAST = {"v_num_grad_steps": 10, "v_lr": 5.0, "prefixes": [[4, 3]], "stats_tokens": 3000, "max_update_ratio": 1000.0}


def fresh():
    from ffkv.testbed.planted import planted_model

    return planted_model(arch="gpt2").model


def state(model):
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def toy_module(batched: bool, calls: list):
    """A test-only edit method: ΔW_l = scale · e_target (k / ||k||²)^T at the subject's last token, so that
    W' k = W k + scale · e_target (e: the target's unembedding row). Everything a method module exports."""
    from ffkv.edit.compute_key import compute_keys

    mod = types.ModuleType("toy")
    mod.NAME = "toy-batched" if batched else "toy"
    mod.SUMMARY = "writes the target's unembedding row at the subject's key (a test method)"
    mod.BATCHED = batched
    mod.HPARAM_DOCS = {"layer": "the layer written", "scale": "how much of e_target is written",
                       "max_update_ratio": "norm limit"}
    mod.defaults = lambda model: {"layer": model.n_layers - 1, "scale": 1.0, "max_update_ratio": 1000.0}
    mod.layers = lambda hp: [hp["layer"]]

    def apply(model, requests, hp, journal, context):
        calls.append(len(requests))
        E = model.unembedding.weight.detach().float().cpu()
        for r in requests:
            k = compute_keys(model, [r], hp["layer"], [""])[0].cpu()
            u = hp["scale"] * E[model.answer_id(r.target)][:, None]
            journal.record(model, mod.NAME, hp["layer"], u, (k / k.pow(2).sum())[:, None], [r.to_json()], hp,
                           max_ratio=hp["max_update_ratio"])

    mod.apply = apply
    return mod


@pytest.fixture
def toy(monkeypatch):
    from ffkv.edit.registry import METHODS, EditMethod

    calls = {"toy": [], "toy-batched": []}
    for batched in (False, True):
        method = EditMethod.from_module(toy_module(batched, calls["toy-batched" if batched else "toy"]))
        monkeypatch.setitem(METHODS, method.name, method)  # the one registry line
    return calls


# ----------------------------------------------------------------------------------------------------
def test_every_method_exports_the_contract():
    from ffkv.edit.registry import METHODS, EditMethod, get_method

    assert list(METHODS) == ["rome", "memit", "kn", "alphaedit", "ft-l"]
    m = fresh()
    for name, method in METHODS.items():
        assert isinstance(method, EditMethod) and method.name == name and get_method(name) is method
        assert method.summary and "\n" not in method.summary
        hp = method.defaults(m)
        assert set(hp) <= set(method.hparam_docs), name  # every hyperparameter is documented
        assert all(0 <= layer < m.n_layers for layer in method.layers(hp))
    assert METHODS["memit"].batched and not METHODS["rome"].batched and not METHODS["kn"].batched
    assert METHODS["alphaedit"].batched
    with pytest.raises(FfkvError, match="unknown edit method 'emmet'.*rome, memit, kn, alphaedit, ft-l"):
        get_method("emmet")


def test_a_new_method_runs_through_apply_edits_the_journal_and_evaluation(toy, tmp_path):
    from ffkv.edit import EditRequest, Journal, apply_edits, resolve_hparams
    from ffkv.evaluate.datasets import read_cases
    from ffkv.evaluate.run import evaluate_edits
    from ffkv.evaluate.sequential import sequential_edits

    m = fresh()
    s0 = state(m)
    req = EditRequest("the old {}", "tower", " rome")
    p0 = m.next_token_probs(req.text)[0, m.answer_id(" rome")].item()
    # hyperparameters are checked against the new method's own defaults
    assert resolve_hparams(m, "toy", {"scale": 3}) == {"layer": 1, "scale": 3.0, "max_update_ratio": 1000.0,
                                                       "method": "toy"}
    for bad, msg in (({"scale": -1.0}, "finite number >= 0"), ({"layer": 7}, "out of range"),
                     ({"v_lr": 1.0}, "unknown toy hyperparameters: v_lr.*Known: layer, max_update_ratio, scale")):
        with pytest.raises(FfkvError, match=msg):
            apply_edits(m, [req], "toy", bad, progress=False)
    assert same_bits(s0, state(m))

    j = apply_edits(m, [req, EditRequest("the old {}", "castle", " oslo")], "toy", {"scale": 200.0}, progress=False)
    assert [e.method for e in j] == ["toy", "toy"] and all(e.rank == 1 for e in j) and toy["toy"] == [2]
    assert m.next_token_probs(req.text)[0, m.answer_id(" rome")].item() > p0 + 0.3
    edited = state(m)
    j.save(tmp_path / "j")
    m2 = fresh()
    Journal.load(tmp_path / "j").replay(m2)
    assert same_bits(edited, state(m2))
    j.undo(m)
    assert same_bits(s0, state(m))

    recs = [{"case_id": i, "requested_rewrite": {"prompt": "the old {} is in", "subject": s,
                                                 "target_new": {"str": new}, "target_true": {"str": "paris"}},
             "paraphrase_prompts": [f"a big {s} in"], "neighborhood_prompts": ["the old dog is in"]}
            for i, (s, new) in enumerate([("tower", "rome"), ("castle", "oslo"), ("tower", "london"),
                                          ("river", "madrid")])]
    cases = read_cases(recs)[0]
    # not batched: one case at a time
    res = evaluate_edits(m, cases, method="toy", hparams={"scale": 200.0}, n_gen_prompts=0, progress=False)
    assert toy["toy"][1:] == [1, 1, 1, 1] and res.meta["counts"]["batches"] == 4
    assert res.meta["hparams"]["scale"] == 200.0 and res.summary["rome"]["post"]["ES"]["mean"] == 100.0
    # batched: all cases in one batch by default; batches of distinct subjects where the data allows
    res = evaluate_edits(m, cases, method="toy-batched", hparams={"scale": 200.0}, n_gen_prompts=0,
                         progress=False)
    assert toy["toy-batched"] == [4] and res.meta["counts"]["batch_size"] == 4
    res = evaluate_edits(m, cases, method="toy-batched", hparams={"scale": 200.0}, batch_size=3,
                         n_gen_prompts=0, progress=False)
    assert toy["toy-batched"] == [4, 3, 1] and res.meta["counts"]["cases_sharing_a_subject_in_batch"] == 0
    assert same_bits(s0, state(m))
    seq = sequential_edits(m, cases[:2], method="toy", hparams={"scale": 200.0}, every=1, progress=False)
    assert [r["n_edits"] for r in seq.curve] == [0, 1, 2] and seq.curve[-1]["efficacy_at_edit"] == 1.0
    assert same_bits(s0, state(m))


# ----------------------------------------------------------------------------------------------------
def test_hparams_read_a_dict_json_and_yaml(tmp_path):
    from ffkv.edit.hparams import load_hparams

    assert load_hparams(None) == {} and load_hparams({"v_lr": 1}) == {"v_lr": 1}
    assert load_hparams('{"v_lr": 0.1}') == {"v_lr": 0.1}
    (tmp_path / "h.json").write_text(json.dumps({"layers": [0, 1]}))
    assert load_hparams(tmp_path / "h.json") == load_hparams(str(tmp_path / "h.json")) == {"layers": [0, 1]}
    (tmp_path / "h.yaml").write_text("v_lr: 5e-1\nlayers: [1]\nkl_prompt: '{} is a'\n")
    assert load_hparams(tmp_path / "h.yaml") == {"v_lr": 0.5, "layers": [1], "kl_prompt": "{} is a"}
    for spec, msg in (("[1, 2]", "must hold an object"), ("{v_lr: 1", "not valid JSON"),
                      (str(tmp_path / "missing.yml"), "no hyperparameter file")):
        with pytest.raises(FfkvError, match=msg) as e:
            load_hparams(spec)
        assert "\n" not in e.value.line()
    (tmp_path / "bad.yaml").write_text("a: [1,\n  b: }\n")
    with pytest.raises(FfkvError, match="not valid YAML") as e:
        load_hparams(tmp_path / "bad.yaml")
    assert "\n" not in e.value.line()


def test_an_easyedit_rome_file_pastes_in(tmp_path):
    from ffkv.edit.hparams import resolve_hparams

    m = fresh()
    text = """alg_name: "ROME"
model_name: "./hugging_cache/gpt2-xl"
stats_dir: "./data/stats"
device: 0
layers: [1]
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 1
v_weight_decay: 0.5
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: true
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "transformer.wte"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
"""
    f = tmp_path / "gpt2-xl.yaml"
    f.write_text(text)
    with pytest.warns(UserWarning, match="model_name, device, stats_dir.*mom2_dtype"):
        hp = resolve_hparams(m, "rome", f)
    assert hp["layer"] == 1 and hp["prefixes"] == [[5, 10], [10, 10]] and hp["v_lr"] == 0.5
    assert hp["clamp_norm_factor"] == 4.0 and "layers" not in hp and "alg_name" not in hp
    for change, msg in (("alg_name: \"MEMIT\"", "for MEMIT, not rome"), ("mom2_adjustment: false", "always uses C"),
                        ("v_loss_layer: 0", "model's output"), ("layers: [0, 1]", "edits one layer"),
                        ("mom2_update_weigth: 1", "unknown rome hyperparameters: mom2_update_weigth.*Known:")):
        key = change.split(":")[0]
        lines = [ln for ln in text.splitlines() if not ln.startswith(key + ":")] + [change]
        f.write_text("\n".join(lines) + "\n")
        with pytest.warns(UserWarning) if "alg_name" not in change else _nothing():
            with pytest.raises(FfkvError, match=msg):
                resolve_hparams(m, "rome", f)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("over, msg", [
    ({"v_num_grad_steps": 2.5}, "positive integer"), ({"v_num_grad_steps": 0}, "positive integer"),
    ({"seed": -1}, "integer >= 0"), ({"v_lr": float("inf")}, "finite number"), ({"kl_factor": "x"}, "finite"),
    ({"prefixes": [[5]]}, r"\[\[length, count\]"), ({"kl_prompt": "no subject"}, "one '{}'"),
    ({"layers": []}, "at least one layer"), ({"layers": [0, 4]}, "out of range"), ({"layer": 3}, "out of range"),
])
def test_bad_memit_hyperparameters_are_one_line(over, msg):
    from ffkv.edit.hparams import resolve_hparams

    with pytest.raises(FfkvError, match=msg) as e:
        resolve_hparams(fresh(), "memit", over)
    assert "\n" not in e.value.line()


def test_edit_and_evaluate_override_hyperparameters_the_same_way(tmp_path):
    from ffkv.edit.hparams import parse_settings, resolve_hparams
    from ffkv.evaluate.run import resolve_hparams as evaluate_hparams

    m = fresh()
    assert parse_settings(["v_lr=0.1", "corpus=wikitext", "layers=[0,1]"]) == \
        {"v_lr": 0.1, "corpus": "wikitext", "layers": [0, 1]}
    (tmp_path / "h.yml").write_text("layers: [1, 0]\nmom2_update_weight: 100\n")
    # file, then --set, then --layer: later overrides win
    hp = resolve_hparams(m, "memit", tmp_path / "h.yml", parse_settings(["v_lr=2"]), {"layer": 1})
    assert hp["layers"] == [1] and hp["mom2_update_weight"] == 100.0 and hp["v_lr"] == 2.0
    assert evaluate_hparams(m, "memit", {"layers": [1, 0], "mom2_update_weight": 100}) == \
        resolve_hparams(m, "memit", {"layers": [1, 0], "mom2_update_weight": 100})
    with pytest.raises(FfkvError, match="--set expects key=value"):
        parse_settings(["v_lr"])


def test_the_docs_table_lists_every_registered_method():
    from pathlib import Path

    from ffkv.edit.registry import METHODS

    text = (Path(__file__).resolve().parents[1] / "docs" / "edit.md").read_text()
    for name, m in METHODS.items():
        assert f"| `{name}` | {'yes' if m.batched else 'no'} | {m.summary} |" in text, name
