"""A reliability verdict per query: trust the model's recall, or retrieve the fact instead.

The score is a logistic regression on the query's signals, all read for the model's own greedy answer
(a user asking a question does not know the true answer):

    score = σ(w · (x - μ) / s + b),   verdict = "recall" if score >= threshold else "retrieve"

with x = (log p, margin, entropy, storage strength, survival, log k_50, top-memory share, self-consistency,
subject familiarity). Subject familiarity (the mean log-probability of the subject's own tokens) needs the
subject; the others need only the prompt. The
weights, the standardization (μ, s) and the threshold are fitted on one split of the default testbed's facts
(training-template prompts) by ``bench/bench_recall.py`` and shipped in ``verdict_default.json`` with their
provenance, so ``ffkv recall`` gives a verdict without refitting.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import FfkvError
from ..io import read_json, write_json
from ..models.model import MemoryModel
from .consistency import self_consistency
from .stats import best_threshold, fit_logistic, sigmoid, standardize
from .strength import DEFAULT_KS, StorageStrength, storage_strength

FEATURES = ("log_p", "margin", "entropy", "strength", "survival", "log_redundancy", "attribution_share",
            "consistency", "subject_familiarity")
DEFAULT_WEIGHTS = Path(__file__).with_name("verdict_default.json")


@torch.no_grad()
def subject_familiarity(model: MemoryModel, prompt: str, subject: str) -> float:
    """How well the model predicts the subject's own tokens: ``(1/(e-s-1)) Σ_{t=s+1}^{e-1} log p(x_t | x_<t)``.

    A name seen often in training is predictable after its first token; one never seen is not. The
    subject's first token is not scored (nothing before it names the subject). 0.0 for one-token subjects.
    """
    s, e = model.find_subject(prompt, subject)
    if e - s < 2:
        return 0.0
    batch = model.encode(prompt)
    logp = torch.log_softmax(model.hf(**batch).logits[0].float(), -1)
    ids = batch["input_ids"][0]
    return float(torch.stack([logp[t - 1, ids[t]] for t in range(s + 1, e)]).mean())


def query_signals(model: MemoryModel, prompt: str, subject: str | None = None, n_samples: int = 20,
                  temperature: float = 1.0, seed: int = 0, ks=DEFAULT_KS, trace: bool = False,
                  adaptive: bool = True, known: StorageStrength | None = None) -> dict:
    """Every signal of one query, for the model's greedy answer: the verdict's features and the details.

    known: a storage strength already computed for this prompt (reused if it is for the greedy answer).
    Returns ``{"features": {name: value}, "strength": StorageStrength, "consistency": SelfConsistency}``.
    """
    logits = model.next_token_logits(prompt)[0].float()
    logp = torch.log_softmax(logits, -1)
    greedy = int(logits.argmax())
    if known is not None and known.prompt == prompt and known.answer_id == greedy and (known.trace or not trace):
        st = known
    else:
        st = storage_strength(model, prompt, greedy, subject=subject, ks=ks, trace=trace, adaptive=adaptive)
    sc = self_consistency(model, prompt, n=n_samples, temperature=temperature, seed=seed, logits=logits)
    feats = {
        "log_p": float(logp[greedy]),
        "margin": st.margin,
        "entropy": float(-(logp.exp() * logp).sum()),
        "strength": st.strength,
        "survival": st.survival,
        "log_redundancy": math.log(st.redundancy),
        "attribution_share": st.attribution_share,
        "consistency": sc.agreement,
    }
    if subject is not None:
        feats["subject_familiarity"] = subject_familiarity(model, prompt, subject)
    return {"features": feats, "strength": st, "consistency": sc}


@dataclass
class VerdictModel:
    """A fitted logistic verdict: feature names, standardization, weights, bias, threshold, provenance."""

    features: list[str]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    threshold: float
    provenance: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    signal_settings: dict = field(default_factory=lambda: {"n_samples": 20, "temperature": 1.0, "adaptive": True})

    def score(self, X) -> np.ndarray:
        """P(recall is correct) for feature rows X (n, d) in ``self.features`` order."""
        Z, _, _ = standardize(np.atleast_2d(np.asarray(X, float)), self.mean, self.std)
        return sigmoid(Z @ np.asarray(self.weights) + self.bias)

    def score_features(self, feats: dict, impute: bool = False) -> float:
        """The score of one query's features; with ``impute`` a missing feature takes its fitted mean (its
        standardized value 0, so it moves the score neither way) instead of being refused."""
        missing = [f for f in self.features if f not in feats]
        if missing and not impute:
            raise FfkvError(f"the verdict needs signals {missing}",
                            "pass the subject (--subject) so that subject_familiarity can be read")
        mean = dict(zip(self.features, self.mean))
        return float(self.score([[feats.get(f, mean[f]) for f in self.features]])[0])

    def verdict(self, score: float) -> str:
        return "recall" if score >= self.threshold else "retrieve"

    def save(self, path: str | Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path = DEFAULT_WEIGHTS) -> "VerdictModel":
        if not Path(path).exists():
            raise FfkvError(f"verdict weights not found at {path}",
                            "pass --weights FILE, or fit them with `python bench/bench_recall.py --fit-weights`")
        d = read_json(path)
        try:
            return cls(**d)
        except TypeError as e:
            raise FfkvError(f"{path} is not a verdict weights file ({e})",
                            "refit it with bench/bench_recall.py") from None


def fit_verdict(X, y, features=FEATURES, l2: float = 1e-2, provenance: dict | None = None,
                signal_settings: dict | None = None) -> VerdictModel:
    """Fit the logistic verdict on (X (n, d), y (n,) = recall correct) and choose the accuracy-best threshold."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    if len(np.unique(y)) < 2:
        raise FfkvError("the verdict needs both correct and wrong recalls to fit", "use more or rarer facts")
    Z, mean, std = standardize(X)
    w, b = fit_logistic(Z, y, l2=l2)
    vm = VerdictModel(list(features), mean.tolist(), std.tolist(), w.tolist(), b, 0.5, provenance or {})
    if signal_settings:
        vm.signal_settings = dict(signal_settings)
    t, acc = best_threshold(vm.score(X), y)
    vm.threshold = float(t)
    vm.fit = {"n": int(len(y)), "positives": int(y.sum()), "accuracy_at_threshold": acc, "l2": l2}
    return vm


