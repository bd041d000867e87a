"""The approximate causal trace (ffkv.locate.approx): attribution patching screened, top cells verified exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ffkv.errors import FfkvError
from ffkv.locate.approx import approx_trace, verified_peaks
from ffkv.locate.registry import locate
from ffkv.locate.trace import causal_trace

# A planted key reads one channel with gain 3: only large noise hides the trigger (as in test_one_owner).
OPTS = {"noise": 100.0, "samples": 4, "window": 1}


@pytest.mark.parametrize("prompt,subject", [("the old tower", "tower"), ("a big castle", "castle"),
                                            ("the river", "river")])
def test_peaks_and_verified_cells_equal_the_exact_trace(planted, prompt, subject):
    m = planted.model
    r = approx_trace(m, prompt, subject, verify=3, **OPTS)
    assert r.sites == ["hidden", "mlp", "attn"] and r.scores.shape == (3, 3 if subject != "river" else 2, 2)
    peaks = verified_peaks(r)
    for i, kind in enumerate(r.sites):
        exact = causal_trace(m, prompt, subject, kind=kind, **OPTS)
        assert r.clean == pytest.approx(exact.high_score, abs=1e-6)
        assert r.corrupted == pytest.approx(exact.low_score, abs=1e-6)
        # every verified cell holds the exact trace's value there
        for t, l, p in r.detail["verified"][kind]:
            assert p == pytest.approx(exact.scores[t, l], abs=1e-6), (kind, t, l)
            assert r.scores[i, t, l] == p
        # the peak: the screen's best cell and the best verified cell reach the exact trace's maximum (ties,
        # e.g. the last token's hidden states that all give p_clean back, count as the same peak)
        est = r.detail["estimate"][i]
        t, l = np.unravel_index(int(np.argmax(est)), est.shape)
        assert exact.scores[t, l] == pytest.approx(exact.scores.max(), abs=1e-6), (kind, (t, l), exact.peak())
        assert exact.scores[peaks[kind]] == pytest.approx(exact.scores.max(), abs=1e-6), kind
        if np.sort(exact.scores.ravel())[-2] < exact.scores.max() - 1e-3:  # a unique peak: the same cell
            assert (t, l) == exact.peak() == peaks[kind], kind
    # the stored effect: trigger token, planted layer, by the mlp screen
    assert r.site_scores("mlp").argmax() == np.argmax(causal_trace(m, prompt, subject, kind="mlp", **OPTS).scores)


def test_first_order_estimate_is_exact_where_the_model_is_linear(planted):
    """Tokens before the subject change nothing (estimate = p_*), and the estimate differs from p_* only on
    subject-and-later tokens; a registered locator with JSON output."""
    m = planted.model
    r = locate(m, "approx-trace", "the old tower", "tower", None, kinds=["mlp"], verify=0, **OPTS)
    assert r.sites == ["mlp"] and r.answer_id == int(m.next_token_probs("the old tower")[0].argmax())
    s, _ = r.subject_range
    assert np.allclose(r.scores[0, :s], r.corrupted)
    json.dumps(r.to_json())
    with pytest.raises(FfkvError):
        approx_trace(m, "the old tower", "tower", kinds=["mlp", "ffn"])
