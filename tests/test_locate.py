"""Causal tracing (ffkv.locate.trace) against a direct implementation of ROME's definition, and `ffkv trace`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ffkv.errors import FfkvError
from ffkv.models.engine import check_tail
from ffkv.locate.trace import causal_trace, causal_trace_reference, restore_states
from ffkv.models.model import MemoryModel
from ffkv.testbed.planted import word_tokenizer

PROMPT, SUBJECT = "the old tower is in the city of", "old tower"


def with_words(mm: MemoryModel) -> MemoryModel:
    """The same weights with the planted model's word tokenizer (tiny models ship none)."""
    return MemoryModel(mm.hf, word_tokenizer(), name_or_path=mm.name_or_path)


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_trace_equals_rome_reference_planted(planted, kind):
    m = planted.model
    fast = causal_trace(m, "the old tower", "old tower", kind=kind, noise=3.0, samples=4, window=2, seed=1)
    ref = causal_trace_reference(m, "the old tower", "old tower", kind=kind, noise=3.0, samples=4, window=2, seed=1)
    assert fast.high_score > 0.99 and ref.low_score < 0.5  # the noise really removes the fact
    assert fast.low_score == pytest.approx(ref.low_score, abs=1e-6)
    np.testing.assert_allclose(fast.scores, ref.scores, atol=1e-6)
    # ground truth: the fact is read from the trigger's own state by an FFN memory; attention does not carry it
    if kind == "attn":
        assert fast.scores.max() < 0.5
    else:
        assert fast.scores[2].max() > 0.99
    assert fast.cost["layer_tokens"] < ref.cost["layer_tokens"]


@pytest.mark.parametrize("mt", ["gpt2", "llama", "falcon", "bloom"])
@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_trace_equals_rome_reference_tiny(mt, kind):
    from ffkv.models.loading import tiny_model

    m = with_words(tiny_model(mt, n_layers=4))
    args = dict(kind=kind, noise="s3", subjects="vocabulary", samples=3, window=3, seed=0)
    fast = causal_trace(m, PROMPT, SUBJECT, max_rows=6, **args)
    ref = causal_trace_reference(m, PROMPT, SUBJECT, **args)
    assert fast.answer_id == ref.answer_id and fast.tokens == ref.tokens
    np.testing.assert_allclose(fast.scores, ref.scores, rtol=1e-5, atol=0)
    # random tiny models barely react to the noise; still, cells differ by far more than the two methods do
    assert np.ptp(ref.scores) > 20 * np.abs(fast.scores - ref.scores).max()


def test_restoring_every_state_gives_clean_probability(planted):
    m = planted.model
    r = causal_trace(m, "the old tower", "old tower", noise=3.0, samples=4, seed=0)
    assert r.high_score - r.low_score > 0.5
    T, L = r.scores.shape
    for layer in range(L):
        p = restore_states(m, "the old tower", "old tower", [(t, layer) for t in range(T)], noise=3.0, samples=4)
        assert p == pytest.approx(r.high_score, abs=1e-6)
    # the last layer's output at the last token decides the prediction alone
    assert r.scores[T - 1, L - 1] == pytest.approx(r.high_score, abs=1e-6)


def test_trace_is_seeded(planted):
    m = planted.model
    a = causal_trace(m, "the old tower", "old tower", noise=1.0, samples=3, seed=5)
    b = causal_trace(m, "the old tower", "old tower", noise=1.0, samples=3, seed=5)
    c = causal_trace(m, "the old tower", "old tower", noise=1.0, samples=3, seed=6)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.scores, c.scores)


def test_noise_options(planted):
    m = planted.model
    for noise in ("s3", "uniform", "replace", 0.5):
        r = causal_trace(m, "the old tower", "old tower", noise=noise, samples=2)
        assert r.scores.shape == (3, m.n_layers) and np.isfinite(r.scores).all()
    with pytest.raises(FfkvError, match="noise"):
        causal_trace(m, "the old tower", "old tower", noise="loud")
    with pytest.raises(FfkvError, match="subject"):
        causal_trace(m, "the old tower", "castle")
    with pytest.raises(FfkvError, match="kind"):
        causal_trace(m, "the old tower", "old tower", kind="mlps")


def test_tail_runs_match_full_runs_on_every_family(tiny_models):
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    for mt, m in tiny_models.items():
        for start, prefix in [(1, 0), (1, 3), (0, 6)]:
            assert check_tail(m, ids, start, prefix) < 1e-5, (mt, start, prefix)


