"""The edit context: what edits of one model share between calls, kept here and not on the model object.

    ctx = EditContext(stats_dir="stats")
    apply_edits(model, reqs1, "rome", context=ctx)     # statistics computed (or read from stats_dir)
    apply_edits(model, reqs2, "rome", context=ctx)     # the same statistics and context prefixes, reused

It holds the statistics memo (``{(spec, layer): SecondMoment}``, :func:`ffkv.edit.stats.layer_stats`),
the context-prefix cache (``{(spec, seed): [prefix, ...]}``, generated once per run on the unedited
model, as ROME's global cache) and the base identity: the unedited model's, which the statistics of an
edited model belong to. ``method_state`` holds what a method carries from one call to the next (AlphaEdit:
the keys of its earlier edits, kept in step with the journal, :class:`ffkv.edit.methods.alphaedit.AlphaEditState`).
One context serves one model (and its edited states).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .compute_key import context_prefixes
from .stats import SecondMoment, layer_stats

@dataclass
class EditContext:
    """State shared by the edits of one model. ``stats_dir``, ``corpus`` and ``progress`` are the settings
    of the statistics pass (``corpus``: texts or a spec overriding the ``corpus`` hyperparameter)."""

    base_identity: dict | None = None
    memo: dict = field(default_factory=dict)
    prefix_cache: dict = field(default_factory=dict)
    stats_dir: str | Path | None = None
    corpus: object = None
    progress: bool = True
    method_state: dict = field(default_factory=dict)  # a method's own state, keyed by its name (AlphaEdit's K_p K_p^T)

    def using(self, **settings) -> "EditContext":
        """A view with other settings (``stats_dir``, ``corpus``, ``progress``) sharing this context's state."""
        return dataclasses.replace(self, **{k: v for k, v in settings.items() if v is not None})

    def layer_stats(self, model, layers: Sequence[int], hp: dict) -> dict[int, SecondMoment]:
        """C = E[k k^T] of ``layers`` for the hyperparameters ``hp``: ``corpus`` and the sample, the corpus's
        first ``stats_tokens`` tokens as a stream when it is a number, else ``mom2_n_samples`` texts (default
        100,000) as kmeng01's ``layer_stats`` counts them (:mod:`.stats`)."""
        corpus = self.corpus if self.corpus is not None else hp["corpus"]
        n_tokens = hp.get("stats_tokens")
        kw = dict(corpus=corpus, n_tokens=n_tokens,
                  n_texts=hp.get("mom2_n_samples", 100_000) if n_tokens is None else None,
                  stats_dir=self.stats_dir, progress=self.progress)
        return layer_stats(model, list(layers), base_identity=self.base_identity, memo=self.memo, **kw)

    def context_prefixes(self, model, spec, seed: int) -> list[str]:
        """ROME's context prefixes, generated once per context (see :func:`.compute_key.context_prefixes`)."""
        return context_prefixes(model, spec, seed, cache=self.prefix_cache)
