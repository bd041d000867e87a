"""Configs of tiny, randomly initialised models of every supported family (for tests and examples)."""

from __future__ import annotations


def tiny_config(model_type: str, n_layers: int = 2, d_model: int = 32, d_ffn: int = 64, vocab: int = 128,
                n_heads: int = 4, n_positions: int = 128):
    """A transformers config of ``model_type`` with the given sizes; every family's own field names."""
    import transformers as T

    from .adapters import get_spec

    get_spec(model_type)
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
    return builders[model_type]()
