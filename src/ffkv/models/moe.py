"""Mixture-of-experts FFNs as key-value memories: an expert axis.

A sparse MoE layer routes each token x to its top-k experts and sums their FFNs, weighted by the router:

    MoE(x) = sum_{e in topk(x)} w_e(x) * FFN_e(x)  [+ sigmoid(g . x) * FFN_shared(x)]
    FFN_e(x) = W_out^e m^e(x),      m^e(x) = act(W_gate^e x) * (W_up^e x)

so expert e of layer l is a dense gated FFN of its own: row i of ``W_gate^e`` (and ``W_up^e``) is key
``k_i^e``, column i of ``W_out^e`` is value ``v_i^e``, and the memory is named
``MemoryId(l, i, expert=e)`` (``L3.E2.17``). Qwen2-MoE also has a *shared expert* that every token passes
through; it is an ordinary dense FFN (``MemoryId(l, i)``, ``L3.17``) whose write is scaled by a sigmoid gate.

transformers 5 keeps the experts of a layer as fused 3-D tensors (``gate_up_proj`` (E, 2F, D), ``down_proj``
(E, D, F)) in one module, so there is no module per expert to hook. This module is the engine for that axis:

    with expert_intervene(model, reads=[(1, 2)], edits=[ExpertEdit(1, 3, "off", indices=[5])]) as rec:
        model.hf(**batch)
    cap = rec[1, 2]        # ExpertCapture: coefficients (n, F) of the n tokens routed to expert 2 of layer 1
    cap.batch, cap.position, cap.weight     # (n,) which (batch, position) those are, and their routing weight
    cap.dense()            # (B, T, F), NaN where a token was not routed to the expert ("not active")

It replaces the experts module's ``forward`` for the duration of the block by a per-expert loop that computes
exactly what transformers' eager loop computes (bit for bit; within rounding of grouped_mm), and restores it on
exit, also on error. :func:`check_moe` is the load-time check, :func:`moe_census` the census by expert and
:func:`tiny_moe_model` builds tiny random models of the four families.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..errors import AdapterCheckFailed, FfkvError, UnsupportedArchitecture
from .adapters import ArchSpec, get_path
from .hooks import intervene
from .memory_id import MemoryId, parse_memories
from .model import MemoryModel

# ============================================================================= specs (data, checked)


@dataclass(frozen=True)
class MoESpec:
    """Where a family keeps its router, fused experts and shared expert, and how it routes.

    Paths are relative to one decoder layer. ``gate_up`` / ``down`` are parameter names on the experts module:
    ``gate_up`` is (E, 2F, D) with the gate rows first when ``gate_first`` (``[gate; up]``), ``down`` is
    (E, D, F). Routing: ``p = softmax(W_router x)`` in float32, the top-k experts of p, their weights
    renormalised to sum 1 when ``norm_topk`` (None: read ``config.norm_topk_prob``), cast back to the
    model's dtype when ``weights_in_dtype``.
    """

    family: str
    model_types: tuple[str, ...]
    block: str = "mlp"                     # the sparse MoE block (input: FFN input x, output: what it writes)
    router: str = "mlp.gate"               # module with .weight (E, D)
    experts: str = "mlp.experts"           # the fused experts module
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    act: str = "act_fn"                    # attribute of the experts module
    gate_first: bool = True
    norm_topk: bool | None = None
    weights_in_dtype: bool = True
    shared: str | None = None              # shared expert (a dense gated MLP)
    shared_gate: str | None = None         # Linear(D, 1): write = sigmoid(gate x) * shared(x)
    shared_key: str = "gate_proj"          # relative to the shared expert (and to a dense MLP)
    shared_up: str = "up_proj"
    shared_value: str = "down_proj"
    shared_act: str = "act_fn"
    notes: str = ""
    # Routing rule (ffkv.models.moe_infer picks it for inferred families; the check confirms it):
    #   "softmax": p = softmax(W_router x);  "sigmoid": p = sigmoid(W_router x) (DeepSeek-V3, GLM-4-MoE).
    # The experts are chosen by top-k of p [+ score_bias] (within the topk_group best of n_group groups, a
    # group scored by the sum of its two best experts or by its best: group_score); their weights are p
    # (never the biased score), renormalised as w / (sum w + norm_eps) when norm_topk, times routed_scaling.
    routing: str = "softmax"
    score_bias: str | None = None          # path in the layer of an (E,) / (1, E) buffer (e_score_correction_bias)
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2sum"           # a group's score: "top2sum" (DeepSeek-V3) or "max" (DeepSeek-V2)
    norm_eps: float = 0.0
    routed_scaling: float = 1.0
    top_k: int | None = None               # None: config.num_experts_per_tok
    # per-layer token mixer (hybrid families: attention in some layers, linear attention / a state-space
    # mixer in others); None: ArchSpec.attn in every layer. Site "attn_out" is the output of layer l's mixer.
    mixers: tuple[str, ...] | None = None
    inferred: bool = False


_LLAMA_LAYOUT = dict(
    layers="model.layers", embed="model.embed_tokens", unembed="lm_head", final_norm="model.norm",
    attn="self_attn", mlp="mlp", key="mlp.gate_proj", up="mlp.up_proj", value="mlp.down_proj",
    act="mlp.act_fn", pre_attn_norm="input_layernorm", pre_ffn_norm="post_attention_layernorm",
)

# The dense part of each family: layers, norms, head; key/up/value name the dense MLP of layers without
# experts (Qwen-MoE's mlp_only_layers), which do not exist in an all-MoE model.
MOE_SPECS: tuple[tuple[ArchSpec, MoESpec], ...] = (
    (ArchSpec(family="mixtral", model_types=("mixtral",), **_LLAMA_LAYOUT,
              notes="sparse MoE in every layer; experts fused as (E, 2F, D) / (E, D, F)"),
     MoESpec(family="mixtral", model_types=("mixtral",), norm_topk=True, weights_in_dtype=False,
             notes="top-k softmax weights always renormalised, kept in float32")),
    (ArchSpec(family="qwen2-moe", model_types=("qwen2_moe",), **_LLAMA_LAYOUT,
              notes="shared expert gated by sigmoid(shared_expert_gate x); mlp_only_layers are dense"),
     MoESpec(family="qwen2-moe", model_types=("qwen2_moe",), shared="mlp.shared_expert",
             shared_gate="mlp.shared_expert_gate")),
    (ArchSpec(family="qwen3-moe", model_types=("qwen3_moe",), **_LLAMA_LAYOUT,
              notes="q/k RMSNorm in attention; mlp_only_layers are dense"),
     MoESpec(family="qwen3-moe", model_types=("qwen3_moe",))),
    (ArchSpec(family="olmoe", model_types=("olmoe",), **_LLAMA_LAYOUT, notes="q/k RMSNorm in attention"),
     MoESpec(family="olmoe", model_types=("olmoe",))),
)

_MOE_BY_TYPE = {t: pair for pair in MOE_SPECS for t in pair[1].model_types}


def moe_model_types() -> list[str]:
    return sorted(_MOE_BY_TYPE)


def is_moe(model_type_or_config) -> bool:
    """True for a model type (or config) whose FFNs are mixtures of experts with a hand-written spec."""
    return getattr(model_type_or_config, "model_type", model_type_or_config) in _MOE_BY_TYPE


def get_moe_spec(model_type_or_config) -> tuple[ArchSpec, MoESpec]:
    mt = getattr(model_type_or_config, "model_type", model_type_or_config)
    if mt not in _MOE_BY_TYPE:
        raise UnsupportedArchitecture(f"architecture '{mt}' has no mixture-of-experts spec in ffkv",
                                      f"MoE model types: {', '.join(moe_model_types())}")
    return _MOE_BY_TYPE[mt]


# ============================================================================= the model with an expert axis


class MoEModel(MemoryModel):
    """A :class:`MemoryModel` whose MoE layers have an expert axis.

    Conventions (``e`` an expert of MoE layer ``l``; F = ``d_expert(l)``):
        keys(l, e)       (F, D)   row i is key k_i^e (W_gate^e), a view of gate_up_proj[e]
        up_keys(l, e)    (F, D)   W_up^e
        values(l, e)     (D, F)   column i is value v_i^e, a view of down_proj[e]: in-place writes edit it
        value_param(l, e) / value_slice(l, e):  the fused (E, D, F) parameter and the index of expert e in it
    ``expert=None`` on an MoE layer names the shared expert (Qwen2-MoE), a dense FFN; on a layer without
    experts it names that layer's dense MLP, exactly as :class:`MemoryModel` does.
    """

    def __init__(self, hf_model: nn.Module, tokenizer=None, spec: ArchSpec | None = None,
                 name_or_path: str | None = None, moe_spec: MoESpec | None = None):
        if spec is None or moe_spec is None:  # an inferred family passes both (ffkv.models.moe_infer)
            arch, moe = get_moe_spec(hf_model.config)
            spec, moe_spec = spec or arch, moe_spec or moe
        super().__init__(hf_model, tokenizer, spec, name_or_path)
        self.moe_spec = moe_spec

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, check: bool = True) -> "MoEModel":
        return cls.from_hf_checked(hf_model, tokenizer, None, check)

    @classmethod
    def from_hf_checked(cls, hf_model, tokenizer, name_or_path, check: bool, spec: ArchSpec | None = None,
                        moe_spec: MoESpec | None = None) -> "MoEModel":
        mm = cls(hf_model, tokenizer, spec=spec, name_or_path=name_or_path, moe_spec=moe_spec)
        mm.adapter_check = check_moe(mm, raise_on_fail=True) if check else None
        return mm

    # ----------------------------------------------------------------------------- the expert axis
    def experts_module(self, layer: int) -> nn.Module | None:
        """The fused experts module of a layer; None for a layer without experts."""
        return get_path(self.layer(layer), self.moe_spec.experts)

    def is_moe_layer(self, layer: int) -> bool:
        return self.experts_module(layer) is not None

    @property
    def moe_layers(self) -> list[int]:
        return [l for l in range(self.n_layers) if self.is_moe_layer(l)]

    def n_experts(self, layer: int) -> int:
        """Routed experts at a layer (0 for a dense layer)."""
        ex = self.experts_module(layer)
        return 0 if ex is None else getattr(ex, self.moe_spec.down).shape[0]

    @property
    def top_k(self) -> int:
        if self.moe_spec.top_k is not None:
            return int(self.moe_spec.top_k)
        return int(self.config.num_experts_per_tok)

    def has_shared_expert(self, layer: int) -> bool:
        return self.moe_spec.shared is not None and self.is_moe_layer(layer) and \
            get_path(self.layer(layer), self.moe_spec.shared) is not None

    def router(self, layer: int) -> nn.Module:
        return self.module(layer, self.moe_spec.router)

    def check_expert(self, layer: int, expert: int) -> int:
        n = self.n_experts(layer)
        if n == 0:
            raise FfkvError(f"layer {layer} of this {self.family} model has no experts",
                            "drop the E<expert> part of the memory name")
        if isinstance(expert, bool) or not hasattr(expert, "__index__") or not 0 <= int(expert) < n:
            raise FfkvError(f"expert {expert!r} is out of range for layer {layer} ({n} experts)",
                            f"use experts 0..{n - 1}")
        return int(expert)

    def check_memory(self, mid) -> MemoryId:
        """Refuse a memory the model does not have (the width depends on the layer and expert)."""
        mid = MemoryId.parse(mid)
        self.check_layer(mid.layer)
        if mid.expert is not None:
            self.check_expert(mid.layer, mid.expert)
        return mid.check(self.n_layers, self.d_expert(mid.layer, mid.expert),
                         self.n_experts(mid.layer) or None)

    def _fused(self, layer: int, name: str) -> torch.Tensor:
        return getattr(self.experts_module(layer), name)

    def d_expert(self, layer: int, expert: int | None = None) -> int:
        """Width F of one FFN: a routed expert, or (``expert=None``) the shared expert / dense MLP."""
        if expert is not None:
            return self.values(layer, expert).shape[1]
        return self.values(layer).shape[1]  # refuses an MoE layer without a dense FFN

    @property
    def d_ffn(self) -> int:
        """Width of one routed expert (of the first MoE layer); dense widths: :meth:`d_expert`."""
        moe = self.moe_layers
        return self.d_expert(moe[0], 0) if moe else super().d_ffn

    def __repr__(self):
        return (f"MoEModel({self.name_or_path!r}, family={self.family}, layers={self.n_layers}, "
                f"d_model={self.d_model}, d_expert={self.d_ffn}, "
                f"experts={self.n_experts(self.moe_layers[0]) if self.moe_layers else 0}, top_k={self.top_k})")

    @property
    def identity(self) -> dict:
        out = super().identity
        out.update(n_experts=[self.n_experts(l) for l in range(self.n_layers)], top_k=self.top_k,
                   shared_expert=any(self.has_shared_expert(l) for l in range(self.n_layers)))
        return out

    # ----------------------------------------------------------------------------- dense paths
    def _dense(self, layer: int, what: str) -> str:
        """Path of the dense FFN part ``what`` (key/up/value/act) of a layer: shared expert on MoE layers."""
        if self.is_moe_layer(layer):
            if not self.has_shared_expert(layer):
                raise FfkvError(f"layer {layer} of this {self.family} model is a mixture of experts with no "
                                f"dense FFN", f"name an expert: L{layer}.E<expert>.<index>, expert 0.."
                                              f"{self.n_experts(layer) - 1}")
            m = self.moe_spec
            rel = {"key": m.shared_key, "up": m.shared_up, "value": m.shared_value, "act": m.shared_act}[what]
            return f"{m.shared}.{rel}"
        return getattr(self.spec, what)

    def site_module(self, site: str, layer: int | None) -> tuple[nn.Module, str]:
        """Dense sites; on an MoE layer "ffn_out"/"ffn_write" are the block's output (what it adds to the
        residual) and "coef" is the shared expert's coefficients (expert coefficients: :func:`expert_intervene`)."""
        if layer is not None and site in ("coef", "ffn_out", "ffn_write") and self.is_moe_layer(layer):
            if site == "coef":
                return self.module(layer, self._dense(layer, "value")), "pre"
            if site == "ffn_write" and self.spec.post_ffn_norm is not None:  # sandwich norms (FlexOlmo, AFMoE)
                return self.module(layer, self.spec.post_ffn_norm), "post"
            return self.module(layer, self.moe_spec.block), "post"
        if site == "attn_out" and layer is not None and self.moe_spec.mixers is not None:
            return self.module(self.check_layer(layer), self.moe_spec.mixers[layer]), "post"
        if site == "ffn_write" and self.spec.post_ffn_norm is None:  # the FFN output is added unchanged
            site = "ffn_out"
        return super().site_module(site, layer)

    # ----------------------------------------------------------------------------- keys and values
    def _weight(self, layer: int, path: str) -> torch.Tensor:
        return self.module(layer, path).weight

    def keys(self, layer: int, expert: int | None = None) -> torch.Tensor:
        """Keys (F, D): W_gate^e rows (a view), or the shared expert's / dense MLP's W_gate."""
        if expert is None:
            return self._weight(layer, self._dense(layer, "key"))
        gu = self._fused(layer, self.moe_spec.gate_up)[self.check_expert(layer, expert)]
        f = gu.shape[0] // 2
        return gu[:f] if self.moe_spec.gate_first else gu[f:]

    def up_keys(self, layer: int, expert: int | None = None) -> torch.Tensor:
        if expert is None:
            return self._weight(layer, self._dense(layer, "up"))
        gu = self._fused(layer, self.moe_spec.gate_up)[self.check_expert(layer, expert)]
        f = gu.shape[0] // 2
        return gu[f:] if self.moe_spec.gate_first else gu[:f]

    def key_bias(self, layer: int, expert: int | None = None):
        return None if expert is not None else getattr(self.module(layer, self._dense(layer, "key")), "bias", None)

    def up_bias(self, layer: int, expert: int | None = None):
        return None if expert is not None else getattr(self.module(layer, self._dense(layer, "up")), "bias", None)

    def values(self, layer: int, expert: int | None = None) -> torch.Tensor:
        """Values (D, F): column i is v_i^e. A view of the parameter: in-place writes edit the model."""
        if expert is None:
            return self._weight(layer, self._dense(layer, "value"))
        return self._fused(layer, self.moe_spec.down)[self.check_expert(layer, expert)]

    def value_param(self, layer: int, expert: int | None = None) -> nn.Parameter:
        """The parameter holding a W_out: the fused (E, D, F) ``down_proj`` for an expert (index it with
        :meth:`value_slice`), the (D, F) ``down_proj.weight`` of the shared expert / dense MLP otherwise."""
        if expert is None:
            return self.module(layer, self._dense(layer, "value")).weight
        self.check_expert(layer, expert)
        return self._fused(layer, self.moe_spec.down)

    def value_slice(self, layer: int, expert: int | None = None) -> tuple:
        """Index of one W_out in :meth:`value_param`: ``value_param(l, e)[value_slice(l, e)] == values(l, e)``."""
        if expert is None:
            return (slice(None),)
        return (self.check_expert(layer, expert),)

    def value_bias(self, layer: int, expert: int | None = None):
        return None if expert is not None else \
            getattr(self.module(layer, self._dense(layer, "value")), "bias", None)

    def activation(self, layer: int, expert: int | None = None):
        if expert is None:
            return self.module(layer, self._dense(layer, "act"))
        return getattr(self.experts_module(layer), self.moe_spec.act)

    def coefficients_from_input(self, layer: int, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """``m^e(x) = act(W_gate^e x) * (W_up^e x)``; x: (..., D) -> (..., F)."""
        lin = torch.nn.functional.linear
        gate = lin(x, self.keys(layer, expert), self.key_bias(layer, expert))
        return self.activation(layer, expert)(gate) * lin(x, self.up_keys(layer, expert), self.up_bias(layer, expert))

    def ffn_output_from_coefficients(self, layer: int, m: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """``FFN_e = W_out^e m = sum_i m_i v_i^e``; m: (..., F) -> (..., D). Before the routing weight."""
        return torch.nn.functional.linear(m, self.values(layer, expert), self.value_bias(layer, expert))

    def shared_gate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The shared expert's write scale ``sigmoid(g . x)``, (..., 1); ones when the family has no gate."""
        if self.moe_spec.shared_gate is None:
            return torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
        return torch.sigmoid(self.module(layer, self.moe_spec.shared_gate)(x))

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The spec's routing of FFN inputs x (N, D): ``(top_k_index (N, k), top_k_weights (N, k))``.

        ``p = softmax(W_router x)`` or ``sigmoid(W_router x)`` in float32 (:attr:`MoESpec.routing`); experts
        chosen by top-k of ``p + b`` (``score_bias``; within the ``topk_group`` best of ``n_group`` groups);
        weights ``p`` of the chosen, ``/ (sum + norm_eps)`` when renormalised, ``* routed_scaling``.
        """
        m = self.moe_spec
        router = self.router(layer)
        x = x.reshape(-1, x.shape[-1])
        if m.routing == "softmax":
            logits = torch.nn.functional.linear(x, router.weight)
            probs = torch.softmax(logits.float(), dim=-1)
        elif m.routing == "sigmoid":
            logits = torch.nn.functional.linear(x.float(), router.weight.float())
            probs = logits.sigmoid()
        else:
            raise FfkvError(f"unknown routing rule '{m.routing}'", "use 'softmax' or 'sigmoid'")
        k = self.top_k
        if m.score_bias is None and m.n_group <= 1:
            top_w, top_i = torch.topk(probs, k, dim=-1)
        else:
            choice = probs
            if m.score_bias is not None:
                choice = choice + get_path(self.layer(layer), m.score_bias).reshape(-1).float()
            if m.n_group > 1:
                E = choice.shape[-1]
                grouped = choice.view(-1, m.n_group, E // m.n_group)
                group_scores = grouped.max(dim=-1).values if m.group_score == "max" else \
                    grouped.topk(2, dim=-1)[0].sum(dim=-1)
                group_idx = torch.topk(group_scores, k=m.topk_group, dim=-1, sorted=False)[1]
                keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
                choice = choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape(-1, E), float("-inf"))
            top_i = torch.topk(choice, k, dim=-1, sorted=False)[1]
            top_w = probs.gather(1, top_i)
        norm = m.norm_topk
        if norm is None:
            norm = bool(getattr(self.config, "norm_topk_prob", False))
        if norm:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + m.norm_eps)
        if m.routed_scaling != 1.0:
            top_w = top_w * m.routed_scaling
        if m.weights_in_dtype:
            top_w = top_w.to(x.dtype)
        return top_i, top_w

    def moe_output_from_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MoE block by the spec: ``sum_{e in topk} w_e W_out^e m^e(x) [+ sigmoid(g x) W_s m^s(x)]``.

        x: (N, D) -> (N, D). Used by :func:`check_moe` against the model's own block.
        """
        x = x.reshape(-1, x.shape[-1])
        idx, wts = self.route(layer, x)
        out = torch.zeros_like(x)
        for e in range(self.n_experts(layer)):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                y = self.ffn_output_from_coefficients(layer, self.coefficients_from_input(layer, x[tok], e), e)
                out.index_add_(0, tok, (y * wts[tok, slot, None]).to(out.dtype))
        if self.has_shared_expert(layer):
            out = out + self.shared_gate(layer, x) * self.ffn_output_from_coefficients(
                layer, self.coefficients_from_input(layer, x))
        return out


def wrap(hf_model: nn.Module, tokenizer=None, check: bool = True, name_or_path: str | None = None) -> MoEModel:
    """Wrap a transformers MoE causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE); runs :func:`check_moe`."""
    return MoEModel.from_hf_checked(hf_model, tokenizer, name_or_path, check)


# ============================================================================= the engine: per-expert runs

EXPERT_OPS = ("off", "on", "set", "scale", "add", "fn")

Index = None | int | Sequence[int] | torch.Tensor


@dataclass
class ExpertEdit:
    """One rewrite of the coefficients of expert ``expert`` at layer ``layer``, on the tokens routed to it.

    ``op`` acts on ``m[rows, indices]`` where rows are the routed tokens at ``batch`` x ``positions``
    (None = all): ``off`` (0), ``on``/``set`` (value), ``scale`` (m * value), ``add`` (m + value),
    ``fn`` (value(slice) -> new slice). Tokens not routed to the expert are never touched: an edit cannot
    make an expert fire on a token the router did not send it.
    """

    layer: int
    expert: int
    op: str
    value: Any = None
    indices: Index = None
    positions: Index = None
    batch: Index = None

    def __post_init__(self):
        if self.op not in EXPERT_OPS:
            raise FfkvError(f"unknown expert intervention '{self.op}'", f"use one of {', '.join(EXPERT_OPS)}")
        if self.op != "off" and self.value is None:
            raise FfkvError(f"expert intervention '{self.op}' needs a value", "pass value=...")

    def apply(self, m: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """m (n, F) coefficients of the routed rows, b / t (n,) their batch and position -> a rewritten copy."""
        rows = torch.ones(m.shape[0], dtype=torch.bool, device=m.device)
        for sel, where in ((self.batch, b), (self.positions, t)):
            if sel is not None:
                rows &= torch.isin(where, torch.as_tensor(sel, device=m.device, dtype=torch.long).reshape(-1))
        r = rows.nonzero().reshape(-1)
        cols = torch.arange(m.shape[1], device=m.device) if self.indices is None else \
            torch.as_tensor(self.indices, device=m.device, dtype=torch.long).reshape(-1)
        if cols.numel() and (cols.max() >= m.shape[1] or cols.min() < 0):
            raise FfkvError(f"memory index {cols.tolist()} out of range for an expert with d_ffn={m.shape[1]}",
                            f"use indices 0..{m.shape[1] - 1}")
        idx = (r[:, None], cols[None, :])
        cur = m[idx]
        v = self.value.to(m.device, m.dtype) if torch.is_tensor(self.value) else self.value
        new = {"off": lambda: torch.zeros_like(cur), "on": lambda: v, "set": lambda: v,
               "scale": lambda: cur * v, "add": lambda: cur + v, "fn": lambda: self.value(cur)}[self.op]()
        out = m.clone()
        out[idx] = torch.as_tensor(new, dtype=m.dtype, device=m.device).expand_as(cur)
        return out


def switch_expert_memories(memories: Iterable, on_value: float | None = None,
                           positions: Index = None) -> list[ExpertEdit]:
    """Switch expert memories (``L3.E2.17`` ...) off (``on_value=None``) or force them to ``on_value``;
    one :class:`ExpertEdit` per (layer, expert). Dense memories are refused (use hooks.switch_memories)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for mid in parse_memories(memories):
        if mid.expert is None:
            raise FfkvError(f"memory {mid} is not an expert memory", "switch dense memories with "
                                                                      "ffkv.models.hooks.switch_memories")
        groups.setdefault((mid.layer, mid.expert), []).append(mid.index)
    op = "off" if on_value is None else "on"
    return [ExpertEdit(l, e, op, value=None if on_value is None else float(on_value), indices=ix,
                       positions=positions) for (l, e), ix in groups.items()]


@dataclass
class ExpertCapture:
    """What expert ``expert`` of layer ``layer`` did in one forward pass, on the n tokens routed to it.

    coef      (n, F)  coefficients m^e of those tokens, as the model used them (after edits)
    batch     (n,)    batch row of each token;  position (n,) its position;  token (n,) = batch * T + position
    weight    (n,)    its routing weight w_e;  slot (n,) which of its top-k choices e was
    out       (n, D)  W_out^e m^e before the routing weight (only with ``outputs=True``), else None
    shape     (B, T)
    Rows are in token order. Tokens not in ``token`` were not routed to e: their coefficient is not active
    (absent here, NaN in :meth:`dense`), never 0.
    """

    layer: int
    expert: int
    coef: torch.Tensor
    batch: torch.Tensor
    position: torch.Tensor
    token: torch.Tensor
    weight: torch.Tensor
    slot: torch.Tensor
    shape: tuple[int, int]
    out: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.token.numel())

    def mask(self) -> torch.Tensor:
        """(B, T) bool: True where the token was routed to this expert."""
        m = torch.zeros(self.shape, dtype=torch.bool, device=self.coef.device)
        m[self.batch, self.position] = True
        return m

    def dense(self, fill: float = math.nan) -> torch.Tensor:
        """(B, T, F) coefficients with ``fill`` (NaN: not active) at unrouted tokens. Note torch.topk ranks
        NaN first: mine maxima over ``dense(-inf)`` or over :attr:`coef` with :attr:`token`."""
        d = torch.full((*self.shape, self.coef.shape[1]), fill, dtype=self.coef.dtype, device=self.coef.device)
        d[self.batch, self.position] = self.coef
        return d


class ExpertRecording(dict):
    """Captures keyed by ``(layer, expert)``; ``routing[layer] = (top_k_index, top_k_weights)``, each (B, T, k)."""

    def __init__(self):
        super().__init__()
        self.routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, key):
        if key not in self:
            raise FfkvError(f"expert {key} was not recorded", "add (layer, expert) or the layer to reads=[...]")
        return super().__getitem__(key)


def _read_keys(model: MoEModel, reads) -> set[tuple[int, int]]:
    keys = set()
    for r in reads:
        if isinstance(r, int) and not isinstance(r, bool):
            l = model.check_layer(r)
            keys.update((l, e) for e in range(model.n_experts(l)))
            if model.n_experts(l) == 0:
                raise FfkvError(f"layer {r} has no experts", "read its coefficients with hooks.intervene")
        elif isinstance(r, (tuple, list)) and len(r) == 2:
            l = model.check_layer(int(r[0]))
            keys.add((l, model.check_expert(l, int(r[1]))))
        else:
            raise FfkvError(f"cannot read experts {r!r}", "pass a layer (all its experts) or (layer, expert)")
    return keys


def _routed_forward(model: MoEModel, experts: nn.Module, layer: int, reads: set, edits: dict, rec, shape,
                    keep_grad: bool, outputs: bool):
    """The experts module's forward: transformers' eager per-expert loop, with reads and edits of m^e."""
    spec = model.moe_spec
    keep = (lambda z: z) if keep_grad else (lambda z: z.detach())

    def forward(hidden_states, top_k_index, top_k_weights):
        # read at call time: an edit may have replaced the parameters inside the block
        gu_all, down_all = getattr(experts, spec.gate_up), getattr(experts, spec.down)
        act = getattr(experts, spec.act)
        n_exp = down_all.shape[0]
        final = torch.zeros_like(hidden_states)
        n_tok = hidden_states.shape[0]
        B, T = shape.get("BT", (1, n_tok))
        if B * T != n_tok:
            B, T = 1, n_tok
        if any(l == layer for l, _ in reads):
            rec.routing[layer] = (top_k_index.detach().reshape(B, T, -1), top_k_weights.detach().reshape(B, T, -1))
        with torch.no_grad():
            # (E+1, k, N) like the eager loop, so tokens are visited in the same order and sums are bitwise equal
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=n_exp + 1).permute(2, 1, 0)
            hit = set(torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().reshape(-1).tolist())
        for e in range(n_exp):
            key = (layer, e)
            if e not in hit:
                if key in reads:
                    rec[key] = _empty_capture(layer, e, (B, T), gu_all, hidden_states, top_k_weights, outputs)
                continue
            slot, tok = torch.where(expert_mask[e])
            gate, up = nn.functional.linear(hidden_states[tok], gu_all[e]).chunk(2, dim=-1)
            if not spec.gate_first:
                gate, up = up, gate
            m = act(gate) * up
            if key in edits or key in reads:
                b, t = tok // T, tok % T
                for ed in edits.get(key, ()):
                    m = ed.apply(m, b, t)
            y = nn.functional.linear(m, down_all[e])
            if key in reads:
                order = torch.argsort(tok, stable=True)  # rows in token order, whatever the top-k slot
                rec[key] = ExpertCapture(layer, e, keep(m[order]), b[order], t[order], tok[order],
                                         keep(top_k_weights[tok, slot][order]), slot[order], (B, T),
                                         keep(y[order]) if outputs else None)
            y = y * top_k_weights[tok, slot, None]
            final.index_add_(0, tok, y.to(final.dtype))
        return final

    return forward


def _empty_capture(layer, e, shape, gu, h, w, outputs):
    empty = torch.empty(0, dtype=torch.long, device=h.device)
    return ExpertCapture(layer, e, h.new_empty(0, gu.shape[1] // 2), empty, empty, empty, w.new_empty(0), empty,
                         shape, h.new_empty(0, h.shape[1]) if outputs else None)


@contextlib.contextmanager
def expert_intervene(model: MoEModel, reads: Iterable = (), edits: Iterable[ExpertEdit] = (),
                     keep_grad: bool = False, outputs: bool = False):
    """Record per-expert coefficients (``reads``: layers or ``(layer, expert)``) and apply :class:`ExpertEdit`\\ s
    during every forward pass inside the block; yields an :class:`ExpertRecording`.

    The experts module of each touched layer runs :func:`_routed_forward` instead of its own forward (the
    same computation); the original is restored on exit, also on error. Combine freely with
    :func:`ffkv.models.hooks.intervene` for dense sites (``ffn_in``, ``ffn_out`` = the block's output, ...).
    """
    if not isinstance(model, MoEModel):
        raise FfkvError(f"{model.family} model has no experts", "expert reads and edits need an MoE model")
    reads = _read_keys(model, reads)
    by_key: dict[tuple[int, int], list[ExpertEdit]] = {}
    for ed in edits:
        l = model.check_layer(ed.layer)
        by_key.setdefault((l, model.check_expert(l, ed.expert)), []).append(ed)
    rec = ExpertRecording()
    layers = sorted({l for l, _ in reads} | {l for l, _ in by_key})
    patched: list[nn.Module] = []
    handles = []
    try:
        for l in layers:
            experts = model.experts_module(l)
            if "forward" in experts.__dict__:
                raise FfkvError(f"layer {l}'s experts are already inside an expert_intervene block",
                                "pass all expert reads and edits to one block")
            shape: dict = {}

            def remember(module, args, kwargs, shape=shape):
                h = args[0] if args else kwargs["hidden_states"]
                shape["BT"] = tuple(h.shape[:2]) if h.dim() == 3 else (1, h.shape[0])

            handles.append(model.module(l, model.moe_spec.block).register_forward_pre_hook(remember,
                                                                                          with_kwargs=True))
            experts.forward = _routed_forward(model, experts, l, reads, by_key, rec, shape, keep_grad, outputs)
            patched.append(experts)
        yield rec
    finally:
        for h in handles:
            h.remove()
        for experts in patched:
            experts.__dict__.pop("forward", None)


def all_experts(model: MoEModel) -> list[tuple[int, int]]:
    """Every ``(layer, expert)`` of the model."""
    return [(l, e) for l in model.moe_layers for e in range(model.n_experts(l))]


@torch.no_grad()
def routed_coefficients(model: MoEModel, batch: dict, layer: int, expert: int) -> ExpertCapture:
    """The statistics input of one expert: coefficients of the real (non-padding) tokens routed to it.

    batch: ``input_ids`` / ``attention_mask`` (B, T). Returns the capture restricted to tokens with
    attention_mask 1; ``capture.coef`` (n, F) is what ROME/MEMIT's second moment ``C = E[m m^T]`` of expert
    e is accumulated from (edit/stats.py owns the accumulation).
    """
    with expert_intervene(model, reads=[(layer, expert)]) as rec:
        model.hf(**batch)
    cap = rec[model.check_layer(layer), expert]
    mask = batch.get("attention_mask")
    if mask is None:
        return cap
    keep = mask.to(torch.bool)[cap.batch, cap.position]
    return replace(cap, coef=cap.coef[keep], batch=cap.batch[keep], position=cap.position[keep],
                   token=cap.token[keep], weight=cap.weight[keep], slot=cap.slot[keep],
                   out=None if cap.out is None else cap.out[keep])


# ============================================================================= load-time check


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float64: 1e-8}.get(dtype, 2e-2)


def _err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Max absolute difference and the scale it is judged against: the larger max |.| of the two.

    Relative to the tensors themselves (not to 1): a tiny random model's expert outputs are ~1e-3, where an
    absolute tolerance would let a swapped gate/up layout pass.
    """
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("inf"), 1.0
    if a.numel() == 0:
        return 0.0, 1.0
    scale = max(a.abs().max().item(), b.abs().max().item())
    return (a - b).abs().max().item(), scale if scale > 0 else 1.0


@torch.no_grad()
def check_moe(model: MoEModel, seq_len: int = 8, batch: int = 2, seed: int = 0, raise_on_fail: bool = True) -> dict:
    """Verify the MoE spec against the real model, per layer and expert, on a random batch.

    1. the spec's layout: fused shapes (E, 2F, D) / (E, D, F), concatenated [gate; up], no bias, no
       per-expert norm (what transformers' ``use_experts_implementation`` flags say);
    2. the spec's block ``sum_{e in topk} w_e sum_i m_i^e v_i^e (+ sigmoid(g x) sum_i m_i^s v_i^s)`` from the
       recorded FFN input x == the block's output (router, top-k rule, keys, values, activation, shared expert);
    3. the residual decomposition ``resid_post = resid_pre + attn_out + ffn_out``;
    4. the engine (:func:`expert_intervene`): its routing equals the spec's, its per-expert coefficients equal
       ``act(W_gate^e x) * (W_up^e x)`` of exactly the routed tokens, and its block output and logits equal the
       model's own. Dense layers (mlp_only_layers) get the dense check of the coefficients and W_out m.
    Returns ``{"passed", "max_abs_error", "relative_tolerance", "layers": [...]}``; a failure raises
    :class:`AdapterCheckFailed` naming the family and the layer.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = min(model.vocab_size, getattr(model.config, "vocab_size", model.vocab_size))
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(model.device)
    tol = _tolerance(model.dtype)
    L = model.n_layers
    sites = ["resid_pre", "attn_out", "ffn_in", "ffn_out", "ffn_write", "resid_post"]
    reads = [(s, l) for l in range(L) for s in sites] + \
        [("coef", l) for l in range(L) if not model.is_moe_layer(l)]
    layouts = {l: _layout_problem(model, l) for l in model.moe_layers}
    bad = [(l, p) for l, p in layouts.items() if p]
    if bad:  # the engine cannot run on a layout it does not understand: refuse before any forward pass
        if raise_on_fail:
            _fail_check(model, bad[0][0], bad[0][1], float("inf"), tol)
        return {"passed": False, "max_abs_error": float("inf"), "relative_tolerance": tol,
                "layers": [{"layer": l, "layout": p} for l, p in bad], "logits_error": float("inf")}
    with intervene(model, reads=reads) as ref:
        logits_ref = model.hf(input_ids=ids, use_cache=False).logits
    with intervene(model, reads=[(s, l) for l in range(L) for s in ("ffn_in", "ffn_out")]) as eng, \
            expert_intervene(model, reads=model.moe_layers) as caps:
        logits_eng = model.hf(input_ids=ids, use_cache=False).logits
    rows, worst, passed = [], 0.0, True

    def fail(l, what, err):
        _fail_check(model, l, what, err, tol)

    for l in range(L):
        x, out = ref["ffn_in", l], ref["ffn_out", l]
        D = x.shape[-1]
        row = {"layer": l, "n_experts": model.n_experts(l)}
        checks = []
        # the writes: s N(out) with the family's post norms N (sandwich norms) and residual scale s (Granite)
        write = model.write_from_ffn_out(l, out)
        attn_write = model.attn_write_from_attn_out(l, ref["attn_out", l], ref["resid_pre", l])
        resid = _err(ref["resid_pre", l] + attn_write + write, ref["resid_post", l])
        checks.append(("residual_error", "resid_post != resid_pre + attention write + FFN write", resid))
        s = model.residual_scale
        checks.append(("write_error", "the ffn_write site differs from the FFN write N(ffn_out)",
                       _err(s * ref["ffn_write", l], write)))
        try:
            if model.is_moe_layer(l):
                worst_e, exp_err = _per_expert_error(model, l, x.reshape(-1, D))
                checks.append(("expert_error", f"expert {worst_e}'s sum_i m_i v_i from the spec differs from "
                               f"the model's own experts module run on that expert alone", exp_err))
                checks.append(("ffn_error", "the spec's sum over routed experts of w_e sum_i m_i v_i "
                               "(+ shared expert) differs from the block's output",
                               _err(model.moe_output_from_input(l, x), out.reshape(-1, D))))
                xe = eng["ffn_in", l].reshape(-1, D)
                idx, wts = model.route(l, xe)
                ri, rw = caps.routing[l]
                # the k chosen experts are a set: families that take top-k unsorted list them in any order
                (ri, rw), (si, sw) = _by_expert(ri.reshape(idx.shape), rw.reshape(wts.shape)), _by_expert(idx, wts)
                same_route = ri.equal(si)
                checks.append(("route_error", "the engine's routing differs from the spec's top-k",
                               (0.0 if same_route else float("inf"), 1.0)))
                checks.append(("weight_error", "the engine's routing weights differ from the spec's",
                               _err(rw, sw) if same_route else (float("inf"), 1.0)))
                coef_err = (0.0, 1.0)
                for e in range(model.n_experts(l)):
                    cap = caps[l, e]
                    tok = torch.where((idx == e).any(-1))[0]
                    if not cap.token.equal(tok):
                        coef_err = (float("inf"), 1.0)
                        break
                    ce = _err(model.coefficients_from_input(l, xe[tok], e), cap.coef)
                    coef_err = max(coef_err, ce, key=lambda c: c[0] / c[1])
                checks.append(("coef_error", "the engine's expert coefficients differ from act(W_gate x)*(W_up x) "
                               "of the routed tokens", coef_err))
                checks.append(("engine_error", "the engine's block output differs from the model's own",
                               _err(eng["ffn_out", l], out)))
            else:
                checks.append(("coef_error", "the dense MLP's coefficients differ from the spec's",
                               _err(model.coefficients_from_input(l, x), ref["coef", l])))
                checks.append(("ffn_error", "the dense MLP's output differs from W_out m",
                               _err(model.ffn_output_from_coefficients(l, ref["coef", l]), out)))
        except (RuntimeError, IndexError) as exc:  # shapes disagree: wrong modules or layout
            checks.append(("ffn_error", f"the spec cannot be applied ({str(exc).splitlines()[0][:80]})",
                           (float("inf"), 1.0)))
        for name, what, (err, scale) in checks:
            row[name] = err
            worst = max(worst, err)
            if err > tol * scale:
                passed = False
                if raise_on_fail:
                    fail(l, what, err / scale)
        rows.append(row)
    lg = _err(logits_eng, logits_ref)
    if lg[0] > tol * lg[1]:
        passed = False
        if raise_on_fail:
            fail(L - 1, "the engine's logits differ from the model's own", lg[0] / lg[1])
    worst = max(worst, lg[0])
    return {"passed": passed, "max_abs_error": worst, "relative_tolerance": tol, "layers": rows,
            "logits_error": lg[0]}


def _by_expert(idx: torch.Tensor, wts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k choices (N, k) and their weights sorted by expert index, so two routings compare as sets."""
    idx_sorted, order = torch.sort(idx, dim=-1)
    return idx_sorted, wts.gather(-1, order)


def _per_expert_error(model: MoEModel, layer: int, x: torch.Tensor) -> tuple[int, tuple[float, float]]:
    """Each expert alone: the model's experts module with every token routed to e with weight 1 (its own
    implementation, whatever the dispatch) against ``W_out^e m^e(x)`` from the spec. Returns the worst expert."""
    ex = model.experts_module(layer)
    worst = (0, (0.0, 1.0))
    for e in range(model.n_experts(layer)):
        only_e = torch.full((x.shape[0], 1), e, dtype=torch.long, device=x.device)
        own = ex(x, only_e, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device))
        err = _err(model.ffn_output_from_coefficients(layer, model.coefficients_from_input(layer, x, e), e), own)
        if err[0] / err[1] > worst[1][0] / worst[1][1]:
            worst = (e, err)
    return worst


def _fail_check(model: MoEModel, layer: int, what: str, err: float, tol: float):
    raise AdapterCheckFailed(
        f"MoE adapter check failed for family '{model.family}' at layer {layer}: {what} "
        f"(relative error {err:.3g}, tolerance {tol:g})",
        "the model's mixture-of-experts block does not match ffkv's spec for this family; please report it")


def _layout_problem(model: MoEModel, layer: int) -> str | None:
    ex = model.experts_module(layer)
    spec = model.moe_spec
    gu, down = getattr(ex, spec.gate_up, None), getattr(ex, spec.down, None)
    if gu is None or down is None or not callable(getattr(ex, spec.act, None)):
        return f"the experts module has no '{spec.gate_up}' / '{spec.down}' / '{spec.act}'"
    E, D = down.shape[0], model.d_model
    if gu.dim() != 3 or down.dim() != 3 or gu.shape[0] != E or gu.shape[2] != D or down.shape[1] != D \
            or gu.shape[1] != 2 * down.shape[2]:
        return f"fused expert shapes {tuple(gu.shape)} / {tuple(down.shape)} are not (E, 2F, D) / (E, D, F)"
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False}
    bad = [k for k, v in flags.items() if getattr(ex, k, v) != v]
    if bad:
        return f"the experts module's layout flags {bad} differ from the spec"
    gate_fn = getattr(type(ex), "_apply_gate", None)
    if gate_fn is not None and getattr(gate_fn, "__name__", "") != "_default_apply_gate":
        return "the experts module has its own gating function, not act(gate) * up"
    return None


# ============================================================================= census by expert

MOE_COMPONENTS = ("embeddings", "attention", "router", "experts", "shared_expert", "dense_ffn", "norms",
                  "unembedding", "other")


def moe_census(config_or_model) -> dict:
    """Parameters by component and memory slots by expert, from a config (on the meta device) or a model.

    Returns ``{model_type, family, total_params, active_params, expert_params, expert_share, memory_slots,
    expert_slots, shared_slots, dense_slots, n_layers, moe_layers, n_experts, top_k, d_expert, d_shared,
    components: {...}, per_layer: [{layer, n_experts, d_expert, expert_slots, shared_slots, dense_slots}]}``.
    ``active_params`` counts the parameters one token uses (its top-k experts, not all E). Tied embeddings
    are counted once.
    """
    if isinstance(config_or_model, MemoryModel):
        hf = config_or_model.hf
    elif isinstance(config_or_model, nn.Module):
        hf = config_or_model
    else:
        from transformers import AutoModelForCausalLM

        get_moe_spec(config_or_model)
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config_or_model)
    if isinstance(config_or_model, MoEModel):  # an inferred family carries its own specs
        arch, moe = config_or_model.spec, config_or_model.moe_spec
    else:
        arch, moe = get_moe_spec(hf.config)
    layers = get_path(hf, arch.layers)
    prefix = arch.layers + "."
    counts = {c: 0 for c in MOE_COMPONENTS}
    for name, p in hf.named_parameters():
        counts[_moe_component(hf, arch, moe, name, prefix)] += p.numel()
    per_layer = []
    top_k = int(moe.top_k if moe.top_k is not None else hf.config.num_experts_per_tok)
    active = sum(counts.values()) - counts["experts"]
    d_expert = d_shared = None
    for l, layer in enumerate(layers):
        ex = get_path(layer, moe.experts)
        row = {"layer": l, "n_experts": 0, "d_expert": 0, "expert_slots": 0, "shared_slots": 0, "dense_slots": 0}
        if ex is not None:
            down = getattr(ex, moe.down)
            E, F = down.shape[0], down.shape[2]
            row.update(n_experts=E, d_expert=F, expert_slots=E * F)
            d_expert = d_expert or F
            per_expert = sum(getattr(ex, n).numel() for n in (moe.gate_up, moe.down)) // E
            active += min(top_k, E) * per_expert
            sh = get_path(layer, moe.shared) if moe.shared else None
            if sh is not None:
                row["shared_slots"] = get_path(sh, moe.shared_value).weight.shape[1]
                d_shared = d_shared or row["shared_slots"]
        else:
            dense = get_path(layer, arch.value)
            row["dense_slots"] = 0 if dense is None else dense.weight.shape[1]
        per_layer.append(row)
    total = sum(counts.values())
    slots = {k: sum(r[k] for r in per_layer) for k in ("expert_slots", "shared_slots", "dense_slots")}
    return {
        "model_type": hf.config.model_type, "family": moe.family,
        "total_params": total, "active_params": active, "expert_params": counts["experts"],
        "expert_share": counts["experts"] / total if total else 0.0,
        "memory_slots": sum(slots.values()), **slots,
        "n_layers": len(layers), "moe_layers": sum(1 for r in per_layer if r["n_experts"]),
        "n_experts": max((r["n_experts"] for r in per_layer), default=0), "top_k": top_k,
        "d_expert": d_expert, "d_shared": d_shared,
        "tied_embeddings": counts["unembedding"] == 0,
        "components": counts, "per_layer": per_layer,
    }


def _moe_component(hf, arch: ArchSpec, moe: MoESpec, name: str, prefix: str) -> str:
    module_name = name.rsplit(".", 1)[0]

    def under(path, mod):
        return bool(path) and (mod == path or mod.startswith(path + "."))

    for path, comp in ((arch.embed, "embeddings"), (arch.pos_embed, "embeddings"),
                       (arch.unembed, "unembedding"), (arch.final_norm, "norms")):
        if under(path, module_name):
            return comp
    if name.startswith(prefix):
        parts = name[len(prefix):].split(".", 1)
        rel = parts[1] if len(parts) > 1 else ""
        for path, comp in ((arch.attn, "attention"), (moe.router, "router"), (moe.experts, "experts"),
                           (moe.shared, "shared_expert"), (moe.shared_gate, "shared_expert"),
                           (arch.mlp, "dense_ffn")):
            if path and (rel == path or rel.startswith(path + ".")):
                return comp
    if "norm" in type(hf.get_submodule(module_name)).__name__.lower():
        return "norms"
    return "other"


# ============================================================================= tiny models

_TINY_CONFIGS = {"mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig",
                 "olmoe": "OlmoeConfig"}


def tiny_moe_config(model_type: str, n_layers: int = 2, d_model: int = 32, d_expert: int = 32,
                    n_experts: int = 4, top_k: int = 2, vocab: int = 128, n_heads: int = 4, d_shared: int = 64,
                    n_positions: int = 128, **overrides):
    """A config of ``model_type`` (mixtral, qwen2_moe, qwen3_moe, olmoe) with every layer an MoE layer of
    ``n_experts`` experts of width ``d_expert``, top-``top_k`` routing; Qwen2-MoE with a shared expert of width
    ``d_shared``. ``overrides`` go to the config (e.g. ``mlp_only_layers=[0]``, ``norm_topk_prob=True``)."""
    import transformers as T

    get_moe_spec(model_type)
    kw = dict(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
              num_key_value_heads=max(1, n_heads // 2), vocab_size=vocab, max_position_embeddings=n_positions,
              num_experts_per_tok=top_k, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if model_type in ("mixtral", "olmoe"):
        kw.update(intermediate_size=d_expert, num_experts=n_experts, num_local_experts=n_experts)
    else:
        kw.update(intermediate_size=2 * d_expert, moe_intermediate_size=d_expert, num_experts=n_experts,
                  decoder_sparse_step=1, mlp_only_layers=[])
    if model_type == "qwen2_moe":
        kw.update(shared_expert_intermediate_size=d_shared)
    kw.update(overrides)
    return getattr(T, _TINY_CONFIGS[model_type])(**kw)


def tiny_moe_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, check: bool = True,
                   experts_implementation: str | None = None, **config) -> MoEModel:
    """A randomly initialised tiny MoE model (see :func:`tiny_moe_config` for the sizes), checked on build.

    ``experts_implementation`` ("eager", "grouped_mm", "batched_mm") is transformers' dispatch of the fused
    experts; None keeps transformers' default.
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_moe_config(model_type, **config)
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg).to(dtype)
    return MoEModel.from_hf_checked(hf, None, f"tiny-{model_type}", check)
