"""Tiny, randomly initialised models of any causal-LM family (for tests, examples and the family table).

:func:`shrink_config` takes a model type's *default* transformers config and shrinks it: few layers, a small
width, few heads and experts, a small vocabulary, short contexts. It works on field names every family
uses (``num_hidden_layers``/``n_layer``/``num_layers``, ``hidden_size``/``n_embd``/``d_model``, ...), on
nested configs (``text_config``, ``vision_config``, ...), on per-layer lists (``layer_types``,
``mlp_layer_types``: truncated to the new depth) and on token ids (moved inside the new vocabulary).
:func:`tiny_config` adds the sizes of ffkv's hand-written test models on top.
"""

from __future__ import annotations

from typing import Any

import transformers as T
from transformers import CONFIG_MAPPING

from ..errors import FfkvError
from .infer import Refusal

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")
WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "word_embed_proj_dim", "embedding_size", "embed_dim",
              "attention_hidden_size", "lru_width")
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
             "num_decoder_attention_heads", "attention_heads")
KV_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "num_query_groups")
HEAD_DIM_KEYS = ("head_dim", "qk_head_dim", "v_head_dim", "attention_head_size", "kv_channels", "d_head",
                 "dim_head", "attention_head_dim")
FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "decoder_ffn_dim", "dim_ff",
            "intermediate_size_mlp", "dense_intermediate_size", "d_inner", "feed_forward_size", "dff")
SMALL_FFN_KEYS = ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
                  "shared_intermediate_size", "moe_shared_expert_intermediate_size",
                  "shared_experts_intermediate_size")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length",
                "max_target_positions", "context_length")
TOKEN_ID_SUFFIXES = ("_token_id", "_token_ids", "_token_index")


