"""Data sets written from a world, in the layouts the field uses.

- ``facts.jsonl``: every fact, one a line: subject, subject_type, relation, relation_id, object, train_count,
  train_templates, heldout_templates, fact_id.
- ``counterfact.json``: ROME's CounterFact layout. For each case a counterfactual ``target_new`` (another object
  of the same relation), 2 paraphrase prompts rendered from *held-out* templates, 10 neighborhood prompts
  (other subjects with the same relation and the same true object, preferring facts seen >= 16 times, which
  the model knows), attribute prompts (subjects whose true
  object is ``target_new``) and generation prompts. Extra keys: ``train_count``, ``fact_id``.
- ``known_facts.json``: ROME's ``known_1000`` layout for causal tracing (known_id, subject, attribute, template,
  prediction, prompt, relation_id), for the facts seen often enough to be known (``train_count >= 30``);
  ``prediction`` is the true continuation, not a model's output, so the file depends on the world only.
- ``world.json``: the relations (templates, candidate objects), the world's summary and provenance.

All are pure functions of the world: the same seed writes the same bytes (``world.json``'s ``created`` aside).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from .. import validate
from ..errors import FfkvError
from ..io import atomic_path, provenance, read_json, write_json

KNOWN_MIN_COUNT = 30
COUNTERFACT_MIN_COUNT = 4  # cases are facts a model may know; rarer ones are in facts.jsonl
# Neighborhood prompts test that an edit leaves *known* facts alone, so they are drawn from facts seen often
# enough to be recalled (the default model: 0.89-0.96 held-out recall from 16 mentions up); with fewer such
# neighbors the rest are the most frequent others. Unknown neighbors would make NS measure ignorance.
NEIGHBOR_MIN_COUNT = 16
N_PARAPHRASE, N_NEIGHBORHOOD, N_ATTRIBUTE, N_GENERATION = 2, 10, 10, 5


def counterfact_cases(world, min_count: int = COUNTERFACT_MIN_COUNT) -> list[dict]:
    """CounterFact records (ROME layout) for every fact seen at least ``min_count`` times."""
    rng = random.Random(f"{world.seed}-counterfact")
    by_rel_obj: dict[tuple[str, str], list] = defaultdict(list)
    facts_of_subject: dict[str, list] = defaultdict(list)
    for f in world.facts:
        by_rel_obj[f.relation_id, f.object].append(f)
        facts_of_subject[f.subject].append(f)
    cases = []
    for f in world.facts:
        if f.train_count < min_count:
            continue
        others = [o for o in world.candidates[f.relation_id] if o != f.object]
        if not others:
            continue
        target_new = rng.choice(others)
        template = rng.choice(f.train_templates)
        paraphrases = rng.sample(f.heldout_templates, min(N_PARAPHRASE, len(f.heldout_templates)))
        neighbors = [g for g in by_rel_obj[f.relation_id, f.object] if g.subject != f.subject]
        known = [g for g in neighbors if g.train_count >= NEIGHBOR_MIN_COUNT]
        rest = sorted((g for g in neighbors if g.train_count < NEIGHBOR_MIN_COUNT),
                      key=lambda g: (-g.train_count, g.fact_id))
        neighbors = rng.sample(known, min(N_NEIGHBORHOOD, len(known))) + rest[:max(0, N_NEIGHBORHOOD - len(known))]
        attributes = [g for g in by_rel_obj[f.relation_id, target_new] if g.subject != f.subject]
        attributes = rng.sample(attributes, min(N_ATTRIBUTE, len(attributes)))
        own = facts_of_subject[f.subject]
        generation = [g.prompt(rng.choice(g.train_templates)) for g in rng.choices(own, k=N_GENERATION)]
        cases.append({
            "case_id": len(cases),
            "pararel_idx": f.fact_id,
            "requested_rewrite": {
                "prompt": template,
                "relation_id": f.relation_id,
                "subject": f.subject,
                "target_new": {"str": target_new, "id": _object_id(world, f.relation_id, target_new)},
                "target_true": {"str": f.object, "id": _object_id(world, f.relation_id, f.object)},
            },
            "paraphrase_prompts": [f.prompt(t) for t in paraphrases],
            "neighborhood_prompts": [g.prompt(rng.choice(g.train_templates)) for g in neighbors],
            "attribute_prompts": [g.prompt(rng.choice(g.train_templates)) for g in attributes],
            "generation_prompts": generation,
            "train_count": f.train_count,
            "fact_id": f.fact_id,
        })
    return cases


def _object_id(world, relation_id: str, obj: str) -> str:
    """A stable id for an object, in the spirit of Wikidata's Q-ids: relation and index among candidates."""
    return f"{relation_id}:{world.candidates[relation_id].index(obj)}"


