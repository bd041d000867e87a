"""A padded vocabulary (more unembedding rows than the tokenizer has tokens, as Pythia's) is flagged, and a
trace of the top prediction never names a row no text maps to."""

from __future__ import annotations

import torch

from ffkv.locate.approx import approx_trace
from ffkv.locate.trace import causal_trace
from ffkv.models.loading import tiny_model
from ffkv.testbed.planted import word_tokenizer


def test_trace_answers_with_a_real_token_on_a_padded_vocabulary():
    tok = word_tokenizer()
    m = tiny_model("gpt2", vocab=len(tok) + 40, tokenizer=tok)
    assert m.tokenizer_vocab_size == len(tok) < m.vocab_size
    with torch.no_grad():  # make a padding row the model's favourite: point it along the final hidden state
        h = m.hf(**m.encode("the old tower"), output_hidden_states=True).hidden_states[-1][0, -1]
        m.unembedding.weight[len(tok) + 7] = 100 * h / h.norm()
    probs = m.next_token_probs("the old tower")[0]
    assert int(probs.argmax()) >= len(tok)
    r = causal_trace(m, "the old tower", "tower", kind="hidden", samples=2, window=1)
    assert r.answer_id < len(tok) and r.answer.strip()
    assert r.answer_id == int(probs[: len(tok)].argmax())
    a = approx_trace(m, "the old tower", "tower", kinds=["hidden"], samples=2, window=1, verify=1)
    assert a.answer_id == r.answer_id
