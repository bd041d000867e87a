"""The testbed: a world of known facts and small language models trained on it on a CPU.

    from ffkv import testbed
    world = testbed.generate_world(seed=0, preset="default")   # facts, paraphrases, frequencies
    world.write_datasets("out/data")                            # facts.jsonl, counterfact.json, known_facts.json
    testbed.build("tiny", "out/tiny")                           # + a trained model in out/tiny/model
    path = testbed.default_testbed()                            # the shipped default (GPT-2, 6 x 128)
    facts, candidates = testbed.load_facts(path)
    report = testbed.recall_report(ffkv.load_model(path / "model"), facts, candidates)
    testbed.bucket_of(12)                                       # "8-15": the one frequency-bucket rule

Heavy imports happen on first use.
"""

from .._lazy import lazy_getattr

_LAZY = {
    "World": "ffkv.testbed.world",
    "Fact": "ffkv.testbed.world",
    "RELATIONS": "ffkv.testbed.world",
    "generate_world": "ffkv.testbed.world",
    "write_datasets": "ffkv.testbed.datasets",
    "load_facts": "ffkv.testbed.datasets",
    "counterfact_cases": "ffkv.testbed.datasets",
    "known_facts": "ffkv.testbed.datasets",
    "train_tokenizer": "ffkv.testbed.tokenizer",
    "train_model": "ffkv.testbed.train",
    "TRAIN_PRESETS": "ffkv.testbed.train",
    "BUCKETS": "ffkv.testbed.buckets",
    "BUCKET_NAMES": "ffkv.testbed.buckets",
    "bucket_of": "ffkv.testbed.buckets",
    "group_by_bucket": "ffkv.testbed.buckets",
    "stratified_facts": "ffkv.testbed.buckets",
    "recall_report": "ffkv.testbed.report",
    "format_table": "ffkv.testbed.report",
    "build": "ffkv.testbed.build",
    "testbed_report": "ffkv.testbed.build",
    "default_testbed": "ffkv.testbed.build",
    "pararel_world": "ffkv.testbed.pararel",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(_LAZY, __name__)