def judge(model: MemoryModel, prompt: str, subject: str | None = None, answer: str | None = None,
          n_samples: int | None = None, temperature: float | None = None, seed: int = 0,
          weights: str | Path | None = None, trace: bool = False, impute_missing: bool = False) -> dict:
    """The per-query report: signals, score and verdict (and, given ``answer``, how the model treats it).

    The verdict reads the greedy answer's signals, computed with the settings the weights were fitted
    with (samples, temperature, adaptive ranking) unless overridden; with ``answer`` the report adds that
    answer's probability, rank, margin and storage strength, and whether greedy matches it.
    ``impute_missing``: score a query without its subject by giving subject familiarity its fitted mean
    (listed under ``imputed``); otherwise a missing subject is refused.
    """
    if subject is not None:
        model.find_subject(prompt, subject)
    vm = VerdictModel.load(weights or DEFAULT_WEIGHTS)
    cfg = vm.signal_settings
    n_samples = int(cfg.get("n_samples", 20) if n_samples is None else n_samples)
    temperature = float(cfg.get("temperature", 1.0) if temperature is None else temperature)
    adaptive = bool(cfg.get("adaptive", True))
    sig = query_signals(model, prompt, subject, n_samples, temperature, seed, trace=trace, adaptive=adaptive)
    score = vm.score_features(sig["features"], impute=impute_missing)
    st, sc = sig["strength"], sig["consistency"]
    out = {
        "prompt": prompt, "subject": subject, "greedy_answer": st.answer,
        "signals": sig["features"],
        "storage": st.to_json(),
        "self_consistency": sc.to_json(),
        "score": score, "threshold": vm.threshold, "verdict": vm.verdict(score),
        "verdict_weights": str(weights or DEFAULT_WEIGHTS),
        "imputed": [f for f in vm.features if f not in sig["features"]],
    }
    if answer is not None:
        ans = storage_strength(model, prompt, answer, subject=subject, trace=False, adaptive=adaptive)
        sc_a = self_consistency(model, prompt, n=n_samples, temperature=temperature, seed=seed, answer=answer)
        out["answer"] = {"text": answer, "token": ans.answer, "p": ans.p_answer, "rank": ans.rank,
                         "margin": ans.margin, "strength": ans.strength, "survival": ans.survival,
                         "redundancy": ans.redundancy,
                         "sample_agreement": sc_a.answer_agreement,
                         "greedy_matches_answer": ans.answer_id == st.answer_id}
    return out