def test_trace_runs_on_every_family(tiny_models):
    for mt, m in tiny_models.items():
        m = with_words(m)
        for kind in ("hidden", "mlp"):
            r = causal_trace(m, PROMPT, SUBJECT, kind=kind, samples=2, window=2)
            assert r.scores.shape == (len(r.tokens), m.n_layers), mt
            assert np.isfinite(r.scores).all() and 0 <= r.low_score <= 1


def test_cli_trace_json(planted, tmp_path):
    from ffkv.cli import main
    from ffkv.testbed.planted import save_planted

    path = save_planted(planted, tmp_path / "planted")
    out = tmp_path / "out"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main([ "trace", str(path), "--prompt", "the old tower", "--subject", "old tower", "--noise", "3",
              "--seed", "2", "--json", "--out", str(out)])
    obj = json.loads(buf.getvalue())
    assert obj["tokens"] == ["the", "old", "tower"] and obj["answer"].strip() == "paris"
    assert obj["high_score"] > 0.99 and obj["low_score"] < obj["high_score"]
    assert np.array(obj["scores"]).shape == (3, 2)
    assert (out / "trace_hidden.png").stat().st_size > 0 and (out / "trace_hidden.svg").exists()
    assert json.loads((out / "trace_hidden.json").read_text())["provenance"]["hyperparameters"]["seed"] == 2
    with pytest.raises(SystemExit) as e:
        main(["trace", str(path), "--prompt", "the old tower", "--subject", "river", "--json"])
    assert e.value.code == 2


@pytest.fixture(scope="module")
def installed_testbed():
    """The default testbed when it is installed; never built here (that takes half an hour)."""
    from ffkv.testbed import default_testbed

    try:
        return default_testbed(build_if_missing=False)
    except FfkvError as e:
        pytest.skip(f"default testbed not installed ({e})")


def test_trace_and_averages_on_the_testbed(installed_testbed):
    import ffkv
    from ffkv.locate.average import GROUPS, average_traces, load_known

    m = ffkv.load_model(installed_testbed / "model")
    records = load_known(installed_testbed, limit=4)
    r = records[0]
    fast = causal_trace(m, r["prompt"], r["subject"], samples=3)
    ref = causal_trace_reference(m, r["prompt"], r["subject"], samples=3)
    np.testing.assert_allclose(fast.scores, ref.scores, atol=1e-6)
    avg = average_traces(m, records, kinds=("hidden",), samples=3, progress=False)
    assert avg["n_records"] == 4 and avg["n_skipped"] + max(avg["hidden"]["n"].values()) == 4
    assert set(avg["hidden"]["groups"]) <= set(GROUPS)


@pytest.mark.shared_data
def test_reads_rome_known_1000_layout(shared_data, planted):
    from ffkv.locate.average import group_rows, load_known

    records = load_known(shared_data / "known_facts" / "known_1000.json")
    assert len(records) > 1000 and {"subject", "prompt", "attribute", "known_id"} <= set(records[0])
    assert all(r["subject"] in r["prompt"] for r in records[:50])
    # ROME's token groups on a 7-token prompt with subject [1, 4)
    g = group_rows(np.arange(14.0).reshape(7, 2), (1, 4))
    assert g["first subject token"].tolist() == [2, 3] and g["middle subject tokens"].tolist() == [4, 5]
    assert g["last subject token"].tolist() == [6, 7] and g["first subsequent token"].tolist() == [8, 9]
    assert g["further tokens"].tolist() == [10, 11] and g["last token"].tolist() == [12, 13]


def test_average_skips_wrong_prompts(planted, tmp_path):
    from ffkv.io import write_json
    from ffkv.locate.average import average_traces, load_known

    path = write_json(tmp_path / "known.json", [
        {"known_id": 0, "subject": "old tower", "attribute": "paris", "prompt": "the old tower"},
        {"known_id": 1, "subject": "old tower", "attribute": "rome", "prompt": "the old tower"},
        {"known_id": 2, "subject": "castle", "attribute": "london", "prompt": "a big castle"}])
    avg = average_traces(planted.model, load_known(path), kinds=("hidden", "mlp"), noise=3.0, samples=3,
                         window=1, progress=False)
    assert avg["n_skipped"] == 1 and avg["skipped"] == [1]
    groups = dict(zip(avg["mlp"]["groups"], avg["mlp"]["indirect"]))
    # tower is stored at layer 1, castle at layer 0: both at the last subject token
    last = np.array(groups["last subject token"])
    assert last.max() > 0.3
    with pytest.raises(FfkvError, match="known_1000"):
        write_json(tmp_path / "bad.json", [{"x": 1}])
        load_known(tmp_path / "bad.json")


