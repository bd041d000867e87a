"""ffkv dossier: every section present, its claims right on the planted-memory model, the files written, bad
input refused in one line."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from ffkv.dossier.build import SECTIONS, build_dossier, parse_control
from ffkv.dossier.cli import dossier
from ffkv.dossier.report import write_dossier
from ffkv.errors import FfkvError
from ffkv.locate.interventions import memories_off, variant_probs
from ffkv.testbed.planted import WORDS, save_planted

PARA = {"tower": ["the old tower", "a big tower", "the new tower"],
        "river": ["the old river", "a big river", "the blue river"],
        "castle": ["the old castle", "a red castle", "the small castle"]}


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Random word sentences: keys of every word for C = E[kk^T] (planted facts' triggers among them)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n)]


def fact_dossier(pm, trigger: str, **kw) -> dict:
    f = pm.fact(trigger)
    controls = [f"{PARA[o.trigger][0]}|{o.target}|{o.trigger}" for o in pm.facts if o.trigger != trigger]
    known = [{"prompt": PARA[o.trigger][0], "subject": o.trigger, "answer": o.target} for o in pm.facts]
    return build_dossier(pm.model, PARA[trigger][0], trigger, f.target, paraphrases=PARA[trigger],
                         controls=controls, known=known, noise=3.0, corpus=corpus(), stats_tokens=3000,
                         **kw)


@pytest.fixture(scope="module")
def tower(planted, tmp_path_factory):
    return fact_dossier(planted, "tower", stats_dir=tmp_path_factory.mktemp("stats"))


@pytest.fixture(scope="module")
def river(planted, tmp_path_factory):
    return fact_dossier(planted, "river", stats_dir=tmp_path_factory.mktemp("stats"))


def test_every_section_is_in_the_json(tower):
    assert set(SECTIONS) <= set(tower)
    json.dumps(tower)  # plain JSON all through
    assert len(tower["tracing"]["paraphrases"]) == 3 and tower["subspace"]["positions"] == "last"
    assert tower["provenance"]["ffkv_version"]


def test_claims_match_the_planted_memories(planted, tower, river):
    for d, trigger in ((tower, "tower"), (river, "river")):
        f = planted.fact(trigger)
        layers = {l for l, _ in f.memories}
        c = d["claims"]
        assert c["traced_layer"] in layers
        assert all(r["peak_token_text"].strip() == trigger for r in d["tracing"]["paraphrases"])
        assert c["peak_at_subject"] and c["trace_layers_agree"]
        # the carrying memories (knowledge neurons and carrying sub-updates) include planted ones
        assert set(d["subspace"]["memories"]) & {f"L{l}.{i}" for l, i in f.memories}
        assert c["ablation_spares_other_facts"] and d["subspace"]["control_removed_share"] == 0.0
        assert d["subspace"]["random_removed_share"] == 0.0
        assert d["subspace"]["answer_in_span"] > 0.9  # the planted values point at the target's unembedding
        assert c["recall"] and d["fact"]["answered_share"] == 1.0
    assert "L1.5" in {n["memory"] for n in tower["memories"]["knowledge_neurons"]}
    assert tower["memories"]["sub_updates"][0]["memory"] == "L1.5"
    # one memory holds the tower: switching the carrying set off removes it on every paraphrase
    assert tower["claims"]["ablation_removes_fact"] and tower["subspace"]["removed_share"] == 1.0
    assert not tower["claims"]["redundant"]
    # four memories hold the river, two per layer; the layer-1 pair stays silent while layer 0 writes the answer and
    # takes over once it is off: the dossier says redundant, and its ablation (which finds the active pair) does not
    # remove the fact, while switching all four planted memories off does
    assert river["claims"]["redundant"] and not river["claims"]["ablation_removes_fact"]
    m, f = planted.model, planted.fact("river")
    for prompt in PARA["river"]:
        p, top = variant_probs(m, prompt, f.target_id, [[], memories_off(f.memories)])
        assert top[0] == f.target_id and top[1] != f.target_id


def test_edit_safety_spill_on_the_edited_key_is_one(tower):
    s = tower["edit_safety"]
    own = [j for j, k in enumerate(["tower", "castle", "river"]) if k == "tower"][0]
    assert s["spill"][own] == pytest.approx(1.0, abs=1e-6)
    assert s["n_known"] == 3 and s["layer"] == 1 and s["c_inv_k_norm"] > 0


def test_files_written(tower, tmp_path):
    paths = write_dossier(tower, tmp_path / "d")
    assert json.loads(paths["json"].read_text())["claims"] == tower["claims"]
    page = paths["html"].read_text()
    assert page.startswith("<!doctype html>") and "Edit safety" in page and "L1.5" in page


def test_cli_writes_the_report(planted, tmp_path):
    folder = save_planted(planted, tmp_path / "planted")
    (tmp_path / "corpus.txt").write_text("\n".join(corpus()))
    r = CliRunner().invoke(dossier, [str(folder), "--prompt", "the old tower", "--subject", "tower",
                                     "--answer", "paris", "--paraphrase", "a big tower", "--control",
                                     "the old castle|london|castle", "--noise", "3", "--samples", "4",
                                     "--corpus", str(tmp_path / "corpus.txt"), "--stats-tokens", "2000",
                                     "--stats-dir", str(tmp_path / "stats"), "--out", str(tmp_path / "out"),
                                     "--json", "-q"])
    assert r.exit_code == 0, r.output
    out = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))
    assert out["claims"]["traced_layer"] == 1
    assert (tmp_path / "out" / "dossier.html").exists() and (tmp_path / "out" / "dossier.json").exists()


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "the old tower", "--subject", "castle", "--answer", "paris"], "does not occur"),
    (["--prompt", "the old tower", "--subject", "tower", "--answer", " "], "answer is empty"),
    (["--prompt", "the old tower", "--subject", "tower", "--answer", "paris", "--paraphrase", "a river"],
     "paraphrase"),
    (["--prompt", "the old tower", "--subject", "tower", "--answer", "paris", "--control", "no answer"],
     "PROMPT|ANSWER"),
])
def test_bad_input_is_one_line(planted, tmp_path, args, needle):
    folder = save_planted(planted, tmp_path / "planted")
    r = CliRunner().invoke(dossier, [str(folder), *args, "--out", str(tmp_path / "out"), "-q"])
    assert isinstance(r.exception, FfkvError), r.output
    line = r.exception.line()
    assert needle in line and "\n" not in line
    assert not (tmp_path / "out").exists()


def test_missing_option_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(dossier, ["m", "--prompt", "x", "--subject", "x", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--answer" in r.output


def test_parse_control():
    assert parse_control("The Louvre is in|Paris|The Louvre") == ("The Louvre is in", "Paris", "The Louvre")
    assert parse_control("a b|c") == ("a b", "c", None)
    with pytest.raises(FfkvError):
        parse_control("a|b|c|d")


def test_testbed_fact_defaults_to_its_heldout_paraphrases(testbed_model, tmp_path):
    from ffkv.testbed.datasets import load_facts
    from ffkv.testbed import default_testbed

    facts, _ = load_facts(default_testbed())
    f = max(facts, key=lambda f: f["train_count"])
    prompt = f["train_templates"][0].format(f["subject"])
    d = build_dossier(testbed_model, prompt, f["subject"], f["object"], samples=2, kn_steps=5, adaptive=False,
                      verdict_samples=5, stats_tokens=3000, stats_dir=tmp_path, n_known=10, n_controls=3)
    assert d["fact"]["paraphrase_source"] == "testbed heldout_templates"
    assert d["fact"]["paraphrases"] == [prompt] + [t.format(f["subject"]) for t in f["heldout_templates"]]
    assert d["fact"]["testbed_fact"]["train_count"] == f["train_count"]
    assert len(d["subspace"]["controls"]) == 3 and d["edit_safety"]["n_known"] == 13
    assert all(c["prompt"].count(f["subject"]) == 0 for c in d["fact"]["controls"])
