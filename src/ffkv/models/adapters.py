"""Where the memories live: one declarative spec per architecture family.

An FFN layer computes ``FFN(x) = W_out · m(x) + b`` with memory coefficients

    m(x) = act(W_in x + b_in)                      (GPT-2, GPT-J, OPT, BLOOM, ...)
    m(x) = act(W_gate x) * (W_up x)                (LLaMA, Mistral, Qwen2, Gemma, Phi-3)

A spec names, relative to the model root or to one decoder layer, the modules that hold ``W_in``
(the keys, one per row), ``W_gate``/``W_up`` for gated FFNs, ``W_out`` (the values, one per column),
the activation, the norms, the final norm and the unembedding. The memory coefficient is, for every
family, the *input of the ``W_out`` module*, so reading it is a pre-hook on that module.

The spec also owns *where the memory writes into the residual stream*. For most families the write is
the output of ``W_out``; families that normalise the FFN output (Gemma-2/3, OLMo-2) add

    write = post_ffn_norm(W_out m + b)          to the residual,

and sandwich-norm families normalise the attention output the same way (``post_attn_norm``). Every layer
of every family satisfies ``resid_post = resid_pre + attn_write + ffn_write`` (sequential and parallel
residuals alike), which the load-time check verifies. The head is owned here too: final norm, optional
final projection, unembedding, then the family's logit scaling and final soft-capping.

Specs are data: hand-written below for the families ffkv names, inferred from the module structure
(:mod:`ffkv.models.infer`) for the rest; :func:`ffkv.models.check.check_adapter` verifies either on load.
"""

from __future__ import annotations

from transformers import CONFIG_MAPPING

from ..errors import UnsupportedArchitecture
from .infer import infer_spec, meta_model
from .spec import ArchSpec, get_path

__all__ = ["ArchSpec", "SPECS", "get_path", "get_spec", "hand_written_spec", "spec_for", "supported_model_types"]


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
             attn_adds_residual=True,
             notes="BloomAttention and BloomMLP add the residual themselves; the FFN output is W_out's output"),
    ArchSpec(family="falcon", model_types=("falcon",), layers="transformer.h",
             embed="transformer.word_embeddings", unembed="lm_head", final_norm="transformer.ln_f",
             attn="self_attention", mlp="mlp", key="mlp.dense_h_to_4h", value="mlp.dense_4h_to_h",
             act="mlp.act", pre_attn_norm="input_layernorm", parallel=True),
    ArchSpec(family="llama", model_types=("llama",), **_LLAMA_LIKE),
    ArchSpec(family="mistral", model_types=("mistral",), **_LLAMA_LIKE),
    ArchSpec(family="qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
    ArchSpec(family="gemma", model_types=("gemma",), **_LLAMA_LIKE,
             notes="embeddings scaled by sqrt(d_model); RMSNorm weight is (1 + w)"),
    ArchSpec(family="qwen3", model_types=("qwen3",), **_LLAMA_LIKE, notes="RMSNorm on queries and keys"),
    ArchSpec(family="gemma2", model_types=("gemma2",), **{**_LLAMA_LIKE, "pre_ffn_norm": "pre_feedforward_layernorm"},
             post_attn_norm="post_attention_layernorm", post_ffn_norm="post_feedforward_layernorm",
             softcap="final_logit_softcapping",
             notes="sandwich norms: the FFN writes post_feedforward_layernorm(W_out m); final logit soft-capping"),
    ArchSpec(family="gemma3", model_types=("gemma3_text",),
             **{**_LLAMA_LIKE, "pre_ffn_norm": "pre_feedforward_layernorm"},
             post_attn_norm="post_attention_layernorm", post_ffn_norm="post_feedforward_layernorm",
             softcap="final_logit_softcapping",
             notes="sandwich norms like Gemma-2; soft-capping when the config sets it"),
    ArchSpec(family="olmo2", model_types=("olmo2",), **{**_LLAMA_LIKE, "pre_attn_norm": None, "pre_ffn_norm": None},
             post_attn_norm="post_attention_layernorm", post_ffn_norm="post_feedforward_layernorm",
             notes="no pre-norms: the FFN reads the raw residual and writes post_feedforward_layernorm(W_out m)"),
    ArchSpec(family="phi", model_types=("phi",), layers="model.layers", embed="model.embed_tokens",
             unembed="lm_head", final_norm="model.final_layernorm", attn="self_attn", mlp="mlp", key="mlp.fc1",
             value="mlp.fc2", act="mlp.activation_fn", pre_attn_norm="input_layernorm", parallel=True,
             notes="Phi-1/1.5/2: parallel attention and FFN on one LayerNorm"),
    ArchSpec(family="phi3", model_types=("phi3",), layers="model.layers", embed="model.embed_tokens",
             unembed="lm_head", final_norm="model.norm", attn="self_attn", mlp="mlp",
             key="mlp.gate_up_proj", fused_gate_up=True, value="mlp.down_proj", act="mlp.activation_fn",
             pre_attn_norm="input_layernorm", pre_ffn_norm="post_attention_layernorm",
             notes="gate_up_proj computes [gate; up] in one matrix"),
)

_BY_TYPE = {t: s for s in SPECS for t in s.model_types}


def supported_model_types() -> list[str]:
    """The model types with a hand-written spec (every other decoder family is inferred)."""
    return sorted(_BY_TYPE)


def hand_written_spec(model_type: str) -> ArchSpec | None:
    """The hand-written spec of a model type, or None (then :mod:`ffkv.models.infer` infers one)."""
    return _BY_TYPE.get(model_type)


def get_spec(model_type_or_config, trust_remote_code: bool = False) -> ArchSpec:
    """The spec of a config (or a model type): hand-written, else inferred from the module structure of a
    ``meta``-device build (no weights). Unreadable families are one :class:`~ffkv.models.infer.Refusal`
    line naming why; an unknown model type is one :class:`UnsupportedArchitecture` line.

    The inferred spec is accepted only by the load-time check, which needs weights:
    :func:`ffkv.load_model` and :func:`ffkv.models.loading.from_hf` run it.
    """
    mt = getattr(model_type_or_config, "model_type", model_type_or_config)
    spec = _BY_TYPE.get(mt)
    if spec is not None:
        return spec
    config = model_type_or_config
    if isinstance(config, str):
        if config not in CONFIG_MAPPING:
            raise UnsupportedArchitecture(
                f"architecture '{mt}' is not supported by ffkv: transformers does not know it",
                f"hand-written model types: {', '.join(supported_model_types())}; other decoder families are "
                "inferred from transformers' module structure",
            )
        config = CONFIG_MAPPING[config]()
    return infer_spec(meta_model(config, trust_remote_code))


def spec_for(hf_model) -> ArchSpec:
    """The spec of a built model: hand-written for its model type, else inferred from its modules."""
    return _BY_TYPE.get(hf_model.config.model_type) or infer_spec(hf_model)


