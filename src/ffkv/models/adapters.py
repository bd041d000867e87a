"""Where the memories live: one declarative spec per architecture family.

An FFN layer computes ``FFN(x) = W_out · m(x) + b`` with memory coefficients

    m(x) = act(W_in x + b_in)                      (GPT-2, GPT-J, OPT, BLOOM, ...)
    m(x) = act(W_gate x) * (W_up x)                (LLaMA, Mistral, Qwen2, Gemma, Phi-3)

A spec names, relative to the model root or to one decoder layer, the modules that hold ``W_in``
(the keys, one per row), ``W_gate``/``W_up`` for gated FFNs, ``W_out`` (the values, one per column),
the activation, the norms, the final norm and the unembedding. The memory coefficient is, for every
family, the *input of the ``W_out`` module*, so reading it is a pre-hook on that module.

Specs are data; :func:`ffkv.models.check.check_adapter` verifies them against the real model on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedArchitecture


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
    act: str  # activation module applied to W_in x (or W_gate x)
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
    notes: str = ""
    d_ffn_keys: tuple[str, ...] = field(default=("intermediate_size", "n_inner", "ffn_dim"))

    @property
    def gated(self) -> bool:
        return self.up is not None or self.fused_gate_up


_GPT2_LIKE = dict(
    layers="transformer.h", embed="transformer.wte", pos_embed="transformer.wpe",
    unembed="lm_head", final_norm="transformer.ln_f", attn="attn", mlp="mlp",
    act="mlp.act", pre_attn_norm="ln_1", pre_ffn_norm="ln_2",
)

_LLAMA_LIKE = dict(
    layers="model.layers", embed="model.embed_tokens", unembed="lm_head", final_norm="model.norm",
    attn="self_attn", mlp="mlp", key="mlp.gate_proj", up="mlp.up_proj", value="mlp.down_proj",
    act="mlp.act_fn", pre_attn_norm="input_layernorm", pre_ffn_norm="post_attention_layernorm",
)

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(family="gpt2", model_types=("gpt2",), key="mlp.c_fc", value="mlp.c_proj", conv1d=True,
             **_GPT2_LIKE),
    ArchSpec(family="gpt-neo", model_types=("gpt_neo",), key="mlp.c_fc", value="mlp.c_proj", **_GPT2_LIKE),
    ArchSpec(family="gpt-j", model_types=("gptj",), layers="transformer.h", embed="transformer.wte",
             unembed="lm_head", final_norm="transformer.ln_f", attn="attn", mlp="mlp", key="mlp.fc_in",
             value="mlp.fc_out", act="mlp.act", pre_attn_norm="ln_1", parallel=True),
    ArchSpec(family="gpt-neox", model_types=("gpt_neox",), layers="gpt_neox.layers",
             embed="gpt_neox.embed_in", unembed="lm_head",
             final_norm="gpt_neox.final_layer_norm", attn="attention", mlp="mlp",
             key="mlp.dense_h_to_4h", value="mlp.dense_4h_to_h", act="mlp.act",
             pre_attn_norm="input_layernorm", pre_ffn_norm="post_attention_layernorm", parallel=True,
             notes="Pythia; parallel residual when config.use_parallel_residual"),
    ArchSpec(family="opt", model_types=("opt",), layers="model.decoder.layers",
             embed="model.decoder.embed_tokens", pos_embed="model.decoder.embed_positions",
             unembed="lm_head", final_norm="model.decoder.final_layer_norm",
             final_proj="model.decoder.project_out", attn="self_attn", mlp="fc1", key="fc1", value="fc2",
             act="activation_fn", pre_attn_norm="self_attn_layer_norm", pre_ffn_norm="final_layer_norm",
             notes="no MLP module: fc1/fc2 sit in the decoder layer"),
    ArchSpec(family="bloom", model_types=("bloom",), layers="transformer.h",
             embed="transformer.word_embeddings", unembed="lm_head", final_norm="transformer.ln_f",
             attn="self_attention", mlp="mlp", key="mlp.dense_h_to_4h", value="mlp.dense_4h_to_h",
             act="mlp.gelu_impl", pre_attn_norm="input_layernorm", pre_ffn_norm="post_attention_layernorm",
             notes="BloomMLP adds the residual itself; the FFN output is W_out's output"),
    ArchSpec(family="falcon", model_types=("falcon",), layers="transformer.h",
             embed="transformer.word_embeddings", unembed="lm_head", final_norm="transformer.ln_f",
             attn="self_attention", mlp="mlp", key="mlp.dense_h_to_4h", value="mlp.dense_4h_to_h",
             act="mlp.act", pre_attn_norm="input_layernorm", parallel=True),
    ArchSpec(family="llama", model_types=("llama",), **_LLAMA_LIKE),
    ArchSpec(family="mistral", model_types=("mistral",), **_LLAMA_LIKE),
    ArchSpec(family="qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
    ArchSpec(family="gemma", model_types=("gemma",), **_LLAMA_LIKE,
             notes="embeddings scaled by sqrt(d_model); RMSNorm weight is (1 + w)"),
    ArchSpec(family="phi3", model_types=("phi3",), layers="model.layers", embed="model.embed_tokens",
             unembed="lm_head", final_norm="model.norm", attn="self_attn", mlp="mlp",
             key="mlp.gate_up_proj", fused_gate_up=True, value="mlp.down_proj", act="mlp.activation_fn",
             pre_attn_norm="input_layernorm", pre_ffn_norm="post_attention_layernorm",
             notes="gate_up_proj computes [gate; up] in one matrix"),
)

_BY_TYPE = {t: s for s in SPECS for t in s.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def get_spec(model_type_or_config) -> ArchSpec:
    """The spec for a ``config.model_type`` (or a config); one clear error for anything else."""
    mt = getattr(model_type_or_config, "model_type", model_type_or_config)
    spec = _BY_TYPE.get(mt)
    if spec is None:
        raise UnsupportedArchitecture(
            f"architecture '{mt}' is not supported by ffkv",
            f"supported model types: {', '.join(supported_model_types())}",
        )
    return spec


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
