"""The evaluation run end to end with the real edit methods (ffkv.edit) on the default testbed.

Small on purpose (a few cases, short generations, 20k-token statistics): the figures for the README come
from `ffkv evaluate` runs recorded in docs/evaluate.md, not from here.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ffkv.evaluate.datasets import load_cases
from ffkv.evaluate.run import evaluate_edits, resolve_hparams
from ffkv.evaluate.sequential import probe_pairs, sequential_edits

FAST = {"stats_tokens": 20_000}


@pytest.fixture(scope="module")
def tb_cases(default_testbed):
    cases, info = load_cases(default_testbed / "data" / "counterfact.json", limit=12)
    assert info["layout"] == "rome"
    return cases


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stats")


def _hp(model, method):
    return {**resolve_hparams(model, method), **FAST}


def _state(model):
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def test_rome_edits_are_measured_and_undone_bit_for_bit(testbed_model, tb_cases, stats_dir):
    before = _state(testbed_model)
    res = evaluate_edits(testbed_model, tb_cases[:3], method="rome", hparams=_hp(testbed_model, "rome"),
                         stats_dir=stats_dir, n_gen_prompts=1, gen_tokens=8, progress=False)
    pre, post = res.summary["rome"]["pre"], res.summary["rome"]["post"]
    assert post["ES"]["mean"] >= pre["ES"]["mean"] and post["EM"]["mean"] > pre["EM"]["mean"]
    assert all(r["post_p_new"] > r["pre_p_new"] for r in res.rows if not r["refused"])
    ee = res.summary["easyedit"]
    assert ee["post"]["reliability"]["mean"] >= ee["pre"]["reliability"]["mean"]
    assert all(0.0 <= r["post_NS"] <= 1.0 and r["post_GE"] > 0 for r in res.rows)
    assert res.meta["hparams"]["layer"] == resolve_hparams(testbed_model, "rome")["layer"]
    after = testbed_model.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_memit_batch_is_edited_together(testbed_model, tb_cases, stats_dir):
    # The testbed's first cases are all about one subject: one key, so MEMIT warns that it can store only
    # the average of their values, and the evaluation counts the shared batch.
    assert len({c.subject for c in tb_cases[:4]}) == 1
    with pytest.warns(UserWarning, match="share a subject"):
        res = evaluate_edits(testbed_model, tb_cases[:4], method="memit", hparams=_hp(testbed_model, "memit"),
                             stats_dir=stats_dir, n_gen_prompts=0, progress=False)
    assert res.meta["counts"]["batches"] == 1 and {r["batch"] for r in res.rows} == {0}
    assert res.meta["counts"]["cases_sharing_a_subject_in_batch"] == 3
    assert res.summary["rome"]["post"]["EM"]["mean"] > res.summary["rome"]["pre"]["EM"]["mean"]


def test_memit_batch_of_distinct_subjects_meets_the_testbed_targets(default_testbed, testbed_model, stats_dir):
    # One case for each of 12 subjects, one batch: efficacy and paraphrase success high, neighbors kept
    # (full runs: docs/evaluate.md). No warning: the keys are distinct.
    from ffkv.evaluate.datasets import spread_subjects

    cases = spread_subjects(load_cases(default_testbed / "data" / "counterfact.json", limit=60)[0])[:12]
    assert len({c.subject for c in cases}) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = evaluate_edits(testbed_model, cases, method="memit", hparams=_hp(testbed_model, "memit"),
                             stats_dir=stats_dir, n_gen_prompts=0, progress=False)
    post = res.summary["rome"]["post"]
    assert post["ES"]["mean"] >= 90 and post["PS"]["mean"] >= 75 and post["NS"]["mean"] >= 70


def test_sequential_rome_keeps_a_curve_and_restores_the_model(testbed_model, tb_cases, stats_dir, tmp_path):
    before = _state(testbed_model)
    res = sequential_edits(testbed_model, tb_cases[:4], method="rome", hparams=_hp(testbed_model, "rome"),
                           stats_dir=stats_dir, every=2, probes=probe_pairs(tb_cases[8:]),
                           gen_prompts=[tb_cases[8].rewrite_prompt], gen_tokens=8, progress=False)
    assert [r["n_edits"] for r in res.curve] == [0, 2, 4]
    assert len(res.steps) == 4 and all(s["edit_seconds"] > 0 for s in res.steps)
    assert 0.0 <= res.curve[-1]["retention_ES"] <= 1.0 and 0.0 <= res.curve[-1]["probe_acc"] <= 1.0
    assert all(r["ppl"] > 1 for r in res.curve)
    paths = res.write(tmp_path / "seq")
    assert paths["curve"].exists() and paths["figure"].exists()
    after = testbed_model.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_prints_one_json_object(default_testbed, stats_dir, tmp_path, capsys):
    from ffkv.cli import main

    main(["evaluate", str(default_testbed), "--method", "rome", "--limit", "2", "--gen-prompts", "1",
          "--gen-tokens", "5", "--set", "stats_tokens=20000", "--stats-dir", str(stats_dir),
          "--out", str(tmp_path / "rows.parquet"), "--json"])
    out = json.loads(capsys.readouterr().out)
    post = out["rome"]["post"]
    assert set(post) >= {"ES", "EM", "PS", "PM", "NS", "NM", "S", "GE"}
    assert set(out["easyedit"]["post"]) >= {"reliability", "generalization", "locality"}
    assert out["counts"]["cases"] == 2 and out["hparams"]["stats_tokens"] == 20000
    assert out["provenance"]["model"]["fingerprint"] and (tmp_path / "rows.parquet").exists()


def test_cli_sequential_edits_distinct_subjects_first(default_testbed, stats_dir, tmp_path, capsys):
    # The file lists each subject's facts together; the sequential run must not edit one subject twice
    # while others are left (a second edit of a subject overwrites the first through their shared key).
    from ffkv.cli import main

    main(["evaluate", str(default_testbed), "--method", "rome", "--sequential", "3", "--every", "3",
          "--probes", "2", "--gen-prompts", "0", "--set", "stats_tokens=20000", "--stats-dir", str(stats_dir),
          "--out", str(tmp_path / "seq"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["data"]["order"] == "spread_subjects"
    assert len(out["edited_case_ids"]) == 3 and out["distinct_subjects"] == 3
    assert [r["n_edits"] for r in out["curve"]] == [0, 3]
    assert json.loads((tmp_path / "seq" / "summary.json").read_text())["distinct_subjects"] == 3


@pytest.mark.shared_data
def test_public_layouts_load_and_score(shared_data, testbed_model):
    from ffkv.evaluate.metrics import measure_cases

    flat, info = load_cases(shared_data / "counterfact" / "counterfact-val.json", limit=20)
    assert info["layout"] == "flat" and len(flat) == 20
    assert all(len(c.paraphrase_prompts) == 1 and len(c.neighborhood) == 1 for c in flat)
    zsre, zinfo = load_cases(shared_data / "zsre" / "zsre_mend_train-1k.json")
    assert zinfo["layout"] == "zsre" and zinfo["n_cases"] + zinfo["n_skipped"] == 1000
    assert zinfo["n_cases"] > 900
    rows = measure_cases(testbed_model, flat[:4] + zsre[:4], n_gen_prompts=1, gen_tokens=4)
    assert all(0.0 <= r["ES"] <= 1.0 and 0.0 <= r["NS"] <= 1.0 and r["locality"] == 1.0 for r in rows)


def test_sequential_alphaedit_carries_the_keys_of_earlier_edits(default_testbed, testbed_model, stats_dir):
    # AlphaEdit's state (the earlier edits' keys K_p K_p^T) lives in the editor's EditContext and follows its
    # shared journal: the second step's update is solved against the first step's keys.
    from ffkv.edit.context import EditContext
    from ffkv.evaluate.datasets import spread_subjects
    from ffkv.evaluate.run import make_editor

    cases = spread_subjects(load_cases(default_testbed / "data" / "counterfact.json", limit=60)[0])[:6]
    before = _state(testbed_model)
    hp = _hp(testbed_model, "alphaedit")
    ctx = EditContext()
    editor = make_editor("alphaedit", hp, stats_dir, shared_journal=True, context=ctx)
    res = sequential_edits(testbed_model, cases[:4], method="alphaedit", hparams=hp, editor=editor, batch_size=2,
                           every=2, probes=probe_pairs(cases[4:]), progress=False)
    assert [r["n_edits"] for r in res.curve] == [0, 2, 4] and not any(s["refused"] for s in res.steps)
    assert res.curve[-1]["retention_ES"] >= 0.5
    state = ctx.method_state["alphaedit"]
    assert all(state.n_keys[l] == 2 for l in hp["layers"])  # the last step saw the first step's two keys
    after = testbed_model.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_sequential_alphaedit_prints_the_keys_rome_prints(default_testbed, stats_dir, capsys):
    from ffkv.cli import main

    keys = {}
    for method in ("rome", "alphaedit"):
        main(["evaluate", str(default_testbed), "--method", method, "--sequential", "2", "--every", "2",
              "--probes", "2", "--gen-prompts", "0", "--set", "stats_tokens=20000", "--set", "v_num_grad_steps=5",
              "--stats-dir", str(stats_dir), "--json"])
        out = json.loads(capsys.readouterr().out)
        assert out["method"] == method and [r["n_edits"] for r in out["curve"]] == [0, 2]
        for k in ("probe_acc", "ppl"):
            assert 0.0 <= out["baseline"][k] < float("inf") and 0.0 <= out["final"][k] < float("inf")
        assert 0.0 <= out["final"]["retention_ES"] <= 1.0
        keys[method] = (set(out), set(out["final"]), set(out["baseline"]))
    assert keys["alphaedit"] == keys["rome"]
