"""Judge recall: how strongly a fact is stored, when to trust the model's recall, and when to retrieve.

    from ffkv.recall import storage_strength, self_consistency, judge
    s = storage_strength(model, "Ana Boll was born in", "Paris", subject="Ana Boll")
    s.strength, s.redundancy, s.margin          # area under the ablation curve, k_50, logit margin
    c = self_consistency(model, "Ana Boll was born in", n=20, temperature=1.0)
    judge(model, "Ana Boll was born in", subject="Ana Boll")["verdict"]   # "recall" or "retrieve"

Heavy imports happen on first use.
"""

from .._lazy import lazy_getattr

_LAZY = {
    "storage_strength": "ffkv.recall.strength",
    "StorageStrength": "ffkv.recall.strength",
    "memory_attribution": "ffkv.recall.strength",
    "ablation_curve": "ffkv.locate.interventions",
    "adaptive_ablation": "ffkv.recall.strength",
    "trace_concentration": "ffkv.recall.strength",
    "self_consistency": "ffkv.recall.consistency",
    "SelfConsistency": "ffkv.recall.consistency",
    "temperature_table": "ffkv.recall.consistency",
    "query_signals": "ffkv.recall.verdict",
    "judge": "ffkv.recall.verdict",
    "fit_verdict": "ffkv.recall.verdict",
    "VerdictModel": "ffkv.recall.verdict",
    "in_context_table": "ffkv.recall.incontext",
    "unseen_facts": "ffkv.recall.data",
    "stratified_facts": "ffkv.testbed.buckets",
    "bucket_of": "ffkv.testbed.buckets",
    "auroc": "ffkv.recall.stats",
    "spearman": "ffkv.recall.stats",
    "bootstrap_ci": "ffkv.recall.stats",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(_LAZY, __name__)
