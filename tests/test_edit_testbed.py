"""ROME and MEMIT on the shipped default testbed (6-layer GPT-2 trained on a generated world).

A few CounterFact cases, fast settings: the edit must make the new object beat the true one on the rewrite
prompt, and undo must give the weights back bit for bit. Skipped (with the reason) where the testbed is
not installed; the full figures are ``ffkv evaluate``'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ffkv.errors import FfkvError

FAST = {"stats_tokens": 20_000}


@pytest.fixture(scope="module")
def testbed():
    from ffkv.testbed import default_testbed

    try:
        return Path(default_testbed(build_if_missing=False))
    except FfkvError as e:
        pytest.skip(f"default testbed not installed ({e})")


@pytest.fixture(scope="module")
def model_and_cases(testbed):
    import ffkv
    from ffkv.io import read_json

    torch.set_num_threads(1)
    cases = read_json(testbed / "data" / "counterfact.json")
    return ffkv.load_model(str(testbed / "model")), cases[:: max(1, len(cases) // 4)][:4]


def nll(model, prompt, target):
    from ffkv.edit.requests import EditRequest, render_batch
    from ffkv.edit.compute_value import target_log_likelihood
    from ffkv.models.engine import run

    b = render_batch(model, [("", EditRequest("{}", prompt, target))], with_target=True)
    with torch.no_grad():
        full = model.hf(**b.inputs).logits[0, b.target_pos[0]]  # (L, V)
        at = run(model, b.inputs["input_ids"], attention_mask=b.inputs["attention_mask"],
                 head=(torch.tensor([0]), b.target_pos)).logits  # the engine's head at the target positions
        assert torch.allclose(full, at[0], atol=1e-4)
        return -float(target_log_likelihood(at, b)[0])


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_edits_of_testbed_facts_take_and_undo(method, model_and_cases, tmp_path):
    from ffkv.edit import EditRequest, apply_edits

    model, cases = model_and_cases
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    reqs = [EditRequest.from_counterfact(c) for c in cases]
    j = apply_edits(model, reqs, method, FAST, stats_dir=tmp_path, progress=False)
    for r in reqs:
        assert nll(model, r.text, r.target) < nll(model, r.text, r.target_true), r
    j.undo(model)
    assert all(torch.equal(before[k], v) for k, v in model.hf.state_dict().items())
