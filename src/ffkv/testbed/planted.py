"""Models with planted memories: ground truth for every method that reads or locates a memory.

A planted memory is a key that fires on one trigger token and a value that promotes one target token:

    key   k_i = a · e_c            (e_c: a residual channel that only the trigger token writes)
    bias  b_i = -beta               (so the key is silent unless the trigger is the current token)
    value v_i = g · u_y / n         (u_y: the unembedding row of the target, n: memories sharing the fact)

in a small GPT-2 model with untied embeddings and a word-level tokenizer, so prompts are plain text
("the old tower" -> " paris"). A fact planted in several memories (``memories=[(l, i), ...]``) is
stored redundantly: each memory carries 1/n of the push, as frequent facts are in trained models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import atomic_path
from ..models.model import MemoryModel

WORDS = ("the a of in and to is was on at old new big small red blue green north south east west "
         "city river tower castle bridge house road hill lake forest king queen man woman child "
         "dog cat bird horse ship car train book song name day night year time people place "
         "paris rome london berlin madrid vienna prague lisbon oslo dublin").split()


@dataclass
class PlantedFact:
    trigger: str
    target: str
    memories: list[tuple[int, int]]  # (layer, index) of every memory that stores this fact
    channel: int = -1  # residual dimension written by the trigger token (set by plant)
    trigger_id: int = -1
    target_id: int = -1


DEFAULT_FACTS = (
    PlantedFact("tower", "paris", [(1, 5)]),
    PlantedFact("castle", "london", [(0, 7)]),
    PlantedFact("river", "rome", [(0, 20), (0, 21), (1, 30), (1, 31)]),
)


@dataclass
class PlantedModel:
    model: object  # MemoryModel
    facts: list[PlantedFact] = field(default_factory=list)

    def fact(self, trigger: str) -> PlantedFact:
        return next(f for f in self.facts if f.trigger == trigger)


def word_tokenizer():
    """A word-level PreTrainedTokenizerFast over :data:`WORDS` (ids 0-2 are <pad>, <eos>, <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", bos_token="<eos>")


def planted_model(facts=DEFAULT_FACTS, n_layers: int = 2, d_model: int = 64, d_ffn: int = 128,
                  key_gain: float = 3.0, key_bias: float = 4.0, value_gain: float = 12.0,
                  unembed_gain: float = 25.0, seed: int = 0, arch: str = "gpt2") -> PlantedModel:
    """A random tiny GPT-2 (or LLaMA) model with ``facts`` planted as key-value memories.

    arch="llama" plants into a gated FFN: the gate key fires on the trigger, the up key is a constant
    positive read of the same channel, so ``m_i = silu(a x_c - beta) * (a' x_c)``.
    """
    import transformers as T


    tok = word_tokenizer()
    vocab = len(tok)
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = T.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=4, n_inner=d_ffn, vocab_size=vocab,
                           n_positions=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=1,
                           pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif arch == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=4,
                            intermediate_size=d_ffn, vocab_size=vocab, max_position_embeddings=64,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    else:
        raise ValueError(f"planted models are gpt2 or llama, not {arch!r}")
    hf = T.AutoModelForCausalLM.from_config(cfg).eval()
    mm = MemoryModel(hf, tok, name_or_path=f"planted-{arch}")
    planted = [PlantedFact(f.trigger, f.target, list(f.memories)) for f in facts]
    with torch.no_grad():
        _plant(mm, planted, key_gain, key_bias, value_gain, unembed_gain)
    return PlantedModel(mm, planted)


def _plant(mm, facts: list[PlantedFact], key_gain: float, key_bias: float, value_gain: float,
           unembed_gain: float):
    tok, d = mm.tokenizer, mm.d_model
    E = mm.embedding.weight  # (vocab, d_model)
    U = mm.unembedding.weight  # (vocab, d_model)
    U *= unembed_gain  # random init gives near-uniform outputs; this makes the planted push decisive
    pos = mm.hf.get_submodule("transformer.wpe").weight if mm.spec.family == "gpt2" else None
    for n, f in enumerate(facts):
        f.channel = d - 1 - n
        f.trigger_id = tok.convert_tokens_to_ids(f.trigger)
        f.target_id = tok.convert_tokens_to_ids(f.target)
        c = f.channel
        # Only the trigger writes channel c, and attention never reads it, so the key sees the trigger
        # at the current position alone.
        E[:, c] = 0.0
        E[f.trigger_id, c] = 1.0
        if pos is not None:
            pos[:, c] = 0.0
        for l in range(mm.n_layers):
            _seal_channel(mm, l, c)
        u = U[f.target_id] / U[f.target_id].norm()
        for layer, index in f.memories:
            keys = mm.keys(layer)  # (d_ffn, d_model) view
            keys[index] = 0.0
            keys[index, c] = key_gain
            kb = mm.key_bias(layer)
            if kb is not None:
                kb[index] = -key_bias
            up = mm.up_keys(layer)
            if up is not None:  # gated: the up projection passes the trigger channel through
                up[index] = 0.0
                up[index, c] = key_gain
            mm.values(layer)[:, index] = value_gain * u / len(f.memories)


def _seal_channel(mm, layer: int, channel: int):
    """Attention neither reads nor writes the channel and no value writes it, so it stays exactly
    the trigger's indicator at every layer (other memories' values are filled in afterwards)."""
    attn = mm.module(layer, mm.spec.attn)
    for name, p in attn.named_parameters():
        head = name.split(".")[0]
        if p.dim() == 1:
            if head in ("c_proj", "o_proj"):
                p[channel] = 0.0
            continue
        if mm.spec.conv1d:  # Conv1D: (in, out)
            if head == "c_attn":
                p[channel, :] = 0.0
            elif head == "c_proj":
                p[:, channel] = 0.0
        elif head in ("q_proj", "k_proj", "v_proj"):  # Linear: (out, in)
            p[:, channel] = 0.0
        elif head == "o_proj":
            p[channel, :] = 0.0
    mm.values(layer)[channel, :] = 0.0
    vb = mm.value_bias(layer)
    if vb is not None:
        vb[channel] = 0.0


def save_planted(pm: PlantedModel, out: str | Path) -> Path:
    """Save as an ordinary Hugging Face model folder (+ ``planted.json`` with the ground truth)."""
    import json


    out = Path(out)
    with atomic_path(out, is_dir=True) as tmp:
        pm.model.hf.save_pretrained(tmp)
        pm.model.tokenizer.save_pretrained(tmp)
        (tmp / "planted.json").write_text(json.dumps([f.__dict__ for f in pm.facts], indent=2))
    return out
