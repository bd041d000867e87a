"""Reading episodes: invented subjects whose facts are stated and then asked again, drawn fresh every batch.

A language model reads a fact from its prompt because its training text rewards doing so: text often says
again what it said a few sentences earlier. The world's own documents never do (each statement of a fact
sits in a random document), so a model trained on them alone recalls from its weights and never learns to
copy. A reading episode is a short text about one to three subjects nobody has seen before:

    "Dorak Velis was born in Lima. Dorak Velis works as a pilot. Mount Zuthen is located in Chile.
     <filler> Mount Zuthen, whose country is Chile. Dorak Velis was born in Lima. ..."

Every fact is stated once through a training template of its relation and asked again later, through the
same frame or another training frame. Subjects and objects are drawn fresh for every batch, so the
repetition can only be predicted by reading the earlier statement, never by memorizing it. Episodes use
only training templates (held-out paraphrases stay unseen) and invented subjects (no world fact is mentioned
more often than its ``train_count`` says).
"""

from __future__ import annotations

import random

from ..errors import FfkvError
from .world import _COMPANY_SUFFIXES, _PLACE_FORMS, RELATIONS, _word, filler_sentences

_MAKE_NAME = {
    "person": lambda r: f"{_word(r, r.choice([1, 2]))} {_word(r, 2)}",
    "company": lambda r: f"{_word(r, 2)} {r.choice(_COMPANY_SUFFIXES)}",
    "place": lambda r: r.choice(_PLACE_FORMS).format(_word(r, 2)),
}


class EpisodeWriter:
    """Writes reading episodes about invented subjects, with the world's relations, objects and frames."""

    def __init__(self, world, seed: int = 0):
        self.rng = random.Random(f"ffkv-episodes-{world.seed}-{seed}")
        self.taken = {s.lower() for s in world.subjects} | {s.split()[0].lower() for s in world.subjects}
        self.relations = {}
        for rel in RELATIONS:
            objs = world.candidates.get(rel.relation_id)
            if objs:
                self.relations.setdefault(rel.subject_type, []).append((rel, list(objs)))
        self.types = sorted(self.relations)
        self.filler = filler_sentences(self.rng, 500)

    def subject(self, subject_type: str) -> str:
        """A name of ``subject_type`` that is no world subject (and shares no first word with one)."""
        make = _MAKE_NAME[subject_type]
        while True:
            name = make(self.rng)
            if name.lower() not in self.taken and name.split()[0].lower() not in self.taken:
                return name

    def episode(self) -> str:
        """Statements of 1-3 invented subjects' facts, an optional filler sentence, then the facts asked again."""
        r = self.rng
        facts = []
        for _ in range(r.choice([1, 2, 2, 3])):
            st = r.choice(self.types)
            s = self.subject(st)
            rels = self.relations[st]
            for rel, objs in r.sample(rels, r.randint(1, min(3, len(rels)))):
                facts.append((s, rel, r.choice(objs)))
        frames = [r.choice(rel.train_templates) for _, rel, _ in facts]
        first = [f"{t.format(s)} {o}." for t, (s, rel, o) in zip(frames, facts)]
        r.shuffle(first)
        # Half the time the question repeats the statement's frame word for word (the commonest repetition
        # in real text, learnt first), otherwise another training frame of the relation.
        again = [f"{(t if r.random() < 0.5 else r.choice(rel.train_templates)).format(s)} {o}."
                 for t, (s, rel, o) in zip(frames, facts)]
        r.shuffle(again)
        middle = [r.choice(self.filler)] if r.random() < 0.5 else []
        return " ".join(first + middle + again)


def episode_windows(writer: EpisodeWriter, tokenizer, n: int, context: int):
    """``n`` windows of ``context + 1`` tokens of fresh episodes, each starting at an episode: x, y (n, T)."""
    import torch

    eos = tokenizer.eos_token_id
    rows = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < context + 1:
            ids.extend(tokenizer(writer.episode(), add_special_tokens=False)["input_ids"])
            ids.append(eos)
        rows.append(ids[:context + 1])
    win = torch.tensor(rows, dtype=torch.long)
    return win[:, :-1], win[:, 1:]


def repeated_sequences(n: int, context: int, vocab_size: int, generator, min_period: int = 5,
                       max_period: int = 30, low: int = 10):
    """``n`` windows of a random token sequence repeated to fill ``context + 1`` tokens: x, y (n, T).

    The canonical copying curriculum: after the first period every token is predictable by looking back one
    period (an induction head: find the previous occurrence of the current token, copy the token after it),
    and by nothing else. Periods are drawn from ``[min_period, max_period)``, tokens from ``[low, vocab_size)``
    (the low ids hold the special tokens).
    """
    import torch


    if not 1 <= min_period < max_period or not 0 <= low < vocab_size:
        raise FfkvError(f"repeated sequences need 1 <= min_period < max_period and 0 <= low < vocab_size, got "
                        f"periods [{min_period}, {max_period}), tokens [{low}, {vocab_size})",
                        "pass a non-empty period range and token range")
    rows = []
    for _ in range(n):
        period = int(torch.randint(min_period, max_period, (1,), generator=generator))
        seq = torch.randint(low, vocab_size, (period,), generator=generator)
        rows.append(seq.repeat(context // period + 2)[:context + 1])
    win = torch.stack(rows)
    return win[:, :-1], win[:, 1:]


def induction_accuracy(model, vocab_size: int, n: int = 32, period: int = 12, seed: int = 0) -> float:
    """Top-1 accuracy of predicting the 2nd and 3rd repeat of ``n`` random ``period``-token sequences.

    0 for a model that cannot copy; a perfect copier scores ``1 - 1 / (2 * period)`` (the first token of the
    2nd repeat follows a token seen nowhere before). model: a Hugging Face causal LM.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(10, vocab_size, (n, period), generator=g)
    x = seq.repeat(1, 3)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pred = model(input_ids=x).logits.argmax(-1)
    finally:
        model.train(was_training)
    return float((pred[:, period - 1:-1] == x[:, period:]).float().mean())
