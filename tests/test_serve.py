"""``ffkv serve``: the memory debugger's views, its validation, its hooks and its journal, in process.

The app runs on the shipped default testbed (6-layer GPT-2) with an atlas mined once per module over a
small slice of the testbed world's text; requests go through Starlette's ASGI test client. One test starts
the real command in a subprocess and reads the URL from its first stdout line.
"""

from __future__ import annotations

import html
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import hook_count
from starlette.testclient import TestClient

import ffkv
from ffkv.errors import FfkvError
from ffkv.models.hooks import Intervention, intervene
from ffkv.serve import Backend, create_app
from ffkv.serve.cli import check_host

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model(default_testbed, one_thread):
    return ffkv.load_model(str(default_testbed / "model"))


@pytest.fixture(scope="module")
def atlas_dir(model, tmp_path_factory):
    from ffkv.memory import mine
    from ffkv.testbed import generate_world

    d = tmp_path_factory.mktemp("serve-atlas")
    (d / "corpus.txt").write_text("\n\n".join(generate_world(0, "default").documents()[:80]) + "\n")
    mine(model, d / "corpus.txt", d / "atlas", top_k=8, progress=False)
    return d / "atlas"


@pytest.fixture(scope="module")
def backend(model, atlas_dir, tmp_path_factory):
    return Backend(model, atlas=atlas_dir, state_dir=tmp_path_factory.mktemp("serve-state"),
                   edit_hparams={"stats_tokens": 20_000})


