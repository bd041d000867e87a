"""``ffkv serve`` on mixture-of-experts models: expert sub-updates, expert switches and expert memory pages.

Tiny random Mixtral and Qwen2-MoE (shared expert) models with the default testbed's tokenizer, in process
through Starlette's ASGI test client. Every number shown is compared with a direct computation from
``expert_intervene``'s capture and ``model.values(l, e)``.
"""

from __future__ import annotations

import html
import math
import re

import pytest
import torch
from conftest import hook_count
from starlette.testclient import TestClient

import ffkv
from ffkv.models.loading import tiny_model
from ffkv.models.moe import ExpertEdit, expert_intervene
from ffkv.models.hooks import intervene
from ffkv.serve import Backend, create_app

PROMPT = "The native language of Quoux Kurte is"
FAMILIES = ["mixtral", "qwen2_moe"]


@pytest.fixture(scope="module")
def tokenizer(default_testbed, one_thread):
    return ffkv.load_model(str(default_testbed / "model")).tokenizer


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tokenizer):
    m = tiny_model(request.param, vocab=len(tokenizer), tokenizer=tokenizer)
    b = Backend(m)
    return m, b, TestClient(create_app(b), raise_server_exceptions=False)


def error_line(r) -> str:
    m = re.search(r'id="error"[^>]*>(.*?)</p>', r.text, re.S)
    return html.unescape(m.group(1)) if m else ""


def patched_experts(model) -> list[int]:
    """Layers whose experts module has a forward of its own (an expert_intervene block left open)."""
    return [l for l in model.moe_layers if "forward" in model.experts_module(l).__dict__]


@torch.no_grad()
def direct_terms(model, prompt, layer):
    """Every sub-update norm of a layer at the last token, straight from the engine: {name: (coef, weight, score)}."""
    batch = model.encode(prompt)
    t = int(batch["attention_mask"].sum()) - 1
    reads = [("coef", layer), ("ffn_in", layer)] if model.has_shared_expert(layer) else []
    with intervene(model, reads=reads) as drec, expert_intervene(model, reads=[layer]) as rec:
        model.hf(**batch)
    out = {}
    for e in range(model.n_experts(layer)):
        cap = rec[layer, e]
        rows = (cap.position == t).nonzero().reshape(-1)
        if rows.numel():
            r = int(rows[0])
            w, m = float(cap.weight[r]), cap.coef[r]
            sub = w * m[None, :] * model.values(layer, e)  # (D, F): column i is w_e m_i v_i
            for i in range(m.numel()):
                out[f"L{layer}.E{e}.{i}"] = (float(m[i]), w, float(sub[:, i].norm()))
    if model.has_shared_expert(layer):
        x = drec["ffn_in", layer][0, t]
        g = float(torch.sigmoid(model.module(layer, model.moe_spec.shared_gate)(x)))
        m = drec["coef", layer][0, t]
        sub = g * m[None, :] * model.values(layer)
        for i in range(m.numel()):
            out[f"L{layer}.{i}"] = (float(m[i]), g, float(sub[:, i].norm()))
    return out


def test_prompt_view_lists_the_routed_sub_updates(served):
    m, b, c = served
    r = c.get("/", params={"prompt": PROMPT, "top_n": "8"})
    assert r.status_code == 200, error_line(r)
    view = b.prompt_view(PROMPT, top_n=8)
    assert view["lens"][-1]["after"][0]["token"] == view["distribution"][0]["token"]
    for layer in view["layers"]:
        l = layer["layer"]
        want = direct_terms(m, PROMPT, l)
        best = sorted(want.items(), key=lambda kv: -kv[1][2])[:8]
        got = layer["sub_updates"]
        assert [s["memory"] for s in got] == [k for k, _ in best], l
        for s, (_, (coef, w, score)) in zip(got, best):
            assert abs(s["coef"] - coef) < 1e-6 and abs(s["weight"] - w) < 1e-6
            assert abs(s["score"] - score) < 1e-5 * max(1.0, score)
        routed = {x["expert"] for x in layer["experts"]}
        assert len(routed) == m.top_k and all(s["expert"] in routed for s in got if s["expert"] is not None)
        for s in got:
            assert f'href="/memory/{s["memory"]}?prompt=' in r.text
    names = [s["memory"] for l in view["layers"] for s in l["sub_updates"]]
    assert any(".E" in n for n in names)
    if m.has_shared_expert(0):  # Qwen2-MoE: the shared expert competes under its dense name
        assert set(direct_terms(m, PROMPT, 0)) & {n for n in names if ".E" not in n}