def _shrunk(d: dict, n_layers: int, d_model: int, n_heads: int, vocab: int, d_ffn: int, context: int) -> dict:
    """The fields of config dict ``d`` that change; nested configs are shrunk the same way."""
    out: dict[str, Any] = {}
    old_layers = next((d[k] for k in LAYER_KEYS if isinstance(d.get(k), int)), None)
    heads = next((d[k] for k in HEAD_KEYS if isinstance(d.get(k), int)), None)

    def put(keys, value):
        for k in keys:
            if isinstance(d.get(k), int) and not isinstance(d.get(k), bool) and d[k] > value:
                out[k] = value

    put(LAYER_KEYS, n_layers)
    put(WIDTH_KEYS, d_model)
    put(HEAD_KEYS, n_heads)
    for k in KV_KEYS:  # multi-query stays multi-query; grouped-query keeps a group of two
        if isinstance(d.get(k), int) and heads:
            out[k] = 1 if d[k] == 1 else (n_heads if d[k] >= heads else max(1, n_heads // 2))
    put(HEAD_DIM_KEYS, d_model // n_heads)
    if "head_dim" in d and d["head_dim"] is None and heads:  # defaults that leave it to the model's init
        out["head_dim"] = d_model // n_heads
    if d.get("num_key_value_heads", 0) is None and heads:
        out["num_key_value_heads"] = n_heads
    if d.get("is_decoder") is False:  # a causal LM head asks for the decoder form (BERT-likes, Reformer)
        out["is_decoder"] = True
    for k, v in (("qk_rope_head_dim", 8), ("qk_nope_head_dim", 8), ("kv_lora_rank", 16), ("q_lora_rank", 16),
                 ("index_head_dim", 16), ("index_n_heads", 2), ("index_topk", 8), ("rotary_dim", 8),
                 ("sliding_window", 16), ("sliding_window_size", 16), ("attention_window_size", 16),
                 ("linear_key_head_dim", 16), ("linear_value_head_dim", 16), ("linear_num_key_heads", 2),
                 ("linear_num_value_heads", 2), ("mamba_d_state", 8), ("mamba_n_heads", 4),
                 ("mamba_d_head", 16), ("state_size", 8), ("ssm_state_size", 8), ("mamba_num_heads", 4),
                 ("mamba_head_dim", 16), ("mamba_headdim", 16), ("time_step_rank", 8), ("n_groups", 1),
                 ("mamba_n_groups", 1), ("n_group", 1), ("topk_group", 1), ("num_expert_group", 1),
                 ("n_shared_experts", 1), ("num_shared_experts", 1), ("moe_num_shared_experts", 1),
                 ("chunk_size", 16), ("mamba_chunk_size", 16), ("num_centroids", 4),
                 ("centroid_intermediate_top_k", 2), ("local_attention_window_len", 16),
                 ("first_k_dense_replace", 1), ("num_dense_layers", 1), ("hidden_size_per_layer_input", 8),
                 ("vocab_size_per_layer_input", vocab), ("laurel_rank", 8), ("num_kv_shared_layers", 0),
                 ("image_size", 32), ("patch_size", 8), ("num_codebooks", 2), ("embedding_dim", d_model),
                 ("swa_num_attention_heads", n_heads), ("swa_num_key_value_heads", max(1, n_heads // 2)),
                 ("swa_head_dim", d_model // n_heads), ("backbone_hidden_size", d_model),
                 ("router_hidden_size", d_model), ("ple_embed_dim", 8), ("ngram_vocab_size_base", vocab)):
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool) and d[k] > v:
            out[k] = v
    put(FFN_KEYS, d_ffn)
    put(SMALL_FFN_KEYS, d_ffn // 2)
    put(EXPERT_KEYS, 4)
    put(TOPK_KEYS, 2)
    put(CONTEXT_KEYS, context)
    if isinstance(d.get("vocab_size"), int) and d["vocab_size"] > vocab:
        out["vocab_size"] = vocab
        for k, v in d.items():
            if k.endswith(TOKEN_ID_SUFFIXES) and not k.startswith("decoder_start"):
                if isinstance(v, int) and not isinstance(v, bool) and v >= vocab:
                    out[k] = vocab - 1 - (v % 8)
                elif isinstance(v, list) and all(isinstance(x, int) for x in v):
                    out[k] = [x if x < vocab else vocab - 1 - (x % 8) for x in v]
    for k, v in d.items():
        if isinstance(v, list) and old_layers and len(v) == old_layers and k not in out:
            out[k] = v[:n_layers]  # per-layer lists: layer_types, mlp_layer_types, ...
        elif isinstance(v, dict) and old_layers and v and all(str(x).isdigit() for x in v):
            out[k] = {x: y for x, y in v.items() if int(x) < n_layers}  # per-layer overrides by index
        elif isinstance(v, dict) and ("model_type" in v or k.endswith("_config")):
            sub = _shrunk(v, n_layers, d_model, n_heads, vocab, d_ffn, context)
            if sub:
                out[k] = {**v, **sub}
    return out


def shrink_config(model_type: str, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, vocab: int = 256,
                  d_ffn: int = 128, context: int = 128):
    """The default transformers config of ``model_type``, shrunk to a tiny model of the same family.

    Raises :class:`FfkvError` (one line) when transformers has no such model type or cannot build the
    shrunk config; the default config's derived fields (``layer_types`` from the depth, ...) are recomputed
    by the config class itself, because the shrunk values are passed to its constructor.
    """
    if model_type not in CONFIG_MAPPING:
        raise FfkvError(f"transformers has no model type '{model_type}'", "use a model type of the installed "
                        "transformers (transformers.CONFIG_MAPPING)")
    cls = CONFIG_MAPPING[model_type]
    try:
        default = cls()
        changes = _shrunk(default.to_dict(), n_layers, d_model, n_heads, vocab, d_ffn, context)
        return cls(**changes)
    except Exception as e:  # a config class's own validation: reported in one line, never a traceback
        raise Refusal(model_type, "cannot-build", f"transformers cannot build a tiny config ({_first_line(e)})",
                      "this model type is checked at full size only") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def tiny_config(model_type: str, n_layers: int = 2, d_model: int = 32, d_ffn: int = 64, vocab: int = 128,
                n_heads: int = 4, n_positions: int = 128):
    """A config of ``model_type`` with exactly these sizes: hand-written for ffkv's original families (their
    tests depend on the sizes), :func:`shrink_config` for every other model type."""
    common_llama = dict(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                        intermediate_size=d_ffn, vocab_size=vocab, max_position_embeddings=n_positions,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1)
    builders = {
        "gpt2": lambda: T.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_inner=d_ffn,
                                     vocab_size=vocab, n_positions=n_positions, bos_token_id=0,
                                     eos_token_id=1),
        "gpt_neo": lambda: T.GPTNeoConfig(num_layers=n_layers, hidden_size=d_model, num_heads=n_heads,
                                          intermediate_size=d_ffn, vocab_size=vocab,
                                          max_position_embeddings=n_positions,
                                          attention_types=[[["global", "local"], max(1, n_layers // 2)]]
                                          if n_layers % 2 == 0 else [[["global"], n_layers]],
                                          bos_token_id=0, eos_token_id=1),
        "gptj": lambda: T.GPTJConfig(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_inner=d_ffn,
                                     vocab_size=vocab, n_positions=n_positions, rotary_dim=d_model // n_heads // 2,
                                     bos_token_id=0, eos_token_id=1),
        "gpt_neox": lambda: T.GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=d_model,
                                            num_attention_heads=n_heads, intermediate_size=d_ffn,
                                            vocab_size=vocab, max_position_embeddings=n_positions,
                                            bos_token_id=0, eos_token_id=1),
        "opt": lambda: T.OPTConfig(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                                   ffn_dim=d_ffn, vocab_size=vocab, word_embed_proj_dim=d_model,
                                   max_position_embeddings=n_positions, bos_token_id=0, eos_token_id=1,
                                   pad_token_id=1),
        "bloom": lambda: T.BloomConfig(n_layer=n_layers, hidden_size=d_model, n_head=n_heads, vocab_size=vocab,
                                       bos_token_id=0, eos_token_id=1),
        "falcon": lambda: T.FalconConfig(num_hidden_layers=n_layers, hidden_size=d_model,
                                         num_attention_heads=n_heads, vocab_size=vocab,
                                         ffn_hidden_size=d_ffn, bos_token_id=0, eos_token_id=1),
        "llama": lambda: T.LlamaConfig(**common_llama),
        "mistral": lambda: T.MistralConfig(**common_llama, num_key_value_heads=max(1, n_heads // 2)),
        "qwen2": lambda: T.Qwen2Config(**common_llama, num_key_value_heads=max(1, n_heads // 2)),
        "gemma": lambda: T.GemmaConfig(**common_llama, num_key_value_heads=1, head_dim=d_model // n_heads),
        "phi3": lambda: T.Phi3Config(**common_llama),
    }
    if model_type not in builders:
        return shrink_config(model_type, n_layers=n_layers, d_model=d_model, n_heads=n_heads, vocab=vocab,
                             d_ffn=d_ffn, context=n_positions)
    return builders[model_type]()
