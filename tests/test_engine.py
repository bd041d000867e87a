"""The engine (ffkv.models.engine): partial runs equal full runs on every family, stops run nothing deeper,
heads at positions are the model's own logits, hooks never stay behind, no deprecation warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import hook_count

from ffkv.errors import FfkvError
from ffkv.models.engine import Cost, capture_coefficients, reference_run, run, run_tail
from ffkv.models.hooks import Intervention, intervene


def _ids(m, B=2, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, min(m.vocab_size, 100), (B, T), generator=g)


def test_partial_run_from_a_layer_and_position_equals_the_full_run(tiny_models):
    for mt, m in tiny_models.items():
        ids = _ids(m)
        L = m.n_layers
        for start, prefix in [(L - 1, 3), (0, 4), (1, 0)]:
            logits, rec, cache = reference_run(m, ids, reads=[("resid_pre", start), ("resid_post", L - 1)])
            out = run(m, ids[:, prefix:], start_layer=start, start_resid=rec["resid_pre", start][:, prefix:],
                      cache=cache, prefix_len=prefix, cache_rows=torch.arange(2), reads=[("resid_post", L - 1)])
            assert out.logits.shape == (2, 7 - prefix, m.vocab_size), mt
            assert torch.allclose(out.logits, logits[:, prefix:], atol=1e-5, rtol=1e-5), (mt, start, prefix)
            assert torch.allclose(out.rec["resid_post", L - 1], rec["resid_post", L - 1][:, prefix:], atol=1e-5)
            if prefix != 3:
                continue
            # the same cells as the last-position shorthand
            tail, _ = run_tail(m, ids[:, prefix:], start, rec["resid_pre", start][:, prefix:], cache, prefix,
                               torch.arange(2))
            assert torch.allclose(tail, logits[:, -1], atol=1e-5, rtol=1e-5), (mt, start, prefix)


def test_one_cached_row_tiled_over_the_batch(tiny_models):
    m = tiny_models["llama"]
    ids = _ids(m, B=1)
    logits, rec, cache = reference_run(m, ids, reads=[("resid_pre", 1)])
    out = run(m, ids[:, 3:].expand(4, -1), start_layer=1, start_resid=rec["resid_pre", 1][:, 3:].expand(4, -1, -1),
              cache=cache, prefix_len=3, head="last")
    assert out.logits.shape == (4, m.vocab_size)
    assert torch.allclose(out.logits, logits[:, -1].expand(4, -1), atol=1e-5)


def test_stop_after_a_layer_reads_the_same_and_runs_nothing_deeper(tiny_models):
    for mt, m in tiny_models.items():
        ids = _ids(m)
        reads = [(site, 0) for site in ("resid_pre", "ffn_in", "coef", "ffn_out", "attn_out", "resid_post")]
        full = run(m, ids, reads=reads).rec
        calls = {}
        handles = [m.layer(l).register_forward_pre_hook(lambda mod, a, l=l: calls.__setitem__(l, calls.get(l, 0) + 1))
                   for l in range(m.n_layers)]
        handles.append(m.unembedding.register_forward_pre_hook(lambda mod, a: calls.__setitem__("head", 1)))
        try:
            out = run(m, ids, reads=reads, head="none")
        finally:
            for h in handles:
                h.remove()
        assert out.logits is None and out.stopped_after == 0, mt
        assert calls == {0: 1}, (mt, calls)  # layer 0 once; no deeper layer and no head
        for key in reads:
            assert torch.equal(out.rec[key], full[key]), (mt, key)


def test_stop_at_a_coefficient_skips_that_layers_w_out_and_reads_the_same(tiny_models):
    for mt, m in tiny_models.items():
        ids = _ids(m)
        last = m.n_layers - 1
        full = run(m, ids, reads=[("coef", l) for l in range(m.n_layers)]).rec
        w_out, _ = m.site_module("ffn_out", last)
        calls = []
        h = w_out.register_forward_hook(lambda mod, a, out: calls.append(1))
        try:
            got = capture_coefficients(m, ids)
        finally:
            h.remove()
        assert calls == [], mt  # the deepest layer's W_out never ran
        for l in range(m.n_layers):
            assert torch.equal(got[l], full["coef", l]), (mt, l)
        with pytest.raises(FfkvError, match="do not lie before"):
            run(m, ids, reads=[("coef", 0), ("ffn_out", 0)], head="none", stop_at=("coef", 0))


def test_head_at_positions_equals_the_models_logits(tiny_models):
    """The family's real head (MemoryModel.unembed) at (row, position) pairs == model.hf(...).logits there.
    Families with final-logit soft-capping pass once MemoryModel.unembed applies it."""
    rows, pos = torch.tensor([0, 2, 1]), torch.tensor([[6, 3], [0, 5], [2, 2]])
    for mt, m in tiny_models.items():
        ids = _ids(m, B=3)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            full = m.hf(input_ids=ids, attention_mask=mask).logits
            at = run(m, ids, attention_mask=mask, head=(rows, pos)).logits
            last = run(m, ids, head="last").logits
        assert at.shape == (3, 2, full.shape[-1]), mt
        assert torch.allclose(at, full[rows[:, None], pos], atol=1e-4, rtol=1e-4), mt
        assert torch.allclose(last, full[:, -1], atol=1e-5), mt


def test_head_at_positions_carries_gradients(tiny_models):
    m = tiny_models["gpt2"]
    ids = _ids(m)
    delta = torch.zeros(m.d_model, requires_grad=True)
    edit = Intervention("resid_post", 0, "fn", positions=[2], value=lambda h: h + delta)
    logits = run(m, ids, edits=[edit], head=(torch.tensor([0, 1]), torch.tensor([4, 6]))).logits
    logits[:, 5].sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_uncopied_reads_equal_copied_reads_on_every_family(tiny_models):
    sites = ("resid_pre", "ffn_in", "coef", "ffn_out", "attn_out", "resid_post")
    for mt, m in tiny_models.items():
        ids = _ids(m)
        reads = [(s, l) for l in range(m.n_layers) for s in sites]
        a = run(m, ids, reads=reads, copy_reads=True).rec
        b = run(m, ids, reads=reads, copy_reads=False).rec
        for key in reads:
            assert torch.equal(a[key], b[key]), (mt, key)  # Falcon's in-place ffn_out is copied
        coef = capture_coefficients(m, ids)
        for l in range(m.n_layers):
            assert torch.equal(coef[l], a["coef", l]), mt


def test_an_in_place_update_of_an_uncopied_read_is_an_error(tiny_models):
    m = tiny_models["gpt2"]
    module, _ = m.site_module("coef", 0)

    def write_in_place(mod, args, out):  # something after the read writes into W_out's input in place
        args[0].add_(0.0)

    handle = module.register_forward_hook(write_in_place)
    try:
        with pytest.raises(FfkvError, match="in place"):
            run(m, _ids(m), reads=[("coef", 0)], copy_reads=False)
        run(m, _ids(m), reads=[("coef", 0)], copy_reads=True)  # a copied read is safe
    finally:
        handle.remove()


def test_hooks_and_layers_are_restored_after_runs_including_failing_ones(tiny_models):
    for mt, m in tiny_models.items():
        n0, layers0 = hook_count(m), [id(m.layer(l)) for l in range(m.n_layers)]
        ids = _ids(m)
        _, rec, cache = reference_run(m, ids, reads=[("resid_pre", 1)])

        def boom(h):
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            run(m, ids[:, 3:], start_layer=1, start_resid=rec["resid_pre", 1][:, 3:], cache=cache, prefix_len=3,
                edits=[Intervention("coef", 1, "fn", value=boom)])
        with pytest.raises(ValueError, match="boom"):
            run(m, ids, head="none", edits=[Intervention("coef", 0, "fn", value=boom)])
        with pytest.raises(FfkvError):
            run(m, ids, head="none", stop_after=0, reads=[("coef", 1)])  # past the stop
        with pytest.raises(FfkvError):
            run(m, ids, head="sideways")
        with pytest.raises(FfkvError):
            run(m, ids, stop_after=0)  # a stopped run has no head
        run(m, ids, head="none", stop_after=0)
        run(m, ids, head=(torch.tensor([0]), torch.tensor([1])))
        assert hook_count(m) == n0, mt
        assert [id(m.layer(l)) for l in range(m.n_layers)] == layers0 and m.n_layers == len(layers0), mt


def test_cost_counts_the_layer_tokens_actually_run(tiny_models):
    m = tiny_models["llama"]
    ids = _ids(m)
    cost = Cost()
    _, rec, cache = reference_run(m, ids, reads=[("resid_pre", 1)], cost=cost)
    run_tail(m, ids[:, 4:], 1, rec["resid_pre", 1][:, 4:], cache, 4, torch.arange(2), cost=cost)
    run(m, ids, head="none", stop_after=0, cost=cost)
    L = m.n_layers
    assert cost.forward_passes == 3
    assert cost.layer_tokens == 2 * 7 * L + 2 * 3 * (L - 1) + 2 * 7 * 1


def test_no_deprecation_warnings_from_ffkv_calls(tiny_models):
    """transformers 5 renamed ``past_key_values`` to ``cache``; the engine uses the new names everywhere."""
    for mt, m in tiny_models.items():
        ids = _ids(m)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            logits, rec, cache = reference_run(m, ids, reads=[("resid_pre", 1)])
            run_tail(m, ids[:, 2:], 1, rec["resid_pre", 1][:, 2:], cache, 2, torch.arange(2))
            run(m, ids, head=(torch.tensor([0]), torch.tensor([3])))
            capture_coefficients(m, ids)


def test_ffn_write_is_a_site(tiny_models, monkeypatch):
    """hooks accept ffn_write; where it lives is the adapter's (site_module). Until the adapter maps it,
    this test maps it to the output of W_out (what it is in families without a post-FFN norm)."""
    m = tiny_models["gpt2"]
    real = m.site_module
    monkeypatch.setattr(m, "site_module", lambda site, layer: real("ffn_out" if site == "ffn_write" else site, layer))
    ids = _ids(m)
    with intervene(m, reads=[("ffn_write", 1), ("ffn_out", 1)]) as rec:
        m.hf(input_ids=ids)
    assert torch.equal(rec["ffn_write", 1], rec["ffn_out", 1])
    out = run(m, ids, reads=["ffn_write@0"], edits=[Intervention("ffn_write", 0, "scale", value=0.0)], head="none")
    assert out.rec["ffn_write", 0].abs().max() == 0
