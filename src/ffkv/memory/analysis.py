"""Run every measurement of the atlas on a mined folder and store it (``values.parquet``, ``analysis/*.json``)."""

from __future__ import annotations

import time

from ..io import provenance, write_json, write_parquet
from .atlas import Atlas
from .composition import composition_and_refinement, sample_units
from .corpus import CorpusSpec
from .patterns import pattern_summary, removal_effects
from .values import analyze_values, values_arrow

STEPS = ("values", "patterns", "removal", "composition")


def corpus_spec_of(atlas: Atlas, corpus: str | None = None) -> CorpusSpec:
    h = atlas.meta["hyperparameters"]
    return CorpusSpec(corpus or h["corpus"], split=h["split"], window=h["window"], min_tokens=h["min_tokens"],
                      text_field=h["text_field"], max_units=h.get("max_units"), docs=h.get("docs", "paragraph"))


def analyze(atlas: Atlas, norm: bool = False, steps=STEPS, pattern_threshold: float = 0.5,
            topic_share: float = 0.3, removal_keys: int = 64, composition_units: int = 200,
            active_threshold: float | None = None, sample_corpus: str | None = None, seed: int = 0,
            progress: bool = False) -> dict:
    """Compute the chosen analyses and write them into the atlas folder; returns {step: result}.

    composition and refinement run on ``composition_units`` units sampled from the mined corpus (or from
    ``sample_corpus``), every position of each being one prefix.
    """
    model = atlas.model
    ident = atlas.meta["model"]
    results = {}
    timing = {}
    # the values step's argmax / argmin of every value are composition's memory tokens: project once
    value_tokens = {} if "values" in steps and "composition" in steps else None
    if "values" in steps:
        t = time.perf_counter()
        cols, summary = analyze_values(atlas, norm=norm, seed=seed, progress=progress, value_tokens=value_tokens)
        prov = provenance(ident, norm=norm, seed=seed)
        write_parquet(atlas.path / "values.parquet", values_arrow(cols), meta=prov)
        write_json(atlas.path / "analysis" / "values.json", {**prov, **summary})
        atlas._tables.pop("values", None)
        results["values"] = summary
        timing["values"] = time.perf_counter() - t
    if "patterns" in steps:
        t = time.perf_counter()
        res = pattern_summary(atlas, threshold=pattern_threshold, topic_share=topic_share, progress=progress)
        write_json(atlas.path / "analysis" / "patterns.json",
                   {**provenance(ident, threshold=pattern_threshold, topic_share=topic_share), **res})
        results["patterns"] = res
        timing["patterns"] = time.perf_counter() - t
    if "removal" in steps:
        t = time.perf_counter()
        res = removal_effects(atlas, keys_per_layer=removal_keys, seed=seed, progress=progress)
        write_json(atlas.path / "analysis" / "removal.json", {**provenance(ident, keys=removal_keys, seed=seed), **res})
        results["removal"] = res
        timing["removal"] = time.perf_counter() - t
    if "composition" in steps:
        t = time.perf_counter()
        units = sample_units(model, corpus_spec_of(atlas, sample_corpus), n_units=composition_units, seed=seed)
        res = composition_and_refinement(model, units, norm=norm, active_threshold=active_threshold,
                                         progress=progress, value_tokens=value_tokens)
        write_json(atlas.path / "analysis" / "composition.json",
                   {**provenance(ident, norm=norm, units=composition_units, seed=seed,
                                 active_threshold=active_threshold, corpus=sample_corpus or "mined"), **res})
        results["composition"] = res
        timing["composition"] = time.perf_counter() - t
    results["seconds"] = timing
    return results
