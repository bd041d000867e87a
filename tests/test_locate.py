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
