"""Figures of causal traces (ROME's heatmaps and averaged curves) and ablation curves, as PNG or SVG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {"hidden": "single restored layer", "mlp": "center of {w} restored MLP layers",
          "attn": "center of {w} restored attention layers"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    from ..io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    _plt().close(fig)
    return path


def plot_trace(result, path: str | Path) -> Path:
    """ROME's heatmap of one trace: tokens (subject tokens starred) x layers, colour = restored P(answer)."""
    plt = _plt()
    scores = np.asarray(result.scores)
    labels = list(result.tokens)
    for i in range(*result.subject_range):
        labels[i] = labels[i] + "*"
    fig, ax = plt.subplots(figsize=(max(3.5, 1.5 + 0.35 * scores.shape[1]), 1.0 + 0.3 * len(labels)), dpi=150)
    h = ax.pcolor(scores, cmap=CMAPS.get(result.kind, "Purples"), vmin=result.low_score)
    ax.invert_yaxis()
    ax.set_yticks([0.5 + i for i in range(len(labels))])
    ax.set_yticklabels(labels)
    ax.set_xticks([0.5 + i for i in range(scores.shape[1])])
    ax.set_xticklabels(range(scores.shape[1]))
    ax.set_xlabel(TITLES.get(result.kind, "").format(w=result.window))
    ax.set_title(f"restoring {result.kind} after corrupted subject", fontsize=9)
    cb = fig.colorbar(h)
    cb.ax.set_title(f"p({result.answer.strip()})", y=-0.08, fontsize=8, va="top")
    return _save(fig, path)


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
