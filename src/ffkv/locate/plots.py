"""Figures of locators (any :class:`~ffkv.locate.result.LocateResult`: ROME's heatmaps, attribution by layer),
averaged traces and ablation curves, as PNG or SVG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_path
from .result import LocateResult, from_trace
from .trace import TraceResult

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds", "coef": "Blues"}
XLABELS = {"hidden": "single restored layer", "mlp": "center of {w} restored MLP layers",
           "attn": "center of {w} restored attention layers", "coef": "layer (memories' summed attribution)"}


def _plt():
    import matplotlib  # a heavy import, made only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    _plt().close(fig)
    return path


def locate_title(result: LocateResult) -> str:
    """``'PROMPT' -> 'ANSWER'`` with the clean and corrupted probabilities where the method has them."""
    parts = [f"{result.prompt!r} -> {result.answer.strip()!r}"]
    if result.clean is not None:
        parts.append(f"clean p={result.clean:.3f}")
    if result.corrupted is not None:
        parts.append(f"corrupted p={result.corrupted:.3f}")
    return ", ".join(parts)


def plot_locate(result: LocateResult, path: str | Path) -> Path:
    """One heatmap per site: tokens (subject tokens starred) x layers, colour = score (NaN cells blank).

    The title states the prompt, the answer and the clean and corrupted probabilities where they exist; a
    trace's colour scale starts at the corrupted probability (ROME's figures).
    """
    plt = _plt()
    labels = list(result.tokens)
    if result.subject_range:
        for i in range(*result.subject_range):
            labels[i] = labels[i] + "*"
    S, T, L = result.scores.shape
    fig, axes = plt.subplots(1, S, figsize=(S * max(3.5, 1.5 + 0.35 * L), 1.2 + 0.3 * T), dpi=150, squeeze=False)
    window = result.options.get("window", 1)
    for ax, site, scores in zip(axes[0], result.sites, result.scores):
        h = ax.pcolor(np.ma.masked_invalid(scores), cmap=CMAPS.get(site, "Purples"), vmin=result.corrupted)
        ax.invert_yaxis()
        ax.set_yticks([0.5 + i for i in range(T)])
        ax.set_yticklabels(labels)
        ax.set_xticks([0.5 + i for i in range(L)])
        ax.set_xticklabels(range(L))
        ax.set_xlabel(XLABELS.get(site, "layer").format(w=window))
        cb = fig.colorbar(h, ax=ax)
        cb.ax.set_title(result.score, y=-0.08, fontsize=7, va="top")
    fig.suptitle(f"{result.method}: {locate_title(result)}", fontsize=8)
    return _save(fig, path)


def plot_trace(result: TraceResult | LocateResult, path: str | Path) -> Path:
    """ROME's heatmap of one causal trace: :func:`plot_locate` of the trace."""
    return plot_locate(from_trace(result) if isinstance(result, TraceResult) else result, path)


def plot_average(avg: dict, path: str | Path) -> Path:
    """Averaged indirect effect per token group over layers (ROME Fig. 2 style), one panel per kind.

    avg: ``{kind: {"groups": [...], "indirect": (groups, layers) list, "n": int}}``.
    """
    plt = _plt()
    kinds = list(avg)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3), dpi=150, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        ie = np.asarray(avg[kind]["indirect"])
        for g, row in zip(avg[kind]["groups"], ie):
            ax.plot(range(len(row)), row, label=g)
        n = avg[kind]["n"]
        n = max(n.values(), default=0) if isinstance(n, dict) else n
        ax.set_title(f"{kind}: average indirect effect (n={n})", fontsize=8)
        ax.set_xlabel("layer")
        ax.set_ylabel("AIE on p(answer)")
    axes[0][-1].legend(fontsize=6)
    return _save(fig, path)


def plot_ablation(curve: list[dict], path: str | Path, random_curve: list[dict] | None = None) -> Path:
    """P(answer) as the top-k memories are suppressed, k = 0..N (and a random-memory control)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3), dpi=150)
    ax.plot([c["k"] for c in curve], [c["prob"] for c in curve], marker="o", label="knowledge neurons")
    if random_curve:
        ax.plot([c["k"] for c in random_curve], [c["prob"] for c in random_curve], marker=".", label="random")
    ax.set_xlabel("memories suppressed (top k)")
    ax.set_ylabel("p(answer)")
    ax.legend(fontsize=7)
    return _save(fig, path)
