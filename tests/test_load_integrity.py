"""Model files checked before use (issue 14, families 1, 2, 14): every damaged model folder, bad load argument
and non-finite weight is refused in one line by the Python API and by every command that loads a model."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

import ffkv
from ffkv.cli import main
from ffkv.edit.journal import Journal
from ffkv.errors import FfkvError
from ffkv.models.integrity import (check_checkpoint, check_device_map, describe_nonfinite, nonfinite_weights,
                                   read_safetensors_header)
from ffkv.models.loading import load_checked
from ffkv.testbed.planted import save_planted

FFN = "transformer.h.0.mlp.c_fc.weight"


@pytest.fixture(autouse=True)
def quiet_transformers():
    """What ``ffkv.cli.main`` sets up before transformers is imported in a fresh process (TRANSFORMERS_VERBOSITY=
    error); here transformers was imported by earlier tests, so its verbosity is set directly."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def good(planted, tmp_path_factory) -> Path:
    return save_planted(planted, tmp_path_factory.mktemp("good") / "model")


@pytest.fixture(scope="module")
def sharded(planted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "model"
    planted.model.hf.save_pretrained(out, max_shard_size="40KB")
    planted.model.tokenizer.save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) > 2
    return out


# ------------------------------------------------------------------------------------------ damage
def _weights(d: Path) -> Path:
    return d / "model.safetensors"