def known_facts(world, min_count: int = KNOWN_MIN_COUNT) -> list[dict]:
    """ROME ``known_1000`` records for facts seen at least ``min_count`` times (else the top quarter)."""
    facts = [f for f in world.facts if f.train_count >= min_count]
    if not facts:  # a small world: the most frequent quarter of its facts
        cut = sorted((f.train_count for f in world.facts), reverse=True)[max(0, len(world.facts) // 4 - 1)]
        facts = [f for f in world.facts if f.train_count >= cut]
    rng = random.Random(f"{world.seed}-known")
    out = []
    for f in facts:
        template = rng.choice(f.train_templates)
        out.append({"known_id": len(out), "subject": f.subject, "attribute": f.object, "template": template,
                    "prediction": " " + f.object, "prompt": f.prompt(template), "relation_id": f.relation_id,
                    "train_count": f.train_count, "fact_id": f.fact_id})
    return out


def world_record(world) -> dict:
    rels = {}
    for rid in world.relation_ids:
        f = next(f for f in world.facts if f.relation_id == rid)
        rels[rid] = {"relation": f.relation, "subject_type": f.subject_type, "candidates": world.candidates[rid],
                     "train_templates": f.train_templates, "heldout_templates": f.heldout_templates}
    return {"summary": world.summary(), "relations": rels,
            "provenance": provenance({}, seed=world.seed, preset=world.preset, source=world.source)}


def write_datasets(world, out_dir: str | Path) -> dict[str, Path]:
    """Write facts.jsonl, counterfact.json, known_facts.json and world.json under ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {"facts": out_dir / "facts.jsonl", "counterfact": out_dir / "counterfact.json",
             "known_facts": out_dir / "known_facts.json", "world": out_dir / "world.json"}
    with atomic_path(paths["facts"]) as tmp:
        tmp.write_text("".join(json.dumps(f.to_json()) + "\n" for f in world.facts))
    # Compact JSON: these files ship inside the package.
    write_json(paths["counterfact"], counterfact_cases(world), indent=None)
    write_json(paths["known_facts"], known_facts(world), indent=None)
    write_json(paths["world"], world_record(world))
    return paths


FACT_FIELDS = ("subject", "relation_id", "object", "train_count", "train_templates", "heldout_templates")


def load_facts(path: str | Path) -> tuple[list[dict], dict[str, list[str]]]:
    """Facts and candidate objects from a testbed folder, its ``data/`` folder, or a ``facts.jsonl``.

    Returns ``(facts, candidates)``: the facts as dicts (the fields of ``facts.jsonl``) and, per relation id,
    the relation's candidate objects.
    """
    path = Path(path)
    if path.is_dir() and (path / "data").is_dir():
        path = path / "data"
    facts_path = path / "facts.jsonl" if path.is_dir() else path
    if not facts_path.exists():
        raise FfkvError(f"no facts.jsonl at {path}", "pass a testbed folder made by `ffkv testbed build`")
    # Every record is checked (not only the first), so a bad line is named before any work starts.
    facts = validate.records(facts_path, FACT_FIELDS, what="fact")
    for n, f in enumerate(facts, 1):
        bad = next((k for k in ("train_templates", "heldout_templates") if not isinstance(f[k], list)), None)
        if bad is None and not isinstance(f["train_count"], int):
            bad = "train_count"
        if bad is not None:
            raise FfkvError(f"{facts_path} fact {n} has a malformed {bad!r} ({type(f[bad]).__name__})",
                            "rebuild it with `ffkv testbed build`")
    world_path = facts_path.parent / "world.json"
    if world_path.exists():
        world = read_json(world_path)
        rels = world.get("relations") if isinstance(world, dict) else None
        if not isinstance(rels, dict) or not all(isinstance(r, dict) and isinstance(r.get("candidates"), list)
                                                 for r in rels.values()):
            raise FfkvError(f"{world_path} has no relations with candidate objects",
                            "rebuild it with `ffkv testbed build`")
        candidates = {rid: r["candidates"] for rid, r in rels.items()}
    else:
        candidates = defaultdict(list)
        for f in facts:
            if f["object"] not in candidates[f["relation_id"]]:
                candidates[f["relation_id"]].append(f["object"])
        candidates = dict(candidates)
    return facts, candidates
