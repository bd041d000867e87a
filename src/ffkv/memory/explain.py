"""Why the model prefers one answer to another: the logit difference decomposed by layer and by memory.

The residual stream at the last position is a sum of writes (the check at load verifies it):

    x = e + sum_l (a^l + f^l),      a^l = attention's write of layer l,  f^l = the FFN's write

and the head reads ``x`` through the final norm ``N(x) = g ⊙ P(x) / s(x) + b`` (``P`` centres for LayerNorm,
is the identity for RMSNorm). With the norm's scale ``s(x)`` frozen at its value on this prompt (direct logit
attribution, as TransformerLens does with a cached ``ln_final.hook_scale``), the head is linear in ``x``, so
each write's contribution to candidate ``c``'s logit is

    phi_c(w) = E_c · proj(g ⊙ P(w) / s(x))

and ``sum_w phi_c(w) + E_c · proj(b) (+ E's bias)`` is the logit itself, before the family's logit scaling
(applied to every term, it is linear) and soft-capping ``c tanh(z / c)``: the terms sum to the pre-cap logits
``z``, and ``check`` reports both the error of ``c tanh(sum / c)`` against the model's logits and the gap the cap
makes to the centred sum. Within an FFN, ``f^l = sum_i m_i v_i + b^l`` (Geva et al. 2022's sub-updates), so memory ``i``
contributes ``m_i phi_c(v_i)`` exactly; in post-norm families ``v_i`` is read as it writes (``g ⊙ v_i``,
:meth:`MemoryModel.write_values`) and the memories' sum approximates the FFN's write (reported).

With candidates ``c_1 .. c_K`` (their first tokens, by the model's answer rule) the result is centred: each
term's contribution to ``logit_c - mean_k logit_{c_k}``, so two candidates read as their logit difference.
Mixture-of-experts layers are decomposed by layer only (their memories are per expert; see docs/moe.md).
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import FfkvError
from ..models.engine import run
from ..models.memory_id import MemoryId
from ..models.spec import get_path
from ..models.moe import MoEModel

__all__ = ["Explanation", "explain", "frozen_norm"]


@dataclass
class Explanation:
    """Per-term contributions (centred over the candidates) to each candidate's logit at the last position.

    embed, constant: {candidate: float}; layers: one dict per layer with ``attn`` and ``ffn``
    ({candidate: float}) and ``memories`` (the top ones, each with ``memory``, ``coefficient`` and
    ``contribution`` {candidate: float}); check: the decomposition's sum against the model's own logits.
    """

    prompt: str
    candidates: list[str]
    token_ids: list[int]
    logits: dict[str, float]
    embed: dict[str, float]
    constant: dict[str, float]
    layers: list[dict] = field(default_factory=list)
    check: dict = field(default_factory=dict)

    @property
    def logit_diff(self) -> float:
        """logit(first candidate) - logit(second), the model's own."""
        a, b = self.candidates[:2]
        return self.logits[a] - self.logits[b]

    def promoting(self, candidate: str, n: int = 5) -> list[dict]:
        """The memories (over all layers) that most raise ``candidate`` against the others."""
        mems = [m for layer in self.layers for m in layer["memories"]]
        return sorted(mems, key=lambda m: -m["contribution"][candidate])[:n]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "candidates": self.candidates, "token_ids": self.token_ids,
                "logits": self.logits, "logit_diff": self.logit_diff, "embed": self.embed,
                "constant": self.constant, "layers": self.layers, "check": self.check}

    def __repr__(self) -> str:
        top = max(self.layers, key=lambda l: abs(_spread(l["ffn"])), default=None)
        where = f", largest FFN term at L{top['layer']}" if top else ""
        return (f"Explanation({self.prompt!r}, {' vs '.join(self.candidates)}: logit diff "
                f"{self.logit_diff:+.3f}{where}, sum error {self.check.get('error', float('nan')):.1e})")


def _spread(d: dict[str, float]) -> float:
    vals = list(d.values())
    return max(vals) - min(vals) if vals else 0.0


