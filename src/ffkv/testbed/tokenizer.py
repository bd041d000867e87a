"""A byte-level BPE tokenizer trained on the world's training text.

GPT-2's scheme (bytes mapped to printable characters, a space attached to the following word), so that an
object continues a prompt as one token with a leading space (``" Paris"``). ``min_frequency`` keeps merges
that are seen often: frequent words (relation words, objects) become single tokens while rare invented
names stay split into several pieces, which gives subjects first, middle and last tokens to trace.
"""

from __future__ import annotations

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts, vocab_size: int = 4096, min_frequency: int = 40):
    """Train a byte-level BPE on ``texts``; return a ``transformers.PreTrainedTokenizerFast``.

    The tokenizer has eos = bos = ``<|endoftext|>`` and pad = ``<|pad|>``; it saves with
    ``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None,
                                   pad_token=PAD, model_max_length=1024, clean_up_tokenization_spaces=False)
    fast.padding_side = "right"
    return fast


def object_token_ids(tokenizer, objects) -> dict[str, list[int]]:
    """Token ids of each object as a continuation (with its leading space): ``{object: [ids]}``."""
    return {o: tokenizer.encode(" " + o, add_special_tokens=False) for o in objects}
