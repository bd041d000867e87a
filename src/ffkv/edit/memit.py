"""MEMIT: many edits at once, spread over a range of layers (Meng et al., 2023).

1. Target residuals. For the batch of n requests, optimise δ_i at the residual stream after the last edited
   layer L (``resid_post``), all requests together (:func:`.compute_value.compute_targets`):
   z_i = h_i^L + δ_i, Z: (n, d_model).
2. For each edited layer l = l_1 .. l_m = L, in order (later keys see earlier updates):

       K_l = [k*_1 .. k*_n]                          (d_ffn, n)     keys averaged over context prefixes
       R_l = (Z - H^L) / (m - j)                     (d_model, n)   the remaining residual, shared by the
                                                                    layers still to edit
       ΔW_l = R_l K_l^T (λ C_l + K_l K_l^T)^-1       (d_model, d_ffn)

   solved as ΔW_l = R_l A^T with A = (λ C_l + K_l K_l^T)^-1 K_l by a Cholesky solve (the matrix is
   symmetric positive definite); λ is ``mom2_update_weight`` and C_l = E[k k^T] the layer's statistics.

Each layer's update is a journal entry of rank n: u = R_l (d_model, n), v = A (d_ffn, n).

Post-norm families (Gemma-2/3, OLMo-2) add N(W_out m + b) to the residual, N the post-FFN norm, so a
residual delta R_l is not a change of W_out's output. For those layers R_l is mapped to the change Δy of
W_out's output y (at each request's subject's last token) whose normed write gives it,

    Δy = argmin ||N(y + Δy) - N(y) - R_l||^2 / ||R_l||^2 + ε ||Δy||^2 / ||y||^2      (per request)

(L-BFGS from Δy = R_l; ε = 1e-8 keeps Δy finite). A norm's output has an (almost) fixed size, so
N(y) + R_l is reached exactly only where it lies on that surface; elsewhere Δy gives the closest write
(``write_error`` in the journal entry's info: ||achieved - R_l|| / ||R_l||), and the layers after this one,
which see the residual left, make up the rest. Δy takes R_l's place in ΔW_l. Dense families (no post
norm) use R_l itself.

One expert per layer of a mixture-of-experts model (``hparams["expert"]``: one index for every layer, or a
list aligned with ``layers``): K_l holds expert e_l's coefficients at each request's subject's last token
(:func:`.compute_key.compute_expert_keys`, every request must be routed to e_l), C_l its statistics over the
tokens routed to it, and since the block writes ``w_e W m^e``, request i's column of R_l is divided by its
routing weight w_{e,i} (the expert's output moves by r_i / w_{e,i} for the block's to move by r_i). A Qwen2-MoE
shared expert (``expert`` None on an MoE layer) writes through its gate ``sigmoid(g . x)``, which divides R_l
the same way.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

from ..errors import FfkvError
from .compute_key import (compute_expert_keys, compute_keys, context_prefixes, read_at_subject, shared_gates,
                          shared_write_scale)
from .compute_value import compute_targets
from .journal import Journal, JournalEntry
from .requests import EditRequest
from .stats import SecondMoment, cholesky_factor


def memit_layer_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, lam: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) with ΔW = u v^T = R K^T (λ C + K K^T)^-1; C (d_ffn, d_ffn), K (d_ffn, n), R (d_model, n)."""
    K = K.double().cpu()
    A = lam * C.double().cpu() + K @ K.T
    adj = torch.cholesky_solve(K, cholesky_factor(A))  # (d_ffn, n)
    return R.double().cpu(), adj


def ffn_out_delta(write, y: torch.Tensor, R: torch.Tensor, max_iter: int = 100) -> torch.Tensor:
    """Δy (n, d_model) with write(y + Δy) ≈ write(y) + R, for each row; y, R: (n, d_model).

    write: the post-FFN write N(·) of one layer, applied row-wise (module docstring).
    """
    y = y.detach().float()
    R = R.detach().float().to(y.device)
    with torch.no_grad():
        target = write(y).float() + R
    r_sq = R.pow(2).sum(1).clamp_min(1e-30)
    y_sq = y.pow(2).sum(1).clamp_min(1e-30)
    delta = R.clone().requires_grad_(True)  # the dense answer is the starting point
    opt = torch.optim.LBFGS([delta], max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)

    def loss():
        opt.zero_grad()
        out = write(y + delta).float()
        val = ((out - target).pow(2).sum(1) / r_sq + 1e-8 * delta.pow(2).sum(1) / y_sq).sum()
        val.backward()
        return val

    with torch.enable_grad():
        opt.step(loss)
    return delta.detach()


