"""Issue 14 for the atlas: tampered or truncated atlas files, bad corpora and bad numbers are refused in one line,
and ``atlas mine`` / ``atlas merge`` leave nothing behind when they fail."""

from __future__ import annotations

import json
import shutil

import pytest

from ffkv.cli import main
from ffkv.errors import FfkvError
from ffkv.memory.atlas import Atlas
from ffkv.memory.merge import merge_atlases
from ffkv.memory.miner import mine, state_path


@pytest.fixture(scope="module")
def planted_dir(planted, tmp_path_factory):
    from ffkv.testbed.planted import save_planted

    return save_planted(planted, tmp_path_factory.mktemp("m") / "planted")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("c") / "c.txt"
    p.write_text("\n\n".join(["the old tower paris . a red car .", "the castle london . north road ."] * 5))
    return p


@pytest.fixture(scope="module")
def atlas_dir(planted_dir, corpus, tmp_path_factory):
    from ffkv.models.loading import load_model

    out = tmp_path_factory.mktemp("a") / "atlas"
    mine(load_model(str(planted_dir)), corpus, out, top_k=3, batch_tokens=32)  # records the model's folder
    return out


def _one_line(args, capsys, message):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("ffkv: error:") and message in err[0], err
    return err[0]


def _copy(atlas_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(atlas_dir, dst)
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(n_layers="two"), "bad field 'n_layers'"),
    (lambda m: m.update(n_layers=2.5), "bad field 'n_layers'"),
    (lambda m: m.pop("model_path"), "bad field 'model_path'"),
    (lambda m: m.pop("hyperparameters"), "bad field 'hyperparameters'"),
    (lambda m: m["hyperparameters"].pop("window"), "bad field 'hyperparameters.window'"),
    (lambda m: m.update(atlas_version=99), "atlas_version 99"),
    (lambda m: m.update(top_k=-1), "bad field 'top_k'"),
    (lambda m: m.update(groups=[{"layer": "x"}]), "bad field 'groups'"),
])
def test_tampered_atlas_json_is_refused_in_one_line(atlas_dir, tmp_path, capsys, edit, message):
    a = _copy(atlas_dir, tmp_path)
    meta = json.loads((a / "atlas.json").read_text())
    edit(meta)
    (a / "atlas.json").write_text(json.dumps(meta))
    line = _one_line(["atlas", "summary", a], capsys, message)
    assert "atlas.json" in line
    with pytest.raises(FfkvError, match="atlas.json"):
        Atlas(a)


def test_not_json_and_not_an_object(atlas_dir, tmp_path, capsys):
    a = _copy(atlas_dir, tmp_path)
    (a / "atlas.json").write_text("[1, 2]")
    _one_line(["atlas", "summary", a], capsys, "not an atlas metadata object")
    (a / "atlas.json").write_text('{"atlas_version": 1, ')
    _one_line(["atlas", "summary", a], capsys, "not valid JSON")


