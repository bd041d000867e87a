"""The command line as a whole: one kit of options, one JSON style, one-line usage errors, one answer rule,
and the commands that must agree with each other (neurons vs the KN edit, the trace peak vs ROME's layer)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from ffkv.cli import cli, main
from ffkv.clikit import MODEL_OPTIONS, emit_json, parse_layers
from ffkv.errors import FfkvError

# Commands that load a model: each must take exactly the kit's model options.
MODEL_COMMANDS = [("inspect",), ("trace",), ("neurons",), ("recall",), ("evaluate",), ("edit", "apply"),
                  ("edit", "stats"), ("edit", "erase"), ("atlas", "mine"), ("atlas", "analyze"), ("atlas", "report"),
                  ("atlas", "memory"), ("atlas", "promotes"), ("atlas", "nearest"), ("atlas", "subupdates")]


# ------------------------------------------------------------------------------------------ registry
@pytest.fixture
def edit_registry(monkeypatch):
    """The edit-method registry (``ffkv.edit.registry``) and ``ffkv.edit.hparams.load_hparams``.

    Until the registry branch is merged this installs a minimal stand-in with the contract's names, built on
    today's ``default_hparams`` (tests only); once the real module exists, it is used as it is.
    """
    if importlib.util.find_spec("ffkv.edit.registry") is None:
        import yaml

        from ffkv.edit import hparams as hp_module
        from ffkv.edit.api import edit_layers

        @dataclasses.dataclass(frozen=True)
        class EditMethod:
            name: str
            summary: str
            defaults: object
            layers: object
            apply: object
            batched: bool
            hparam_docs: dict

        def method(name, summary, batched):
            def defaults(model):
                return {k: v for k, v in hp_module.default_hparams(model, name).items() if k != "method"}

            docs = {k: f"(stand-in) {k}" for k in ("layer", "layers", "v_num_grad_steps", "ig_steps")}
            return EditMethod(name, summary, defaults, lambda hp: edit_layers({**hp, "method": name}), None, batched,
                              docs)

        reg = types.ModuleType("ffkv.edit.registry")
        reg.EditMethod = EditMethod
        reg.METHODS = {"rome": method("rome", "rank-one edit of one layer", False),
                       "memit": method("memit", "one batch over several layers", True),
                       "kn": method("kn", "knowledge-neuron value edit", False)}

        def get_method(name):
            if name not in reg.METHODS:
                raise FfkvError(f"unknown edit method {name!r}", f"use one of {', '.join(reg.METHODS)}")
            return reg.METHODS[name]

        reg.get_method = get_method

        def load_hparams(spec):
            if isinstance(spec, dict):
                return dict(spec)
            p = Path(str(spec))
            if p.suffix in (".yaml", ".yml"):
                return yaml.safe_load(p.read_text())
            return json.loads(p.read_text() if p.exists() else str(spec))

        monkeypatch.setitem(sys.modules, "ffkv.edit.registry", reg)
        monkeypatch.setattr(hp_module, "load_hparams", load_hparams, raising=False)
        for name in ("ffkv.edit.cli", "ffkv.evaluate.cli"):
            monkeypatch.delitem(sys.modules, name, raising=False)
    yield importlib.import_module("ffkv.edit.registry")
    for name in ("ffkv.edit.cli", "ffkv.evaluate.cli"):  # built on the stand-in: import afresh next time
        sys.modules.pop(name, None)


def _command(path):
    ctx = click.Context(cli)
    cmd = cli
    for name in path:
        cmd = cmd.get_command(ctx, name)
        assert cmd is not None, path
    return cmd


def _all_paths():
    ctx = click.Context(cli)
    out = []
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        out.append((name,))
        if isinstance(cmd, click.Group):
            out += [(name, sub) for sub in cmd.list_commands(ctx)]
    return out


def _invoke(args):
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, (args, res.output)
    return res


def _json(args) -> dict:
    out = _invoke(args + ["--json"]).stdout
    assert out.count("\n") == 1, out  # one JSON object on one line, nothing else on stdout
    obj = json.loads(out)
    assert isinstance(obj, dict) and all(re.fullmatch(r"[a-z][a-z0-9_]*", k) for k in obj), list(obj)
    return obj


# ------------------------------------------------------------------------------------------ the kit
def test_every_command_has_help(edit_registry):
    paths = _all_paths()
    assert ("edit", "apply") in paths and ("atlas", "mine") in paths
    for path in paths:
        res = CliRunner().invoke(cli, [*path, "--help"])
        assert res.exit_code == 0, (path, res.output)
        assert res.output.startswith(f"Usage: {' '.join(['cli', *path])}") or "Usage:" in res.output


def test_model_commands_share_the_model_options(edit_registry):
    reference = None
    for path in MODEL_COMMANDS:
        params = {p.name: p for p in _command(path).params}
        assert set(MODEL_OPTIONS) <= set(params), (path, set(MODEL_OPTIONS) - set(params))
        sig = {n: (tuple(params[n].opts), params[n].default, repr(params[n].type), params[n].help)
               for n in MODEL_OPTIONS}
        reference = reference or sig
        assert sig == reference, path
    # No command carries a partial, private copy of the model options.
    for path in _all_paths():
        names = {p.name for p in _command(path).params}
        assert not (names & {"dtype", "device_map"}) or set(MODEL_OPTIONS) <= names, path
    for path in (("trace",), ("neurons",)):
        assert "layers" in {p.name for p in _command(path).params}


def test_numeric_options_state_their_range_in_help(edit_registry):
    out = CliRunner().invoke(cli, ["trace", "--help"], terminal_width=200).output
    assert "--samples" in out and "1<=x<=10000" in out
    out = CliRunner().invoke(cli, ["neurons", "--help"], terminal_width=200).output
    assert "0<=x<=1" in out and "0<x<=1" in out


def test_parse_layers():
    assert parse_layers("0-3,5", 6) == [0, 1, 2, 3, 5]
    assert parse_layers(" 4 , 1-2 ", 6) == [1, 2, 4]
    assert parse_layers(None, 6) is None
    for text, message in (("6", "out of range"), ("0-9", "layer 6 is out of range"), ("a-b", "not a list"),
                          ("3-1", "runs backwards"), ("1,,2", "not a list")):
        with pytest.raises(FfkvError, match=message) as e:
            parse_layers(text, 6)
        assert "\n" not in e.value.line() and "0-5" in e.value.line() or message in ("not a list", "runs backwards")


def test_emit_json_is_one_line_with_finite_numbers(capsys):
    emit_json({"a": float("nan"), "b": torch.tensor([1.5, 2.0]), "c": Path("x"), "d": 0.1})
    out = capsys.readouterr().out
    assert out == '{"a": null, "b": [1.5, 2.0], "c": "x", "d": 0.1}\n'


@pytest.mark.parametrize("args, problem, command", [
    (["trace"], "missing argument 'MODEL'", "ffkv trace"),
    (["nope"], "no such command 'nope'", None),
    (["trace", "m", "--sampels", "3"], "no such option '--sampels' (did you mean '--samples'?)", "ffkv trace"),
    (["trace", "m", "--samples", "x"], "'x' is not a valid integer", "ffkv trace"),
    (["trace", "m", "--samples", "0"], "0 is not in the range 1<=x<=10000", "ffkv trace"),
    (["trace", "m", "--kind", "heat"], "'heat' is not one of", "ffkv trace"),
    (["atlas", "mine", "m", "--top-k"], "option '--top-k' requires an argument", "ffkv atlas mine"),
    (["edit", "undo", "{missing}", "--out", "{missing}2"], "does not exist", "ffkv edit undo"),
    (["edit", "m", "--method", "magic", "--out", "o"], "'magic' is not one of", "ffkv edit apply"),
])
def test_usage_errors_are_one_line(args, problem, command, edit_registry, tmp_path, capsys):
    args = [a.format(missing=tmp_path / "missing") for a in args]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("ffkv: error: ") and problem in err[0], err
    fix = f"Run '{command} --help' for usage." if command else "Run 'ffkv --help' for the commands."
    assert err[0].endswith(fix), err
    res = CliRunner().invoke(cli, args)  # the same line when click runs the group itself
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == err, res.output


def test_bare_group_still_shows_its_help():
    res = CliRunner().invoke(cli, ["atlas"])
    assert "Usage:" in res.output and "mine" in res.output


# ------------------------------------------------------------------------------------------ hyperparameters
def test_hparams_from_yaml_then_set_then_layer(edit_registry, planted, tmp_path):
    from ffkv.edit.cli import method_hparams

    m = planted.model
    hp_file = tmp_path / "rome.yaml"
    hp_file.write_text("v_lr: 0.1\nv_num_grad_steps: 7\n")
    over, defaults = method_hparams(m, "rome", str(hp_file), ("v_lr=0.2", "kl_factor=1e-2"), "1")
    assert over == {"v_lr": 0.2, "v_num_grad_steps": 7, "kl_factor": 0.01, "layer": 1}
    assert set(over) <= set(defaults)
    assert method_hparams(m, "rome", '{"v_lr": 0.3}', (), "trace")[0] == {"v_lr": 0.3, "layer": "trace"}
    assert method_hparams(m, "memit", None, (), "0-1")[0] == {"layers": [0, 1]}
    with pytest.raises(FfkvError, match="unknown rome hyperparameter"):
        method_hparams(m, "rome", None, ("v_lrr=1",))
    with pytest.raises(FfkvError, match="--set expects key=value"):
        method_hparams(m, "rome", None, ("v_lr",))
    with pytest.raises(FfkvError, match="edits one layer"):
        method_hparams(m, "rome", None, (), "0-1")
    with pytest.raises(FfkvError, match="layer 5 is out of range"):
        method_hparams(m, "memit", None, (), "0,5")


def test_edit_help_lists_every_method_with_its_hyperparameters(edit_registry):
    from ffkv.edit.cli import PER_MODEL, static_defaults

    for args in (["edit", "--help"], ["edit", "apply", "--help"]):
        out = " ".join(CliRunner().invoke(cli, args, catch_exceptions=False).output.split())
        for name, spec in edit_registry.METHODS.items():
            assert f"{name}: {spec.summary}" in out
            for key, doc in spec.hparam_docs.items():
                assert key in out and " ".join(doc.split()) in out, (name, key)
            defaults = static_defaults(name)
            # the edited layer(s) depend on the model; KN finds its neurons, FT-L edits layer 0 as ROME's paper does
            assert PER_MODEL in defaults.values() or name in ("kn", "ft-l")
            for key, value in defaults.items():
                assert f"{key} " in out
                expected = " ".join(f"{key} {spec.hparam_docs.get(key, '')} [default: {value!r}]".split())
                assert expected in out, (name, key, expected)


# ------------------------------------------------------------------------------------------ padded vocabulary
@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory):
    """The planted model with 8 embedding rows beyond its tokenizer, one of them the top logit of the prompt."""
    from ffkv.testbed.planted import planted_model

    pm = planted_model(arch="gpt2")
    m = pm.model
    n = len(m.tokenizer)
    paris = m.answer_id("paris")
    m.hf.resize_token_embeddings(n + 8)
    with torch.no_grad():
        w = m.unembedding.weight
        w[n:] = 0
        w[n + 3] = 4 * w[paris]  # the untrained-looking row now wins the argmax of "the old tower"
    assert int(m.next_token_probs("the old tower")[0].argmax()) == n + 3
    out = tmp_path_factory.mktemp("padded") / "model"
    m.hf.save_pretrained(out)
    m.tokenizer.save_pretrained(out)
    return out, n


def test_inspect_flags_a_padded_vocabulary(padded_dir, capsys):
    path, n = padded_dir
    main(["inspect", str(path), "--json"])
    cap = capsys.readouterr()
    info = json.loads(cap.out)
    assert info["padded_vocab"] is True and info["tokenizer_vocab_size"] == n and info["embedding_rows"] == n + 8
    warn = [l for l in cap.err.splitlines() if l.startswith("ffkv: warning:")]
    assert len(warn) == 1 and "padded vocabulary" in warn[0] and str(n) in warn[0]


def test_trace_never_reports_an_empty_answer(padded_dir, planted, tmp_path):
    path, n = padded_dir
    obj = _json(["trace", str(path), "--prompt", "the old tower", "--subject", "old tower", "--samples", "2"])
    assert obj["answer"].strip() == "paris" and obj["answer_id"] < n
    assert obj["peak"]["layer"] in obj["layers"] and len(obj["scores"][0]) == len(obj["layers"])
    part = _json(["trace", str(path), "--prompt", "the old tower", "--subject", "old tower", "--samples", "2",
                  "--layers", "1"])
    assert part["layers"] == [1] and [r[0] for r in part["scores"]] == [r[1] for r in obj["scores"]]
    with pytest.raises(SystemExit) as e:
        main(["trace", str(path), "--prompt", "the old tower", "--subject", "old tower", "--layers", "0-7"])
    assert e.value.code == 2


def test_planted_inspect_is_not_padded(planted, tmp_path):
    from ffkv.testbed.planted import save_planted

    info = _json(["inspect", str(save_planted(planted, tmp_path / "p"))])
    assert info["padded_vocab"] is False and info["adapter_check"]["passed"] is True


# ------------------------------------------------------------------------------------------ the default testbed
@pytest.fixture(scope="module")
def known_fact(default_testbed):
    """A frequent testbed fact the model answers right on its first training template."""
    import ffkv
    from ffkv.testbed import load_facts

    m = ffkv.load_model(default_testbed / "model")
    facts, _ = load_facts(default_testbed)
    for f in sorted(facts, key=lambda f: -f["train_count"]):
        template = f["train_templates"][0]
        prompt = template.format(f["subject"])
        if int(m.next_token_probs(prompt)[0].argmax()) == m.answer_id(f["object"]):
            other = next(g["object"] for g in facts if g["object"] != f["object"])
            return {"template": template, "prompt": prompt, "subject": f["subject"], "object": f["object"],
                    "new": other, "model": str(default_testbed / "model")}
    raise AssertionError("the default testbed knows none of its frequent facts")


def _edit_json(fact, tmp_path, *args):
    return _json(["edit", fact["model"], "--prompt", fact["template"], "--subject", fact["subject"],
                  "--stats-dir", str(tmp_path / "stats"), "--out", str(tmp_path / f"ed{len(list(tmp_path.iterdir()))}"),
                  *args])


def test_answer_names_the_same_token_in_every_command(edit_registry, known_fact, tmp_path):
    f = known_fact
    bare, spaced = f["object"].strip(), " " + f["object"].strip()
    ids = {}
    for a in (bare, spaced):
        tr = _json(["trace", f["model"], "--prompt", f["prompt"], "--subject", f["subject"], "--answer", a,
                    "--kind", "mlp", "--samples", "1", "--window", "1", "--layers", "0"])
        kn = _json(["neurons", f["model"], "--prompt", f["prompt"], "--answer", a, "--steps", "2"])
        rc = _json(["recall", f["model"], "--prompt", f["prompt"], "--subject", f["subject"], "--answer", a,
                    "--samples", "1"])
        ed = _edit_json(f, tmp_path, "--method", "rome", "--target", a, "--layer", "0", "--set", "stats_tokens=2000",
                        "--set", "v_num_grad_steps=1", "--set", "prefixes=[]")
        ids[a] = (tr["answer_id"], kn["answer_id"], rc["answer_id"], ed["requests"][0]["target_id"], kn["memories"])
    assert ids[bare] == ids[spaced]
    assert len(set(ids[bare][:4])) == 1  # one token for the answer in all four commands


def test_neurons_and_the_kn_edit_find_the_same_neurons(edit_registry, known_fact, testbed_model, tmp_path):
    f = known_fact
    hp = edit_registry.get_method("kn").defaults(testbed_model)  # the KN edit's settings, given to ffkv neurons
    kn = _json(["neurons", f["model"], "--prompt", f["prompt"], "--answer", f["object"], "--steps", str(hp["ig_steps"]),
                "--threshold", str(hp["threshold"]), "--max-neurons", str(hp["max_neurons"])])
    ed = _edit_json(f, tmp_path, "--method", "kn", "--target", f["new"], "--target-true", f["object"])
    assert kn["memories"], "the fact has knowledge neurons"
    assert sorted(ed["memories"]) == sorted(kn["memories"])


def test_edit_layer_trace_picks_the_peak_of_trace_mlp(edit_registry, known_fact, tmp_path):
    f = known_fact
    tr = _json(["trace", f["model"], "--prompt", f["prompt"], "--subject", f["subject"], "--kind", "mlp"])
    ed = _edit_json(f, tmp_path, "--method", "rome", "--layer", "trace", "--target", f["new"],
                    "--set", "stats_tokens=4000", "--set", "v_num_grad_steps=2")
    assert ed["layers"] == [tr["subject_peak"]["layer"]]
    assert tr["subject_peak"]["token"] == tr["subject_range"][1] - 1