def shared_subject_groups(requests: Sequence[EditRequest]) -> list[list[int]]:
    """Groups (of 2 or more) of requests about the same subject.

    The key k* is read at the subject's last token and averaged over context prefixes, so requests about one
    subject have the same or nearly the same key (the same exactly when the prompt text before the subject is
    the same); a layer maps one key to one value, so one batch cannot give them different values.
    """
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.subject, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def layer_experts(hparams: dict) -> list[int | None]:
    """The expert edited at each of ``hparams['layers']``: None (dense W_out), one index for all, or a list."""
    layers = list(hparams["layers"])
    ex = hparams.get("expert")
    if ex is None or (isinstance(ex, int) and not isinstance(ex, bool)):
        return [ex] * len(layers)
    if isinstance(ex, (list, tuple)) and len(ex) == len(layers) and all(
            e is None or (isinstance(e, int) and not isinstance(e, bool)) for e in ex):
        return list(ex)
    raise FfkvError(f"hyperparameter expert={ex!r} does not name one expert per layer of {layers}",
                    f"pass one expert index for all layers or a list of {len(layers)}")


def memit_edit(model, requests: Sequence[EditRequest], hparams: dict, stats: dict[int, SecondMoment],
               journal: Journal, prefixes: list[str] | None = None, method: str = "memit",
               layer_update: Callable | None = None, progress: bool = False) -> list[JournalEntry]:
    """Apply one MEMIT batch over ``hparams['layers']``; returns the journal entries (one per layer).

    ``stats`` is keyed by layer, or by ``(layer, expert)`` for a layer whose expert is edited.
    ``layer_update(site, K, R) -> (u, v, info)`` replaces the per-layer solve ΔW = u v^T (default: MEMIT's,
    :func:`memit_layer_update` with λ = ``mom2_update_weight``); AlphaEdit passes its null-space projected
    solve (:mod:`ffkv.edit.methods.alphaedit`), and ``method`` names the journal entries."""
    layers = list(hparams["layers"])
    experts = layer_experts(hparams)
    top = layers[-1]
    shared = shared_subject_groups(requests)
    if shared:
        r = requests[shared[0][0]]
        warnings.warn(f"{sum(len(g) for g in shared)} of {len(requests)} requests share a subject (e.g. "
                      f"{r.subject!r}) and so their key: each layer maps a key to one value, so they get about "
                      "the average of their values and may all fail; put them in separate batches "
                      "(ffkv.evaluate.datasets.subject_batches)", stacklevel=3)
    if prefixes is None:
        prefixes = context_prefixes(model, hparams["prefixes"], hparams["seed"])
    for layer, expert in zip(layers, experts):  # refuse an expert a request is not routed to, before optimising
        if expert is not None:
            compute_expert_keys(model, requests, layer, expert, [""])
    tgt = compute_targets(model, requests, "resid_post", top, hparams, prefixes, progress=progress)
    z = tgt.h + tgt.delta  # (n, d_model)
    reqs = [r.to_json() for r in requests]
    info_req = [tgt.info(i) for i in range(len(requests))]
    entries = []
    post_norm = model.post_norm
    for j, (layer, expert) in enumerate(zip(layers, experts)):
        if expert is None:
            K = compute_keys(model, requests, layer, prefixes).T  # (d_ffn, n)
        else:
            K, w = compute_expert_keys(model, requests, layer, expert, prefixes)
            K = K.T  # (d_expert, n)
        cur = read_at_subject(model, requests, "resid_post", top)  # (n, d_model)
        R = (z - cur).T / (len(layers) - j)  # (d_model, n) residual delta
        info = {}
        site = layer if expert is None else (layer, expert)
        if post_norm is not None and post_norm(layer) is not None:  # a block output change, then the expert's
            y = read_at_subject(model, requests, "ffn_out", layer)  # (n, d_model) W_out's (the block's) output
            write = lambda x, layer=layer: model.write_from_ffn_out(layer, x)  # noqa: E731
            dy = ffn_out_delta(write, y, R.T)
            with torch.no_grad():
                got = write(y + dy).float() - write(y).float()
            info["write_error"] = float((got - R.T.to(got.device)).norm() / R.norm().clamp_min(1e-30))
            R = dy.T.to(R.device)  # (d_model, n) in W_out's output space
        if expert is not None:
            R = R / w.to(R.device)[None, :]  # the expert's output change that moves the block by R
            info["routing_weights"] = [float(x) for x in w]
        elif shared_write_scale(model, layer):
            g = shared_gates(model, requests, layer, prefixes)
            R = R / g.to(R.device)[None, :]
            info["shared_gates"] = [float(x) for x in g]
        if layer_update is None:
            u, v = memit_layer_update(stats[site].C, K, R, float(hparams["mom2_update_weight"]))
        else:
            u, v, extra = layer_update(site, K, R)
            info.update(extra)
        info.update({"targets": info_req if j == 0 else None, "residual_norm": float(R.norm()),
                     "stats_tokens": stats[site].n_tokens, "stats_texts": stats[site].n_texts,
                     "stats_corpus": stats[site].corpus})
        entries.append(journal.record(model, method, layer, u.float(), v.float(), reqs, hparams, info,
                                      max_ratio=hparams["max_update_ratio"], keys=K, expert=expert))
    return entries
