"""ffkv.edit: ROME's closed form, the journal (undo, save, replay), refusals, statistics, MEMIT, KN, CLI.

Models are fresh planted models (2 layers, word tokenizer) built per test, never the shared fixtures, since
edits change weights in place.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from ffkv.errors import FfkvError

# The planted model is extreme (h ~ 200, p(paris) ~ 1 - 1e-15): large steps and updates.
FAST = {"v_num_grad_steps": 10, "v_lr": 5.0, "prefixes": [[4, 3]], "stats_tokens": 3000, "max_update_ratio": 1000.0}


def fresh(arch="gpt2", seed=0):
    from ffkv.testbed.planted import planted_model

    return planted_model(arch=arch, seed=seed).model


@pytest.fixture(scope="module")
def corpus():
    from ffkv.testbed.planted import WORDS

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(400)]


@pytest.fixture
def stats_dir(tmp_path):
    return tmp_path / "stats"


def request(subject="tower", target=" rome", prompt="the old {}"):
    from ffkv.edit import EditRequest

    return EditRequest(prompt, subject, target)


def state(model):
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def same_bits(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def prob(model, req):
    return model.next_token_probs(req.text)[0, model.answer_id(req.target)].item()


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rome_maps_the_key_to_the_target_value(arch, corpus, stats_dir):
    from ffkv.edit import apply_edits

    m = fresh(arch)
    req = request()
    p0 = prob(m, req)
    # the planted LLaMA's gated FFN outputs are ~30x larger (h ~ 6500): larger steps
    hp = {**FAST, "layer": 1, **({"v_lr": 200.0, "max_update_ratio": 1e4} if arch == "llama" else {})}
    j = apply_edits(m, [req], "rome", hp, stats_dir=stats_dir, corpus=corpus, progress=False)
    e = j[0]
    assert e.rank == 1 and e.layer == 1
    k, v_star = e.keys[:, 0].double(), e.targets[:, 0].double()
    W = m.values(1).double()
    b = m.value_bias(1)
    out = W @ k + (b.double() if b is not None else 0)
    # closed form: W' k* + b = v* (up to float32 rounding of W', u and v)
    assert torch.allclose(out, v_star, rtol=0, atol=1e-5 * v_star.norm().item())
    assert prob(m, req) > max(0.5, p0 + 0.3)


def test_rome_update_is_rank_one_and_uses_the_averaged_key(corpus, stats_dir):
    from ffkv.edit import apply_edits, layer_stats
    from ffkv.edit.stats import cholesky_factor

    m = fresh()
    W0 = m.values(1).detach().clone().double()
    j = apply_edits(m, [request()], "rome", {**FAST, "layer": 1}, stats_dir=stats_dir, corpus=corpus,
                    progress=False)
    dW = m.values(1).double() - W0
    s = torch.linalg.svdvals(dW)
    assert s[1] < 1e-5 * s[0]
    # the right singular direction is C^-1 k*, with the same averaged k* that W' maps to v*; the edited
    # model's statistics are its base's, which the journal's context knows (nothing is kept on the model)
    C = j.context.using(stats_dir=stats_dir, progress=False).layer_stats(
        m, [1], {"corpus": corpus, "stats_tokens": FAST["stats_tokens"]})[1].C
    assert torch.equal(C, layer_stats(fresh(), 1, corpus=corpus, n_tokens=FAST["stats_tokens"],
                                      stats_dir=stats_dir, progress=False)[1].C)
    direction = torch.cholesky_solve(j[0].keys.double(), cholesky_factor(C))[:, 0]
    cos = torch.nn.functional.cosine_similarity(dW.T @ (dW @ direction), direction, dim=0)
    assert cos > 0.999


def test_undo_is_bit_identical(corpus, stats_dir):
    from ffkv.edit import apply_edits

    m = fresh()
    s0 = state(m)
    j = apply_edits(m, [request()], "rome", {**FAST, "layer": 1}, stats_dir=stats_dir, corpus=corpus, progress=False)
    s1 = state(m)
    apply_edits(m, [request("castle", " paris")], "rome", {**FAST, "layer": 1}, stats_dir=stats_dir,
                corpus=corpus, journal=j, progress=False)
    apply_edits(m, [request("river", " oslo")], "rome", {**FAST, "layer": 0}, stats_dir=stats_dir,
                corpus=corpus, journal=j, progress=False)
    assert len(j) == 3 and not same_bits(s1, state(m))
    assert j.undo(m, 2) == 2
    assert same_bits(s1, state(m))
    j.undo(m)
    assert same_bits(s0, state(m))
    assert len(j) == 0


def test_journal_save_load_replay_is_bit_identical(corpus, stats_dir, tmp_path):
    from ffkv.edit import Journal, apply_edits

    m = fresh()
    j = apply_edits(m, [request(), request("castle", " paris")], "rome", {**FAST, "layer": 1},
                    stats_dir=stats_dir, corpus=corpus, progress=False)
    edited = state(m)
    j.save(tmp_path / "journal")
    loaded = Journal.load(tmp_path / "journal")
    assert len(loaded) == 2 and loaded[0].before == j[0].before
    m2 = fresh()
    loaded.replay(m2)
    assert same_bits(edited, state(m2))
    with pytest.raises(FfkvError, match="recorded on W_out checksum"):
        loaded.replay(m2)  # twice: the weights are no longer those the journal was recorded on
    loaded.undo(m2)
    assert same_bits(state(fresh()), state(m2))
    with pytest.raises(FfkvError, match="recorded on"):
        Journal.load(tmp_path / "journal").replay(fresh(seed=1))  # another model


@pytest.mark.parametrize("bad, message", [
    (dict(prompt="the old tower", subject="castle"), "does not occur in prompt"),
    (dict(target=" "), "empty target"),
    (dict(target=""), "empty target"),
    (dict(subject=""), "empty subject"),
])
def test_bad_requests_are_refused_and_leave_the_model_unchanged(bad, message, corpus, stats_dir):
    from ffkv.edit import EditRequest, apply_edits

    m = fresh()
    s0 = state(m)
    kw = dict(prompt="the old {}", subject="tower", target=" rome") | bad
    with pytest.raises(FfkvError, match=message) as e:
        apply_edits(m, [EditRequest(**kw)], "rome", {**FAST, "layer": 1}, stats_dir=stats_dir, corpus=corpus,
                    progress=False)
    assert "\n" not in str(e.value)
    assert same_bits(s0, state(m))


@pytest.mark.parametrize("hp, message", [
    ({"layer": 5}, "out of range"),
    ({"layers": [0, 9]}, "out of range"),
    ({"v_lr": float("nan")}, "must be a finite"),
    ({"max_update_ratio": 1e-9}, "limit"),
    ({"no_such": 1}, "unknown"),
])
def test_bad_layers_and_bad_updates_are_refused(hp, message, corpus, stats_dir):
    from ffkv.edit import apply_edits

    method = "memit" if "layers" in hp else "rome"
    m = fresh()
    s0 = state(m)
    with pytest.raises(FfkvError, match=message):
        apply_edits(m, [request(), request("castle", " paris")], method, {**FAST, **hp}, stats_dir=stats_dir,
                    corpus=corpus, progress=False)
    assert same_bits(s0, state(m))


def test_a_non_finite_rome_update_is_refused(corpus, stats_dir, monkeypatch):
    from ffkv.edit import apply_edits, rome

    m = fresh()
    s0 = state(m)
    real = rome.rank_one_update
    monkeypatch.setattr(rome, "rank_one_update", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    with pytest.raises(FfkvError, match="not finite"):
        apply_edits(m, [request()], "rome", {**FAST, "layer": 1}, stats_dir=stats_dir, corpus=corpus,
                    progress=False)
    assert same_bits(s0, state(m))


def test_a_refused_memit_layer_rolls_back_the_earlier_layers(corpus, stats_dir, monkeypatch):
    from ffkv.edit import apply_edits, memit

    m = fresh()
    s0 = state(m)
    real = memit.memit_layer_update
    calls = []

    def second_layer_explodes(C, K, R, lam):
        u, v = real(C, K, R, lam)
        calls.append(1)
        return (u * float("inf"), v) if len(calls) == 2 else (u, v)

    monkeypatch.setattr(memit, "memit_layer_update", second_layer_explodes)
    with pytest.raises(FfkvError, match="not finite"):
        apply_edits(m, [request()], "memit", {**FAST, "layers": [0, 1]}, stats_dir=stats_dir, corpus=corpus,
                    progress=False)
    assert len(calls) == 2 and same_bits(s0, state(m))


# ----------------------------------------------------------------------------------------------------
def test_stats_match_a_direct_computation_are_cached_and_refuse_another_model(corpus, stats_dir):
    from ffkv.edit import layer_stats
    from ffkv.edit.stats import token_windows
    from ffkv.models.hooks import intervene

    m = fresh()
    st = layer_stats(m, [0, 1], corpus=corpus, n_tokens=2000, stats_dir=stats_dir, window=32, progress=False)
    windows = token_windows(m, corpus, 2000, 32)
    with torch.no_grad(), intervene(m, reads=[("coef", 1)]) as rec:
        m.hf(input_ids=windows)
    k = rec["coef", 1].reshape(-1, m.d_ffn).double()
    assert st[1].n_tokens == windows.numel()
    assert torch.allclose(st[1].C, k.T @ k / k.shape[0], rtol=1e-5, atol=1e-7)
    assert st[1].path.exists() and st[1].C.dtype == torch.float64
    again = layer_stats(m, [1], corpus=corpus, n_tokens=2000, stats_dir=stats_dir, window=32, progress=False)
    assert torch.equal(again[1].C, st[1].C) and again[1].path == st[1].path
    other = fresh(seed=1)  # same name ("planted-gpt2"), other weights
    with pytest.raises(FfkvError, match="belong to another model"):
        layer_stats(other, [1], corpus=corpus, n_tokens=2000, stats_dir=stats_dir, window=32, progress=False)


def test_stats_of_an_edited_model_are_those_of_its_base(corpus, stats_dir):
    from ffkv.edit import EditContext, apply_edits, layer_stats

    m = fresh()
    base = layer_stats(m, [1], corpus=corpus, n_tokens=FAST["stats_tokens"], stats_dir=stats_dir, progress=False)
    ctx = EditContext(stats_dir=stats_dir, progress=False)
    apply_edits(m, [request()], "rome", {**FAST, "layer": 1}, corpus=corpus, context=ctx)
    assert ctx.base_identity["fingerprint"] == fresh().identity["fingerprint"]
    assert not hasattr(m, "_ffkv_base_identity")  # the journal's base identity lives in the context
    # the edited model's fingerprint differs, but the cached statistics of its base are reused, not refused
    fresh_ctx = EditContext(base_identity=ctx.base_identity, stats_dir=stats_dir, progress=False)
    st = fresh_ctx.layer_stats(m, [1], {"corpus": corpus, "stats_tokens": FAST["stats_tokens"]})
    assert st[1].path == base[1].path and torch.equal(st[1].C, base[1].C)
    # a second edit in the same context reuses the memo: the very same statistics object
    apply_edits(m, [request("castle", " paris")], "rome", {**FAST, "layer": 1}, corpus=corpus, context=ctx)
    assert ctx.layer_stats(m, [1], {"corpus": corpus, "stats_tokens": FAST["stats_tokens"]})[1] is \
        ctx.layer_stats(m, [1], {"corpus": corpus, "stats_tokens": FAST["stats_tokens"]})[1]


# ----------------------------------------------------------------------------------------------------
def test_memit_batch_edits_all_requests_and_undoes(corpus, stats_dir):
    from ffkv.edit import apply_edits

    m = fresh()
    s0 = state(m)
    reqs = [request(), request("castle", " oslo"), request("river", " paris")]
    j = apply_edits(m, reqs, "memit", {**FAST, "layers": [0, 1], "mom2_update_weight": 100.0, "clamp_norm_factor": 4.0, "v_weight_decay_form": "squared",
                                       "v_num_grad_steps": 15}, stats_dir=stats_dir, corpus=corpus,
                    progress=False)
    assert [e.layer for e in j] == [0, 1] and all(e.rank == 3 for e in j)
    for r in reqs:
        p = m.next_token_probs(r.text)[0]
        assert p.argmax().item() == m.answer_id(r.target), r
    j.undo(m)
    assert same_bits(s0, state(m))


def test_batched_targets_equal_one_request_at_a_time():
    from ffkv.edit import default_hparams
    from ffkv.edit.compute_key import context_prefixes
    from ffkv.edit.compute_value import compute_targets

    m = fresh()
    hp = {**default_hparams(m, "memit"), **FAST}
    reqs = [request(), request("castle", " oslo"), request("river", " paris")]
    prefixes = context_prefixes(m, hp["prefixes"], hp["seed"])
    batched = compute_targets(m, reqs, "resid_post", 1, hp, prefixes)
    for i, r in enumerate(reqs):
        one = compute_targets(m, [r], "resid_post", 1, hp, prefixes)
        assert torch.allclose(one.delta[0], batched.delta[i], rtol=1e-4, atol=1e-4)
        assert one.steps[0] == batched.steps[i]


def test_kn_edit_moves_the_neurons_value_toward_the_new_object(stats_dir):
    from ffkv.edit import EditRequest, apply_edits

    m = fresh()
    s0 = state(m)
    req = EditRequest("the old {}", "tower", " rome", target_true=" paris")
    p_new0 = prob(m, req)
    j = apply_edits(m, [req], "kn", {"kn_lambda": 2.0}, progress=False)
    # the planted memory L1.5 stores tower -> paris; attribution must find it
    assert any(e.layer == 1 and e.v[5, 0] != 0 for e in j)
    assert prob(m, req) > p_new0
    j.undo(m)
    assert same_bits(s0, state(m))


def test_erase_relation_zeroes_the_shared_neurons():
    from ffkv.edit import EditRequest, erase_relation

    m = fresh()
    # tower -> paris is planted in memory L1.5 alone
    reqs = [EditRequest("the old {}", "tower", " oslo", target_true=" paris"),
            EditRequest("a big {}", "tower", " oslo", target_true=" paris")]
    p0 = m.next_token_probs(reqs[0].text)[0, m.answer_id(" paris")].item()
    j = erase_relation(m, reqs, {"threshold": 0.2, "max_neurons": 8})
    erased = {(e.layer, i) for e in j for i in torch.nonzero(e.v.abs().sum(1)).flatten().tolist()}
    assert (1, 5) in erased
    for layer, i in erased:
        assert torch.count_nonzero(m.values(layer)[:, i]) == 0
    assert m.next_token_probs(reqs[0].text)[0, m.answer_id(" paris")].item() < 0.5 * p0


# ----------------------------------------------------------------------------------------------------
def test_cli_edit_and_undo_round_trip(tmp_path, corpus):
    from ffkv.cli import main
    from ffkv.models.loading import load_model
    from ffkv.testbed.planted import planted_model, save_planted

    src = save_planted(planted_model(), tmp_path / "planted")
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n\n".join(corpus))
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    main(["edit", str(src), "--method", "rome", "--prompt", "the old {}", "--subject", "tower",
          "--target", " rome", "--layer", "1", "--hparams", str(hp), "--corpus", str(corpus_file),
          "--stats-dir", str(tmp_path / "stats"), "--out", str(tmp_path / "ed")])
    assert (tmp_path / "ed" / "model" / "config.json").exists()
    assert (tmp_path / "ed" / "journal" / "journal.json").exists()
    edited = load_model(tmp_path / "ed" / "model", check=False)
    assert edited.next_token_probs("the old tower")[0].argmax() == edited.answer_id(" rome")
    main(["edit", "undo", str(tmp_path / "ed"), "--out", str(tmp_path / "un")])
    a = load_model(src, check=False).hf.state_dict()
    b = load_model(tmp_path / "un" / "model", check=False).hf.state_dict()
    assert same_bits(a, b)


def test_cli_refuses_a_bad_request_with_one_line(tmp_path, capsys):
    from ffkv.cli import main
    from ffkv.testbed.planted import planted_model, save_planted

    src = save_planted(planted_model(), tmp_path / "planted")
    with pytest.raises(SystemExit) as e:
        main(["edit", str(src), "--prompt", "the old tower", "--subject", "castle", "--target", " rome",
              "--out", str(tmp_path / "ed")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: save_planted's progress bars
    assert err.startswith("ffkv: error:") and "does not occur" in err and "\n" not in err
    assert not (tmp_path / "ed").exists()


def test_layer_trace_picks_the_peak_of_ffkv_trace_mlp(corpus, stats_dir):
    # NEEDS h3's ffkv.locate.layer_choice (merged with h3's branch). `ffkv edit --layer trace` must pick the
    # peak of `ffkv trace --kind mlp` at the subject's last token, averaged over the requests.
    import numpy as np

    from ffkv.edit import apply_edits
    from ffkv.locate.layer_choice import trace_layer
    from ffkv.locate.trace import causal_trace
    from ffkv.testbed.planted import PlantedFact, planted_model

    # tower -> paris is planted in layer 1 alone, castle -> london in layer 0 alone
    m = planted_model(facts=(PlantedFact("tower", "paris", [(1, 5)]), PlantedFact("castle", "london", [(0, 7)])),
                      n_layers=3).model
    reqs = [request("castle", " rome"), request("tower", " oslo")]
    # a planted key reads one channel with gain 3: only large noise hides the trigger
    hp = {**FAST, "layer": "trace", "trace_noise": "s100", "seed": 0}
    scores = []
    for r in reqs:
        t = causal_trace(m, r.text, r.subject, kind="mlp", noise="s100", seed=0)
        scores.append(t.scores[t.subject_range[1] - 1])
    peak = int(np.mean(scores, 0).argmax())
    assert trace_layer(m, reqs, noise="s100", seed=0) == peak
    j = apply_edits(m, reqs, "rome", hp, stats_dir=stats_dir, corpus=corpus, progress=False)
    assert {e.layer for e in j} == {peak} and j[0].hparams["layer"] == peak


def test_requests_from_counterfact_and_files(tmp_path):
    from ffkv.edit import EditRequest, load_requests

    rec = {"case_id": 7, "requested_rewrite": {"prompt": "{} is located in", "subject": "Eiffel Tower",
                                               "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}}}
    r = EditRequest.from_counterfact(rec)
    assert (r.prompt, r.subject, r.target, r.target_true, r.case_id) == \
        ("{} is located in", "Eiffel Tower", " Rome", " Paris", 7)
    assert r.text == "Eiffel Tower is located in"
    assert EditRequest("Eiffel Tower is located in", "Eiffel Tower", " Rome").prompt == "{} is located in"
    f = tmp_path / "reqs.jsonl"
    f.write_text(json.dumps(rec) + "\n" + json.dumps({"prompt": "{} plays", "subject": "X", "target": " chess"}) + "\n")
    assert [q.target for q in load_requests(f)] == [" Rome", " chess"]
    g = tmp_path / "reqs.json"
    g.write_text(json.dumps([{"prompt": "{} plays"}]))
    with pytest.raises(FfkvError, match="lacks"):
        load_requests(g)


def test_default_layers_follow_the_published_table():
    from types import SimpleNamespace

    from ffkv.edit import default_hparams

    def fake(family, n):
        return SimpleNamespace(family=family, n_layers=n, check_layer=lambda l: l)

    assert default_hparams(fake("gpt2", 48), "rome")["layer"] == 17
    assert default_hparams(fake("gpt-j", 28), "memit")["layers"] == [3, 4, 5, 6, 7, 8]
    assert default_hparams(fake("llama", 32), "rome")["layer"] == 5
    for n in (2, 3, 12, 40):  # any depth: below the top layer
        assert 0 <= default_hparams(fake("opt", n), "rome")["layer"] <= n - 2
        assert all(0 <= l <= n - 2 for l in default_hparams(fake("opt", n), "memit")["layers"])
    with pytest.raises(FfkvError, match="unknown edit method"):
        default_hparams(fake("gpt2", 12), "nope")


def test_memit_journal_saves_and_replays_bit_identically(corpus, stats_dir, tmp_path):
    from ffkv.edit import Journal, apply_edits

    m = fresh()
    hp = {**FAST, "layers": [0, 1], "clamp_norm_factor": 4.0, "mom2_update_weight": 100.0}
    j = apply_edits(m, [request(), request("castle", " oslo")], "memit", hp, stats_dir=stats_dir, corpus=corpus,
                    progress=False)
    j = apply_edits(m, [request("river", " paris")], "rome", {**FAST, "layer": 0}, stats_dir=stats_dir,
                    corpus=corpus, journal=j, progress=False)
    j.save(tmp_path / "j")
    m2 = fresh()
    Journal.load(tmp_path / "j").replay(m2)
    assert same_bits(state(m), state(m2))


def test_cli_erase_writes_a_model_without_the_relation_neurons(tmp_path):
    from ffkv.cli import main
    from ffkv.models.loading import load_model
    from ffkv.testbed.planted import planted_model, save_planted

    src = save_planted(planted_model(), tmp_path / "planted")
    reqs = tmp_path / "relation.json"
    reqs.write_text(json.dumps([{"prompt": p, "subject": "tower", "target_true": " paris"}
                                for p in ("the old {}", "a big {}")]))
    main(["edit", "erase", str(src), "--requests", str(reqs), "--out", str(tmp_path / "er")])
    m = load_model(tmp_path / "er" / "model", check=False)
    assert torch.count_nonzero(m.values(1)[:, 5]) == 0
    main(["edit", "undo", str(tmp_path / "er"), "--out", str(tmp_path / "un")])
    assert same_bits(load_model(src, check=False).hf.state_dict(),
                     load_model(tmp_path / "un" / "model", check=False).hf.state_dict())
