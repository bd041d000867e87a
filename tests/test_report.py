"""The static atlas report is navigable: contents, anchors, every memory searchable, the firing token marked."""

from __future__ import annotations

import json
import re

import pytest

from ffkv.memory import Atlas, mine, write_report
from ffkv.memory.report import _model_name, memory_index


@pytest.fixture(scope="module")
def report_atlas(planted, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("rc") / "c.txt"
    corpus.write_text("\n\n".join(["alpha tower paris . beta castle london .", "gamma river rome . tower paris ."] * 6))
    out = tmp_path_factory.mktemp("ra") / "atlas"
    mine(planted.model, corpus, out, top_k=4, batch_tokens=64, progress=False)
    return Atlas(out, model=planted.model)


def test_report_has_contents_anchors_and_every_memory(report_atlas):
    path = write_report(report_atlas, progress=False, composition_units=6, removal_keys=4)
    page = open(path).read()
    # a table of contents whose links all land on an anchor of the page
    nav = page[page.index("<nav>"): page.index("</nav>")]
    targets = re.findall(r"href='#([^']+)'", nav)
    assert {"patterns", "values", "memories"} <= set(targets)
    for t in targets:
        assert f"id='{t}'" in page
    # a readable title, not an absolute path
    title = re.search(r"<title>(.*?)</title>", page).group(1)
    assert not title.split(": ", 1)[1].startswith("/")
    # every memory of every layer is in the index scripts the page loads
    scripts = re.findall(r"<script src='([^']+)'>", page)
    a = report_atlas
    assert len(scripts) == a.n_layers
    names = set()
    for l, s in enumerate(scripts):
        text = (a.path / s).read_text()
        rows = json.loads(text[text.index("] = ") + 4: text.rstrip().rindex(";")])
        assert len(rows) == a.d_ffn
        names |= {r["m"] for r in rows}
    assert names == {f"L{l}.{i}" for l in range(a.n_layers) for i in range(a.d_ffn)}
    # the firing token is marked in the sampled memories
    assert "<mark>" in page.split("id='sampled'")[1]


def test_index_triggers_equal_the_atlas_queries(report_atlas):
    a = report_atlas
    index = memory_index(a, n_triggers=2, context=50)
    checked = 0
    for l in range(a.n_layers):
        for i in range(0, a.d_ffn, 7):
            want = a.memory_triggers(l, i, n=2, tokenizer=a.model.tokenizer)
            got = index[l][i]["t"]
            assert len(got) == len(want)
            for (ctx, fire, nxt, coef), w in zip(got, want):
                assert fire.strip() == w["last_token"].strip()
                assert w["prefix"].endswith(ctx + fire)
                assert coef == pytest.approx(w["coef"], abs=1e-4)
                checked += 1
    assert checked > 0


def test_model_name_is_readable():
    assert _model_name("/a/b/testbeds/default/model") == "default/model"
    assert _model_name("/tmp/x/gpt2-small") == "gpt2-small"
    assert _model_name("gpt2") == "gpt2"