def test_switching_an_expert_memory_off_matches_a_direct_run(served):
    m, b, c = served
    view = b.prompt_view(PROMPT, top_n=5)
    subs = [s for l in view["layers"] for s in l["sub_updates"] if s["expert"] is not None][:3]
    off = [s["memory"] for s in subs]
    r = c.get("/", params={"prompt": PROMPT, "off": ",".join(off), "max_new_tokens": 4})
    assert r.status_code == 200 and 'id="switch-result"' in r.text and 'id="generation"' in r.text
    sw = b.prompt_view(PROMPT, off=off, max_new_tokens=4)["switch"]
    edits = [ExpertEdit(s["layer"], s["expert"], "off", indices=[s["index"]]) for s in subs]
    with torch.no_grad():
        before = m.next_token_probs(PROMPT)[0]
        with expert_intervene(m, edits=edits):
            after = m.next_token_probs(PROMPT)[0]
    kl = float((before * (before.log() - after.log())).sum())
    assert kl > 1e-9 and abs(sw["kl"] - kl) <= 1e-4 * kl
    top = after.topk(len(sw["after"]))
    assert [d["p"] for d in sw["after"]] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert [d["token"] for d in sw["after"]] == [m.decode([i]) for i in top.indices.tolist()]
    # Forcing one on at one position only: the change equals ExpertEdit "on" at that position.
    s = subs[0]
    last = len(view["tokens"]) - 1
    sw = b.prompt_view(PROMPT, on=[f"{s['memory']}=40"], positions=str(last), max_new_tokens=2)["switch"]
    with torch.no_grad(), expert_intervene(m, edits=[ExpertEdit(s["layer"], s["expert"], "on", value=40.0,
                                                                indices=[s["index"]], positions=[last])]):
        forced = m.next_token_probs(PROMPT)[0]
    assert sw["after"][0]["p"] == pytest.approx(float(forced.max()), rel=1e-5) and sw["kl"] > 0
    assert [d["token"] for d in sw["after"]] == [m.decode([i]) for i in forced.topk(len(sw["after"])).indices]


def test_expert_memory_page(served):
    m, b, c = served
    view = b.prompt_view(PROMPT, top_n=3)
    s = next(s for l in view["layers"] for s in l["sub_updates"] if s["expert"] is not None)
    r = c.get(f"/memory/{s['memory']}", params={"prompt": PROMPT})
    assert r.status_code == 200 and f"Memory {s['memory']}" in r.text and 'id="value-top"' in r.text
    page = b.memory_page(s["memory"], prompt=PROMPT, value_top=5)
    with torch.no_grad():
        logits = m.unembed(m.values(s["layer"], s["expert"])[:, s["index"]], norm=False).float()
    assert [t["id"] for t in page["value_top"]] == logits.topk(5).indices.tolist()
    assert [t["id"] for t in page["value_bottom"]] == (-logits).topk(5).indices.tolist()
    assert abs(page["value_norm"] - float(m.values(s["layer"], s["expert"])[:, s["index"]].detach().norm())) < 1e-6
    # Nearest values: within the same expert of the same layer, by cosine.
    V = m.values(s["layer"], s["expert"])
    cos = torch.nn.functional.cosine_similarity(V.T, V[:, s["index"]][None], dim=1)
    cos[s["index"]] = -2
    assert page["nearest"][0]["memory"] == f"L{s['layer']}.E{s['expert']}.{int(cos.argmax())}"
    assert all(n["expert"] == s["expert"] and n["layer"] == s["layer"] for n in page["nearest"])
    # Its rank for the prompt: the same as in the prompt view; unrouted tokens are NaN, never 0.
    rank = page["rank"]
    assert rank["routed"] and abs(rank["coef"] - s["coef"]) < 1e-6
    assert rank["rank"] == 1 + sum(x["score"] > s["score"] for x in view["layers"][s["layer"]]["sub_updates"])
    batch = m.encode(PROMPT)
    with torch.no_grad(), expert_intervene(m, reads=[(s["layer"], s["expert"])]) as rec:
        m.hf(**batch)
    dense = rec[s["layer"], s["expert"]].dense()[0, :, s["index"]]
    for row, want in zip(rank["per_position"], dense.tolist()):
        assert row["routed"] == (not math.isnan(want))
        assert (math.isnan(row["coef"]) and row["rank"] is None) if math.isnan(want) else \
            abs(row["coef"] - want) < 1e-6
    # An expert memory at a token it is not routed to says so.
    e_off = next(e for e in range(m.n_experts(s["layer"]))
                 if e not in {x["expert"] for x in view["layers"][s["layer"]]["experts"]})
    r = c.get(f"/memory/L{s['layer']}.E{e_off}.0", params={"prompt": PROMPT})
    assert r.status_code == 200 and 'id="not-routed"' in r.text
    assert b.memory_page(f"L{s['layer']}.E{e_off}.0", prompt=PROMPT)["rank"]["rank"] is None


