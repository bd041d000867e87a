"""FT-L (ffkv.edit.methods.ft_l): ROME's constrained fine-tuning baseline, as a registered edit method.

Its change equals a direct version of kmeng01's execute_ft (plain HF forward, Adam on the W_out weight,
element-wise clamp), stays inside the L-infinity box, touches only the one W_out, makes the edit take on the
testbed, and undoes / replays bit for bit through the journal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ffkv.errors import FfkvError


def state_bits(model):
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def direct_ft(model, request, layer, steps, lr, eps):
    """kmeng01's execute_ft for one request, written directly on the HF model: returns ΔW in value orientation."""
    from ffkv.edit.requests import target_ids

    tok = model.require_tokenizer()
    inputs = tok([request.text], return_tensors="pt")
    tgt = torch.tensor([target_ids(model, request)])
    w = model.value_param(layer)
    w0 = w.detach().clone()
    olds = [p.requires_grad for p in model.hf.parameters()]
    for p in model.hf.parameters():
        p.requires_grad_(p is w)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=0)
    for _ in range(steps):
        opt.zero_grad()
        last = inputs["attention_mask"].sum(1) - 1
        lp = torch.log_softmax(model.hf(**inputs).logits[torch.arange(1), last].float(), -1)
        loss = -lp.gather(1, tgt).mean()
        if loss.item() >= 1e-2:
            loss.backward()
            opt.step()
        with torch.no_grad():
            w[...] = torch.clamp(w, min=w0 - eps, max=w0 + eps)
        if loss.item() < 1e-2:
            break
    with torch.no_grad():
        new = model.values(layer).detach().double().clone()
        w.copy_(w0)
    for p, o in zip(model.hf.parameters(), olds):
        p.requires_grad_(o)
    return new - model.values(layer).detach().double()


@pytest.fixture(scope="module")
def tb():
    import ffkv
    from ffkv.edit import EditRequest
    from ffkv.io import read_json
    from ffkv.testbed import default_testbed

    try:
        path = Path(default_testbed(build_if_missing=False))
    except FfkvError as e:
        pytest.skip(f"default testbed not installed ({e})")
    torch.set_num_threads(1)
    cases = read_json(path / "data" / "counterfact.json")
    return ffkv.load_model(str(path / "model")), [EditRequest.from_counterfact(c) for c in cases[::97][:2]]


def test_ft_l_equals_a_direct_version_of_the_reference(tb):
    from ffkv.edit.compute_value import constrained_finetune

    model, reqs = tb
    before = state_bits(model)
    ours, info = constrained_finetune(model, reqs[0], 0, 6, 5e-4, 0.0, 5e-3)
    assert same_bits(before, state_bits(model))  # the model is as it was
    ref = direct_ft(model, reqs[0], 0, 6, 5e-4, 5e-3)
    assert ours.abs().max() > 0 and info["ft_steps"] == 6
    # Adam divides by sqrt(v): an element whose gradient is ~0 moves on float noise, so the tolerance is in
    # units of the box (0.2%), and the two changes agree as a whole to 1e-3
    assert torch.allclose(ours, ref, rtol=0, atol=1e-5), float((ours - ref).abs().max())
    assert float((ours - ref).norm() / ref.norm()) < 1e-3


def same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ft_l_takes_on_the_testbed_within_its_bound_and_undoes(tb, tmp_path):
    from ffkv.edit import Journal, apply_edits, resolve_hparams

    model, reqs = tb
    hp = resolve_hparams(model, "ft-l", None)
    assert hp["layer"] == 0 and hp["num_steps"] == 25 and hp["lr"] == 5e-4
    before = state_bits(model)
    j = apply_edits(model, reqs, "ft-l", progress=False)
    assert [e.method for e in j] == ["ft-l", "ft-l"] and all(e.rank == model.d_model for e in j)
    for r in reqs[-1:]:  # the last edit's object is top-1 (an earlier one may be moved by the later FT)
        assert int(model.next_token_probs(r.text)[0].argmax()) == model.answer_id(r.target)
    after = state_bits(model)
    name = next(k for k, v in model.hf.named_parameters() if v is model.value_param(0))
    assert [k for k in after if not torch.equal(after[k], before[k])] == [name]
    linf = (after[name].double() - before[name].double()).abs().max()
    assert linf <= 2 * hp["norm_constraint"] * (1 + 1e-3)  # two requests, each inside its own box
    assert all(e.info["linf"] <= hp["norm_constraint"] * (1 + 1e-3) for e in j)
    j.save(tmp_path / "j")
    j.undo(model)
    assert same_bits(before, state_bits(model))
    Journal.load(tmp_path / "j").replay(model)
    assert same_bits(after, state_bits(model))
    Journal.load(tmp_path / "j").undo(model)
    assert same_bits(before, state_bits(model))


def test_rome_ft_files_paste_in(planted):
    from ffkv.edit import resolve_hparams

    m = planted.model
    constr = {"layers": [0], "num_steps": 25, "lr": 5e-4, "weight_decay": 0, "kl_factor": 0,
              "norm_constraint": 5e-4, "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj"}
    with pytest.warns(UserWarning, match="rewrite_module_tmp"):
        hp = resolve_hparams(m, "ft-l", constr)
    assert hp["layer"] == 0 and hp["norm_constraint"] == 5e-4 and "kl_factor" not in hp
    assert resolve_hparams(m, "ft-l", {"norm_constraint": False})["norm_constraint"] == 0.0
    with pytest.raises(FfkvError, match="norm_constraint"):
        resolve_hparams(m, "ft-l", {"norm_constraint": -1})
