"""Check localisations against ground truth: planted memories, and the testbed's known facts and frequencies.

Planted model (:func:`planted_ground_truth`): each fact is stored in known memories ``(layer, index)`` whose key
fires on the trigger token. Tracing with kind="mlp" and a window of 1 should peak at the trigger token and the
memory's layer; integrated gradients should rank the planted memories first.

Testbed (:func:`testbed_ground_truth`): for a sample of facts from every frequency bucket, on a prompt rendered
from a training template that the model answers correctly:

- tracing peak: the (token group, layer) of the largest indirect effect of hidden states, and the layer of the
  largest MLP effect at the last subject token (window 1, so that a layer means one layer);
- storage layer: the layer l whose memories, switched off at the subject tokens (``m^(l) := 0`` at [s, e)),
  lower P(answer) the most: the causal definition of "where the subject's attribute is stored" in the
  key-value view. *Agreement* = the MLP-trace peak layer equals the storage layer;
- knowledge-neuron precision: the fact's knowledge neurons (over its training-template prompts) switched off
  at the last token: relative change of P(answer) on the fact's own prompts and on facts of other relations;
  precision = own flip rate / (own flip rate + unrelated flip rate); also reported on the same subject's facts
  of other relations (do the neurons hold the fact, or the subject?), and for the neurons left after dropping
  those that are also coarse neurons of most of ``n_background`` other facts (``filtered_*``);
- frequency dependence: everything above by frequency bucket (1, 2-3, ..., 32+), with the recall (share of
  sampled facts the model answers) and the total effect.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch


from ..models.hooks import intervene, switch_memories
from ..models.model import MemoryModel
from ..testbed.buckets import BUCKETS, bucket_of, group_by_bucket
from ..testbed.datasets import load_facts
from ..models.engine import Cost
from ..progress import track
from .attribution import integrated_gradients, top_memories
from .average import group_rows
from .interventions import intervention_effects
from .neurons import knowledge_neurons
from .trace import causal_trace, noise_level


# --------------------------------------------------------------------------------------------- planted
def planted_ground_truth(pm, samples: int = 10, seed: int = 0) -> list[dict]:
    """Per planted fact: where the MLP trace peaks vs. the planted memory, and IG's top memories."""
    m = pm.model
    rows = []
    for f in pm.facts:
        prompt = f"the old {f.trigger}"
        tr = causal_trace(m, prompt, f"old {f.trigger}", kind="mlp", window=1, noise=3.0, samples=samples,
                          seed=seed)
        t, l = tr.peak()
        attr = integrated_gradients(m, prompt, f.target)
        found = {(mid.layer, mid.index) for mid in top_memories(attr, len(f.memories))}
        rows.append({"fact": f"{f.trigger} -> {f.target}", "planted": f.memories,
                     "trace_peak_token": tr.tokens[t], "trace_peak_layer": l,
                     "trace_agrees": tr.tokens[t] == f.trigger and l in {ly for ly, _ in f.memories},
                     "ig_top": sorted(found), "ig_recall": len(found & set(map(tuple, f.memories))) / len(f.memories)})
    return rows


# --------------------------------------------------------------------------------------------- testbed
@torch.no_grad()
def storage_profile(model: MemoryModel, prompt: str, subject_range: tuple[int, int], answer_id: int) -> np.ndarray:
    """P(answer) drop when layer l's memories are switched off at the subject tokens, (n_layers,)."""
    ids = model.encode(prompt)["input_ids"]
    L = model.n_layers
    s, e = subject_range
    edits = []
    for l in range(L):  # row l + 1: every memory of layer l off at the subject tokens
        off = switch_memories(l, range(model.d_ffn), positions=list(range(s, e)))
        off.batch = [l + 1]
        edits.append(off)
    with intervene(model, edits=edits):
        logits = model.hf(input_ids=ids.expand(L + 1, ids.shape[1])).logits[:, -1]
    p = torch.softmax(logits.float(), -1)[:, answer_id].cpu().numpy()
    return p[0] - p[1:]


def _render(template: str, subject: str) -> str:
    return template.replace("{}", subject)


def _known(model: MemoryModel, prompt: str, answer_id: int) -> bool:
    return int(model.next_token_probs(prompt)[0].argmax()) == answer_id


