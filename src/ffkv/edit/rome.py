"""ROME: a rank-one update of one W_out that inserts the key-value pair (k*, v*) (Meng et al., 2022).

Among all W' with W' k* = v* - b, ROME takes the one that least changes the outputs for the keys the layer
already sees, measured by C = E[k k^T]:

    W' = W + (v* - W k* - b) (C^-1 k*)^T / (k*^T C^-1 k*)          W: (d_model, d_ffn), k*: (d_ffn,)

so ΔW = u v^T with u = v* - W k* - b (d_model,) and v = C^-1 k* / (k*^T C^-1 k*) (d_ffn,). C^-1 k* is a
Cholesky solve in float64, never an explicit inverse. k* is the key averaged over context prefixes
(:mod:`.compute_key`) in both places (r-ROME), and v* = W k* + b + δ with δ from :mod:`.compute_value`,
so the edited layer maps k* to v* exactly: W' k* + b = v*.

One expert of a mixture-of-experts layer (``hparams["expert"] = e``): W is expert e's W_out (no bias), k* its
coefficients at the subject's last token (:func:`.compute_key.compute_expert_keys`; only an expert that token
is routed to can hold the fact), C its statistics over the tokens routed to it, and δ is optimised at the
block's output (``ffn_out``, what the MoE block adds to the residual) as for a dense layer. The block writes
``w_e W m^e``, so the expert's output must move by δ / w_e for the block's to move by δ:

    v* = W k* + δ / w_e          (w_e: the routing weight at the subject's last token, averaged like k*)

A Qwen2-MoE shared expert (``expert`` None on an MoE layer) writes through its gate ``sigmoid(g . x)``, which
takes w_e's place.
"""

from __future__ import annotations

import torch

from .compute_key import compute_expert_keys, compute_keys, context_prefixes, shared_gates, shared_write_scale
from .compute_value import compute_targets
from .journal import Journal, JournalEntry
from .requests import EditRequest
from .stats import SecondMoment, cholesky_factor


def solve_C(C_chol: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """C^-1 k from the Cholesky factor L (C = L L^T): k (d_ffn,) or (d_ffn, n) -> same shape, float64."""
    kk = k.double().to(C_chol.device)
    col = kk.dim() == 1
    x = torch.cholesky_solve(kk[:, None] if col else kk, C_chol)
    return x[:, 0] if col else x


def target_value(W: torch.Tensor, b: torch.Tensor | None, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """v* = W k* + b + δ (d_model,) float64: the FFN output at k* moved by the optimised δ."""
    out = W.double() @ k.double().to(W.device)
    if b is not None:
        out = out + b.double()
    return out + delta.double().to(W.device)


def rank_one_update(W: torch.Tensor, b: torch.Tensor | None, C_chol: torch.Tensor, k: torch.Tensor,
                    v_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) with ΔW = u v^T: u = v* - W k* - b (d_model,), v = C^-1 k* / (k*^T C^-1 k*) (d_ffn,), float64."""
    k = k.double()
    Cinv_k = solve_C(C_chol, k).to(W.device)
    residual = v_target.double().to(W.device) - W.double() @ k.to(W.device)
    if b is not None:
        residual = residual - b.double()
    return residual.cpu(), (Cinv_k / (k.to(W.device) @ Cinv_k)).cpu()


def rome_edit(model, request: EditRequest, hparams: dict, stats: SecondMoment, journal: Journal,
              prefixes: list[str] | None = None, progress: bool = False) -> JournalEntry:
    """Apply one ROME edit at ``hparams['layer']`` (expert ``hparams['expert']`` of it, when set) and record
    it in ``journal``; returns the entry."""
    layer = hparams["layer"]
    expert = hparams.get("expert")
    if prefixes is None:
        prefixes = context_prefixes(model, hparams["prefixes"], hparams["seed"])
    if expert is None:
        k = compute_keys(model, [request], layer, prefixes)[0]  # (d_ffn,)
        W, b, w_e = model.values(layer), model.value_bias(layer), None
        if shared_write_scale(model, layer):
            w_e = float(shared_gates(model, [request], layer, prefixes)[0])
    else:
        K, w = compute_expert_keys(model, [request], layer, expert, prefixes)  # refuses an unrouted expert
        k, w_e = K[0], float(w[0])
        W, b = model.values(layer, expert), None
    tgt = compute_targets(model, [request], "ffn_out", layer, hparams, prefixes, progress=progress)
    delta = tgt.delta[0] if w_e is None else tgt.delta[0] / w_e
    with torch.no_grad():
        v_star = target_value(W, b, k, delta)
        u, v = rank_one_update(W, b, cholesky_factor(stats.C), k, v_star)
    info = {**tgt.info(0), "stats_tokens": stats.n_tokens, "stats_texts": stats.n_texts,
            "stats_corpus": stats.corpus}
    if w_e is not None:
        info["routing_weight" if expert is not None else "shared_gate"] = w_e
    return journal.record(model, "rome", layer, u.float(), v.float(), [request.to_json()], hparams, info,
                          max_ratio=hparams["max_update_ratio"], keys=k, targets=v_star, expert=expert)
