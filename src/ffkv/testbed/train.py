"""Train a small language model on a world's training text: a plain PyTorch loop, nanoGPT style.

The corpus is tokenized once into a single stream of token ids (documents separated by ``<|endoftext|>``);
each step draws ``batch_size`` random windows of ``context + 1`` tokens from it (seeded), and minimizes the
next-token cross-entropy

    L = -(1 / (B T)) Σ_b Σ_t log p(x_{b,t+1} | x_{b,≤t})

with AdamW, a linear warm-up of the learning rate and a cosine decay to a tenth of it. Deterministic for a
seed: ``torch.manual_seed``, a seeded window sampler and one thread. The result is an ordinary Hugging Face
model folder (``save_pretrained``, safetensors) with its tokenizer, loadable by ``ffkv.load_model``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import FfkvError
from ..io import atomic_path, provenance


@dataclass(frozen=True)
class TrainPreset:
    n_layer: int
    d_model: int
    n_head: int
    d_ffn: int  # GPT-2: the FFN width; LLaMA: the gated FFN width is 2/3 of it (same parameter count)
    context: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    weight_decay: float = 0.1
    vocab_size: int = 4096
    min_frequency: int = 20
    # share of each batch drawn from reading episodes (:mod:`.episodes`) instead of the world's documents
    episode_share: float = 0.0


TRAIN_PRESETS = {
    "tiny": TrainPreset(n_layer=2, d_model=64, n_head=2, d_ffn=256, context=64, batch_size=16, steps=800,
                        lr=6e-3, warmup=50, min_frequency=8),
    "default": TrainPreset(n_layer=6, d_model=128, n_head=4, d_ffn=512, context=128, batch_size=32,
                           steps=1500, lr=4e-3, warmup=100),
}


def model_config(arch: str, preset: TrainPreset, tokenizer):
    """A Hugging Face config for ``arch`` ("gpt2" or "llama") at the preset's sizes."""
    from transformers import GPT2Config, LlamaConfig

    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  tie_word_embeddings=True)
    if arch == "gpt2":
        # No dropout: the point is to memorize facts, and the runs are short.
        return GPT2Config(n_layer=preset.n_layer, n_embd=preset.d_model, n_head=preset.n_head,
                          n_inner=preset.d_ffn, n_positions=preset.context, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **common)
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=preset.n_layer, hidden_size=preset.d_model,
                           num_attention_heads=preset.n_head, num_key_value_heads=preset.n_head,
                           intermediate_size=int(round(preset.d_ffn * 2 / 3 / 8)) * 8,
                           max_position_embeddings=preset.context, hidden_act="silu", attention_dropout=0.0,
                           rms_norm_eps=1e-5, **common)
    raise FfkvError(f"unknown testbed architecture {arch!r}", "use --arch gpt2 or --arch llama")


def token_stream(tokenizer, documents):
    """All documents as one 1-D tensor of token ids, each document followed by ``<|endoftext|>``. (N,)"""
    import torch

    eos = tokenizer.eos_token_id
    ids = []
    for enc in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(stream, context: int, batch_size: int, generator):
    """Random windows of the stream: inputs x (B, T) and next-token targets y (B, T)."""
    import torch

    starts = torch.randint(0, len(stream) - context - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    win = stream[idx]
    return win[:, :-1], win[:, 1:]


def learning_rate(step: int, preset: TrainPreset) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``lr / 10``."""
    if step < preset.warmup:
        return preset.lr * (step + 1) / preset.warmup
    t = (step - preset.warmup) / max(1, preset.steps - preset.warmup)
    return preset.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_model(world, arch: str = "gpt2", preset: str | TrainPreset = "default", out: str | Path = "model",
                seed: int = 0, steps: int | None = None, threads: int = 1, progress: bool = True,
                checkpoint_every: int | None = None) -> Path:
    """Train a tokenizer and an ``arch`` model on ``world``'s text; save a HF model folder at ``out``.

    Returns ``out``. The folder holds the model (safetensors), its tokenizer and ``testbed.json``
    (provenance, hyperparameters, loss curve, training time). ``checkpoint_every``: also save the model
    every that many steps to ``<out>-step<N>`` (for watching recall grow, or a long run cut short).
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from .episodes import EpisodeWriter, episode_windows
    from .tokenizer import train_tokenizer

    p = TRAIN_PRESETS[preset] if isinstance(preset, str) else preset
    if steps is not None:
        p = replace(p, steps=steps)
    if not 0.0 <= p.episode_share < 1.0 or round(p.batch_size * p.episode_share) >= p.batch_size:
        raise FfkvError(f"episode_share {p.episode_share} leaves no world text in a batch of {p.batch_size}",
                        "pass an episode_share in [0, 1), e.g. 0.25")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)

    documents = world.documents()
    tokenizer = train_tokenizer(documents, p.vocab_size, p.min_frequency)
    stream = token_stream(tokenizer, documents)
    config = model_config(arch, p, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    n_episode = round(p.batch_size * p.episode_share)
    episodes = EpisodeWriter(world, seed) if n_episode else None

    decay = [q for n, q in model.named_parameters() if q.dim() >= 2]
    no_decay = [q for n, q in model.named_parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.time()
    bar = tqdm(range(p.steps), desc=f"train {arch}", disable=not progress, mininterval=2.0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, p)
        x, y = sample_batch(stream, p.context, p.batch_size - n_episode, gen)
        if n_episode:
            xe, ye = episode_windows(episodes, tokenizer, n_episode, p.context)
            x, y = torch.cat([x, xe]), torch.cat([y, ye])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < p.steps:
            out_ck = Path(f"{out}-step{step + 1}")
            model.save_pretrained(out_ck, safe_serialization=True)
            tokenizer.save_pretrained(out_ck)
        if step % 10 == 0:
            elapsed = time.time() - t0
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{(step + 1) * p.batch_size * p.context / elapsed:.0f}")
    seconds = time.time() - t0
    model.eval()

    out = Path(out)
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = provenance({"name": f"ffkv-testbed-{arch}", "arch": arch},
                          arch=arch, seed=seed, world=world.summary(), train=asdict(p), threads=threads)
        meta.update(train_seconds=round(seconds, 1), corpus_tokens=int(len(stream)),
                    tokens_seen=p.steps * p.batch_size * p.context,
                    n_parameters=sum(q.numel() for q in model.parameters()),
                    loss_every_50=losses[::50], final_loss=sum(losses[-20:]) / max(1, len(losses[-20:])))
        (tmp / "testbed.json").write_text(json.dumps(meta, indent=2) + "\n")
        # mkdtemp makes private folders; a model folder is meant to be shared and shipped.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
    return out
