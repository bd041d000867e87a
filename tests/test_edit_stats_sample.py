"""The key statistics' sample counted as kmeng01's layer_stats counts it (mom2_n_samples = texts), and said.

n_texts records in the order of random.Random(1).shuffle of their indices, each tokenized alone and truncated to
the model's context; C equals a direct per-record computation; the result, its cache file and the edit's
journal entry say how many texts and tokens of which corpus.
"""

from __future__ import annotations

import random

import torch


def corpus():
    from ffkv.testbed.planted import WORDS

    rng = random.Random(0)
    out = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(120)]
    out[5] = " ".join(WORDS * 20)  # longer than the context: truncated
    return out


def test_text_sample_is_the_reference_sample_and_c_equals_a_direct_computation(planted, tmp_path):
    from ffkv.edit.stats import layer_stats, load_second_moment, resolve_corpus, text_sample
    from ffkv.models.engine import capture_coefficients

    m = planted.model
    texts = corpus()
    assert resolve_corpus(m, texts)[1] == texts  # the records as ffkv's corpus reader gives them
    order = list(range(len(texts)))
    random.Random(1).shuffle(order)
    seqs = text_sample(m, texts, 40)
    tok = m.require_tokenizer()
    assert seqs == [tok(texts[i], add_special_tokens=False)["input_ids"][: m.context_length] for i in order[:40]]
    assert max(len(s) for s in text_sample(m, texts, len(texts))) == m.context_length  # the long one, truncated
    st = layer_stats(m, [0, 1], corpus=texts, n_tokens=None, n_texts=40, stats_dir=tmp_path, progress=False)
    n = sum(len(s) for s in seqs)
    for layer in (0, 1):
        S = 0
        for s in seqs:  # one record per forward pass, no padding
            if s:
                k = capture_coefficients(m, torch.tensor([s]), layers=[layer])[layer][0].double()
                S = S + k.T @ k
        assert torch.allclose(st[layer].C, S / n, rtol=1e-5, atol=1e-7)
        assert st[layer].n_texts == 40 and st[layer].n_tokens == n
        assert st[layer].describe() == f"{n} tokens of 40 texts of {st[layer].corpus}"
        again = load_second_moment(st[layer].path)
        assert again.n_texts == 40 and again.n_tokens == n and torch.equal(again.C, st[layer].C)
    # the token stream is another sample, and says so
    stream = layer_stats(m, [0], corpus=texts, n_tokens=300, stats_dir=tmp_path, progress=False)[0]
    assert stream.n_texts is None and stream.n_tokens == 300 // min(256, m.context_length) * min(
        256, m.context_length) and not torch.equal(stream.C, st[0].C)


def test_edit_defaults_count_texts_and_the_journal_says_so(planted, tmp_path):
    from ffkv.edit import EditRequest, apply_edits, resolve_hparams
    from ffkv.edit.stats import text_sample

    m = planted.model
    hp = resolve_hparams(m, "rome", None)
    assert hp["stats_tokens"] is None and hp["mom2_n_samples"] == 100_000 and hp["v_weight_decay_form"] == "reference"
    before = {k: v.clone() for k, v in m.hf.state_dict().items()}
    j = apply_edits(m, [EditRequest("the old {}", "tower", " rome")], "rome",
                    {"layer": 1, "mom2_n_samples": 30, "v_num_grad_steps": 3, "prefixes": [[3, 2]],
                     "max_update_ratio": 1e4}, corpus=corpus(), stats_dir=tmp_path, progress=False)
    info = j[0].info
    assert info["stats_texts"] == 30 and info["stats_tokens"] == sum(len(s) for s in text_sample(m, corpus(), 30))
    j.undo(m)
    assert all(torch.equal(before[k], v) for k, v in m.hf.state_dict().items())


def test_statistics_and_value_optimisation_show_bars_when_the_context_says_so(planted, tmp_path, capsys,
                                                                              monkeypatch):
    from ffkv.edit import EditRequest, apply_edits

    monkeypatch.delenv("FFKV_PROGRESS", raising=False)
    m = planted.model
    hp = {"layer": 1, "mom2_n_samples": 20, "v_num_grad_steps": 2, "prefixes": [[3, 1]], "max_update_ratio": 1e4}
    req = EditRequest("the old {}", "tower", " rome")
    apply_edits(m, [req], "rome", hp, corpus=corpus(), stats_dir=tmp_path / "a", progress=False).undo(m)
    assert capsys.readouterr().err == ""
    apply_edits(m, [req], "rome", hp, corpus=corpus(), stats_dir=tmp_path / "b", progress=True).undo(m)
    err = capsys.readouterr().err
    assert "C=E[kk^T] L1" in err and "target delta" in err