@torch.no_grad()
def frozen_norm(norm, x: torch.Tensor, tol: float = 1e-3):
    """The final norm linearised at ``x`` (d_model,): returns ``(L, b)`` with ``L(w) = g ⊙ P(w) / s(x)`` for
    ``w`` (..., d_model) and ``b = N(0)``, so ``L(x) + b == N(x)``.

    Read off the norm itself, without per-family code: ``N(0) = b``; ``N`` centres when ``N(x + 1) = N(x)``;
    the gain from an alternating ``±1`` probe (mean 0, RMS 1); ``s(x)`` from ``||g ⊙ P(x)|| / ||N(x) - b||``.
    A norm this does not reproduce to ``tol`` (relative) is refused.
    """
    if norm is None:
        return (lambda w: w), torch.zeros_like(x)
    x = x.float()
    d = x.shape[-1]
    # The probes run through a float32 copy: a bf16/fp16 norm would round each probe's output (2^-8 relative)
    norm32 = copy.deepcopy(norm).float()

    def N(t):
        return norm32(t[None])[0].float()

    b = N(torch.zeros_like(x))
    centres = bool(torch.allclose(N(x + 1.0), N(x), rtol=1e-3, atol=1e-4))

    def P(w):
        return w - w.mean(-1, keepdim=True) if centres else w

    u = torch.ones_like(x)
    u[1::2] = -1.0
    if d % 2:
        u[-1] = 0.0
    # The probe's own scale: its RMS (centred or not); eps is small against it and absorbed by the check.
    su = P(u).pow(2).mean().sqrt()
    g = (N(u) - b) * su
    g = torch.where(u != 0, g * u, g)
    if d % 2:  # the zeroed coordinate: recover its gain from a probe that sets it
        e = torch.zeros_like(x)
        e[-1] = 1.0
        e[0] = -1.0
        se = P(e).pow(2).mean().sqrt()
        g[-1] = (N(e) - b)[-1] * se / P(e)[-1]
    nx = N(x) - b
    px = g * P(x)
    s = px.norm() / nx.norm().clamp_min(1e-30)

    def L(w):
        return g * P(w) / s

    err = float((L(x) - nx).norm() / nx.norm().clamp_min(1e-30))
    if not err <= tol:
        raise FfkvError(f"the final norm ({type(norm).__name__}) is not a LayerNorm or RMSNorm this can linearise "
                        f"(relative error {err:.1e})", "explain supports LayerNorm/RMSNorm heads")
    return L, b