@pytest.mark.parametrize("path,params,message", [
    ("/memory/L1.E9.3", {}, "expert 9 is out of range for layer 1 (4 experts)"),
    ("/memory/L1.E1.999", {}, "index 999 is out of range"),
    ("/", {"prompt": PROMPT, "off": "L0.E7.1"}, "expert 7 is out of range"),
    ("/", {"prompt": PROMPT, "on": "L1.E-1.2=3"}, "not a memory name"),
    ("/search", {"near": "L5.E1.1"}, "layer 5 is out of range"),
])
def test_an_expert_that_does_not_exist_is_a_400(served, path, params, message):
    m, b, c = served
    r = c.get(path, params=params)
    assert r.status_code == 400
    line = error_line(r)
    assert message in line and "\n" not in line.strip() and line.strip().endswith(".")


def test_dense_names_on_expert_only_layers(served):
    m, b, c = served
    r = c.get("/memory/L1.3")
    if m.has_shared_expert(1):
        assert r.status_code == 200 and "shared expert" in r.text
    else:
        assert r.status_code == 400 and "no dense FFN" in error_line(r)


def test_no_hook_and_no_patched_forward_is_left_behind(served, monkeypatch):
    m, b, c = served
    n = hook_count(m)
    forwards = [m.experts_module(l).forward for l in m.moe_layers]
    reqs = [("/", {"prompt": PROMPT, "top_n": "3"}),
            ("/", {"prompt": PROMPT, "off": "L0.E1.2,L1.E0.5", "positions": "1,2", "max_new_tokens": "2"}),
            ("/", {"prompt": PROMPT, "on": "L1.E2.4=3", "max_new_tokens": "2"}),
            ("/memory/L1.E3.7", {"prompt": PROMPT}), ("/search", {"near": "L0.E0.1", "n": "3"}),
            ("/search", {"token": "Dutch", "n": "3"}),
            ("/memory/L1.E9.3", {}), ("/", {"prompt": PROMPT, "off": "L0.E7.1"})]
    codes = [c.get(p, params=q).status_code for p, q in reqs * 3]
    assert codes.count(200) == 18 and codes.count(400) == 6
    # A failure inside a forward pass with expert reads and edits in place leaves nothing behind either.
    monkeypatch.setattr(m.hf.lm_head, "forward", lambda *a, **k: 1 / 0)
    for p, q in reqs[:4]:
        assert c.get(p, params=q).status_code == 500
    monkeypatch.undo()
    assert hook_count(m) == n and not patched_experts(m)
    assert [m.experts_module(l).forward for l in m.moe_layers] == forwards
    assert c.get("/", params={"prompt": PROMPT}).status_code == 200