def _truncate(d):
    b = _weights(d).read_bytes()
    _weights(d).write_bytes(b[: len(b) * 2 // 3])


def _empty(d):
    _weights(d).write_bytes(b"")


def _garbled_header(d):
    b = bytearray(_weights(d).read_bytes())
    b[10:40] = b"\x00\xff" * 15  # inside the JSON header
    _weights(d).write_bytes(bytes(b))


def _huge_header_length(d):
    b = _weights(d).read_bytes()
    _weights(d).write_bytes((2 ** 62).to_bytes(8, "little") + b[8:])


def _trailing_bytes(d):
    with _weights(d).open("ab") as f:
        f.write(b"\0" * 100)


def _not_safetensors(d):
    _weights(d).write_text("<html>404 not found</html>")


def _config(d, **changes):
    c = json.loads((d / "config.json").read_text())
    c.update(changes)
    (d / "config.json").write_text(json.dumps(c))


def _shape_mismatch(d):
    _config(d, n_inner=96)


def _missing_tensors(d):
    _config(d, n_layer=3)


def _unexpected_tensors(d):
    _config(d, n_layer=1)


def _corrupt_config(d):
    (d / "config.json").write_text('{"model_type": "gpt2", "n_layer": ')


def _config_not_object(d):
    (d / "config.json").write_text("[1, 2, 3]")


def _unknown_model_type(d):
    _config(d, model_type="gpt7")


def _remote_code(d):
    _config(d, model_type="ffkv_custom", auto_map={"AutoConfig": "modeling.CustomConfig",
                                                   "AutoModelForCausalLM": "modeling.CustomModel"})


def _config_bad_value(d):
    _config(d, n_layer="twelve")


def _corrupt_tokenizer(d):
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')


def _no_weights(d):
    _weights(d).unlink()


def _stray_safetensors(d):
    _weights(d).rename(d / "weights.safetensors")


class _Touch:
    """A pickle that, if it were ever unpickled without weights_only, creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _malicious_pickle(d):
    _weights(d).unlink()
    with (d / "pytorch_model.bin").open("wb") as f:
        pickle.dump({FFN: _Touch(d.parent / "PWNED")}, f)


def _truncated_pickle(d):
    sd = load_file(_weights(d))
    _weights(d).unlink()
    torch.save(sd, d / "pytorch_model.bin")  # a zip archive: cut in half it is unreadable
    b = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(b[: len(b) // 2])


DAMAGE = {  # damage -> the words the one line must contain (the RIGHT problem, never "not found")
    "truncated": (_truncate, "is truncated"),
    "empty": (_empty, "is empty"),
    "garbled-header": (_garbled_header, "header is not valid JSON"),
    "huge-header-length": (_huge_header_length, "header length field"),
    "trailing-bytes": (_trailing_bytes, "bytes follow its last tensor"),
    "not-safetensors": (_not_safetensors, "is corrupt"),
    "shape-mismatch": (_shape_mismatch, "do not match its config.json"),
    "missing-tensors": (_missing_tensors, "lacks tensors its config.json needs"),
    "unexpected-tensors": (_unexpected_tensors, "has tensors its config.json has no place for"),
    "corrupt-config": (_corrupt_config, "config.json is not valid JSON"),
    "config-not-object": (_config_not_object, "config.json is not a JSON object"),
    "unknown-model-type": (_unknown_model_type, "model_type 'gpt7'"),
    "remote-code": (_remote_code, "needs custom code"),
    "config-bad-value": (_config_bad_value, "config.json is not a valid 'gpt2' config"),
    "corrupt-tokenizer": (_corrupt_tokenizer, "the tokenizer in"),
    "no-weights": (_no_weights, "no weights"),
    "stray-safetensors": (_stray_safetensors, "no model.safetensors"),
    "malicious-pickle": (_malicious_pickle, "pickle checkpoint (pytorch_model.bin)"),
    "truncated-pickle": (_truncated_pickle, "pickle checkpoint (pytorch_model.bin)"),
}


def _missing_shard(d):
    next(iter(sorted(d.glob("model-*.safetensors")))).unlink()


def _index_not_json(d):
    (d / "model.safetensors.index.json").write_text("{")


def _index_wrong_shard(d):
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    name = next(n for n, s in idx["weight_map"].items() if s == shards[0])
    idx["weight_map"][name] = shards[1]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def _index_escapes(d):
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"][next(iter(idx["weight_map"]))] = "../elsewhere.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def _truncated_shard(d):
    s = sorted(d.glob("model-*.safetensors"))[-1]
    s.write_bytes(s.read_bytes()[:-10])


SHARD_DAMAGE = {
    "missing-shard": (_missing_shard, "is missing"),
    "index-not-json": (_index_not_json, "is not valid JSON"),
    "index-wrong-shard": (_index_wrong_shard, "which does not hold it"),
    "index-escapes-folder": (_index_escapes, "not a file of the model folder"),
    "truncated-shard": (_truncated_shard, "is truncated"),
}


def _damaged(src: Path, tmp_path: Path, damage) -> Path:
    d = tmp_path / "m" / "model"
    shutil.copytree(src, d)
    damage(d)
    return d


def _with_nan(d: Path, where: str = FFN, value=float("nan")) -> None:
    sd = load_file(_weights(d))
    sd[where].view(-1)[:3] = value
    sd[where].view(-1)[3] = float("inf")
    save_file(sd, _weights(d), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------ the CLI
def _run(args, capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, [l for l in out.err.splitlines() if l.strip()], out.out


def _commands(d: Path, tmp_path: Path) -> dict[str, list]:
    """Every kind of command that loads a model, pointed at model folder ``d``."""
    undo_src = d.parent  # an edit output folder: model/ and journal/ (an empty journal is enough to load it)
    if not (undo_src / "journal").exists():
        Journal().save(undo_src / "journal")
    return {
        "inspect": ["inspect", d],
        "trace": ["trace", d, "--prompt", "the old tower", "--subject", "old tower", "--samples", "2"],
        "edit rome": ["edit", d, "--method", "rome", "--prompt", "the old {}", "--subject", "tower",
                      "--target", "rome", "--out", tmp_path / "edited"],
        "edit undo": ["edit", "undo", undo_src, "--out", tmp_path / "undone"],
    }


def _assert_refused(code, err, words, what):
    assert code == 2, (what, code, err)
    assert len(err) == 1 and err[0].startswith("ffkv: error: "), (what, err)
    assert words in err[0] and "not found" not in err[0] and "Traceback" not in err[0], (what, err)


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_every_model_command_refuses_a_damaged_folder_in_one_line(kind, good, tmp_path, capsys):
    damage, words = DAMAGE[kind]
    d = _damaged(good, tmp_path, damage)
    for name, args in _commands(d, tmp_path).items():
        code, err, out = _run(args, capsys)
        _assert_refused(code, err, words, f"{kind}: ffkv {name}")
        assert out == "" and not (tmp_path / "edited").exists() and not (tmp_path / "undone").exists()
    assert not (tmp_path / "m" / "PWNED").exists()  # the malicious pickle never ran


@pytest.mark.parametrize("kind", sorted(SHARD_DAMAGE))
def test_a_damaged_sharded_checkpoint_is_refused_in_one_line(kind, sharded, tmp_path, capsys):
    damage, words = SHARD_DAMAGE[kind]
    d = _damaged(sharded, tmp_path, damage)
    with pytest.raises(FfkvError, match=words):
        ffkv.load_model(d)
    for name in ("inspect", "trace"):
        code, err, _ = _run(_commands(d, tmp_path)[name], capsys)
        _assert_refused(code, err, words, f"{kind}: ffkv {name}")


def test_an_intact_sharded_checkpoint_loads_equal(sharded, planted):
    mm = ffkv.load_model(sharded)
    ids = torch.tensor([[2, 3, 4]])
    torch.testing.assert_close(mm.hf(input_ids=ids).logits, planted.model.hf(input_ids=ids).logits)


@pytest.mark.parametrize("option, value, words", [
    ("--device-map", "nonsense", "--device-map 'nonsense' is not a device map"),
    ("--device-map", "{bad json", "--device-map '{bad json' is not valid JSON"),
    ("--device", "nonsense", "--device 'nonsense' is not a device"),
    ("--device", "cuda:7", "'cuda:7'"),
    ("--device", "meta", "meta holds no weights"),
])
def test_bad_load_arguments_name_the_argument(option, value, words, good, tmp_path, capsys):
    if value == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    for name, args in _commands(good, tmp_path).items():
        if name == "edit undo":  # takes no model options
            continue
        code, err, _ = _run([*args, option, value], capsys)
        _assert_refused(code, err, words, f"ffkv {name} {option} {value}")
    with pytest.raises(FfkvError, match=re.escape(words)):
        ffkv.load_model(good, **{option.strip("-").replace("-", "_"): value})


def test_a_valid_device_map_is_accepted_or_asks_for_accelerate():
    for value in ("auto", "sequential", "cpu", '{"": "cpu"}', {"transformer": "cpu", "lm_head": 0}):
        try:
            got = check_device_map(value)
        except FfkvError as e:
            assert "accelerate" in str(e) or "cannot be used" in str(e), e
        else:
            assert got == (json.loads(value) if isinstance(value, str) and value.startswith("{") else value)


def test_missing_and_empty_folders_name_the_problem(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for d, words in ((tmp_path / "missing", "not found"), (tmp_path / "empty", "has no config.json")):
        code, err, _ = _run(["inspect", d], capsys)
        assert code == 2 and len(err) == 1 and words in err[0], err
        with pytest.raises(FfkvError, match=words):
            ffkv.load_model(d)


# ------------------------------------------------------------------------------------------ the Python API
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_load_model_raises_one_ffkv_error(kind, good, tmp_path):
    damage, words = DAMAGE[kind]
    d = _damaged(good, tmp_path, damage)
    with pytest.raises(FfkvError, match=re.escape(words)) as e:
        ffkv.load_model(d)
    assert "\n" not in e.value.line()


def test_a_pickle_checkpoint_of_plain_tensors_loads_through_weights_only(good, planted, tmp_path):
    d = _damaged(good, tmp_path, lambda d: torch.save(load_file(_weights(d)), d / "pytorch_model.bin"))
    _weights(d).unlink()
    assert check_checkpoint(d).format == "pickle"
    mm = ffkv.load_model(d)
    ids = torch.tensor([[2, 3, 4]])
    torch.testing.assert_close(mm.hf(input_ids=ids).logits, planted.model.hf(input_ids=ids).logits)


def test_the_header_reader_agrees_with_the_file(good):
    tensors = read_safetensors_header(_weights(good))
    on_disk = load_file(_weights(good))
    assert {n: tuple(t.shape) for n, t in on_disk.items()} == {n: s for n, (_, s) in tensors.items()}
    ck = check_checkpoint(good)
    assert ck.format == "safetensors" and ck.files == [_weights(good)] and ck.tensors == tensors


# ------------------------------------------------------------------------------------------ non-finite
def test_nonfinite_weights_are_counted_per_tensor(planted):
    hf = planted.model.hf
    assert nonfinite_weights(hf) == []
    w = dict(hf.named_parameters())[FFN]
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.view(-1)[:3] = float("nan")
            w.view(-1)[3] = float("-inf")
        assert nonfinite_weights(hf) == [{"tensor": FFN, "nan": 3, "inf": 1, "numel": w.numel()}]
        with torch.no_grad():  # finite values whose sum overflows are not reported
            w.copy_(torch.full_like(w, 3e38))
        assert nonfinite_weights(hf) == []
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert describe_nonfinite([{"tensor": "a", "nan": 3, "inf": 1, "numel": 9}]) == "4 values in 1 tensor: a (3 NaN, 1 inf)"


def test_nan_weights_inspect_reports_them_other_commands_refuse(good, tmp_path, capsys):
    d = _damaged(good, tmp_path, _with_nan)
    code, err, out = _run(["inspect", d, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["nonfinite_weights"] == [{"tensor": FFN, "nan": 3, "inf": 1, "numel": 64 * 128}]
    assert info["adapter_check"]["passed"] is None and info["adapter_check"]["max_abs_error"] is None
    assert len(err) == 1 and err[0].startswith("ffkv: warning: ") and FFN in err[0], err
    code, err, out = _run(["inspect", d], capsys)
    assert code == 0 and "non-finite" in out and "passed" not in out and "not run" in out, out
    for name, args in _commands(d, tmp_path).items():
        if name == "inspect":
            continue
        code, err, out = _run(args, capsys)
        _assert_refused(code, err, "has non-finite weights", f"ffkv {name}")
        assert f"{FFN} (3 NaN, 1 inf)" in err[0] and "--allow-nonfinite" in err[0]
    with pytest.raises(FfkvError, match="non-finite weights"):
        ffkv.load_model(d)
    mm, report = load_checked(d, allow_nonfinite=True)
    assert report[0]["nan"] == 3 and torch.isnan(dict(mm.hf.named_parameters())[FFN]).sum() == 3
    assert mm.adapter_check is None  # its comparison would be NaN: not run, never "passed"


def test_clean_model_inspect_reports_no_nonfinite_weights(good, capsys):
    code, err, out = _run(["inspect", good, "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["nonfinite_weights"] == [] and info["adapter_check"]["passed"] is True


def test_allow_nonfinite_lets_the_model_through(good, tmp_path, capsys):
    # NaN in position embeddings the short prompt never reaches: the trace itself stays finite.
    d = _damaged(good, tmp_path, lambda d: _with_nan(d, "transformer.wpe.weight"))
    args = _commands(d, tmp_path)["trace"]
    code, err, _ = _run(args, capsys)
    _assert_refused(code, err, "non-finite weights", "trace")
    code, err, out = _run([*args, "--allow-nonfinite", "--json"], capsys)
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith("ffkv: warning: ") and "transformer.wpe.weight" in err[0], err
    assert "scores" in json.loads(out) or json.loads(out)


def test_the_malicious_pickle_would_run_if_unpickled(tmp_path):
    pickle.loads(pickle.dumps(_Touch(tmp_path / "ran")))  # what the refusal above keeps from happening
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("kind", ["malicious-pickle"])
def test_a_subprocess_prints_one_line_and_no_traceback(kind, good, tmp_path):
    damage, words = DAMAGE[kind]
    d = _damaged(good, tmp_path, damage)
    r = subprocess.run([sys.executable, "-m", "ffkv.cli", "trace", str(d), "--prompt", "the old tower",
                        "--subject", "old tower"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("ffkv: error: ") and words in lines[0], r.stderr
    assert not (tmp_path / "m" / "PWNED").exists()
