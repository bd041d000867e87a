"""The key-value atlas (Geva et al. 2021, 2022): what triggers each FFN memory and what its value promotes.

    from ffkv.memory import mine, Atlas, analyze, write_report, sub_updates
    mine(model, "corpus/", "atlas/", top_k=25)          # one streaming, resumable pass
    atlas = Atlas("atlas/", model=model)
    analyze(atlas)                                       # values, patterns, composition, refinement
    write_report(atlas)                                  # atlas/report.html
    atlas.memory_triggers(3, 17)                         # what triggers memory L3.17
"""

from .._lazy import lazy_getattr

_LAZY = {
    "mine": "ffkv.memory.miner", "brute_force_triggers": "ffkv.memory.oracle", "merge_topk": "ffkv.memory.topk",
    "TriggerBuffers": "ffkv.memory.topk", "merge_atlases": "ffkv.memory.merge", "open_corpus": "ffkv.memory.corpus",
    "CorpusSpec": "ffkv.memory.corpus", "iter_units": "ffkv.memory.corpus",
    "Atlas": "ffkv.memory.atlas", "parse_memory": "ffkv.memory.atlas",
    "analyze": "ffkv.memory.analysis",
    "project_values": "ffkv.memory.values", "value_logits": "ffkv.memory.values", "agreement": "ffkv.memory.values",
    "promotes": "ffkv.memory.values", "nearest_values": "ffkv.memory.values", "token_id": "ffkv.memory.values",
    "pattern_summary": "ffkv.memory.patterns", "removal_effects": "ffkv.memory.patterns",
    "key_pattern": "ffkv.memory.patterns",
    "composition_and_refinement": "ffkv.memory.composition", "sample_units": "ffkv.memory.composition",
    "sub_updates": "ffkv.memory.subupdates", "switch_effect": "ffkv.memory.subupdates",
    "generate_with_memories": "ffkv.memory.subupdates",
    "describe_memory": "ffkv.memory.queries",
    "write_report": "ffkv.memory.report",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(_LAZY, __name__)
