"""Causal tracing (Meng et al., NeurIPS 2022): which hidden states carry a fact to the prediction.

Three runs of one prompt with subject tokens ``[s, e)`` and answer token ``o``:

    clean       p_clean = P(o | prompt)                                   (high_score)
    corrupted   subject embeddings h_i^(0) += nu * z_i, z_i ~ N(0, I), i in [s, e)
                p_* = mean over noise samples of P(o | corrupted)        (low_score)
    restored    corrupted, but one state set back to its clean value
                p_*,clean(h) = mean over noise samples of P(o | corrupted, h restored)

The *indirect effect* of a state is ``p_*,clean(h) - p_*``, the *total effect* ``p_clean - p_*``. The states are
(kind="hidden") the residual stream leaving layer l at token t, or (kind="mlp" / "attn") the MLP or attention
outputs of layers ``[l - window/2, l + window/2)`` (clipped) at token t. ``scores[t, l] = p_*,clean``.

Noise (ROME's ``--noise_level``): ``"s3"`` = 3 x the standard deviation of subject-token embeddings (over the
``subjects`` given, else over the whole embedding table), a float (that level), ``"uniform"`` (noise drawn from
U(-1, 1) times the s3 level, ROME's ``u`` option) or ``"replace"`` (the embeddings replaced by the noise, ROME's
``replace=True``). The noise is drawn once per trace with ``numpy.random.RandomState(seed)``, in the shape
``(samples, e - s, d_model)``, and the same noise is used for every cell, as in ROME (which reseeds per cell).

Speed. ROME runs one forward pass of ``1 + samples`` rows over every token and layer per cell. Here:
1. cells that a restore cannot change are not run: tokens before the subject are identical in the clean and
   corrupted runs (score = p_*), and restoring the last layer's output changes the prediction only at the last
   token (score = p_clean there, p_* elsewhere);
2. window cells that restore the same set of states are run once;
3. a restore at (t, l) changes only positions >= t from layer l (hidden: l + 1) on: each cell runs that block
   alone (:func:`ffkv.models.engine.run_tail`), on the corrupted run's cache and residual stream;
4. many cells share one forward pass (``samples`` rows each), grouped by start layer and token band; the clean
   row is not repeated in every pass.
:func:`causal_trace_reference` is ROME's per-cell loop, kept for the equality test and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FfkvError
from ..models.engine import Cost, reference_run, run, run_tail
from ..models.hooks import Intervention, intervene
from ..models.model import MemoryModel

KINDS = ("hidden", "mlp", "attn")
SITE_OF_KIND = {"hidden": "resid_post", "mlp": "ffn_out", "attn": "attn_out"}


@dataclass
class TraceResult:
    """One causal trace. scores: (tokens, layers) restored probabilities of ``answer``."""

    prompt: str
    subject: str
    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    high_score: float
    low_score: float
    scores: np.ndarray
    kind: str
    window: int = 10
    noise: str | float = "s3"
    noise_level: float = 0.0
    samples: int = 10
    seed: int = 0
    cost: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        # The grid is (tokens x layers) floats: a repr that printed it would bury the facts a user looks for.
        t, l = self.peak()
        return (f"TraceResult(kind={self.kind!r}, prompt={self.prompt!r}, subject={self.subject!r}, "
                f"answer={self.answer!r}, p_clean={self.high_score:.4g}, p_corrupted={self.low_score:.4g}, "
                f"scores={self.scores.shape[0]}x{self.scores.shape[1]} (tokens x layers), "
                f"peak=(token {t} {self.tokens[t]!r}, layer {l}, p={self.scores[t, l]:.4g}), window={self.window})")

    @property
    def indirect_effects(self) -> np.ndarray:
        """``scores - low_score``, (tokens, layers)."""
        return self.scores - self.low_score

    @property
    def total_effect(self) -> float:
        return self.high_score - self.low_score

    def peak(self) -> tuple[int, int]:
        """(token, layer) of the largest restored probability."""
        t, l = np.unravel_index(int(np.argmax(self.scores)), self.scores.shape)
        return int(t), int(l)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "subject": self.subject, "tokens": self.tokens,
                "subject_range": list(self.subject_range), "answer": self.answer, "answer_id": self.answer_id,
                "high_score": self.high_score, "low_score": self.low_score, "kind": self.kind,
                "window": self.window, "noise": self.noise, "noise_level": self.noise_level,
                "samples": self.samples, "seed": self.seed, "scores": self.scores.tolist(), "cost": self.cost}


# ----------------------------------------------------------------------------------------------- noise
@torch.no_grad()
def embedding_std(model: MemoryModel, subjects: list[str] | None = None) -> float:
    """Standard deviation of the embedding-layer output over the tokens of ``subjects`` (ROME's
    ``collect_embedding_std``), or over the whole vocabulary when no subjects are given."""
    if subjects:
        ids = [i for s in subjects for i in model.token_ids(s)]
        if not ids:
            raise FfkvError("the subjects tokenize to nothing", "pass non-empty subjects")
        ids = torch.tensor([ids], device=model.device)
    else:
        ids = torch.arange(model.vocab_size, device=model.device)[None]
    with intervene(model, reads=["embed"]) as rec:
        model.embedding(ids)
    return rec["embed", None].float().std().item()


def noise_level(model: MemoryModel, noise: str | float = "s3", subjects: list[str] | None = None
                ) -> tuple[float, str]:
    """``(level, mode)`` for a noise spec; mode is "gaussian", "uniform" or "replace".

    "sK" (K a float, default 3): K x :func:`embedding_std`; a number: that level; "uniform" / "replace":
    the s3 level with uniform noise / replacing the embeddings; "uK" uniform with level K.
    """
    if isinstance(noise, (int, float)) and not isinstance(noise, bool):
        return float(noise), "gaussian"
    spec = str(noise).strip().lower()
    try:
        if spec in ("uniform", "replace"):
            return 3.0 * embedding_std(model, subjects), spec
        if spec.startswith("s"):
            factor = float(spec[1:]) if len(spec) > 1 else 1.0
            return factor * embedding_std(model, subjects), "gaussian"
        if spec.startswith("u"):
            return float(spec[1:]), "uniform"
        return float(spec), "gaussian"
    except ValueError:
        raise FfkvError(f"unknown noise {noise!r}",
                        "use s3 (3 x subject-embedding std), a number, uniform or replace") from None


def draw_noise(level: float, mode: str, samples: int, n_tokens: int, d_model: int, seed: int) -> torch.Tensor:
    """Noise for the subject embeddings, (samples, n_tokens, d_model), from ``RandomState(seed)`` as in ROME."""
    rs = np.random.RandomState(seed)
    z = rs.uniform(-1, 1, (samples, n_tokens, d_model)) if mode == "uniform" \
        else rs.randn(samples, n_tokens, d_model)
    return level * torch.from_numpy(z)


def corruption(noise: torch.Tensor, subject_range: tuple[int, int], mode: str, rows=None) -> Intervention:
    """The edit that corrupts the subject embeddings of ``rows``: ``h += noise`` (or ``h = noise``)."""
    s, e = subject_range
    return Intervention("embed", None, "set" if mode == "replace" else "add", value=noise,
                        positions=list(range(s, e)), batch=rows)


# ----------------------------------------------------------------------------------------------- cells
def restored_layers(kind: str, layer: int, n_layers: int, window: int) -> tuple[int, ...]:
    """The layers whose state a cell restores: ``(layer,)`` for hidden, else ROME's window
    ``[max(0, l - w//2), min(L, l - (-w//2)))``."""
    if kind == "hidden":
        return (layer,)
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


@dataclass
class _Prepared:
    ids: torch.Tensor  # (1, T)
    tokens: list[str]
    subject_range: tuple[int, int]
    answer_id: int
    answer: str
    high_score: float
    clean: dict  # site -> (T, d) per layer list
    noise: torch.Tensor
    level: float
    mode: str


def _token_strings(model: MemoryModel, ids: torch.Tensor) -> list[str]:
    return [model.decode([int(i)]) for i in ids[0]]


def _check_args(model: MemoryModel, kind: str, samples: int, window: int):
    if kind not in KINDS:
        raise FfkvError(f"unknown trace kind {kind!r}", f"use one of {', '.join(KINDS)}")
    if samples < 1:
        raise FfkvError(f"samples must be at least 1, got {samples}", "use --samples 10 (ROME's default)")
    if window < 1:
        raise FfkvError(f"window must be at least 1, got {window}", "use --window 10 (ROME's default)")


@torch.no_grad()
def _prepare(model, prompt, subject, kind, answer, noise, samples, seed, subjects, cost) -> _Prepared:
    ids = model.encode(prompt)["input_ids"]
    s, e = model.find_subject(prompt, subject)
    site = SITE_OF_KIND[kind]
    logits, rec, _ = reference_run(model, ids, reads=[(site, l) for l in range(model.n_layers)], cost=cost)
    probs = torch.softmax(logits[0, -1].float(), -1)
    if answer is None:
        # ROME traces the model's top prediction; a padded vocabulary's rows past the tokenizer are no text
        real = model.tokenizer_vocab_size or probs.numel()
        answer_id = int(probs[: min(real, probs.numel())].argmax())
    elif isinstance(answer, int):
        answer_id = answer
    else:
        answer_id = model.answer_id(answer)
    level, mode = noise_level(model, noise, subjects)
    z = draw_noise(level, mode, samples, e - s, model.d_model, seed)
    return _Prepared(ids, _token_strings(model, ids), (s, e), answer_id, model.decode([answer_id]),
                     float(probs[answer_id]), {l: rec[site, l][0] for l in range(model.n_layers)}, z, level, mode)


def _mean_prob(logits: torch.Tensor, answer_id: int, samples: int) -> torch.Tensor:
    """(n_cells * samples, vocab) logits -> (n_cells,) mean over each cell's samples of P(answer)."""
    p = torch.softmax(logits.float(), -1)[:, answer_id]
    return p.reshape(-1, samples).mean(1)


def _bands(tokens: list[int], bands: int) -> list[list[int]]:
    """Split sorted token positions into ``bands`` contiguous groups (fewer passes vs. fewer wasted positions)."""
    bands = max(1, min(bands, len(tokens)))
    return [list(b) for b in np.array_split(np.array(tokens), bands) if len(b)]


@torch.no_grad()
def causal_trace(model: MemoryModel, prompt: str, subject: str, kind: str = "hidden", answer=None,
                 noise: str | float = "s3", samples: int = 10, window: int = 10, seed: int = 0,
                 subjects: list[str] | None = None, bands: int = 3, max_rows: int = 400,
                 cost: Cost | None = None) -> TraceResult:
    """Causal trace of one prompt: restored P(answer) for every (token, layer), as ROME defines it.

    answer: None (the model's top prediction, as ROME), a string (its first token) or a token id.
    subjects: the data set's subjects, for the s3 noise level (default: the embedding table's std).
    bands: token bands per start layer (more bands: fewer wasted positions, more passes).
    max_rows: the most batch rows in one forward pass. Returns a :class:`TraceResult`.
    """
    kind = kind or "hidden"  # ROME's kind=None
    _check_args(model, kind, samples, window)
    cost = cost if cost is not None else Cost()
    prep = _prepare(model, prompt, subject, kind, answer, noise, samples, seed, subjects, cost)
    L, T = model.n_layers, prep.ids.shape[1]
    s, _ = prep.subject_range
    # The corrupted run, recording what tail runs start from.
    ids_n = prep.ids.expand(samples, T)
    site = SITE_OF_KIND[kind]
    reads = [("resid_pre", l) for l in range(L)] + [("resid_post", l) for l in range(L)]
    logits, crec, cache = reference_run(model, ids_n, edits=[corruption(prep.noise, prep.subject_range, prep.mode)],
                                        reads=reads, cost=cost)
    low = float(_mean_prob(logits[:, -1], prep.answer_id, samples)[0])
    scores = np.full((T, L), low, dtype=np.float64)
    # Cells a restore can change, keyed by what they restore: {(t, layers): [(t, l), ...]}.
    unique: dict[tuple, list[tuple[int, int]]] = {}
    for t in range(s, T):
        for l in range(L):
            layers = restored_layers(kind, l, L, window)
            if kind == "hidden" and l == L - 1:
                scores[t, l] = prep.high_score if t == T - 1 else low
                continue
            unique.setdefault((t, layers), []).append((t, l))
    by_start: dict[int, list[tuple]] = {}
    for key in unique:
        t, layers = key
        start = layers[0] + 1 if kind == "hidden" else layers[0]
        by_start.setdefault(start, []).append(key)
    per_pass = max(1, max_rows // samples)
    for start, keys in sorted(by_start.items()):
        positions = sorted({t for t, _ in keys})
        for band in _bands(positions, bands):
            band_keys = [k for k in keys if k[0] in band]
            for i in range(0, len(band_keys), per_pass):
                chunk = band_keys[i:i + per_pass]
                probs = _run_cells(model, prep, kind, site, crec, cache, start, chunk, samples, cost)
                for key, p in zip(chunk, probs.tolist()):
                    for t, l in unique[key]:
                        scores[t, l] = p
    return TraceResult(prompt, subject, prep.tokens, prep.subject_range, prep.answer, prep.answer_id,
                       prep.high_score, low, scores, kind, window, noise, prep.level, samples, seed, cost.as_dict())


def _run_cells(model, prep: _Prepared, kind, site, crec, cache, start, keys, samples, cost) -> torch.Tensor:
    """Restored P(answer) of the cells ``keys`` = [(t, layers)], all starting at layer ``start``; (n,) tensor.

    The run covers positions ``t0 = min t`` .. T-1 and layers ``start`` .. L-1; rows are cell-major
    (cell c, sample k) -> c * samples + k, each on the corrupted run's cache row k.
    """
    T = prep.ids.shape[1]
    t0 = min(t for t, _ in keys)
    n = len(keys)
    B = n * samples
    sample_of_row = torch.arange(B) % samples
    if kind == "hidden":
        # Restoring resid_post(l) at t: start layer l + 1 from the corrupted stream, patched at t.
        resid = crec["resid_post", start - 1][:, t0:][sample_of_row].clone()
        for c, (t, _) in enumerate(keys):
            resid[c * samples:(c + 1) * samples, t - t0] = prep.clean[start - 1][t]
        edits = []
    else:
        resid = crec["resid_pre", start][:, t0:][sample_of_row]
        edits = _window_edits(prep, site, keys, samples, t0, T)
    ids = prep.ids[:, t0:].expand(B, T - t0)
    logits, _ = run_tail(model, ids, start, resid, cache, t0, sample_of_row, edits=edits, cost=cost)
    return _mean_prob(logits, prep.answer_id, samples)


def _window_edits(prep: _Prepared, site, keys, samples, t0, T) -> list[Intervention]:
    """One edit per restored layer: rows of a cell whose window holds that layer take the clean state at t."""
    B = len(keys) * samples
    masks: dict[int, torch.Tensor] = {}
    for c, (t, layers) in enumerate(keys):
        for l in layers:
            m = masks.setdefault(l, torch.zeros(B, T - t0, 1, dtype=torch.bool))
            m[c * samples:(c + 1) * samples, t - t0] = True
    edits = []
    for l, m in masks.items():
        clean = prep.clean[l][t0:]
        edits.append(Intervention(site, l, "fn", value=lambda h, m=m, v=clean: torch.where(m.to(h.device), v, h)))
    return edits


# ----------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def causal_trace_reference(model: MemoryModel, prompt: str, subject: str, kind: str = "hidden", answer=None,
                           noise: str | float = "s3", samples: int = 10, window: int = 10, seed: int = 0,
                           subjects: list[str] | None = None, cost: Cost | None = None) -> TraceResult:
    """ROME's ``calculate_hidden_flow``, written directly: one forward pass of ``1 + samples`` rows per cell.

    Row 0 is clean; rows 1.. carry the (same) noise; the restored states are copied from row 0 in the same
    pass (ROME's ``trace_with_patch``). Slow by design: the baseline that :func:`causal_trace` must equal.
    """
    kind = kind or "hidden"
    _check_args(model, kind, samples, window)
    cost = cost if cost is not None else Cost()
    prep = _prepare(model, prompt, subject, kind, answer, noise, samples, seed, subjects, Cost())
    L, T = model.n_layers, prep.ids.shape[1]
    ids = prep.ids.expand(samples + 1, T)
    noised = list(range(1, samples + 1))
    corrupt = corruption(prep.noise, prep.subject_range, prep.mode, rows=noised)

    def trace_with_patch(states: list[tuple[int, int]]) -> float:
        edits = [corrupt] + [Intervention(SITE_OF_KIND[kind], l, "fn", positions=[t],
                                          value=lambda h: h[:1].expand_as(h)) for t, l in states]
        logits = run(model, ids, edits=edits, cost=cost).logits
        return torch.softmax(logits[1:, -1].float(), -1)[:, prep.answer_id].mean().item()

    low = trace_with_patch([])
    scores = np.zeros((T, L))
    for t in range(T):
        for l in range(L):
            scores[t, l] = trace_with_patch([(t, j) for j in restored_layers(kind, l, L, window)])
    return TraceResult(prompt, subject, prep.tokens, prep.subject_range, prep.answer, prep.answer_id,
                       prep.high_score, low, scores, kind, window, noise, prep.level, samples, seed, cost.as_dict())


@torch.no_grad()
def restore_states(model: MemoryModel, prompt: str, subject: str, states: list[tuple[int, int]],
                   kind: str = "hidden", answer=None, noise: str | float = "s3", samples: int = 10, seed: int = 0,
                   subjects: list[str] | None = None) -> float:
    """P(answer) of the corrupted prompt with the clean value of every state in ``states`` = [(token, layer)]
    restored at once (ROME's ``trace_with_patch`` with several states). Restoring all tokens of one layer's
    hidden state gives back the clean probability."""
    _check_args(model, kind, samples, 1)
    prep = _prepare(model, prompt, subject, kind, answer, noise, samples, seed, subjects, Cost())
    T = prep.ids.shape[1]
    edits = [corruption(prep.noise, prep.subject_range, prep.mode, rows=list(range(1, samples + 1)))]
    for t, l in states:
        edits.append(Intervention(SITE_OF_KIND[kind], model.check_layer(l), "fn", positions=[t],
                                  value=lambda h: h[:1].expand_as(h)))
    logits = run(model, prep.ids.expand(samples + 1, T), edits=edits).logits
    return torch.softmax(logits[1:, -1].float(), -1)[:, prep.answer_id].mean().item()