def testbed_ground_truth(model: MemoryModel, facts: list[dict], per_bucket: int = 8, samples: int = 10,
                         n_prompts: int = 3, n_unrelated: int = 4, n_background: int = 6, seed: int = 0,
                         progress: bool = True) -> dict:
    """The ground-truth report on a testbed (see the module docstring). ``facts``: dicts of facts.jsonl."""
    rng = random.Random(f"{seed}-locate-ground-truth")
    by_bucket = group_by_bucket(facts)
    sample = []
    for name, _, _ in BUCKETS:
        group = by_bucket.get(name, [])
        sample += group if len(group) <= per_bucket else rng.sample(group, per_bucket)
    level, _ = noise_level(model, "s3", [f["subject"] for f in facts])
    cost = Cost()
    rows = []
    for f in track(sample, desc="ground truth", unit="fact", enabled=progress):
        answer_id = model.answer_id(f["object"])
        prompts = [_render(t, f["subject"]) for t in f["train_templates"]]
        known = [p for p in prompts if _known(model, p, answer_id)]
        row = {"fact_id": f.get("fact_id"), "subject": f["subject"], "relation_id": f["relation_id"],
               "object": f["object"], "train_count": f["train_count"], "bucket": bucket_of(f["train_count"]),
               "known": bool(known)}
        rows.append(row)
        if not known:
            continue
        prompt = known[0]
        hid = causal_trace(model, prompt, f["subject"], answer=answer_id, noise=level, samples=samples, seed=seed,
                           cost=cost)
        mlp = causal_trace(model, prompt, f["subject"], kind="mlp", window=1, answer=answer_id, noise=level,
                           samples=samples, seed=seed, cost=cost)
        s, e = hid.subject_range
        groups = group_rows(hid.indirect_effects, hid.subject_range)
        peak_group = max(groups, key=lambda g: groups[g].max())
        t_peak, l_peak = hid.peak()
        mlp_last_subject = mlp.indirect_effects[e - 1]
        # Restoring the last layer at the last token is the clean output by construction, so the "early site"
        # (ROME: subject tokens) is reported on its own.
        subj = hid.indirect_effects[s:e]
        ts, ls = np.unravel_index(int(np.argmax(subj)), subj.shape)
        storage = storage_profile(model, prompt, hid.subject_range, answer_id)
        kn = knowledge_neurons(model, known[:n_prompts], f["object"], cost=cost)
        others = [g for g in facts if g["relation_id"] != f["relation_id"] and g["subject"] != f["subject"]]
        unrelated, background = [], []
        for g in rng.sample(others, min(len(others), 8 * n_unrelated)):
            p = _render(g["train_templates"][0], g["subject"])
            if _known(model, p, model.answer_id(g["object"])):
                (unrelated if len(unrelated) < n_unrelated else background).append((p, g["object"]))
            if len(background) >= n_background:
                break
        eff = intervention_effects(model, known[:n_prompts], f["object"], kn.neurons, unrelated=unrelated,
                                   random_trials=1, seed=seed) if kn.neurons else {}
        # The same subject's facts of other relations: do the neurons hold this fact or the subject?
        siblings = []
        for g in facts:
            if g["subject"] == f["subject"] and g["relation_id"] != f["relation_id"]:
                p = _render(g["train_templates"][0], g["subject"])
                if _known(model, p, model.answer_id(g["object"])):
                    siblings.append((p, g["object"]))
        sib = intervention_effects(model, known[:1], f["object"], kn.neurons, unrelated=siblings,
                                   random_trials=0) if kn.neurons and siblings else {}
        # Extension: drop neurons that are also coarse neurons of most background facts (disjoint from the
        # unrelated facts the effects are measured on).
        knf = knowledge_neurons(model, known[:n_prompts], f["object"], background=background, cost=cost) \
            if background else kn
        efff = intervention_effects(model, known[:n_prompts], f["object"], knf.neurons, unrelated=unrelated,
                                    random_trials=0) if knf.neurons else {}
        row.update({
            "prompt": prompt, "high_score": hid.high_score, "low_score": hid.low_score,
            "total_effect": hid.total_effect,
            "trace_peak_group": peak_group, "trace_peak_token": hid.tokens[t_peak], "trace_peak_layer": l_peak,
            "trace_peak_effect": float(hid.indirect_effects.max()),
            "subject_peak_token": hid.tokens[s + int(ts)], "subject_peak_layer": int(ls),
            "subject_peak_effect": float(subj.max()),
            "subject_peak_is_last_subject_token": s + int(ts) == e - 1,
            "mlp_peak_layer_last_subject": int(np.argmax(mlp_last_subject)),
            "mlp_peak_effect_last_subject": float(mlp_last_subject.max()),
            "storage_layer": int(np.argmax(storage)), "storage_drop": storage.tolist(),
            "agrees": int(np.argmax(mlp_last_subject)) == int(np.argmax(storage)),
            "n_neurons": len(kn.neurons), "neuron_layers": sorted({l for l, _, _ in kn.neurons}),
            "kn_own_relative_change": _get(eff, "own", "suppress", "found", "relative_change"),
            "kn_own_flip_rate": _get(eff, "own", "suppress", "found", "flip_rate"),
            "kn_unrelated_relative_change": _get(eff, "unrelated", "suppress", "found", "relative_change"),
            "kn_unrelated_flip_rate": _get(eff, "unrelated", "suppress", "found", "flip_rate"),
            "random_own_relative_change": _get(eff, "own", "suppress", "random", "relative_change"),
            "filtered_n_neurons": len(knf.neurons),
            "filtered_own_relative_change": _get(efff, "own", "suppress", "found", "relative_change"),
            "filtered_own_flip_rate": _get(efff, "own", "suppress", "found", "flip_rate"),
            "filtered_unrelated_relative_change": _get(efff, "unrelated", "suppress", "found", "relative_change"),
            "filtered_unrelated_flip_rate": _get(efff, "unrelated", "suppress", "found", "flip_rate"),
            "kn_same_subject_relative_change": _get(sib, "unrelated", "suppress", "found", "relative_change"),
            "kn_same_subject_flip_rate": _get(sib, "unrelated", "suppress", "found", "flip_rate"),
            "kn_amplify_relative_change": _get(eff, "own", "amplify", "found", "relative_change"),
        })
    return {"noise_level": level, "facts": rows, "by_bucket": summarize(rows), "overall": summarize(rows, all_=True),
            "cost": cost.as_dict()}


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def summarize(rows: list[dict], all_: bool = False) -> dict | list:
    """Per frequency bucket (or over all rows): recall, effects, agreement, neuron counts and precision."""
    def one(group: list[dict]) -> dict:
        traced = [r for r in group if r["known"]]
        own = _mean(traced, "kn_own_flip_rate")
        other = _mean(traced, "kn_unrelated_flip_rate")
        peak_groups = defaultdict(int)
        for r in traced:
            peak_groups[r["trace_peak_group"]] += 1
        return {"n_sampled": len(group), "n_known": len(traced),
                "recall": len(traced) / len(group) if group else None,
                "total_effect": _mean(traced, "total_effect"), "trace_peak_effect": _mean(traced, "trace_peak_effect"),
                "trace_peak_layer": _mean(traced, "trace_peak_layer"),
                "subject_peak_layer": _mean(traced, "subject_peak_layer"),
                "subject_peak_effect": _mean(traced, "subject_peak_effect"),
                "subject_peak_at_last_subject_token": _mean(
                    [{"a": float(r["subject_peak_is_last_subject_token"])} for r in traced], "a"),
                "peak_groups": dict(peak_groups),
                "mlp_peak_layer_last_subject": _mean(traced, "mlp_peak_layer_last_subject"),
                "storage_layer": _mean(traced, "storage_layer"),
                "agreement": _mean([{"a": float(r["agrees"])} for r in traced], "a"),
                "n_neurons": _mean(traced, "n_neurons"),
                "kn_own_relative_change": _mean(traced, "kn_own_relative_change"),
                "kn_own_flip_rate": own, "kn_unrelated_flip_rate": other,
                "kn_unrelated_relative_change": _mean(traced, "kn_unrelated_relative_change"),
                "random_own_relative_change": _mean(traced, "random_own_relative_change"),
                "kn_same_subject_relative_change": _mean(traced, "kn_same_subject_relative_change"),
                "filtered_n_neurons": _mean(traced, "filtered_n_neurons"),
                "filtered_own_relative_change": _mean(traced, "filtered_own_relative_change"),
                "filtered_own_flip_rate": _mean(traced, "filtered_own_flip_rate"),
                "filtered_unrelated_relative_change": _mean(traced, "filtered_unrelated_relative_change"),
                "filtered_unrelated_flip_rate": _mean(traced, "filtered_unrelated_flip_rate"),
                "kn_same_subject_flip_rate": _mean(traced, "kn_same_subject_flip_rate"),
                "kn_precision": (own / (own + other)) if own is not None and other is not None and own + other > 0
                else None}

    if all_:
        return one(rows)
    out = []
    for name, _, _ in BUCKETS:
        group = [r for r in rows if r["bucket"] == name]
        if group:
            out.append({"bucket": name, **one(group)})
    return out


def load_testbed_facts(path: str | Path) -> list[dict]:
    """The facts of a testbed folder (or its data folder, or facts.jsonl)."""
    return load_facts(path)[0]
