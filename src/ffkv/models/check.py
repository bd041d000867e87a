"""Check an adapter spec against the real model.

For every layer, on a random input, the spec must reproduce what the model computes:

    m_spec  = act(W_in x + b_in) [* (W_up x + b_up)]      == input of W_out   (the coefficients)
    ffn     = sum_i m_i v_i + b = W_out m + b             == output of W_out  (the FFN output)

where x is the FFN input the model actually fed its key projection. A mismatch means the spec names the
wrong module, orientation, activation or gate, and is an error naming the family and layer.
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
    """Run one random sequence and compare the spec's coefficients and FFN output with the model's.

    Returns ``{"passed", "max_abs_error", "relative_tolerance", "layers": [{layer, coef_error, ffn_error}]}``;
    a layer passes when its absolute error is within the tolerance times the compared tensor's scale
    (max |.|, at least 1).
    """
    g = torch.Generator().manual_seed(seed)
    vocab = min(model.vocab_size, getattr(model.config, "vocab_size", model.vocab_size))
    ids = torch.randint(0, vocab, (1, seq_len), generator=g).to(model.device)
    reads = [(site, l) for l in range(model.n_layers) for site in ("ffn_in", "coef", "ffn_out")]
    with intervene(model, reads=reads) as rec:
        model.hf(input_ids=ids)
    tol = _tolerance(model.dtype)
    rows, worst, passed = [], 0.0, True
    for l in range(model.n_layers):
        x, m, out = rec["ffn_in", l], rec["coef", l], rec["ffn_out", l]
        try:
            coef_err, coef_scale = _abs_err(model.coefficients_from_input(l, x), m)
            ffn_err, ffn_scale = _abs_err(model.ffn_output_from_coefficients(l, m), out)
        except RuntimeError:  # shapes disagree: the spec names the wrong modules or gate layout
            coef_err = ffn_err = float("inf")
            coef_scale = ffn_scale = 1.0
        rows.append({"layer": l, "coef_error": coef_err, "ffn_error": ffn_err})
        worst = max(worst, coef_err, ffn_err)
        bad = coef_err > tol * coef_scale or ffn_err > tol * ffn_scale
        passed = passed and not bad
        if raise_on_fail and bad:
            which = "memory coefficients" if coef_err > tol else "FFN output sum_i m_i v_i + b"
            raise AdapterCheckFailed(
                f"adapter check failed for family '{model.family}' at layer {l}: the spec's {which} "
                f"differ from the model's by {max(coef_err, ffn_err):.3g} (relative tolerance {tol:g})",
                "the model's FFN does not match ffkv's spec for this family; please report the model",
            )
    return {"passed": passed, "max_abs_error": worst, "relative_tolerance": tol, "layers": rows}


def _abs_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Max absolute difference, and the scale (max |b|, at least 1) the tolerance is relative to."""
    a, b = a.double(), b.double()
    return (a - b).abs().max().item(), max(1.0, b.abs().max().item())
