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

Noise, as ROME's ``causal_trace.py`` by default. The draws: ``z = numpy.random.RandomState(1).randn(samples, e - s,
d_model)`` (ROME's ``trace_with_patch`` reseeds ``RandomState(1)`` for every cell, so every cell sees these same
draws; ``seed`` changes the 1). The level (``noise="s3"``, ROME's ``--noise_level s3``): ``nu`` = 3 x the standard
deviation of the embedding-layer output over the tokens of the *noise subjects* (ROME's ``collect_embedding_std``
over the subjects of its known-facts set), which :func:`noise_subjects` picks, in this order:

    a list of subjects / a file passed as ``subjects``      "given" / the file (``ffkv trace --subjects FILE``)
    ROME's known_1000 (``$FFKV_SHARED_DATA/known_facts``)     "known_1000" (the default where it is present)
    the traced prompt's own subject                          "prompt subject" (the fallback on a clone without it)
    ``subjects="vocabulary"``                                the whole embedding table (an option, not ROME's)

Each result says which (``noise_subjects``). Other specs: a float (that level), ``"sK"`` (K x the std),
``"uniform"`` (U(-1, 1) draws times the s3 level, ROME's ``u``), ``"replace"`` (embeddings replaced by the noise).

Speed. ROME runs one forward pass of ``1 + samples`` rows over every token and layer per cell. Here a cell costs
what an exact method must recompute (the bound), and no more:
1. cells that a restore cannot change are not run: tokens before the subject are identical in the clean and
   corrupted runs (score = p_*); restoring the last layer's output (or a window whose first layer is the last
   layer) changes the prediction only at the last token;
2. window cells that restore the same set of states are run once;
3. a restore at (t, l0) (l0 = the first restored layer) changes nothing at positions < t, nor at layer l0 anywhere
   but position t: each cell recomputes layer l0 at position t alone (mlp / attn; hidden restores the layer's
   output itself), then layers ``l0 + 1 ..`` at positions ``t ..`` (:func:`ffkv.models.engine.run`), on the
   corrupted run's key/value cache and residual stream; only the last position is unembedded;
4. the cells of one (first layer, token) share one forward pass (``samples`` rows each); the clean row is not
   repeated, and :func:`causal_traces` shares the clean and corrupted runs across kinds.
:func:`causal_trace_reference` is ROME's per-cell loop, kept for the equality test and the benchmark.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import FfkvError
from ..io import read_json
from ..models.engine import Cost, run
from ..models.hooks import Intervention, intervene
from ..models.model import MemoryModel
from ..progress import bar

KINDS = ("hidden", "mlp", "attn")
SITE_OF_KIND = {"hidden": "resid_post", "mlp": "ffn_out", "attn": "attn_out"}
# ROME's trace_with_patch: ``rs = numpy.random.RandomState(1)`` for every cell.
DEFAULT_SEED = 1
KNOWN_1000 = Path("known_facts") / "known_1000.json"
VOCABULARY = "vocabulary"


def shared_data() -> Path:
    """The public data sets' folder: ``$FFKV_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("FFKV_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared" / "data"


@dataclass
class TraceResult:
    """One causal trace. scores: (tokens, layers) restored probabilities of ``answer``.

    noise_level: the level nu used; noise_subjects: where the s3 level's subjects came from (:func:`noise_subjects`;
    "fixed level" for a numeric ``noise``).
    """

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
    seed: int = DEFAULT_SEED
    cost: dict = field(default_factory=dict)
    noise_subjects: str = ""

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
                "noise_subjects": self.noise_subjects, "samples": self.samples, "seed": self.seed,
                "scores": self.scores.tolist(), "cost": self.cost}


# ----------------------------------------------------------------------------------------------- noise
def read_subjects(path: str | os.PathLike) -> list[str]:
    """Subjects of a data set: a JSON list of records with ``subject`` (ROME's known_1000 layout, CounterFact's
    flat layout) or of strings, a JSONL file of such records, a testbed folder (its ``data/known_facts.json``),
    or a text file with one subject per line."""
    path = Path(path)
    if path.is_dir():
        path = path / "data" / "known_facts.json" if (path / "data").is_dir() else path / "known_facts.json"
    if not path.is_file():
        raise FfkvError(f"subjects file not found: {path}",
                        "pass a known_1000-layout JSON file, a testbed folder or a text file of subjects")
    if path.suffix == ".json":
        data = read_json(path)
        data = data if isinstance(data, list) else []
    elif path.suffix == ".jsonl":
        data = [__import__("json").loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        data = path.read_text().splitlines()
    subjects = [r if isinstance(r, str) else r.get("subject") if isinstance(r, dict) else None for r in data]
    subjects = [s.strip() for s in subjects if isinstance(s, str) and s.strip()]
    if not subjects:
        raise FfkvError(f"{path} holds no subjects",
                        "pass records with a 'subject' field (known_1000 layout) or one subject per line")
    return subjects


def noise_subjects(subjects=None, fallback: list[str] | None = None) -> tuple[list[str] | None, str]:
    """The subjects whose embeddings set the s3 level, and where they came from (module docstring):
    ``subjects`` (a list, or a file for :func:`read_subjects`), else ROME's known_1000 from the shared data
    folder, else ``fallback`` (the traced prompt's subject); ``"vocabulary"``: None (the whole table)."""
    if isinstance(subjects, str) and subjects == VOCABULARY:
        return None, VOCABULARY
    if isinstance(subjects, (str, os.PathLike)):
        found = read_subjects(subjects)
        return found, f"file {subjects} ({len(found)} subjects)"
    if subjects is not None:
        subjects = [s for s in subjects if isinstance(s, str) and s.strip()]
        if not subjects:
            raise FfkvError("no subjects given for the noise level", "pass non-empty subjects")
        return subjects, f"given ({len(subjects)} subjects)"
    known = shared_data() / KNOWN_1000
    if known.is_file():
        found = read_subjects(known)
        return found, f"known_1000 ({len(found)} subjects)"
    if fallback:
        return list(fallback), "prompt subject (known_1000 not found; set FFKV_SHARED_DATA or pass subjects)"
    return None, VOCABULARY


@torch.no_grad()
def embedding_std(model: MemoryModel, subjects: list[str] | None = None) -> float:
    """Standard deviation of the embedding-layer output over the tokens of ``subjects``, each tokenized alone as
    ROME's ``collect_embedding_std`` does (``tokenizer.encode``, special tokens included), or over the whole
    embedding table when ``subjects`` is None."""
    if subjects:
        rows = []
        for i in range(0, len(subjects), 256):
            enc = model.encode(list(subjects[i:i + 256]))
            with intervene(model, reads=["embed"]) as rec:
                model.embedding(enc["input_ids"])
            rows.append(rec["embed", None][enc["attention_mask"].bool()])
        x = torch.cat(rows)
        if not x.numel():
            raise FfkvError("the subjects tokenize to nothing", "pass non-empty subjects")
    else:
        with intervene(model, reads=["embed"]) as rec:
            model.embedding(torch.arange(model.vocab_size, device=model.device)[None])
        x = rec["embed", None]
    return x.float().std().item()


def noise_setting(model: MemoryModel, noise: str | float = "s3", subjects=None, fallback: list[str] | None = None
                  ) -> tuple[float, str, str]:
    """``(level, mode, source)`` for a noise spec; mode is "gaussian", "uniform" or "replace"; source says what
    set the level (:func:`noise_subjects`, or "fixed level").

    "sK" (K a float, default 3): K x :func:`embedding_std`; a number: that level; "uniform" / "replace":
    the s3 level with uniform noise / replacing the embeddings; "uK" uniform with level K.
    """
    if isinstance(noise, (int, float)) and not isinstance(noise, bool):
        return float(noise), "gaussian", "fixed level"
    spec = str(noise).strip().lower()

    def std():
        subs, source = noise_subjects(subjects, fallback)
        return embedding_std(model, subs), source

    try:
        if spec in ("uniform", "replace"):
            s, source = std()
            return 3.0 * s, spec, source
        if spec.startswith("s"):
            factor = float(spec[1:]) if len(spec) > 1 else 1.0
            s, source = std()
            return factor * s, "gaussian", source
        if spec.startswith("u"):
            return float(spec[1:]), "uniform", "fixed level"
        return float(spec), "gaussian", "fixed level"
    except ValueError:
        raise FfkvError(f"unknown noise {noise!r}",
                        "use s3 (3 x subject-embedding std), a number, uniform or replace") from None


def noise_level(model: MemoryModel, noise: str | float = "s3", subjects=None, fallback: list[str] | None = None
                ) -> tuple[float, str]:
    """``(level, mode)`` of :func:`noise_setting`."""
    return noise_setting(model, noise, subjects, fallback)[:2]


def draw_noise(level: float, mode: str, samples: int, n_tokens: int, d_model: int,
               seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Noise for the subject embeddings, (samples, n_tokens, d_model): ``level x RandomState(seed)`` draws in
    ROME's shape and order (``randn``, or ``uniform(-1, 1)``)."""
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
    clean: dict  # (site, layer) -> (T, d)
    noise: torch.Tensor
    level: float
    mode: str
    source: str


def _token_strings(model: MemoryModel, ids: torch.Tensor) -> list[str]:
    return [model.decode([int(i)]) for i in ids[0]]


def _check_args(model: MemoryModel, kinds, samples: int, window: int):
    for kind in kinds:
        if kind not in KINDS:
            raise FfkvError(f"unknown trace kind {kind!r}", f"use one of {', '.join(KINDS)}")
    if samples < 1:
        raise FfkvError(f"samples must be at least 1, got {samples}", "use --samples 10 (ROME's default)")
    if window < 1:
        raise FfkvError(f"window must be at least 1, got {window}", "use --window 10 (ROME's default)")


@torch.no_grad()
def _prepare(model, prompt, subject, kinds, answer, noise, samples, seed, subjects, cost) -> _Prepared:
    ids = model.encode(prompt)["input_ids"]
    s, e = model.find_subject(prompt, subject)
    sites = sorted({SITE_OF_KIND[k] for k in kinds})
    out = run(model, ids, reads=[(site, l) for site in sites for l in range(model.n_layers)], head="last", cost=cost)
    rec, probs = out.rec, torch.softmax(out.logits[0].float(), -1)
    if answer is None:
        # ROME traces the model's top prediction; a padded vocabulary's rows past the tokenizer are no text
        real = model.tokenizer_vocab_size or probs.numel()
        answer_id = int(probs[: min(real, probs.numel())].argmax())
    elif isinstance(answer, int):
        answer_id = answer
    else:
        answer_id = model.answer_id(answer)
    level, mode, source = noise_setting(model, noise, subjects, fallback=[subject])
    z = draw_noise(level, mode, samples, e - s, model.d_model, seed)
    clean = {(site, l): rec[site, l][0] for site in sites for l in range(model.n_layers)}
    return _Prepared(ids, _token_strings(model, ids), (s, e), answer_id, model.decode([answer_id]),
                     float(probs[answer_id]), clean, z, level, mode, source)


def _mean_prob(logits: torch.Tensor, answer_id: int, samples: int) -> torch.Tensor:
    """(n_cells * samples, vocab) logits -> (n_cells,) mean over each cell's samples of P(answer)."""
    p = torch.softmax(logits.float(), -1)[:, answer_id]
    return p.reshape(-1, samples).mean(1)


class Tracer:
    """The clean and corrupted runs of one prompt, shared by every kind, and the exact restored P of any cell.

    ``Tracer(model, prompt, subject, kinds, answer, noise, samples, window, seed, subjects, max_rows, cost)``;
    ``.prep`` (tokens, subject range, answer, p_clean, clean states, noise), ``.low`` (p_*), ``.crec`` (the
    corrupted run's residual streams), ``.scores(kind, cells)`` (exact restored P of chosen cells).
    """

    @torch.no_grad()
    def __init__(self, model, prompt, subject, kinds, answer, noise, samples, window, seed, subjects, max_rows,
                 cost):
        self.model, self.samples, self.window, self.max_rows, self.cost = model, samples, window, max_rows, cost
        self.seed = seed
        self.prep = _prepare(model, prompt, subject, kinds, answer, noise, samples, seed, subjects, cost)
        self.L, self.T = model.n_layers, self.prep.ids.shape[1]
        reads = [("resid_pre", l) for l in range(self.L)] + [("resid_post", l) for l in range(self.L)]
        ids_n = self.prep.ids.expand(samples, self.T)
        # only the last position is unembedded; the cache holds every position for the cells' partial runs
        out = run(model, ids_n, edits=[corruption(self.prep.noise, self.prep.subject_range, self.prep.mode)],
                  reads=reads, head="last", return_cache=True, cost=cost)
        self.crec, self.cache = out.rec, out.cache
        self.low = float(_mean_prob(out.logits, self.prep.answer_id, samples)[0])

    def groups(self, kind: str, cells=None) -> tuple[dict, dict]:
        """``(known, groups)``: the cells whose score needs no run ``{(t, l): p}``, and the rest as
        ``{(first layer, t): {restored layers: [(t, l), ...]}}`` (cells restoring the same states once)."""
        L, T, (s, _) = self.L, self.T, self.prep.subject_range
        cells = [(t, l) for t in range(T) for l in range(L)] if cells is None else cells
        known, groups = {}, {}
        for t, l in cells:
            layers = restored_layers(kind, l, L, self.window)
            if t < s:
                known[t, l] = self.low  # the clean and corrupted runs agree before the subject
            elif layers[0] == L - 1:
                # the last layer's output (or a window of it alone) reaches the prediction only at the last token
                known[t, l] = (self.prep.high_score if kind == "hidden" else None) if t == T - 1 else self.low
                if known[t, l] is None:
                    del known[t, l]
                    groups.setdefault((layers[0], t), {}).setdefault(layers, []).append((t, l))
            else:
                groups.setdefault((layers[0], t), {}).setdefault(layers, []).append((t, l))
        return known, groups

    def _layer(self, t: int, layer: int, state: torch.Tensor, edits: list[Intervention]) -> torch.Tensor:
        """One decoder layer at positions t .. of ``state`` (rows cell-major, row r on corrupted sample r mod
        samples), positions < t from the corrupted run's cache: the layer's output, same shape."""
        B, n = state.shape[:2]
        rows = torch.arange(B) % self.samples
        out = run(self.model, self.prep.ids[:, t:t + n].expand(B, n), head="none", start_layer=layer,
                  start_resid=state, stop_after=layer, reads=[("resid_post", layer)], edits=edits, cache=self.cache,
                  prefix_len=t, cache_rows=rows, copy_reads=False, cost=self.cost)
        return out.rec["resid_post", layer]

    def run_token(self, kind: str, t: int, cells: list[tuple[int, tuple]], progress=None) -> torch.Tensor:
        """The last layer's output at the last position, (len(cells) * samples, d_model), of the cells ``cells`` =
        [(first restored layer, restored layers)] at token ``t``; rows cell-major, (cell c, sample k) ->
        c * samples + k, each on corrupted sample k.

        Layer by layer: at layer j one run holds every cell that has started by j (so a layer's weights are read
        once per token, not once per cell), over positions t .. only. A hidden cell starts at layer first + 1 from
        the corrupted residual with position t restored; an mlp / attn cell first runs layer ``first`` at
        position t alone (the restore there changes no other position of that layer) and then starts at
        first + 1, its window's later layers restored at t (at the last token, t = T - 1, it starts at ``first``).
        No head runs here: :meth:`scores` unembeds every cell's rows at once.
        """
        S, T, L, site, clean, crec = self.samples, self.T, self.L, SITE_OF_KIND[kind], self.prep.clean, self.crec
        order = sorted(range(len(cells)), key=lambda c: cells[c][0])
        entry = {c: cells[c][0] + 1 if kind == "hidden" or t < T - 1 else cells[c][0] for c in order}
        members: list[int] = []
        state = None
        for j in range(min(entry.values()), L):
            new = [c for c in order if entry[c] == j]
            if new:
                if kind == "hidden":
                    part = crec["resid_post", j - 1][:, t:].repeat(len(new), 1, 1)
                    part[:, 0] = clean["resid_post", j - 1][t]
                elif t == T - 1:
                    part = crec["resid_pre", j][:, t:].repeat(len(new), 1, 1)
                else:
                    first = j - 1
                    step = self._layer(t, first, crec["resid_pre", first][:, t:t + 1].repeat(len(new), 1, 1),
                                       [Intervention(site, first, "set", value=clean[site, first][t], positions=[0])])
                    part = crec["resid_post", first][:, t:].repeat(len(new), 1, 1)
                    part[:, :1] = step
                members += new
                state = part if state is None else torch.cat([state, part])
            rows = [i * S + k for i, c in enumerate(members) if j in cells[c][1] and entry[c] <= j for k in range(S)]
            edits = [Intervention(site, j, "set", value=clean[site, j][t], positions=[0],
                                  batch=None if len(rows) == state.shape[0] else rows)] \
                if rows and kind != "hidden" else []
            state = self._chunked(t, j, state, edits)
            if progress is not None:
                progress.update(1)
        final = state[:, -1]
        back = torch.empty_like(final)
        for i, c in enumerate(members):
            back[c * S:(c + 1) * S] = final[i * S:(i + 1) * S]
        return back

    def _chunked(self, t, j, state, edits):
        """:meth:`_layer` in runs of at most ``max_rows`` rows (whole cells), the edits' rows split to match."""
        per = max(1, self.max_rows // self.samples) * self.samples
        if state.shape[0] <= per:
            return self._layer(t, j, state, edits)
        parts = []
        for lo in range(0, state.shape[0], per):
            hi = min(lo + per, state.shape[0])
            sub = []
            for e in edits:
                rows = list(range(state.shape[0])) if e.batch is None else e.batch
                mine = [r - lo for r in rows if lo <= r < hi]
                if mine:
                    sub.append(Intervention(e.site, e.layer, e.op, value=e.value, positions=e.positions, batch=mine))
            parts.append(self._layer(t, j, state[lo:hi], sub))
        return torch.cat(parts)

    @torch.no_grad()
    def scores(self, kind: str, cells=None, progress=None) -> dict[tuple[int, int], float]:
        """Exact restored P(answer) of ``cells`` [(t, l)] (default: every cell)."""
        known, groups = self.groups(kind, cells)
        out = dict(known)
        by_t: dict[int, list] = {}
        for (first, t), by_window in sorted(groups.items()):
            by_t.setdefault(t, []).extend((first, w, by_window[w]) for w in by_window)
        owners, finals = [], []
        for t, cs in sorted(by_t.items()):
            finals.append(self.run_token(kind, t, [(f, w) for f, w, _ in cs], progress))
            owners += [owned for _, _, owned in cs]
        if finals:
            h = torch.cat(finals)
            probs = torch.cat([_mean_prob(self.model.unembed(h[i:i + 4096]), self.prep.answer_id, self.samples)
                               for i in range(0, h.shape[0], 4096)])
            for cells_of, p in zip(owners, probs.tolist()):
                for cell in cells_of:
                    out[cell] = p
        return out

    def n_steps(self, kind: str) -> int:
        """The layer runs :meth:`scores` makes (the progress bar's total)."""
        groups = self.groups(kind)[1]
        starts: dict[int, int] = {}
        for first, t in groups:
            starts[t] = min(starts.get(t, self.L), first + 1 if kind == "hidden" or t < self.T - 1 else first)
        return sum(self.L - j for j in starts.values())

    def result(self, kind: str, scores: dict, prompt: str, subject: str, noise) -> TraceResult:
        p = self.prep
        grid = np.full((self.T, self.L), self.low, dtype=np.float64)
        for (t, l), v in scores.items():
            grid[t, l] = v
        return TraceResult(prompt, subject, p.tokens, p.subject_range, p.answer, p.answer_id, p.high_score,
                           self.low, grid, kind, self.window, noise, p.level, self.samples, self.seed, self.cost.as_dict(),
                           p.source)


@torch.no_grad()
def causal_traces(model: MemoryModel, prompt: str, subject: str, kinds=KINDS, answer=None,
                  noise: str | float = "s3", samples: int = 10, window: int = 10, seed: int = DEFAULT_SEED,
                  subjects=None, max_rows: int = 400, cost: Cost | None = None,
                  progress: bool = False) -> dict[str, TraceResult]:
    """Causal traces of several kinds of one prompt, sharing one clean and one corrupted run:
    ``{kind: TraceResult}`` (each as :func:`causal_trace` computes it; ``cost`` is the shared total).

    answer: None (the model's top prediction, as ROME), a string (its first token) or a token id.
    noise, seed, subjects: ROME's s3 level and ``RandomState(1)`` draws by default (module docstring; subjects
    a list, a file, or "vocabulary"). max_rows: the most batch rows in one forward pass. progress: a bar
    (:mod:`ffkv.progress`) over the cell groups, with total and ETA.
    """
    kinds = [kinds] if isinstance(kinds, str) else [k or "hidden" for k in kinds]  # ROME's kind=None = hidden
    _check_args(model, kinds, samples, window)
    cost = cost if cost is not None else Cost()
    tr = Tracer(model, prompt, subject, kinds, answer, noise, samples, window, seed, subjects, max_rows, cost)
    out = {}
    with bar(total=sum(tr.n_steps(k) for k in kinds), desc=f"trace {'/'.join(kinds)}", unit="layer",
             enabled=progress) as b:
        for kind in kinds:
            out[kind] = tr.result(kind, tr.scores(kind, progress=b), prompt, subject, noise)
    for r in out.values():
        r.cost = cost.as_dict()
    return out


def causal_trace(model: MemoryModel, prompt: str, subject: str, kind: str = "hidden", answer=None,
                 noise: str | float = "s3", samples: int = 10, window: int = 10, seed: int = DEFAULT_SEED,
                 subjects=None, max_rows: int = 400, cost: Cost | None = None,
                 progress: bool = False) -> TraceResult:
    """Causal trace of one prompt: restored P(answer) for every (token, layer), as ROME defines it, with ROME's
    defaults (s3 noise over known_1000's subjects, ``RandomState(1)``, 10 samples, window 10).

    answer: None (the model's top prediction, as ROME), a string (its first token) or a token id.
    subjects: the data set whose subjects set the s3 level (:func:`noise_subjects`). max_rows: the most batch
    rows in one forward pass. Returns a :class:`TraceResult`.
    """
    kind = kind or "hidden"
    return causal_traces(model, prompt, subject, [kind], answer, noise, samples, window, seed, subjects, max_rows,
                         cost, progress)[kind]


@torch.no_grad()
def exact_cells(model: MemoryModel, prompt: str, subject: str, cells: dict[str, list[tuple[int, int]]],
                answer=None, noise: str | float = "s3", samples: int = 10, window: int = 10,
                seed: int = DEFAULT_SEED, subjects=None, max_rows: int = 400, cost: Cost | None = None
                ) -> tuple[dict[str, dict[tuple[int, int], float]], float, float]:
    """The exact restored P(answer) of chosen cells only, ``{kind: [(t, l), ...]}``, as :func:`causal_trace`
    computes them (one clean and one corrupted run, then only those cells' runs): ``({kind: {(t, l): p}},
    p_clean, p_*)``. The approximate trace verifies its top cells with it."""
    kinds = list(cells)
    _check_args(model, kinds, samples, window)
    cost = cost if cost is not None else Cost()
    tr = Tracer(model, prompt, subject, kinds or ["hidden"], answer, noise, samples, window, seed, subjects,
                 max_rows, cost)
    return {k: tr.scores(k, list(c)) for k, c in cells.items()}, tr.prep.high_score, tr.low


# ----------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def causal_trace_reference(model: MemoryModel, prompt: str, subject: str, kind: str = "hidden", answer=None,
                           noise: str | float = "s3", samples: int = 10, window: int = 10, seed: int = DEFAULT_SEED,
                           subjects=None, cost: Cost | None = None) -> TraceResult:
    """ROME's ``calculate_hidden_flow``, written directly: one forward pass of ``1 + samples`` rows per cell.

    Row 0 is clean; rows 1.. carry the (same) noise; the restored states are copied from row 0 in the same
    pass (ROME's ``trace_with_patch``). Slow by design: the baseline that :func:`causal_trace` must equal.
    """
    kind = kind or "hidden"
    _check_args(model, [kind], samples, window)
    cost = cost if cost is not None else Cost()
    prep = _prepare(model, prompt, subject, [kind], answer, noise, samples, seed, subjects, Cost())
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
                       prep.high_score, low, scores, kind, window, noise, prep.level, samples, seed, cost.as_dict(),
                       prep.source)


@torch.no_grad()
def restore_states(model: MemoryModel, prompt: str, subject: str, states: list[tuple[int, int]],
                   kind: str = "hidden", answer=None, noise: str | float = "s3", samples: int = 10,
                   seed: int = DEFAULT_SEED, subjects=None) -> float:
    """P(answer) of the corrupted prompt with the clean value of every state in ``states`` = [(token, layer)]
    restored at once (ROME's ``trace_with_patch`` with several states). Restoring all tokens of one layer's
    hidden state gives back the clean probability."""
    _check_args(model, [kind], samples, 1)
    prep = _prepare(model, prompt, subject, [kind], answer, noise, samples, seed, subjects, Cost())
    T = prep.ids.shape[1]
    edits = [corruption(prep.noise, prep.subject_range, prep.mode, rows=list(range(1, samples + 1)))]
    for t, l in states:
        edits.append(Intervention(SITE_OF_KIND[kind], model.check_layer(l), "fn", positions=[t],
                                  value=lambda h: h[:1].expand_as(h)))
    logits = run(model, prep.ids.expand(samples + 1, T), edits=edits).logits
    return torch.softmax(logits[1:, -1].float(), -1)[:, prep.answer_id].mean().item()


# ----------------------------------------------------------------------------------------------- cost bound
def work_bound(n_tokens: int, n_layers: int, subject_start: int, kinds=("hidden",), samples: int = 10,
               window: int = 10) -> dict:
    """Layer-token units (rows x positions x layers) of ROME's loop and of the bound an exact method has.

    ROME: per kind, ``T L + 2`` passes (prediction, corrupted, one per cell) of ``samples + 1`` rows over every
    token and layer. Bound: one clean (1 row) and one corrupted (``samples`` rows) run shared by the kinds, and
    for each cell (t >= s, l) only positions ``t ..`` of the layers above its first restored layer ``l0`` (hidden:
    l0 = l; mlp / attn: the window's first layer), for the noised rows: ``samples (T - t) (L - 1 - l0)``; cells
    before the subject change nothing. Returns ``{"rome", "bound", "ratio"}`` (ratio = rome / bound).
    """
    T, L, S = n_tokens, n_layers, samples
    rome = len(kinds) * (T * L + 2) * (S + 1) * T * L
    bound = (1 + S) * T * L
    for kind in kinds:
        for l in range(L):
            l0 = restored_layers(kind, l, L, window)[0]
            bound += sum(S * (T - t) * (L - 1 - l0) for t in range(subject_start, T))
    return {"rome": rome, "bound": bound, "ratio": rome / bound}
