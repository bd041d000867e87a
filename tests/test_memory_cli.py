"""``ffkv atlas`` end to end on a saved planted model, the corpus readers, and real text (shared data)."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ffkv.cli import cli, main
from ffkv.errors import FfkvError
from ffkv.memory.corpus import CorpusSpec, corpus_files, iter_units
from ffkv.testbed.planted import WORDS


@pytest.fixture(scope="module")
def planted_dir(planted, tmp_path_factory):
    from ffkv.testbed.planted import save_planted

    return save_planted(planted, tmp_path_factory.mktemp("m") / "planted")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(3)
    sents = []
    for _ in range(60):
        words = [rng.choice(WORDS[:40]) for _ in range(rng.randint(2, 7))]
        if rng.random() < 0.4:
            words += ["tower", "paris"]
        sents.append(" ".join(words) + " .")
    p = tmp_path_factory.mktemp("c") / "c.txt"
    p.write_text("\n\n".join(" ".join(sents[i: i + 3]) for i in range(0, 60, 3)))
    return p


def _run(args):
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def atlas_dir(planted_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "atlas"
    res = _run(["atlas", "mine", str(planted_dir), "--corpus", str(text_file), "--out", str(out), "--top-k", "6",
                "--json"])
    meta = json.loads(res.stdout)
    assert meta["status"] == "complete" and meta["top_k"] == 6
    return out


def test_cli_mine_memory_promotes(atlas_dir, planted_dir, text_file):
    again = json.loads(_run(["atlas", "mine", str(planted_dir), "--corpus", str(text_file), "--out", str(atlas_dir),
                             "--top-k", "6", "--json"]).stdout)
    assert again["status"] == "complete"
    info = json.loads(_run(["atlas", "memory", str(atlas_dir), "1.5", "--json"]).stdout)
    assert info["memory"] == "L1.5" and info["value_top_tokens"][0] == "paris" and info["agrees"]
    assert [t["last_token"] for t in info["triggers"]] == ["tower"] * 6
    assert len(info["bottom_triggers"]) == 6 and info["pattern"]["label"] == "shallow"
    prom = json.loads(_run(["atlas", "promotes", str(atlas_dir), "paris", "-n", "3", "--json"]).stdout)
    assert prom["memories"][0]["memory"] == "L1.5" and prom["memories"][0]["triggers"][0].endswith("tower")
    near = json.loads(_run(["atlas", "nearest", str(atlas_dir), "--memory", "L0.7", "-n", "2", "--json"]).stdout)
    assert near["memories"][0]["memory"] == "L0.7"
    text = _run(["atlas", "memory", str(atlas_dir), "L0.7", "-n", "2"]).stdout
    assert "london" in text and "castle" in text


def test_cli_subupdates(planted_dir):
    res = json.loads(_run(["atlas", "subupdates", str(planted_dir), "--prompt", "the old tower", "--top-n", "2",
                           "--off", "1.5", "--generate", "2", "--json"]).stdout)
    assert res["layers"][1]["sub_updates"][0]["memory"] == "L1.5"
    assert res["switch"]["before"][0]["token"] == "paris" and res["switch"]["after"][0]["token"] != "paris"
    assert res["generation"]["before"].startswith("paris")
    forced = json.loads(_run(["atlas", "subupdates", str(planted_dir), "--prompt", "the old house",
                              "--on", "1.5=20", "--positions", "2", "--json"]).stdout)
    assert forced["switch"]["after"][0]["token"] == "paris"


def test_cli_analyze_and_report(atlas_dir):
    res = json.loads(_run(["atlas", "analyze", str(atlas_dir), "--steps", "values,composition",
                           "--composition-units", "10", "--json"]).stdout)
    assert len(res["values"]["layers"]) == 2 and len(res["composition"]["refinement"]) == 2
    out = json.loads(_run(["atlas", "report", str(atlas_dir), "--composition-units", "10", "--json"]).stdout)
    assert out["report"].endswith("report.html")
    html = (atlas_dir / "report.html").read_text()
    assert "Refinement" in html and (atlas_dir / "figures" / "patterns.png").exists()


@pytest.mark.parametrize("args, message", [
    (["atlas", "memory", "{atlas}", "2.5"], "layer 2 is out of range"),
    (["atlas", "memory", "{atlas}", "0.999"], "memory index 999 is out of range"),
    (["atlas", "memory", "{atlas}", "zz"], "not a memory name"),
    (["atlas", "promotes", "{atlas}", "zeppelin"], "not in the vocabulary"),
    (["atlas", "mine", "{model}", "--corpus", "{missing}", "--out", "{new}"], "does not exist"),
    (["atlas", "mine", "{model}", "--corpus", "{empty}", "--out", "{new}"], "yields no units"),
    (["atlas", "mine", "{model}", "--corpus", "{text}", "--out", "{new}", "--window", "500"], "longer than"),
    (["atlas", "mine", "{model}", "--corpus", "{text}", "--out", "{atlas}", "--top-k", "3"], "different top_k"),
    (["atlas", "report", "{missing}"], "not an atlas folder"),
    (["atlas", "subupdates", "{model}", "--prompt", "the tower", "--off", "1.500"], "out of range"),
    (["atlas", "subupdates", "{model}", "--prompt", "the tower", "--on", "1.5"], "has no value"),
])
def test_cli_errors_are_one_line(args, message, atlas_dir, planted_dir, text_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    fill = dict(atlas=str(atlas_dir), model=str(planted_dir), missing=str(tmp_path / "nope.txt"),
                empty=str(empty), new=str(tmp_path / "new"), text=str(text_file))
    with pytest.raises(SystemExit) as e:
        main([a.format(**fill) for a in args])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("ffkv: error:") and message in err[0], err
    assert not (tmp_path / "new").exists()  # nothing half-written


# ------------------------------------------------------------------------------------------- corpus readers
def test_corpus_readers_and_splits(planted, tmp_path):
    tok = planted.model.tokenizer
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "the old tower . the city"}) + "\n\n"
                                      + json.dumps({"text": "a red car"}) + "\n")
    pq.write_table(pa.table({"text": ["the big house . a dog", None, "north road"]}), tmp_path / "b.parquet")
    with pa.OSFile(str(tmp_path / "c.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as w:
            w.write_table(pa.table({"text": ["the blue lake"]}))
    (tmp_path / "d.txt").write_text("the old\ncastle .\n\nthe new bridge")
    (tmp_path / "skip.md").write_text("ignored")
    files = corpus_files(tmp_path)
    assert [f.name for f in files] == ["a.jsonl", "b.parquet", "c.arrow", "d.txt"]
    units = list(iter_units(tok, CorpusSpec(str(tmp_path))))
    texts = [tok.decode(u.tokens) for u in units]
    assert texts == ["the old tower <unk>", "the city", "a red car", "the big house <unk>", "a dog", "north road",
                     "the blue lake", "the old castle <unk>", "the new bridge"]
    assert [u.unit for u in units] == list(range(len(units)))
    assert units[0].next_id == tok.convert_tokens_to_ids("the")  # the next sentence's first token
    assert units[1].next_id == -1
    win = list(iter_units(tok, CorpusSpec(str(tmp_path / "a.jsonl"), split="window", window=3)))
    assert [len(u.tokens) for u in win] == [3, 3, 3] and win[0].next_id == win[1].tokens[0]
    lines = list(iter_units(tok, CorpusSpec(str(tmp_path / "d.txt"), docs="line")))
    assert [u.doc for u in lines] == [0, 1, 2]
    assert len(list(iter_units(tok, CorpusSpec(str(tmp_path), max_units=4)))) == 4
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(FfkvError, match="not valid JSON"):
        list(iter_units(tok, CorpusSpec(str(tmp_path / "bad.jsonl"))))
    with pytest.raises(FfkvError, match="no column"):
        list(iter_units(tok, CorpusSpec(str(tmp_path / "b.parquet"), text_field="body")))
    with pytest.raises(FfkvError, match="unknown split"):
        CorpusSpec(str(tmp_path), split="paragraphs")


@pytest.mark.shared_data
def test_mining_real_text(planted, shared_data, tmp_path):
    """A slice of WikiText-2 through the whole pipeline (the planted model's word tokenizer: mostly <unk>)."""
    from ffkv.memory.analysis import analyze
    from ffkv.memory.atlas import Atlas
    from ffkv.memory.miner import mine

    wiki = shared_data / "text" / "wikitext-2" / "valid.txt"
    meta = mine(planted.model, wiki, tmp_path / "w", top_k=5, max_units=150, progress=False, window=32)
    assert meta["units"] == 150 and meta["tokens"] > 150
    res = analyze(Atlas(tmp_path / "w", model=planted.model), steps=("values", "patterns"), progress=False)
    assert len(res["patterns"]["layers"]) == 2
