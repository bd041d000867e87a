"""Evaluate edits: ROME's CounterFact metrics, EasyEdit's accuracies, and a sequential stress test.

    from ffkv.evaluate import load_cases, evaluate_edits, sequential_edits
    cases, info = load_cases("counterfact.json", limit=50)      # ROME, EasyEdit or zsRE layout
    res = evaluate_edits(model, cases, method="rome")             # edit, measure, undo, per case
    res.summary["rome"]["post"]["ES"]                              # {"mean", "ci95", "n"} in percent

Heavy imports happen on first use.
"""

from .._lazy import lazy_getattr

_LAZY = {
    "EvalCase": "ffkv.evaluate.datasets",
    "load_cases": "ffkv.evaluate.datasets",
    "read_cases": "ffkv.evaluate.datasets",
    "detect_layout": "ffkv.evaluate.datasets",
    "score_continuations": "ffkv.evaluate.metrics",
    "measure_cases": "ffkv.evaluate.metrics",
    "ngram_entropy": "ffkv.evaluate.metrics",
    "summarize": "ffkv.evaluate.metrics",
    "evaluate_edits": "ffkv.evaluate.run",
    "make_editor": "ffkv.evaluate.run",
    "EvalResult": "ffkv.evaluate.run",
    "sequential_edits": "ffkv.evaluate.sequential",
    "SequentialResult": "ffkv.evaluate.sequential",
    "probe_pairs": "ffkv.evaluate.sequential",
    "detect_collapse": "ffkv.evaluate.sequential",
    "plot_curves": "ffkv.evaluate.sequential",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(_LAZY, __name__)
