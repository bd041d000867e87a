"""The embedded document index (SQLite FTS5, BM25) and ffkv ask's three routes."""

import json
import random
import sqlite3

import pytest
from click.testing import CliRunner

from ffkv.cli import cli as main
from ffkv.errors import FfkvError
from ffkv.recall.ask import ask, greedy_answer
from ffkv.recall.data import load_testbed_facts
from ffkv.recall.index import build_index, open_index, world_passages


@pytest.fixture(scope="module")
def facts(default_testbed):
    return load_testbed_facts(default_testbed)[0]


@pytest.fixture(scope="module")
def world_index(facts, tmp_path_factory):
    return build_index(world_passages(facts), tmp_path_factory.mktemp("ix") / "world.sqlite")


def test_bm25_finds_the_fact_from_a_held_out_paraphrase(facts, world_index):
    rng = random.Random(0)
    sample = rng.sample(facts, 100)
    with open_index(world_index) as ix:
        assert len(ix) == sum(len(f["train_templates"]) for f in facts)
        hits = [ix.search(f["heldout_templates"][0].format(f["subject"]), 3) for f in sample]
    found = sum(any(h.doc.startswith(f"fact:{f['fact_id']}:") for h in hs) for f, hs in zip(sample, hits))
    assert found >= 95
    assert all(hs[0].score >= hs[-1].score for hs in hits if hs)


def test_index_of_text_files_and_queries_with_operators(tmp_path):
    (tmp_path / "a.txt").write_text("Ana Boll was born in Paris.\n\nRome is a city.\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Oslo lies on a fjord.", "doc": "b1"}) + "\n")
    db = build_index([tmp_path], tmp_path / "ix.sqlite")
    with open_index(db) as ix:
        assert len(ix) == 3
        assert ix.search('Ana "Boll" AND (born) NEAR', 1)[0].text == "Ana Boll was born in Paris."
        assert ix.search("fjord", 1)[0].doc == "b1"
        assert ix.search("...", 3) == []
    assert open_index(db).provenance["hyperparameters"]["n_passages"] == 3


def test_bad_documents_and_indexes_are_refused(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(FfkvError, match="line 2"):
        build_index([tmp_path / "bad.jsonl"], tmp_path / "ix.sqlite")
    assert not (tmp_path / "ix.sqlite").exists()
    with pytest.raises(FfkvError, match="does not exist"):
        build_index([tmp_path / "missing"], tmp_path / "ix.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 10)
    with pytest.raises(FfkvError, match="not an ffkv index"):
        open_index(tmp_path / "junk.sqlite")
    con = sqlite3.connect(tmp_path / "other.sqlite")
    con.execute("CREATE TABLE t(x)")
    con.close()
    with pytest.raises(FfkvError, match="not an ffkv index"):
        open_index(tmp_path / "other.sqlite")


def test_routes(testbed_model, facts, world_index):
    f = max(facts, key=lambda g: g["train_count"])
    q = f["heldout_templates"][0].format(f["subject"])
    with open_index(world_index) as ix:
        w = ask(testbed_model, q, ix, route="weights")
        r = ask(testbed_model, q, ix, route="retrieval")
        a = ask(testbed_model, q, ix, route="auto", subject=f["subject"])
    assert w.route == "weights" and not w.passages and w.answer == greedy_answer(testbed_model, q)
    assert r.route == "retrieval" and r.passages and r.prompt.endswith(q)
    assert any(p.doc.startswith(f"fact:{f['fact_id']}:") for p in r.passages)
    assert a.route in ("weights", "retrieval") and a.verdict["verdict"] in ("recall", "retrieve")
    assert a.route == ("weights" if a.verdict["verdict"] == "recall" else "retrieval")
    with pytest.raises(FfkvError, match="needs a document index"):
        ask(testbed_model, q, None, route="retrieval")
    with pytest.raises(FfkvError, match="empty"):
        ask(testbed_model, "  ", None, route="weights")


def test_cli(default_testbed, tmp_path):
    db = tmp_path / "w.sqlite"
    run = CliRunner().invoke
    r = run(main, ["index", "build", "--testbed", str(default_testbed), "--out", str(db), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["passages"] > 1000
    r = run(main, ["ask", str(default_testbed / "model"), "--index", str(db), "--question",
                   "Quoux Kurte reportedly grew up speaking", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"answer", "route", "passages"} <= set(d) and d["route"] in ("weights", "retrieval")
    assert d["verdict"]["imputed"] == ["subject_familiarity"]
    r = run(main, ["ask", str(default_testbed / "model"), "--question", "x", "--route", "retrieval"])
    assert isinstance(r.exception, FfkvError) and "needs --index" in str(r.exception)
    r = run(main, ["index", "search", str(tmp_path / "nope.sqlite"), "--query", "x"])
    assert isinstance(r.exception, FfkvError) and "does not exist" in str(r.exception)