@pytest.fixture(scope="module")
def client(backend):
    return TestClient(create_app(backend), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def case(default_testbed):
    from ffkv.io import read_json

    c = read_json(default_testbed / "data" / "counterfact.json")[0]
    rw = c["requested_rewrite"]
    return {"prompt": rw["prompt"].format(rw["subject"]), "subject": rw["subject"],
            "true": rw["target_true"]["str"], "new": rw["target_new"]["str"],
            "paraphrases": c["paraphrase_prompts"][:2], "neighbours": c["neighborhood_prompts"][:2]}


def text(r) -> str:
    """A page's visible text, tags removed and entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", r.text))


def error_line(r) -> str:
    m = re.search(r'id="error"[^>]*>(.*?)</p>', r.text, re.S)
    return html.unescape(m.group(1)) if m else ""


def top_token(model, prompt) -> str:
    return model.decode([int(model.next_token_probs(prompt)[0].argmax())])


# --------------------------------------------------------------------------------------------------- views
def test_root_serves_the_app_and_its_own_assets(client):
    r = client.get("/")
    assert r.status_code == 200 and 'id="prompt-form"' in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN: every asset is the package's
    css = client.get("/static/app.css")
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]


def test_prompt_view_shows_the_top_token_lens_and_sub_updates(client, backend, model, case):
    r = client.get("/", params={"prompt": case["prompt"]})
    assert r.status_code == 200
    top = top_token(model, case["prompt"])
    assert top.strip() and top in text(r)
    assert re.search(r'id="top-token"><td class="t">' + re.escape(html.escape(top, quote=True)), r.text)
    view = backend.prompt_view(case["prompt"])
    assert len(view["lens"]) == model.n_layers
    # After the last FFN the lens is the model's own head: its top token and probability are the output's.
    assert view["lens"][-1]["after"][0]["token"] == top
    assert abs(view["lens"][-1]["after"][0]["p"] - view["distribution"][0]["p"]) < 1e-5
    # Before the FFN, the lens reads the residual without the FFN's write: a different distribution.
    assert any(abs(l["before"][0]["p"] - l["after"][0]["p"]) > 1e-4 for l in view["lens"])
    links = set(re.findall(r'href="/memory/(L\d+\.\d+)\?prompt=', r.text))
    assert len(links) >= model.n_layers and all(re.fullmatch(r"L[0-5]\.\d+", m) for m in links)


def test_switching_memories_off_matches_a_direct_intervention(client, backend, model, case):
    view = backend.prompt_view(case["prompt"], top_n=5)
    subs = [s for l in view["layers"] for s in l["sub_updates"][:2]]
    off = [s["memory"] for s in subs]
    r = client.get("/", params={"prompt": case["prompt"], "off": ",".join(off), "max_new_tokens": 8})
    assert r.status_code == 200 and 'id="switch-result"' in r.text and 'id="generation"' in r.text
    sw = backend.prompt_view(case["prompt"], off=off, max_new_tokens=8)["switch"]
    edits = [Intervention("coef", s["layer"], "off", indices=[s["index"]]) for s in subs]
    with torch.no_grad(), intervene(model, edits=edits):
        after = model.next_token_probs(case["prompt"])[0]
    assert abs(sw["after"][0]["p"] - float(after.max())) < 1e-5
    assert sw["kl"] > 1e-4
    assert f"{sw['kl']:.4g}" in text(r)
    # Positions: the top layer's FFN at position t writes only into the logits at t, so switching its
    # memories at the last position is switching them everywhere, and at the first position changes nothing.
    top = [s["memory"] for s in view["layers"][-1]["sub_updates"][:3]]
    last = len(view["tokens"]) - 1
    every = backend.prompt_view(case["prompt"], off=top, max_new_tokens=0)["switch"]
    at_last = backend.prompt_view(case["prompt"], off=top, positions=str(last), max_new_tokens=0)["switch"]
    at_first = backend.prompt_view(case["prompt"], off=top, positions="0", max_new_tokens=3)["switch"]
    assert every["kl"] > 1e-6 and abs(at_last["kl"] - every["kl"]) < 1e-6 * max(1.0, every["kl"])
    assert at_first["kl"] < 1e-9 and at_first["positions"] == "0"


def test_forcing_a_memory_on_changes_the_prediction(backend, case):
    base = backend.prompt_view(case["prompt"])
    mem = base["layers"][-1]["sub_updates"][0]
    sign = -1 if mem["coef"] > 0 else 1  # push against what it does now
    sw = backend.prompt_view(case["prompt"], on=[f"{mem['memory']}={sign * 200}"], max_new_tokens=0)["switch"]
    assert sw["after"][0]["token"] != base["distribution"][0]["token"] and sw["generation"] is None


def test_memory_page_with_atlas(client, backend, model, atlas_dir, case):
    view = backend.prompt_view(case["prompt"])
    top = view["layers"][3]["sub_updates"][0]
    r = client.get(f"/memory/{top['memory']}", params={"prompt": case["prompt"]})
    assert r.status_code == 200 and f"Memory {top['memory']}" in r.text
    # Its rank for the prompt: the layer's top sub-update ranks first, with its coefficient.
    assert re.search(r'id="rank-value">1<', r.text)
    page = backend.memory_page(top["memory"], prompt=case["prompt"])
    assert abs(page["rank"]["coef"] - top["coef"]) < 1e-4 and page["rank"]["rank"] == 1
    # Triggers: the atlas's coefficients, with the firing token (the prefix's last token) marked.
    from ffkv.memory import Atlas

    want = Atlas(atlas_dir, model=model).memory_triggers(3, top["index"], n=10)
    marks = re.findall(r"<mark>(.*?)</mark>", r.text, re.S)
    assert len(marks) >= len(want) and html.unescape(marks[0]) == want[0]["last_token"]
    assert f"{want[0]['coef']:.3g}" in r.text
    assert page["atlas"]["triggers"][0]["before"] + page["atlas"]["triggers"][0]["firing"] == want[0]["prefix"]
    # Value tokens: the top token is the argmax of E v_i.
    logits = model.unembed(model.values(3)[:, top["index"]], norm=False)
    assert page["value_top"][0]["id"] == int(logits.argmax())
    assert page["value_bottom"][0]["id"] == int(logits.argmin())
    assert page["atlas"]["pattern"] is None or "label" in page["atlas"]["pattern"]
    assert page["nearest"] and all(n["memory"] != top["memory"] for n in page["nearest"])


def test_memory_page_without_atlas_still_shows_the_value(model):
    c = TestClient(create_app(Backend(model)), raise_server_exceptions=False)
    r = c.get("/memory/L2.5")
    assert r.status_code == 200 and 'id="no-atlas"' in r.text and 'id="value-top"' in r.text
    r = c.get("/search", params={"q": "language"})
    assert r.status_code == 400 and "needs an atlas" in error_line(r)


def test_an_atlas_of_another_model_is_refused(model, atlas_dir):
    w = model.value_param(0)
    saved = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    try:
        with pytest.raises(FfkvError, match="was mined on another model"):
            Backend(model, atlas=atlas_dir)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    with pytest.raises(FfkvError, match="not an atlas folder"):
        Backend(model, atlas=atlas_dir.parent)


def test_search_views(client, backend, model):
    r = client.get("/search", params={"token": "Dutch", "n": 5})
    assert r.status_code == 200
    rows = backend.search_promotes("Dutch", n=5)["rows"]
    tid = model.answer_id("Dutch")
    with torch.no_grad():  # p_i(t) = softmax(E v_i)[t] of every memory, the brute-force way
        p = torch.stack([torch.softmax(model.unembed(model.values(l).T, norm=False), -1)[:, tid]
                         for l in range(model.n_layers)])
    assert (rows[0]["layer"], rows[0]["index"]) == divmod(int(p.argmax()), model.d_ffn)
    assert f'href="/memory/{rows[0]["memory"]}"' in r.text
    near = backend.search_nearest("L3.17", n=3)["rows"]
    v = model.values(3)[:, 17]
    cos = torch.nn.functional.cosine_similarity(model.values(near[0]["layer"]).T, v[None], dim=1)
    assert abs(float(cos[near[0]["index"]]) - near[0]["cosine"]) < 1e-4
    res = backend.search_text("native language", n=10)
    assert res["rows"] and res["matched"] >= len(res["rows"])
    assert all("native language" in (t["before"] + t["firing"]).lower() for t in res["rows"])
    assert [t["coef"] for t in res["rows"]] == sorted((t["coef"] for t in res["rows"]), reverse=True)
    assert client.get("/search", params={"q": "native language"}).status_code == 200


def test_trace_and_knowledge_neurons(client, backend, model, case):
    r = client.get("/trace", params={"prompt": case["prompt"], "subject": case["subject"],
                                     "paraphrases": "\n".join(case["paraphrases"])})
    assert r.status_code == 200
    for kind in ("hidden", "mlp", "attn"):
        assert f'id="trace-{kind}"' in r.text
    view = backend.trace(case["prompt"], case["subject"], paraphrases=case["paraphrases"])
    p = float(model.next_token_probs(case["prompt"])[0].max())
    for t in view["traces"].values():
        assert abs(t["high_score"] - p) < 1e-4 and t["low_score"] < t["high_score"]
        assert f"clean P = <b class=\"clean\">{t['high_score']:.3g}</b>" in r.text
        assert f"corrupted P = <b class=\"corrupted\">{t['low_score']:.3g}</b>" in r.text
    assert view["answer"].strip() == top_token(model, case["prompt"]).strip()
    for n in view["neurons"]:
        assert f'href="/memory/{n["memory"]}?prompt=' in r.text


def test_edit_undo_and_restart_keep_the_journal(client, backend, model, case, default_testbed):
    before = top_token(model, case["prompt"])
    weights = {k: v.clone() for k, v in model.hf.state_dict().items()}
    r = client.post("/edit", data={"prompt": case["prompt"], "subject": case["subject"], "target": case["new"],
                                   "paraphrases": "\n".join(case["paraphrases"]),
                                   "neighbours": "\n".join(case["neighbours"])})
    assert r.status_code == 200 and 'id="edit-result"' in r.text
    assert top_token(model, case["prompt"]).strip() == case["new"]
    assert len(re.findall(r'<tr class="paraphrases">', r.text)) == 2
    assert len(re.findall(r'<tr class="neighbours">', r.text)) == 2
    assert (backend.journal_path / "journal.json").exists()
    assert case["new"] in text(client.get("/", params={"prompt": case["prompt"]}))
    # A restart: a fresh model and backend on the same state folder replay the journal.
    fresh = ffkv.load_model(str(default_testbed / "model"))
    again = Backend(fresh, state_dir=backend.state_dir)
    assert len(again.journal) == len(backend.journal) == 1
    assert top_token(fresh, case["prompt"]).strip() == case["new"]
    r = client.post("/undo", data={"n": "1"}, follow_redirects=False)
    assert r.status_code == 303
    assert "undid 1 journal entry" in text(client.get(r.headers["location"]))
    assert top_token(model, case["prompt"]) == before
    assert all(torch.equal(weights[k], v) for k, v in model.hf.state_dict().items())
    assert len(Backend(ffkv.load_model(str(default_testbed / "model")), state_dir=backend.state_dir).journal) == 0


def test_counterfact_cases_fill_the_edit_form(model, default_testbed, client):
    b = Backend(model, cases=default_testbed / "data" / "counterfact.json")
    c = TestClient(create_app(b), raise_server_exceptions=False)
    r = c.get("/edit", params={"case": "1"})
    from ffkv.io import read_json

    rec = read_json(default_testbed / "data" / "counterfact.json")[1]
    rw = rec["requested_rewrite"]
    assert r.status_code == 200 and 'id="case-form"' in r.text
    page = html.unescape(r.text)
    assert f'value="{rw["prompt"].format(rw["subject"])}"' in page and f'value="{rw["target_new"]["str"]}"' in page
    assert rec["paraphrase_prompts"][0] in page and rec["neighborhood_prompts"][0] in page
    r = c.get("/edit", params={"case": str(10 ** 6)})
    assert r.status_code == 400 and "case 1000000 is out of range" in error_line(r)
    r = client.get("/edit", params={"case": "0"})
    assert r.status_code == 400 and "--cases FILE" in error_line(r)


def test_memit_edit_is_one_journal_row_and_undoes_whole(backend, model, case):
    before = top_token(model, case["prompt"])
    backend.edit(case["prompt"], case["subject"], case["new"], method="memit")
    assert len(backend.journal) == len(backend.journal.entries[0].hparams["layers"]) > 1
    assert len(backend.journal_rows()) == 1
    entries = len(backend.journal)
    assert backend.undo(1) == entries
    assert len(backend.journal) == 0 and top_token(model, case["prompt"]) == before


@pytest.fixture(scope="module")
def family_models(model):
    """A tiny random model of every supported family, with the testbed's tokenizer (vocabulary sized to it)."""
    from ffkv.models.adapters import supported_model_types
    from ffkv.models.loading import tiny_model
    from ffkv.models.model import MemoryModel

    n = len(model.tokenizer)
    return {mt: MemoryModel(tiny_model(mt, vocab=n).hf, model.tokenizer, name_or_path=f"tiny-{mt}")
            for mt in supported_model_types()}


def test_every_family_is_served(family_models):
    prompt = "The native language of Quoux Kurte is"
    for mt, m in family_models.items():
        b = Backend(m)
        c = TestClient(create_app(b), raise_server_exceptions=False)
        n = hook_count(m)
        r = c.get("/", params={"prompt": prompt, "on": "L1.3=50", "off": "L0.2", "max_new_tokens": 3})
        assert r.status_code == 200, (mt, error_line(r))
        v = b.prompt_view(prompt, on=["L1.3=50"], off=["L0.2"], max_new_tokens=3)
        assert v["lens"][-1]["after"][0]["token"] == v["distribution"][0]["token"], mt
        assert v["switch"]["kl"] > 0, mt
        assert c.get("/memory/L1.3", params={"prompt": prompt}).status_code == 200, mt
        r = c.get("/trace", params={"prompt": prompt, "subject": "Quoux Kurte", "samples": 2, "neurons": "0"})
        assert r.status_code == 200 and 'id="trace-attn"' in r.text, (mt, error_line(r))
        assert hook_count(m) == n, mt


# --------------------------------------------------------------------------------------------------- behaviour
BAD = [
    ("/", {"prompt": ""}, "the prompt is empty"),
    ("/", {"prompt": "x " * 1500}, "characters"),
    ("/", {"prompt": "the " * 300}, "tokens"),
    ("/", {"prompt": "The", "top_n": "999"}, "top-n 999 is out of range"),
    ("/", {"prompt": "The", "top_n": "ten"}, "top-n must be an integer"),
    ("/", {"prompt": "The", "off": "L3.17", "max_new_tokens": "1000"}, "generation length 1000 is out of range"),
    ("/", {"prompt": "The", "off": "L9.1"}, "layer 9 is out of range"),
    ("/", {"prompt": "The", "off": "L1.99999"}, "index 99999 is out of range"),
    ("/", {"prompt": "The", "off": "banana"}, "not a memory name"),
    ("/", {"prompt": "The", "on": "L1.5"}, "has no value"),
    ("/", {"prompt": "The", "on": "L1.5=abc"}, "not a number"),
    ("/", {"prompt": "The", "on": "L1.5=nan"}, "not finite"),
    ("/", {"prompt": "The", "off": "L1.5", "positions": "0,7"}, "outside the 1-token prompt"),
    ("/", {"prompt": "The", "off": "L1.5", "positions": "first"}, "not token positions"),
    ("/", {"prompt": "The", "off": ",".join(f"L1.{i}" for i in range(70))}, "at most 64"),
    ("/memory/L3.E1.2", {}, "names an expert"),
    ("/memory/zz", {}, "not a memory name"),
    ("/memory/L1.3", {"n": "0"}, "triggers 0 is out of range"),
    ("/search", {"token": "zzqqxxyy"}, "not in the vocabulary"),
    ("/search", {"near": "L8.1"}, "layer 8 is out of range"),
    ("/search", {"q": "x" * 300}, "characters"),
    ("/trace", {"prompt": "The capital of France is", "subject": "Germany"}, "does not occur in prompt"),
    ("/trace", {"prompt": "The capital of France is", "subject": ""}, "no subject given"),
    ("/trace", {"prompt": "The capital of France is", "subject": "France", "samples": "500"}, "samples 500"),
]


@pytest.mark.parametrize("path,params,message", BAD, ids=[f"{p}:{m}" for p, _, m in BAD])
def test_bad_requests_show_their_one_line_reason(client, path, params, message):
    r = client.get(path, params=params)
    assert r.status_code == 400
    line = error_line(r)
    assert message in line and "\n" not in line.strip() and line.strip().endswith(".")


@pytest.mark.parametrize("data,message", [
    ({"prompt": "The capital of France is", "subject": "France", "target": ""}, "has no target"),
    ({"prompt": "The capital of France is", "subject": "Spain", "target": "Rome"}, "does not occur"),
    ({"prompt": "The capital of France is", "subject": "France", "target": "Rome", "method": "kn9"},
     "unknown edit method"),
])
def test_bad_edits_are_refused_and_change_nothing(client, backend, model, data, message):
    weights = {k: v.clone() for k, v in model.hf.state_dict().items()}
    r = client.post("/edit", data=data)
    assert r.status_code == 400 and message in error_line(r)
    assert all(torch.equal(weights[k], v) for k, v in model.hf.state_dict().items())
    r = client.post("/undo", data={"n": "1"})
    assert r.status_code == 400 and "journal is empty" in error_line(r)


def test_internal_errors_are_shown_not_swallowed(client, model, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("the head is broken")

    n = hook_count(model)
    monkeypatch.setattr(model.hf.lm_head, "forward", boom)
    r = client.get("/", params={"prompt": "The capital of France is", "off": "L1.5"})
    assert r.status_code == 500 and "RuntimeError: the head is broken" in error_line(r)
    assert hook_count(model) == n


def test_hook_count_is_unchanged_after_hundreds_of_requests(client, model, case, monkeypatch):
    n = hook_count(model)
    reqs = [("/", {"prompt": case["prompt"], "top_n": "3"}),
            ("/", {"prompt": case["prompt"], "off": "L2.7,L5.1", "positions": "1,2", "max_new_tokens": "2"}),
            ("/", {"prompt": case["prompt"], "on": "L4.4=3", "max_new_tokens": "2"}),
            ("/memory/L3.17", {"prompt": case["prompt"]}),
            ("/search", {"near": "L1.1", "n": "3"})] + [(p, q) for p, q, _ in BAD[:12]]
    codes = []
    for i in range(200):
        path, params = reqs[i % len(reqs)]
        codes.append(client.get(path, params=params).status_code)
    assert codes.count(200) >= 50 and codes.count(400) >= 100
    # A failure in the middle of a forward pass (hooks registered) leaves none behind either.
    monkeypatch.setattr(model.hf.lm_head, "forward", lambda *a, **k: 1 / 0)
    for _ in range(5):
        assert client.get("/", params={"prompt": case["prompt"], "off": "L1.5"}).status_code == 500
    monkeypatch.undo()
    assert hook_count(model) == n
    assert client.get("/", params={"prompt": case["prompt"]}).status_code == 200


def test_prompt_view_latency(client, case, capsys):
    """The prompt view on the testbed (6 layers, d_ffn 512) must answer well under a second."""
    client.get("/", params={"prompt": case["prompt"]})
    times = []
    for _ in range(10):
        t = time.perf_counter()
        assert client.get("/", params={"prompt": case["prompt"]}).status_code == 200
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    with capsys.disabled():
        print(f"\n[serve] prompt view latency on the testbed: median {1000 * med:.0f} ms, "
              f"max {1000 * max(times):.0f} ms over {len(times)} requests")
    assert med < 1.0


def test_foreign_hosts_and_cross_site_posts_are_refused(backend):
    app = create_app(backend, allowed_hosts=["127.0.0.1", "localhost"])
    c = TestClient(app, base_url="http://127.0.0.1:8765")
    assert c.get("/api/info").status_code == 200
    r = c.get("/api/info", headers={"host": "evil.example:8765"})
    assert r.status_code == 403 and "not this server's" in r.text
    r = c.post("/undo", data={"n": "1"}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "may not post" in r.text
    r = c.post("/undo", data={"n": "1"}, headers={"origin": "http://127.0.0.1:8765"})
    assert r.status_code == 400 and "journal is empty" in error_line(r)


def test_only_loopback_unless_allowed(capsys):
    check_host("127.0.0.1", False)
    check_host("localhost", False)
    check_host("::1", False)
    with pytest.raises(FfkvError, match="refusing to listen on 0.0.0.0"):
        check_host("0.0.0.0", False)
    check_host("0.0.0.0", True)
    assert "WARNING" in capsys.readouterr().err


def test_serve_command_prints_its_url_first(default_testbed, tmp_path, case):
    """The real command in a subprocess: the URL is the first stdout line, GET / and /?prompt= answer."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ffkv.serve", str(default_testbed / "model"), "--port", "0",
                             "--state", str(tmp_path / "state")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", line), (line, proc.stderr.read() if proc.poll() else "")
        with urllib.request.urlopen(line, timeout=30) as r:
            assert r.status == 200 and 'id="prompt-form"' in r.read().decode()
        with urllib.request.urlopen(line + "?" + urllib.parse.urlencode({"prompt": case["prompt"]}), timeout=30) as r:
            assert r.status == 200 and case["true"] in html.unescape(r.read().decode())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    refused = subprocess.run([sys.executable, "-m", "ffkv.serve", str(default_testbed / "model"), "--host",
                              "0.0.0.0"], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().startswith("ffkv: error: refusing to listen on 0.0.0.0")
