"""The target value of an edit: a residual delta that makes the model say the new object.

ROME (compute_v) and MEMIT (compute_z) optimise a vector δ added to one site at the subject's last token
(ROME: the FFN output of the edited layer, ``ffn_out``; MEMIT: the residual stream after the last edited
layer, ``resid_post``), in every rewriting prompt ``x_j + prompt(subject)`` and in the essence prompt
``"{subject} is a"``:

    L(δ) = - (1/N) Σ_j (1/|o|) Σ_t log p(o_t | x_j + p, o_<t ; h + δ)          (new object o)
           + kl_factor · KL( p(· | "{s} is a"; h + δ) || p(· | "{s} is a"; h) )   (keep the subject's essence)
           + v_weight_decay · ||δ|| / ||h||²        (``v_weight_decay_form="reference"``, the default)

The weight-decay term is the one kmeng01's compute_v / compute_z (and AlphaEdit's compute_z) compute,
``v_weight_decay * norm(delta) / norm(target_init) ** 2``; the papers write ||δ||² / ||h||², available as
``v_weight_decay_form="squared"``. The form decides when the early stop (loss < ``early_stop_loss``) fires:
the squared term is smaller for ||δ|| < 1 and larger beyond.

with Adam (``v_lr``, ``v_num_grad_steps``), stopping when L < ``early_stop_loss``, and δ projected back into
the ball ||δ|| <= clamp_norm_factor · ||h|| after every step. h (d_model,) is the site's activation on the
bare prompt; the target value is v* = h + δ.

A batch of requests is optimised together: one forward pass per step holds every request's prompts, each
request has its own row of δ (n, d_model) and its own loss term, Adam acts element-wise, and a request that
has converged leaves the batch (its rows are no longer run) with δ frozen, so each row follows the same
trajectory as a one-request-at-a-time run and no work is spent on finished requests.

δ enters at layer l, so the layers below l compute the same residual at every step: each step runs layers
l .. L-1 only, from the residual entering l recorded once (the engine's ``start_layer`` / ``start_resid``).

The loss reads a few positions per row, and the LM head over every position of every row would be most of
the work (B x T x V logits): each step is one engine run with the head only at those positions
(``head=(rows, positions)`` of :func:`ffkv.models.engine.run`: the family's real head, soft-capping included).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.engine import run
from ..models.hooks import Intervention
from ..progress import bar
from .requests import Batch, EditRequest, render_batch, target_ids


MICRO_BATCH_ROWS = 256


@dataclass
class TargetResult:
    """delta, h: (n, d_model) float32. nll: (n,) final NLL of the target; steps: (n,) steps taken."""

    delta: torch.Tensor
    h: torch.Tensor
    nll: torch.Tensor
    target_prob: torch.Tensor
    steps: torch.Tensor

    def info(self, i: int) -> dict:
        return {"delta_norm": float(self.delta[i].norm()), "h_norm": float(self.h[i].norm()),
                "target_nll": float(self.nll[i]), "target_prob": float(self.target_prob[i]),
                "v_steps": int(self.steps[i])}


@contextlib.contextmanager
def frozen_parameters(model):
    """Turn off requires_grad on every weight (only δ is trained), restoring it afterwards."""
    params = list(model.hf.parameters())
    old = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, o in zip(params, old):
            p.requires_grad_(o)


def stack_batches(a: Batch, b: Batch, pad_id: int) -> Batch:
    """Rows of ``a`` then rows of ``b`` in one batch (``b`` has no targets); padded to the longer T."""
    T = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

    return Batch(torch.cat([pad(a.input_ids, pad_id), pad(b.input_ids, pad_id)]),
                 torch.cat([pad(a.attention_mask, 0), pad(b.attention_mask, 0)]),
                 torch.cat([a.subject_last, b.subject_last]), torch.cat([a.last, b.last]),
                 a.target_pos, a.target_tok, a.target_mask)


def add_at_rows(rows: torch.Tensor, positions: torch.Tensor, owner: torch.Tensor, delta: torch.Tensor):
    """``fn`` for :class:`Intervention`: h[rows_i, positions_i] += delta[owner_i]; h: (B, T, D)."""

    def fn(h):
        d = delta[owner].to(h.dtype)
        return h.index_put((rows, positions), h[rows, positions] + d)

    return fn


WEIGHT_DECAY_FORMS = ("reference", "squared")


def weight_decay_norm(delta: torch.Tensor, form: str) -> torch.Tensor:
    """(n,) ||δ_i|| ("reference": kmeng01's code) or ||δ_i||² ("squared": the papers); δ: (n, d_model).

    ``vector_norm``'s gradient at δ = 0 is 0 (the first step starts there), as torch.norm's in the reference."""
    if form == "squared":
        return delta.pow(2).sum(1)
    return torch.linalg.vector_norm(delta, dim=1)


def target_log_likelihood(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean log p of each rewriting row's target tokens: (n_rows,) from logits (n_rows, L, V) at target_pos."""
    lp = torch.log_softmax(logits.float(), -1)
    tok_lp = lp.gather(-1, batch.target_tok[..., None])[..., 0]  # (n, L)
    m = batch.target_mask.float()
    return (tok_lp * m).sum(1) / m.sum(1)


def compute_targets(model, requests: Sequence[EditRequest], site: str, layer: int, hparams: dict,
                    prefixes: Sequence[str], progress: bool = False) -> TargetResult:
    """Optimise δ for every request together (see the module docstring); returns a :class:`TargetResult`."""
    n, P = len(requests), len(prefixes)
    tok = model.require_tokenizer()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rewrite = render_batch(model, [(p, r) for r in requests for p in prefixes], with_target=True)
    kl_reqs = [EditRequest(hparams["kl_prompt"], r.subject, r.target) for r in requests]
    kl = render_batch(model, [("", r) for r in kl_reqs])
    batch = stack_batches(rewrite, kl, pad_id)
    dev = model.device
    B = n * P + n
    owner = torch.cat([torch.arange(n, device=dev).repeat_interleave(P), torch.arange(n, device=dev)])
    kl_rows = torch.arange(n * P, B, device=dev)

    with torch.no_grad():
        ref = run(model, batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"],
                  reads=[(site, layer)] + ([("resid_pre", layer)] if layer else []))
    logits, rec = ref.logits, ref.rec
    # δ enters at ``layer``: the layers below it give the same residual at every step, so each step starts
    # there from the residual this reference run recorded (run(start_layer=...), the engine's suffix run)
    resid0 = rec["resid_pre", layer] if layer else None  # (B, T, d_model)
    h = rec[site, layer][torch.arange(0, n * P, P, device=dev), batch.subject_last[: n * P: P]].float()
    kl_ref = torch.log_softmax(logits[kl_rows, batch.last[kl_rows]].float(), -1)  # (n, V)

    delta = torch.zeros(n, model.d_model, device=dev, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams["v_lr"])
    active = torch.ones(n, dtype=torch.bool, device=dev)
    steps = torch.zeros(n, dtype=torch.long)
    max_norm = hparams["clamp_norm_factor"] * h.norm(dim=1)  # (n,)
    h_sq = h.pow(2).sum(1)
    form = hparams.get("v_weight_decay_form", "reference")
    nll = torch.zeros(n)
    n_steps = int(hparams["v_num_grad_steps"])
    pbar = bar(total=n_steps, desc=f"target delta ({n} request{'s' if n > 1 else ''})", unit="step",
               enabled=progress)
    with frozen_parameters(model), pbar:
        for it in range(n_steps):
            pbar.update(1)
            # Only the requests still optimising run: a converged request leaves the batch, as it would
            # stop in a one-request-at-a-time run.
            act_all = torch.nonzero(active).flatten()  # request ids still optimising
            go_all = torch.zeros(n, dtype=torch.bool, device=dev)
            opt.zero_grad()
            # Micro-batches of requests keep the tensors cache-sized on a CPU; the gradients of one step
            # are accumulated over them before the (single) Adam step, so the result does not depend on it.
            for act in act_all.split(max(1, MICRO_BATCH_ROWS // (P + 1))):
                a = len(act)
                rw_sel = (act[:, None] * P + torch.arange(P, device=dev)).flatten()
                sel = torch.cat([rw_sel, n * P + act])
                width = int(batch.attention_mask[sel].sum(1).max())
                inputs = {"input_ids": batch.input_ids[sel, :width],
                          "attention_mask": batch.attention_mask[sel, :width]}
                fn = add_at_rows(torch.arange(len(sel), device=dev), batch.subject_last[sel], owner[sel], delta)
                sub = Batch(inputs["input_ids"], inputs["attention_mask"], batch.subject_last[sel],
                            batch.last[sel], rewrite.target_pos[rw_sel], rewrite.target_tok[rw_sel],
                            rewrite.target_mask[rw_sel])
                n_rw = a * P
                # one unembedding call for the target positions (n_rw, L) and the KL rows' last tokens (a,)
                L = sub.target_pos.shape[1]
                rows = torch.cat([torch.arange(n_rw, device=dev).repeat_interleave(L),
                                  torch.arange(n_rw, n_rw + a, device=dev)])
                pos = torch.cat([sub.target_pos.flatten(), batch.last[n * P + act]])
                # the family's real head, only where the loss reads: (n_rw * L + a, V)
                logits = run(model, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             edits=[Intervention(site, layer, "fn", value=fn)], head=(rows, pos),
                             **({} if resid0 is None else {"start_layer": layer,
                                                           "start_resid": resid0[sel, :width]})).logits
                nll_r = -target_log_likelihood(logits[: n_rw * L].view(n_rw, L, -1), sub).view(a, P).mean(1)
                lp_new = torch.log_softmax(logits[n_rw * L:].float(), -1)  # (a, V)
                kl_r = (lp_new.exp() * (lp_new - kl_ref[act])).sum(-1)  # KL(p_new || p_orig), as ROME's kl_div
                wd_r = hparams["v_weight_decay"] * weight_decay_norm(delta[act], form) / h_sq[act]
                loss_r = nll_r + hparams["kl_factor"] * kl_r + wd_r  # (a,)
                nll[act.cpu()] = nll_r.detach().cpu()
                go = loss_r.detach() >= hparams["early_stop_loss"]  # still optimising after this step
                go_all[act] = go
                if it < n_steps - 1 and bool(go.any()):
                    (loss_r * go.float()).sum().backward()
            active = go_all
            if not bool(active.any()) or it == n_steps - 1:
                break
            steps[active.cpu()] += 1
            keep = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                delta[~active] = keep[~active]
                norms = delta.norm(dim=1)
                over = active & (norms > max_norm)
                if bool(over.any()):
                    delta[over] = delta[over] * (max_norm[over] / norms[over])[:, None]
    with torch.no_grad():
        prob = (-nll).exp()
    return TargetResult(delta.detach(), h, nll, prob, steps)


FT_STOP_LOSS = 1e-2  # kmeng01's execute_ft: no step below this loss, and the loop ends


def constrained_finetune(model, request: EditRequest, layer: int, num_steps: int, lr: float,
                         weight_decay: float = 0.0, norm_constraint: float = 0.0) -> tuple[torch.Tensor, dict]:
    """FT-L's fine-tuning of layer ``layer``'s W_out on one request (:mod:`ffkv.edit.methods.ft_l`): Adam on
    L(W) = -(1/|o|) Σ_t log p(o_t | prompt) at the prompt's last position, a step only while L >= 1e-2, then
    W clamped into ||W - W_0||_∞ <= norm_constraint (0: no bound). Returns ΔW (d_model, d_ffn) float64 and its
    info; the model's weights are as they were when it returns."""
    b = render_batch(model, [("", request)])
    ids = b.inputs["input_ids"].to(model.device)
    mask = b.inputs["attention_mask"].to(model.device)
    tgt = torch.tensor(target_ids(model, request), device=model.device)
    head = (torch.zeros(1, dtype=torch.long), b.last[:1].cpu())
    param = model.value_param(layer)
    W0 = param.detach().clone()
    eps = float(norm_constraint or 0.0)
    losses = []
    try:
        with frozen_parameters(model), torch.enable_grad():
            param.requires_grad_(True)
            opt = torch.optim.Adam([param], lr=lr, weight_decay=weight_decay)
            for _ in range(int(num_steps)):
                opt.zero_grad()
                logits = run(model, ids, attention_mask=mask, head=head).logits  # (1, V) at the last token
                loss = -torch.log_softmax(logits.float(), -1)[0, tgt].mean()
                losses.append(float(loss.detach()))
                if losses[-1] >= FT_STOP_LOSS:
                    loss.backward()
                    opt.step()
                if eps > 0:
                    with torch.no_grad():
                        param.copy_(torch.maximum(torch.minimum(param, W0 + eps), W0 - eps))
                if losses[-1] < FT_STOP_LOSS:
                    break
        with torch.no_grad():
            new = model.values(layer).detach().double().clone()
    finally:
        with torch.no_grad():
            param.copy_(W0)
            param.grad = None
    D = new - model.values(layer).detach().double()
    return D, {"ft_steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
               "linf": float(D.abs().max())}
