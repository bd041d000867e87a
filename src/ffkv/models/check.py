"""Check an adapter spec against the real model.

For every layer, on one random input, the spec must reproduce what the model computes:

    m_spec  = act(W_in x + b_in) [* (W_up x + b_up)]       == input of W_out         (the coefficients)
    ffn     = sum_i m_i v_i + b = W_out m + b              == output of W_out        (the FFN output)
    write   = post_ffn_norm(sum_i m_i v_i + b)             == what the FFN writes    (identity norm if none)
    resid_post == resid_pre + attn_write + write                                    (the residual stream)

where x is the FFN input the model actually fed its key projection and ``attn_write`` is the attention
output (through the post-attention norm of sandwich-norm families). The residual identity holds for
sequential and parallel residuals alike, so a spec that forgets a post-FFN norm (Gemma-2 without
``post_feedforward_layernorm``) fails it. Finally the head: ``model.unembed`` of the last layer's output
must equal the model's logits (final norm, unembedding, logit scaling and soft-capping). A mismatch is
an :class:`~ffkv.errors.AdapterCheckFailed` naming the family, the layer and what differs.
"""

from __future__ import annotations

import torch

from ..errors import AdapterCheckFailed
from .hooks import intervene
from .model import MemoryModel

def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float64: 1e-8}.get(dtype, 2e-2)


@torch.no_grad()
def check_adapter(model: MemoryModel, seq_len: int = 8, seed: int = 0, raise_on_fail: bool = True) -> dict:
    """Run one random sequence and compare the spec's coefficients, FFN output, write, residual and head
    with the model's.

    Returns ``{"passed", "max_abs_error", "relative_tolerance", "head_error", "failure", "layers":
    [{layer, coef_error, ffn_error, write_error, resid_error}]}``; a quantity passes when its absolute
    error is within the tolerance times the compared tensor's scale (max |.|, at least 1). ``failure`` is
    None or the one-line reason of the first mismatch ("layer L: ...", "head: ...").
    """
    g = torch.Generator().manual_seed(seed)
    vocab = min(model.vocab_size, getattr(model.text_config, "vocab_size", None) or model.vocab_size)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g).to(model.device)
    sites = ["ffn_in", "coef", "ffn_out", "ffn_write", "resid_pre", "resid_post", "attn_out"]
    reads = [(site, l) for l in range(model.n_layers) for site in sites]
    with intervene(model, reads=reads) as rec:
        logits = model.hf(input_ids=ids).logits
    tol = _tolerance(model.dtype)
    rows, worst, failure = [], 0.0, None
    for l in range(model.n_layers):
        errs = _layer_errors(model, l, rec)
        rows.append({"layer": l, **{k: e for k, (e, _) in errs.items()}})
        worst = max([worst] + [e for e, _ in errs.values()])
        bad = next((k for k, (e, scale) in errs.items() if not e <= tol * scale), None)
        if bad is not None and failure is None:
            failure = f"layer {l}: {_WHAT[bad]} differ from the model's by {errs[bad][0]:.3g}"
    head_err, head_scale = _safe_err(lambda: (model.unembed(rec["resid_post", model.n_layers - 1]), logits))
    worst = max(worst, head_err)
    if failure is None and not head_err <= tol * head_scale:
        failure = (f"head: unembed(last residual) differs from the model's logits by {head_err:.3g} (final norm, "
                   "unembedding, logit scaling or soft-capping)")
    if failure is not None and raise_on_fail:
        raise AdapterCheckFailed(
            f"adapter check failed for family '{model.family}' at {failure} (relative tolerance {tol:g})",
            "the model does not match ffkv's spec for this family; please report the model type",
        )
    return {"passed": failure is None, "max_abs_error": worst, "relative_tolerance": tol, "head_error": head_err,
            "failure": failure, "layers": rows}


_WHAT = {
    "coef_error": "the spec's memory coefficients",
    "ffn_error": "the spec's FFN output sum_i m_i v_i + b",
    "write_error": "the spec's write post_ffn_norm(sum_i m_i v_i + b)",
    "resid_error": "resid_pre + attn_write + ffn_write (the residual after the layer)",
}


def _layer_errors(model: MemoryModel, l: int, rec) -> dict[str, tuple[float, float]]:
    x, m, out = rec["ffn_in", l], rec["coef", l], rec["ffn_out", l]
    errs = {
        "coef_error": _safe_err(lambda: (model.coefficients_from_input(l, x), m)),
        "ffn_error": _safe_err(lambda: (model.ffn_output_from_coefficients(l, m), out)),
    }
    write = _safe(lambda: model.write_from_ffn_out(l, model.ffn_output_from_coefficients(l, m)))
    errs["write_error"] = _safe_err(lambda: (write, model.residual_scale * rec["ffn_write", l]))
    errs["resid_error"] = _safe_err(lambda: (
        rec["resid_pre", l] + model.attn_write_from_attn_out(l, rec["attn_out", l], rec["resid_pre", l]) + write,
        rec["resid_post", l]))
    return errs


def _safe(fn):
    try:
        return fn()
    except (RuntimeError, TypeError, ValueError, IndexError):  # shapes disagree: the spec names wrong modules
        return None


def _safe_err(pair_fn) -> tuple[float, float]:
    pair = _safe(pair_fn)
    if pair is None or pair[0] is None or not torch.is_tensor(pair[0]) or pair[0].shape != pair[1].shape:
        return float("inf"), 1.0
    return _abs_err(*pair)


def _abs_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Max absolute difference, and the scale (max |b|, at least 1) the tolerance is relative to."""
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    return (err if err == err else float("inf")), max(1.0, b.abs().max().item())
