"""FT-L (Meng et al., 2022, the constrained fine-tuning baseline): fine-tune one layer's W_out on the new
object under an L-infinity bound on the change.

As kmeng01/rome's ``baselines/ft`` (``execute_ft``) with its ``*_constr.json`` files: for each request,
Adam (``lr``, ``weight_decay``) on W = W_out of ``layer`` for at most ``num_steps`` steps on

    L(W) = - (1/|o|) Σ_t log p(o_t | prompt(subject); W)       every target token o_t scored at the prompt's
                                                                 last position (the reference's gather)

a step taken only while L >= 1e-2 and the loop left once L < 1e-2, and after every step W projected back
into the box ||W - W_0||_∞ <= norm_constraint (element-wise clamp; ``norm_constraint`` 0 or false: no
bound, the unconstrained FT). W: (d_model, d_ffn) in value orientation (the clamp is element-wise, so a
Conv1D's transposed layout does not matter).

The loop is :func:`ffkv.edit.compute_value.constrained_finetune` (the edit's one place for gradient steps).
The change ΔW = W - W_0 is full rank. It goes into the journal as ``u = I`` (d_model, d_model), ``v = ΔW^T``
(d_ffn, d_model), so ``W_0 + u v^T`` is the fine-tuned matrix (rounded to float32 once) and undo and replay
are bit-exact like every other entry. Departure: the reference's ``rewrite_module_tmp`` also matches the
module's bias, which its Adam trains and clamps too; ffkv's journal edits W_out, so the bias is left as it
is (its change is bounded by norm_constraint per element in the reference).

Defaults: GPT-2 XL's file (layer 0, 25 steps, lr 5e-4, no weight decay, norm_constraint 5e-4); GPT-2
medium / large 2e-3 / 1e-3, GPT-J 5e-5 (their files); the testbed's value is tuned (below).
"""

from __future__ import annotations

import torch

from ..compute_value import constrained_finetune

NAME = "ft-l"
SUMMARY = "fine-tune one layer's W_out on the target under an L-infinity bound on the change (Meng et al., 2022)"
BATCHED = False
HPARAM_DOCS = {
    "layer": "the FFN layer whose W_out is fine-tuned",
    "num_steps": "Adam steps at most (a step only while the loss is >= 1e-2)",
    "lr": "Adam learning rate",
    "weight_decay": "Adam weight decay",
    "norm_constraint": "L-infinity bound on W_out - W_out_0 after every step (0: unconstrained)",
    "max_update_ratio": "refuse an update with ||dW||_F > max_update_ratio * ||W||_F",
}

# (family, n_layers) -> norm_constraint of the published files (layer 0 in all of them)
NORM_TABLE = {("gpt2", 48): 5e-4, ("gpt2", 36): 1e-3, ("gpt2", 24): 2e-3, ("gpt-j", 28): 5e-5,
              # testbed: one request at a time on 8 CounterFact cases, the new object top-1 after the edit in
              # 0 / 8 / 8 of 8 at 5e-4 / 5e-3 / 5e-2 (2026-12-02, commit e1e2a98)
              ("gpt2", 6): 5e-3}


def defaults(model) -> dict:
    return {"layer": 0, "num_steps": 25, "lr": 5e-4, "weight_decay": 0.0,
            "norm_constraint": NORM_TABLE.get((model.family, model.n_layers), 5e-4), "max_update_ratio": 100.0}


def layers(hp: dict) -> list[int]:
    return [hp["layer"]]


def apply(model, requests, hp: dict, journal, context) -> None:
    """One request at a time: each a full-rank entry ΔW = I (ΔW^T)^T of ``hp['layer']``."""
    for r in requests:
        D, info = constrained_finetune(model, r, hp["layer"], hp["num_steps"], hp["lr"], hp["weight_decay"],
                                       hp["norm_constraint"])
        journal.record(model, NAME, hp["layer"], torch.eye(model.d_model, dtype=torch.float32), D.T.float(),
                       [r.to_json()], hp, info, max_ratio=hp["max_update_ratio"])