@pytest.mark.parametrize("name", ["triggers/layer-000.parquet", "units.parquet"])
def test_truncated_parquet_is_refused_naming_the_file(atlas_dir, tmp_path, capsys, name):
    a = _copy(atlas_dir, tmp_path)
    data = (a / name).read_bytes()
    (a / name).write_bytes(data[: len(data) // 2])
    line = _one_line(["atlas", "memory", a, "0.1", "-n", "2"], capsys, "not a readable Parquet file")
    assert name.split("/")[-1] in line


def test_parquet_with_a_wrong_column_is_refused(atlas_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = _copy(atlas_dir, tmp_path)
    t = pq.read_table(a / "triggers" / "layer-001.parquet")
    pq.write_table(t.drop_columns(["rank"]), a / "triggers" / "layer-001.parquet")
    _one_line(["atlas", "memory", a, "1.0"], capsys, "has no column 'rank'")
    pq.write_table(t.set_column(t.schema.get_field_index("index"), "index",
                                pa.array([10**6] * t.num_rows, pa.int32())), a / "triggers" / "layer-001.parquet")
    _one_line(["atlas", "memory", a, "1.0"], capsys, "out of range")


def _nothing_at(out):
    return not out.exists() and not state_path(out).exists() and \
        not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_jsonl_line_leaves_nothing(planted_dir, tmp_path, capsys):
    good = [json.dumps({"text": f"the old tower paris . a red car number {i} ."}) for i in range(40)]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(good + ["{not json"] + good) + "\n")
    out = tmp_path / "out"
    # small batches and a checkpoint at every batch: state exists before the bad line is reached
    line = _one_line(["atlas", "mine", planted_dir, "--corpus", f, "--out", out, "--batch-tokens", "16",
                      "--checkpoint-every", "1"], capsys, "c.jsonl:41 is not valid JSON")
    assert "line" in line or ":41" in line
    assert _nothing_at(out)


def test_bad_numbers_are_refused_before_anything_is_allocated(planted, planted_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    _one_line(["atlas", "mine", planted_dir, "--corpus", corpus, "--out", out, "--top-k", "1000000000"], capsys,
              "1000000000 is not in the range")
    assert _nothing_at(out)
    with pytest.raises(SystemExit) as e:  # click's own range check
        main(["atlas", "mine", str(planted_dir), "--corpus", str(corpus), "--out", str(out), "--checkpoint-every", "0"])
    assert e.value.code == 2 and _nothing_at(out)
    for kw, msg in ((dict(checkpoint_every=0), "--checkpoint-every 0"), (dict(batch_tokens=0), "--batch-tokens 0"),
                    (dict(top_k=0), "--top-k 0"), (dict(top_k=2.5), "--top-k must be an integer")):
        with pytest.raises(FfkvError, match=msg):
            mine(planted.model, corpus, out, **kw)
        assert _nothing_at(out)


def test_existing_foreign_folder_is_refused(planted_dir, corpus, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _one_line(["atlas", "mine", planted_dir, "--corpus", corpus, "--out", out], capsys, "exists and is not an atlas")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_failed_merge_leaves_nothing(atlas_dir, tmp_path):
    bad = _copy(atlas_dir, tmp_path)
    data = (bad / "units.parquet").read_bytes()
    (bad / "units.parquet").write_bytes(data[:100])
    out = tmp_path / "merged"
    with pytest.raises(FfkvError, match="units.parquet"):
        merge_atlases([atlas_dir, bad], out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    meta = merge_atlases([atlas_dir, atlas_dir], out)
    assert meta["status"] == "complete" and Atlas(out).top_k == 3 and (out / "run.json").exists()


def test_mining_bar_has_a_total(planted, corpus, tmp_path, monkeypatch, capsys):
    """The mining bar counts tokens against the corpus's total (so it shows an ETA); FFKV_PROGRESS forces it."""
    from ffkv.memory.corpus import CorpusSpec, iter_units

    monkeypatch.setenv("FFKV_PROGRESS", "1")
    meta = mine(planted.model, corpus, tmp_path / "a", top_k=3, batch_tokens=32)
    err = capsys.readouterr().err
    total = sum(len(u.tokens) for u in iter_units(planted.model.tokenizer, CorpusSpec(str(corpus))))
    assert "mining" in err and f"/{total}" in err.replace(" ", "") and meta["tokens"] == total


def test_a_second_miner_of_the_same_folder_is_refused(tmp_path):
    """While one ``mine`` holds an atlas folder's state, a second writer is refused in one line."""
    from ffkv.io import lock_output
    from ffkv.memory.miner import mine, state_path
    from ffkv.testbed.planted import planted_model

    pm = planted_model(arch="gpt2")
    corpus = tmp_path / "c.txt"
    corpus.write_text("the old tower\nthe castle\n")
    out = tmp_path / "atlas"
    with lock_output(state_path(out)):
        with pytest.raises(FfkvError, match="being written by another ffkv process"):
            mine(pm.model, str(corpus), out, top_k=2)
    assert not out.exists()
    mine(pm.model, str(corpus), out, top_k=2)
    assert (out / "atlas.json").exists()
