"""A real world: T-REx facts rendered through PARAREL's paraphrase patterns (CounterFact's own source).

Reads ``<pararel>/pattern_data/graphs_json/P*.jsonl`` (patterns such as ``"[X] was born in [Y]."``) and
``<pararel>/trex_lms_vocab/P*.jsonl`` (facts ``{sub_label, obj_label}``). A pattern becomes a ROME template
when ``[Y]`` ends it and ``[X]`` precedes it (``"{} was born in"``); within a relation, a template that has
another as a prefix is dropped, and a third of the templates (at least one) are held out. Mention counts
follow the same truncated Zipf law as the generated world. Nothing of the data set is copied anywhere but
the testbed folder the user asks for.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path

from ..errors import FfkvError
from .world import PRESETS, Fact, World, filler_sentences, zipf_counts

# How much of PARAREL each preset takes: relations, facts per relation.
PARAREL_SIZES = {"tiny": (5, 40), "default": (None, 300)}


def pararel_templates(pattern_file: Path) -> list[str]:
    """ROME templates from a PARAREL pattern file: ``[X] ... [Y].`` -> ``{} ...``; no template a prefix of another."""
    out = []
    for line in pattern_file.read_text().splitlines():
        if not line.strip():
            continue
        pat = json.loads(line)["pattern"].strip()
        if not pat.endswith("[Y] .") and not pat.endswith("[Y]."):
            continue
        head = pat[: pat.rindex("[Y]")].rstrip()
        if head.count("[X]") != 1 or "[Y]" in head:
            continue
        t = head.replace("[X]", "{}")
        if t not in out:
            out.append(t)
    return [t for t in out if not any(o != t and t.startswith(o) for o in out)]


def pararel_world(path: str | Path, seed: int = 0, preset: str = "default",
                  relations: list[str] | None = None) -> World:
    """A :class:`World` of T-REx facts and PARAREL templates read from ``path`` (e.g. ../shared/data/pararel)."""
    root = Path(path)
    pat_dir, fact_dir = root / "pattern_data" / "graphs_json", root / "trex_lms_vocab"
    if not pat_dir.is_dir() or not fact_dir.is_dir():
        raise FfkvError(f"{root} does not look like PARAREL (needs pattern_data/graphs_json and trex_lms_vocab)",
                        "pass the pararel folder, e.g. ../shared/data/pararel")
    if preset not in PRESETS:
        raise FfkvError(f"unknown testbed preset {preset!r}", f"use one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    max_rel, per_rel = PARAREL_SIZES[preset]
    rng = random.Random(f"ffkv-pararel-{seed}-{preset}")

    rel_ids = sorted(f.stem for f in pat_dir.glob("P*.jsonl") if (fact_dir / f.name).exists())
    if relations:
        rel_ids = [r for r in rel_ids if r in set(relations)]
    chosen_rel = []
    templates = {}
    for rid in rel_ids:
        ts = pararel_templates(pat_dir / f"{rid}.jsonl")
        if len(ts) >= 2:
            rng.shuffle(ts)
            n_held = max(1, len(ts) // 3)
            templates[rid] = (sorted(ts[n_held:]), sorted(ts[:n_held]))
            chosen_rel.append(rid)
    if max_rel:
        chosen_rel = chosen_rel[:max_rel]
    if not chosen_rel:
        raise FfkvError(f"no usable PARAREL relation under {root}", "check the folder's contents")

    raw = []
    for rid in chosen_rel:
        rows = [json.loads(l) for l in (fact_dir / f"{rid}.jsonl").read_text().splitlines() if l.strip()]
        rows = [r for r in rows if r.get("sub_label") and r.get("obj_label")]
        rng.shuffle(rows)
        raw += [(r["sub_label"], rid, r["obj_label"]) for r in rows[:per_rel]]
    subjects = list(dict.fromkeys(s for s, _, _ in raw))
    counts = dict(zip(subjects, zipf_counts(rng, len(subjects), p.zipf_a, p.min_count, p.max_count)))
    candidates: dict[str, list[str]] = defaultdict(list)
    facts = []
    seen = set()
    for s, rid, o in raw:
        if (s, rid) in seen:  # one object per (subject, relation): the first T-REx gives
            continue
        seen.add((s, rid))
        if o not in candidates[rid]:
            candidates[rid].append(o)
        train, held = templates[rid]
        facts.append(Fact(subject=s, subject_type="entity", relation_id=rid, relation=rid, object=o,
                          train_count=counts[s], train_templates=list(train), heldout_templates=list(held),
                          fact_id=len(facts)))
    n_statements = sum(f.train_count for f in facts)
    filler = filler_sentences(rng, math.ceil(n_statements * p.filler_fraction / (1 - p.filler_fraction)))
    return World(seed=seed, preset=preset, facts=facts, candidates={k: sorted(v) for k, v in candidates.items()},
                 filler=filler, source=f"pararel:{root.name}", sentences_per_document=p.sentences_per_document)