@pytest.mark.parametrize("model_type", ["olmoe", "qwen3_moe"])
def test_the_other_moe_families_are_served(tokenizer, model_type):
    m = tiny_model(model_type, vocab=len(tokenizer), tokenizer=tokenizer)
    b = Backend(m)
    c = TestClient(create_app(b), raise_server_exceptions=False)
    n = hook_count(m)
    view = b.prompt_view(PROMPT, top_n=4)
    l = view["layers"][-1]
    want = sorted(direct_terms(m, PROMPT, l["layer"]).items(), key=lambda kv: -kv[1][2])[:4]
    assert [s["memory"] for s in l["sub_updates"]] == [k for k, _ in want]
    s = l["sub_updates"][0]
    r = c.get("/", params={"prompt": PROMPT, "off": s["memory"], "max_new_tokens": 2})
    assert r.status_code == 200 and 'id="switch-result"' in r.text, error_line(r)
    r = c.get(f"/memory/{s['memory']}", params={"prompt": PROMPT})
    assert r.status_code == 200 and re.search(r'id="rank-value">1<', r.text)
    r = c.get("/trace", params={"prompt": PROMPT, "subject": "Quoux Kurte", "samples": 2})
    assert r.status_code == 200 and 'id="neurons-note"' in r.text, error_line(r)
    assert hook_count(m) == n and not patched_experts(m)


def test_knowledge_neurons_of_routed_experts_on_the_trace_page(tokenizer):
    from ffkv.locate.neurons import knowledge_neurons

    m = tiny_model("mixtral", vocab=len(tokenizer), tokenizer=tokenizer)
    b = Backend(m)
    n = hook_count(m)
    view = b.trace(PROMPT, "Quoux Kurte", samples=2)
    assert "heaviest routed expert" in view["neurons_note"]
    experts = {int(k[1:].split(".")[0]): int(k.split(".E")[1]) for k in
               [p.strip() for p in view["neurons_note"].split(": ")[1].split(",")]}
    want = knowledge_neurons(m, [PROMPT], view["answer"], experts=experts, layers=sorted(experts))
    assert [r["memory"] for r in view["neurons"]] == [str(x.memory) for x in want.neurons]
    assert all(".E" in r["memory"] for r in view["neurons"])
    assert hook_count(m) == n and not patched_experts(m)


def test_rome_from_the_page_edits_the_routed_expert_and_undoes(tokenizer, tmp_path):
    # Mixtral's FFNs are routed experts only: ROME edits the heaviest routed expert's W_out (expert="top",
    # statistics over the tokens routed to it); MEMIT, which needs its experts named, is refused in one line.
    m = tiny_model("mixtral", vocab=len(tokenizer), tokenizer=tokenizer)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join([PROMPT + " Dutch.", "The native language of Ana Boll is French."] * 40))
    # a random tiny model's block outputs are ~1e-3: ROME's norm-relative clamp and decay are lifted
    hp = {"layer": 0, "stats_tokens": 800, "prefixes": [], "corpus": str(corpus), "clamp_norm_factor": 1e4,
          "max_update_ratio": 1e6, "v_weight_decay": 0.0, "kl_factor": 0.0, "v_num_grad_steps": 30}
    b = Backend(m, state_dir=tmp_path / "state", edit_hparams=hp)
    c = TestClient(create_app(b), raise_server_exceptions=False)
    weights = {k: v.clone() for k, v in m.hf.state_dict().items()}
    r = c.post("/edit", data={"prompt": PROMPT, "subject": "Quoux Kurte", "target": "Dutch", "method": "memit"})
    assert r.status_code == 400 and "only routed experts" in error_line(r)
    assert all(torch.equal(weights[k], v) for k, v in m.hf.state_dict().items()) and len(b.journal) == 0
    target = m.answer_id("Dutch")
    p0 = float(m.next_token_probs(PROMPT)[0, target])
    r = c.post("/edit", data={"prompt": PROMPT, "subject": "Quoux Kurte", "target": "Dutch", "method": "rome"})
    assert r.status_code == 200, error_line(r)
    entry = b.journal.entries[-1]
    assert entry.expert is not None  # the edit landed on one routed expert's W_out
    changed = [k for k, v in m.hf.state_dict().items() if not torch.equal(weights[k], v)]
    assert changed == [k for k in changed if "experts" in k] and changed
    assert float(m.next_token_probs(PROMPT)[0, target]) > p0
    r = c.post("/undo", data={"n": 1})
    assert r.status_code in (200, 303), error_line(r)
    assert all(torch.equal(weights[k], v) for k, v in m.hf.state_dict().items())
