"""The shape of an adapter spec: :class:`ArchSpec` (data) and :func:`get_path` (following its paths).

Kept apart from the registry (:mod:`ffkv.models.adapters`) so that inference (:mod:`ffkv.models.infer`)
and the registry both build on it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its layers, keys, values, norms and unembedding.

    Paths are dotted attribute paths. ``layers``, ``embed``, ``pos_embed``, ``final_norm``,
    ``final_proj`` and ``unembed`` are relative to the ``*ForCausalLM`` module; the rest are relative
    to one decoder layer (``""`` is the layer itself).
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    unembed: str
    final_norm: str | None
    attn: str
    mlp: str  # module whose input is the FFN input x (after the pre-FFN norm)
    key: str  # W_in (non-gated) or W_gate (gated); for fused gate_up, the fused module
    value: str  # W_out
    act: str | None  # activation module applied to W_in x (or W_gate x); None: ``act_fn`` names it
    up: str | None = None  # W_up for gated FFNs with separate projections
    fused_gate_up: bool = False  # Phi-3: one module computes [gate; up]
    conv1d: bool = False  # GPT-2's Conv1D stores weights as (in, out): transposed w.r.t. nn.Linear
    pre_attn_norm: str | None = None
    pre_ffn_norm: str | None = None  # None when attention and FFN read the same normed input
    post_attn_norm: str | None = None  # sandwich norms (applied to sub-block outputs)
    post_ffn_norm: str | None = None
    pos_embed: str | None = None
    final_proj: str | None = None  # OPT-350m projects out of d_model before the unembedding
    parallel: bool = False  # attention and FFN read the same residual (GPT-J, NeoX, Falcon)
    act_fn: str | None = None  # transformers ACT2FN name, for FFNs that call a functional activation
    residual_scale: str | None = None  # config field scaling both writes (Granite: residual_multiplier;
    # "scale_depth": MiniCPM's scale_depth / sqrt(num_hidden_layers))
    attn_adds_residual: bool = False  # BLOOM: the attention module returns resid_pre + attention
    logit_scale: str | None = None  # config field the logits are multiplied by (Cohere: logit_scale)
    logit_divisor: str | None = None  # config field the logits are divided by (Granite: logits_scaling)
    softcap: str | None = None  # config field of the final soft-cap c: logits = c tanh(logits / c) (Gemma-2/3)
    inferred: bool = False  # True: built by ffkv.models.infer from the module structure
    notes: str = ""
    d_ffn_keys: tuple[str, ...] = field(default=("intermediate_size", "n_inner", "ffn_dim"))

    @property
    def gated(self) -> bool:
        return self.up is not None or self.fused_gate_up

    @property
    def write_site(self) -> str:
        """The module path whose output is added to the residual: the post-FFN norm, else ``W_out``."""
        return self.post_ffn_norm or self.value



def get_path(root, path: str | None):
    """Follow a dotted path (``""`` is ``root`` itself); ``None`` when any step is missing."""
    if path is None:
        return None
    obj = root
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
