"""Small statistics in numpy: rank correlation, AUROC, calibration, bootstrap intervals, logistic regression.

No scipy or sklearn (the project's dependencies are fixed). Every function takes plain arrays.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import FfkvError


def ranks(x) -> np.ndarray:
    """Ranks 1..n of ``x`` with ties given their average rank (as in Spearman and Mann-Whitney). (n,)"""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=float)
    r[order] = np.arange(1, len(x) + 1)
    # Average the ranks of tied values.
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return (sums / counts)[inverse]


def spearman(x, y) -> float:
    """Spearman's rank correlation ``ρ = corr(rank(x), rank(y))`` (Pearson on average ranks)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) != len(y) or len(x) < 3:
        raise FfkvError(f"spearman needs two arrays of the same length >= 3 (got {len(x)}, {len(y)})",
                        "pass more facts")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def auroc(scores, labels) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic.

    ``AUROC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``, R_pos the sum of the positives' ranks among
    all scores (ties averaged): the probability that a random positive scores above a random negative.
    """
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_ci(stat: Callable[..., float], *arrays, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the statistic and its percentile bootstrap interval (resampling rows)."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    est = stat(*arrays)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = stat(*(a[idx] for a in arrays))
        if np.isfinite(v):
            boots.append(v)
    if not boots:
        return float(est), float("nan"), float("nan")
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(est), float(lo), float(hi)


def expected_calibration_error(confidence, correct, n_bins: int = 10) -> float:
    """``ECE = Σ_b (n_b / n) |acc_b - conf_b|`` over equal-width confidence bins."""
    c, y = np.asarray(confidence, float), np.asarray(correct, float)
    bins = np.clip((c * n_bins).astype(int), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - c[m].mean())
    return float(ece)


# ------------------------------------------------------------------------------------------ logistic regression


def standardize(X, mean=None, std=None):
    """``(X - mean) / std`` column-wise; returns ``(Z, mean, std)``. X: (n, d)"""
    X = np.asarray(X, float)
    mean = X.mean(0) if mean is None else np.asarray(mean, float)
    std = X.std(0) if std is None else np.asarray(std, float)
    std = np.where(std > 0, std, 1.0)
    return (X - mean) / std, mean, std


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def fit_logistic(X, y, l2: float = 1e-2, iters: int = 50) -> tuple[np.ndarray, float]:
    """Weights ``w`` (d,) and bias ``b`` of ``p(y=1|x) = σ(w·x + b)`` by Newton's method.

    Minimizes ``-Σ [y log p + (1-y) log(1-p)] / n + (l2 / 2) |w|²`` (the bias is not penalized).
    X: (n, d), standardized; y: (n,) in {0, 1}.
    """
    X, y = np.asarray(X, float), np.asarray(y, float)
    n, d = X.shape
    A = np.hstack([X, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = sigmoid(A @ theta)
        grad = A.T @ (p - y) / n + reg * theta
        H = (A * (p * (1 - p))[:, None]).T @ A / n + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(H, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return theta[:-1], float(theta[-1])


def best_threshold(scores, labels) -> tuple[float, float]:
    """The threshold t maximizing accuracy of ``score >= t`` -> positive; returns ``(t, accuracy)``."""
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    cands = np.unique(np.concatenate([s, [np.inf]]))
    best = (float(cands[0]), -1.0)
    for t in cands:
        acc = float(((s >= t) == y).mean())
        if acc > best[1]:
            best = (float(t), acc)
    return best
