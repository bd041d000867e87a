"""``ffkv serve`` in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

The tests start the server on 127.0.0.1 (a free port, in a thread) over the shipped default testbed, click
through the views as a user would, and save a screenshot of every view to docs/figures/serve-*.png (the
pictures in docs/serve.md). Skipped, with the reason, where the system Chromium or Playwright is missing.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import ffkv
from ffkv.memory.subupdates import sub_updates, switch_effect
from ffkv.serve import Backend, create_app, make_server

CHROMIUM = Path("/usr/bin/chromium")
FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"

if not CHROMIUM.exists():
    pytest.skip(f"the browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the browser tests need playwright (pip install playwright)")


@pytest.fixture(scope="module")
def model(default_testbed, one_thread):
    return ffkv.load_model(str(default_testbed / "model"))


@pytest.fixture(scope="module")
def cases(default_testbed):
    from ffkv.io import read_json

    return read_json(default_testbed / "data" / "counterfact.json")


@pytest.fixture(scope="module")
def server(model, default_testbed, tmp_path_factory):
    from ffkv.memory import mine
    from ffkv.testbed import generate_world

    d = tmp_path_factory.mktemp("browser")
    (d / "corpus.txt").write_text("\n\n".join(generate_world(0, "default").documents()[:80]) + "\n")
    mine(model, d / "corpus.txt", d / "atlas", top_k=8, progress=False)
    backend = Backend(model, atlas=d / "atlas", state_dir=d / "state", edit_hparams={"stats_tokens": 20_000},
                      cases=default_testbed / "data" / "counterfact.json")
    ready = threading.Event()
    app = create_app(backend, allowed_hosts=["127.0.0.1", "localhost"])  # as `ffkv serve` on loopback
    srv = make_server(app, "127.0.0.1", 0, on_start=lambda url: ready.set())
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    assert ready.wait(60), "the server did not start"
    yield srv.url.rstrip("/")
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    pg.set_default_timeout(60_000)
    yield pg
    pg.close()


def shot(page, name: str):
    FIGURES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(FIGURES / f"serve-{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def flip(model, cases):
    """A testbed prompt and a memory (its layer's top sub-update) whose switch-off changes the top token."""
    for c in cases[:60]:
        rw = c["requested_rewrite"]
        prompt = rw["prompt"].format(rw["subject"])
        for layer in sub_updates(model, prompt, top_n=1)["layers"]:
            s = layer["sub_updates"][0]
            eff = switch_effect(model, prompt, off=[(s["layer"], s["index"])], top=1)
            if eff["before"][0]["token"] != eff["after"][0]["token"]:
                return {"prompt": prompt, "memory": s["memory"], "layer": s["layer"],
                        "before": eff["before"][0]["token"], "after": eff["after"][0]["token"]}
    pytest.fail("no testbed prompt of the first 60 has a single memory whose switch-off changes the prediction")


def top(page, selector: str) -> str:
    return page.locator(selector).first.inner_text().strip()


def test_prompt_sub_updates_memory_page_switch_off(page, server, flip):
    page.goto(server + "/")
    page.fill("#prompt", flip["prompt"])
    page.click("#run")
    page.wait_for_selector("#prediction")
    assert top(page, "#top-token td.t") == flip["before"].strip()
    shot(page, "prompt")
    # The memory's row among its layer's sub-updates opens its page.
    page.locator(f"#layer-{flip['layer']}").get_by_role("link", name=flip["memory"], exact=True).click()
    page.wait_for_selector("#memory-name")
    assert page.inner_text("#memory-name") == f"Memory {flip['memory']}"
    assert page.inner_text("#rank-value") == "1"
    assert page.locator("#triggers mark").count() > 0  # the firing token is marked
    shot(page, "memory")
    page.click("#switch-off")
    page.wait_for_selector("#switch-result")
    assert top(page, "#top-token td.t") == flip["before"].strip()
    assert top(page, "#after-top td.t") == flip["after"].strip() != flip["before"].strip()
    assert float(page.inner_text("#kl")) > 0
    assert page.locator("#generation").count() == 1
    shot(page, "switch")


def test_tick_memories_in_the_prompt_view(page, server, flip):
    page.goto(server + "/?prompt=" + flip["prompt"])
    page.locator(f"#layer-{flip['layer']} input[type=checkbox][value='{flip['memory']}']").check()
    page.click("#switch-ticked")
    page.wait_for_selector("#switch-result")
    assert top(page, "#after-top td.t") == flip["after"].strip()


def test_trace_a_fact(page, server, cases, model):
    rw = cases[0]["requested_rewrite"]
    prompt = rw["prompt"].format(rw["subject"])
    page.goto(server + "/trace")
    page.fill("#trace-prompt", prompt)
    page.fill("#trace-subject", rw["subject"])
    page.fill("textarea[name=paraphrases]", "\n".join(cases[0]["paraphrase_prompts"][:2]))
    page.click("#trace-go")
    page.wait_for_selector("#traces")
    for kind in ("hidden", "mlp", "attn"):
        t = page.locator(f"#trace-{kind}")
        clean, corrupted = float(t.locator(".clean").inner_text()), float(t.locator(".corrupted").inner_text())
        assert clean > corrupted
        assert t.locator("td").count() == len(model.token_ids(prompt)) * model.n_layers
    shot(page, "trace")
    links = page.locator("#neurons a.mem")
    if links.count():
        name = links.first.inner_text()
        links.first.click()
        page.wait_for_selector("#memory-name")
        assert page.inner_text("#memory-name") == f"Memory {name}"


def test_edit_a_fact_then_undo(page, server, cases):
    c = cases[0]
    rw = c["requested_rewrite"]
    prompt = rw["prompt"].format(rw["subject"])
    true, new = rw["target_true"]["str"], rw["target_new"]["str"]
    page.goto(server + "/?prompt=" + prompt)
    assert top(page, "#top-token td.t") == true
    page.goto(server + "/edit")
    page.fill("#case", "0")  # the form filled from the testbed's CounterFact case 0
    page.click("#case-go")
    page.wait_for_selector("#edit-form")
    assert page.input_value("#edit-prompt") == prompt and page.input_value("#edit-target") == new
    assert page.input_value("textarea[name=paraphrases]").splitlines() == c["paraphrase_prompts"]
    page.fill("textarea[name=neighbours]", "\n".join(c["neighborhood_prompts"][:3]))
    page.click("#edit-go")
    page.wait_for_selector("#edit-result")
    assert page.locator("#journal-table tr").count() == 2
    assert page.locator("tr.edit-prompt .after-top").inner_text().split()[0] == new
    shot(page, "edit")
    page.click("#see-prompt")
    page.wait_for_selector("#prediction")
    assert top(page, "#top-token td.t") == new
    page.goto(server + "/edit")
    page.click("#undo")
    page.wait_for_selector("#message")
    assert "undid 1" in page.inner_text("#message") and page.locator("#journal-empty").count() == 1
    shot(page, "journal")
    page.goto(server + "/?prompt=" + prompt)
    assert top(page, "#top-token td.t") == true


def test_search_and_errors(page, server):
    page.goto(server + "/search")
    page.fill("#search-token", "Dutch")
    page.click("#search-token-go")
    page.wait_for_selector("#results")
    first = page.locator("#results a.mem").first
    assert first.count() == 1
    shot(page, "search")
    page.goto(server + "/search?q=native language")
    assert page.locator("#results mark").count() > 0
    shot(page, "search-text")
    page.goto(server + "/?prompt=The&off=L9.1")
    assert "layer 9 is out of range" in page.inner_text("#error")
    shot(page, "error")