@torch.no_grad()
def explain(model, prompt: str, candidates: Sequence[str], top_n: int = 5, layers: Sequence[int] | None = None,
            leading_space: bool = True) -> Explanation:
    """Decompose the candidates' logits at the prompt's last token (module docstring).

    candidates: two or more answers; each is read as its first token (``model.answer_id``). top_n memories
    per layer are kept, ranked by how much they separate the candidates (max - min contribution).
    """
    cands = [str(c) for c in candidates]
    if len(cands) < 2:
        raise FfkvError("explain needs at least two candidates", "pass --candidates A B [C ...]")
    if len(set(cands)) < len(cands):
        raise FfkvError("the candidates repeat", "pass distinct candidates")
    ids = [model.answer_id(c, leading_space=leading_space) for c in cands]
    if len(set(ids)) < len(ids):
        dup = [c for c, i in zip(cands, ids) if ids.count(i) > 1]
        raise FfkvError(f"candidates {dup} begin with the same token, so their logits cannot differ",
                        "pass candidates whose first tokens differ")
    batch = model.encode(prompt)
    L = model.n_layers
    picked = list(range(L)) if layers is None else sorted({model.check_layer(l) for l in layers})
    moe = isinstance(model, MoEModel)
    reads = [("resid_pre", 0)]
    for l in range(L):
        reads += [("resid_post", l), ("ffn_write", l)]
        if l in picked and not moe:
            reads.append(("coef", l))
    r = run(model, batch["input_ids"], attention_mask=batch.get("attention_mask"), reads=reads, head="last")
    rec = r.rec
    x = rec["resid_post", L - 1][0, -1].float()
    Lin, b = frozen_norm(model.final_norm, x)
    idx = torch.tensor(ids, device=x.device)

    def head_rows(w):  # (..., d_model) residual-space vectors -> (..., K) candidate logits, linear part only
        y = Lin(w)
        return _linear_head(model, y, idx)

    const = _linear_head(model, b, idx) + _head_bias(model, idx)
    terms_e = head_rows(rec["resid_pre", 0][0, -1].float())
    out_layers, total = [], terms_e + const
    for l in range(L):
        pre = (rec["resid_pre", 0] if l == 0 else rec["resid_post", l - 1])[0, -1].float()
        post = rec["resid_post", l][0, -1].float()
        f = rec["ffn_write", l][0, -1].float()
        a = post - pre - f
        ta, tf = head_rows(a), head_rows(f)
        total = total + ta + tf
        if l not in picked:
            continue
        entry = {"layer": l, "attn": _centred(cands, ta), "ffn": _centred(cands, tf), "memories": [],
                 "memories_sum_error": None}
        if not moe:
            m = rec["coef", l][0, -1].float()
            wv = model.write_values(l).float()                  # (d_model, d_ffn)
            per = head_rows(wv.T) * m[:, None]                  # (d_ffn, K): m_i phi(v_i)
            per_c = per - per.mean(1, keepdim=True)
            spread = per_c.max(1).values - per_c.min(1).values
            top = torch.topk(spread, min(top_n, spread.numel())).indices
            entry["memories"] = [{"memory": str(MemoryId(l, int(i))), "coefficient": float(m[i]),
                                  "contribution": _centred(cands, per[i])} for i in top.tolist()]
            bias = model.value_bias(l)
            lin_sum = per.sum(0) + (head_rows(bias.float()) if bias is not None else 0.0)
            entry["memories_sum_error"] = float((lin_sum - tf).abs().max()) if model.post_norm(l) is None else None
        out_layers.append(entry)
    actual = r.logits[0].float()[idx]
    scale = model.logit_scale
    pre_cap = total * scale
    cap = model.logit_softcap
    modelled = torch.tanh(pre_cap / cap) * cap if cap else pre_cap
    check = {"sum": _centred(cands, pre_cap), "actual": _centred(cands, actual),
             "error": float((modelled - actual).abs().max()),
             "softcap": cap,
             "softcap_gap": float((_c(pre_cap) - _c(actual)).abs().max()) if cap else 0.0}
    sc = lambda t: _centred(cands, t * scale)
    for e in out_layers:
        for k in ("attn", "ffn"):
            e[k] = {c: v * scale for c, v in e[k].items()}
        for mem in e["memories"]:
            mem["contribution"] = {c: v * scale for c, v in mem["contribution"].items()}
    return Explanation(prompt=prompt, candidates=cands, token_ids=ids,
                       logits={c: float(v) for c, v in zip(cands, actual)}, embed=sc(terms_e),
                       constant=sc(const), layers=out_layers, check=check)


def _c(t: torch.Tensor) -> torch.Tensor:
    return t - t.mean(-1, keepdim=True)


def _centred(cands, t: torch.Tensor) -> dict[str, float]:
    t = _c(t.float())
    return {c: float(v) for c, v in zip(cands, t)}


def _linear_head(model, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``E_c · proj(y)`` for the candidates, without E's bias (proj is linear in every family that has one)."""
    proj = get_path(model.hf, model.spec.final_proj)
    if proj is not None:
        y = proj(y.to(model.dtype)).float()
    W = model.unembedding.weight[idx].float()                   # (K, d_model)
    return y.float() @ W.T


def _head_bias(model, idx: torch.Tensor) -> torch.Tensor:
    bias = getattr(model.unembedding, "bias", None)
    return torch.zeros(len(idx)) if bias is None else bias[idx].float()