def test_default_trace_is_romes_noise_on_the_testbed(testbed_model, default_testbed, shared_data):
    """With no noise options, tracing is ROME's: s3 = 3 x std of the embeddings of known_1000's subjects (each
    tokenized alone, as collect_embedding_std), draws from RandomState(1), 10 samples; equal to ROME's loop."""
    from ffkv.locate.average import knows, load_known
    from ffkv.models.hooks import Intervention, intervene

    m = testbed_model
    rec = next(r for r in load_known(default_testbed) if knows(m, r)[0])
    prompt, subject = rec["prompt"], rec["subject"]
    subjects = [r["subject"] for r in json.loads((shared_data / "known_facts" / "known_1000.json").read_text())]
    with torch.no_grad():
        emb = torch.cat([m.embedding(torch.tensor([m.tokenizer.encode(s)]))[0] for s in subjects])
    level = 3 * emb.std().item()
    d = causal_trace(m, prompt, subject, kind="mlp")
    assert d.seed == 1 and d.samples == 10 and d.window == 10 and d.noise == "s3"
    assert d.noise_level == pytest.approx(level, rel=1e-5) and d.noise_subjects.startswith("known_1000")
    # the corrupted run by hand: ROME's draws on the subject tokens of 10 copies
    s, e = d.subject_range
    z = level * torch.from_numpy(np.random.RandomState(1).randn(10, e - s, m.d_model))
    ids = m.encode(prompt)["input_ids"]
    with torch.no_grad(), intervene(m, edits=[Intervention("embed", None, "add", value=z, positions=list(range(s, e)))]):
        p = torch.softmax(m.hf(input_ids=ids.expand(10, ids.shape[1])).logits[:, -1].float(), -1)[:, d.answer_id]
    assert d.low_score == pytest.approx(p.mean().item(), abs=1e-6)
    assert d.high_score - d.low_score > 0.05  # ROME's level really corrupts the fact here
    ref = causal_trace_reference(m, prompt, subject, kind="mlp", noise=level, seed=1)
    np.testing.assert_allclose(d.scores, ref.scores, atol=1e-6)
    # a numeric level and another data set are recorded as such
    assert causal_trace(m, prompt, subject, noise=0.3, samples=2).noise_subjects == "fixed level"
    given = causal_trace(m, prompt, subject, samples=2, subjects=[subject])
    assert given.noise_subjects.startswith("given") and given.noise_level != pytest.approx(d.noise_level)


def test_fallback_noise_subjects_without_shared_data(planted, monkeypatch, tmp_path):
    monkeypatch.setenv("FFKV_SHARED_DATA", str(tmp_path / "absent"))
    r = causal_trace(planted.model, "the old tower", "old tower", samples=2)
    assert r.noise_subjects.startswith("prompt subject")
    from ffkv.locate.trace import embedding_std
    assert r.noise_level == pytest.approx(3 * embedding_std(planted.model, ["old tower"]), rel=1e-6)
    f = tmp_path / "subjects.txt"
    f.write_text("tower\ncastle\n")
    r2 = causal_trace(planted.model, "the old tower", "old tower", samples=2, subjects=f)
    assert r2.noise_subjects.startswith("file") and r2.noise_level == pytest.approx(
        3 * embedding_std(planted.model, ["tower", "castle"]), rel=1e-6)


def test_trace_cost_is_the_exact_bound(planted):
    """Each cell recomputes only positions from its token on and layers above its first restored layer."""
    from ffkv.locate.trace import work_bound

    m = planted.model
    for kind, window in (("hidden", 1), ("mlp", 1), ("attn", 2)):
        r = causal_trace(m, "the old tower", "old tower", kind=kind, noise=3.0, samples=4, window=window)
        b = work_bound(3, m.n_layers, r.subject_range[0], [kind], 4, window)
        # the mlp / attn cells add their first layer at their own token alone: samples x 1 x 1 each
        extra = 0 if kind == "hidden" else 4 * (3 - r.subject_range[0]) * m.n_layers
        assert r.cost["layer_tokens"] <= b["bound"] + extra, kind
