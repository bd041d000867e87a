"""How often the dossier's claims are right, checked against the testbed's ground truth; and its time on a model
of GPT-2 small's shape.

    python bench/bench_dossier.py [--per-bucket 3] [--unseen 5] [--out dossier_bench.json]
    python bench/bench_dossier.py --gpt2-small [--stats-tokens 20000]
    python bench/bench_dossier.py --mquake 10 [--method rome]      # MQuAKE multi-hop accuracy, testbed model
    python bench/bench_dossier.py --two-hop 200                    # can the testbed model compose two facts?

For a sample of testbed facts (stratified over the train-count buckets) and a few invented facts the model never
saw, one dossier each (``ffkv.dossier.build.build_dossier`` with its defaults, paraphrases = the prompt + the
fact's held-out templates), and per claim the ground truth the testbed gives:

    traced_layer                == the storage layer: the layer whose memories, switched off at the subject tokens,
                                   lower P(answer) most (ffkv.locate.ground_truth.storage_profile); known facts
    peak_at_subject             == that storage drop is larger at the subject tokens than at the last token
    ablation_removes_fact       == switching the dossier's carrying memories off removes the fact on at least half
                                   of the fact's *training* templates (prompts the dossier did not see)
    ablation_spares_other_facts == it removes at most a fifth of 20 fresh facts of other subjects (seen >= 8 times;
                                   the share is over those the model answers)
    strongly_stored             == the fact is frequent: train_count >= 8 (and exists: unseen facts have 0)
    recall                      == the model's greedy answer on the prompt is the fact's true object (unseen facts:
                                   the fact does not exist, so recall is wrong)
    edit_safe                   == a ROME edit at the traced layer (to another object of the relation) damages at
                                   most 5% of the known facts whose keys the dossier checked (damaged: the top-1
                                   answer changes or P(object) halves); per key, the AUROC of |s_j| for damage

Rates are over the facts where the ground truth is defined. Prints one table and, with --out, writes JSON (with
provenance). --gpt2-small times one dossier on a randomly initialised GPT2Config() (12 x 768, d_ffn 3072) with the
testbed tokenizer, section by section.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ffkv.dossier.build import REMOVES_SHARE, SAFE_SHARE, SPARES_SHARE, build_dossier  # noqa: E402
from ffkv.edit.api import apply_edits  # noqa: E402
from ffkv.edit.context import EditContext  # noqa: E402
from ffkv.edit.requests import EditRequest  # noqa: E402
from ffkv.evaluate.datasets import load_mquake  # noqa: E402
from ffkv.evaluate.multihop import multihop_accuracy, testbed_two_hop  # noqa: E402
from ffkv.io import provenance, write_json  # noqa: E402
from ffkv.locate.ground_truth import storage_profile  # noqa: E402
from ffkv.locate.interventions import memories_off, variant_probs  # noqa: E402
from ffkv.models.loading import from_hf, load_model  # noqa: E402
from ffkv.models.memory_id import MemoryId  # noqa: E402
from ffkv.progress import track  # noqa: E402
from ffkv.recall.data import unseen_facts  # noqa: E402
from ffkv.recall.stats import auroc  # noqa: E402
from ffkv.testbed import default_testbed  # noqa: E402
from ffkv.testbed.buckets import stratified_facts  # noqa: E402
from ffkv.testbed.datasets import load_facts  # noqa: E402

CLAIMS = ("traced_layer", "peak_at_subject", "ablation_removes_fact", "ablation_spares_other_facts",
          "strongly_stored", "recall", "edit_safe")


def removed_share(model, carrying, pairs, positions: str, answered_only: bool = False) -> float:
    """Share of (prompt, answer) pairs whose fact the carrying memories, switched off where the dossier switched
    them off ("last" or "all" positions), remove."""
    out = []
    for prompt, answer in pairs:
        a = model.answer_id(answer)
        at = None if positions == "all" else [model.encode(prompt)["input_ids"].shape[1] - 1]
        p, top = variant_probs(model, prompt, a, [[], memories_off(carrying, at)])
        if answered_only and int(top[0]) != a:
            continue  # the model does not answer it: no fact to remove
        out.append(int(top[1]) != a or p[1] < 0.5 * p[0])
    return float(np.mean(out)) if out else float("nan")


def damaged(model, known, before) -> list[bool]:
    out = []
    for k, (p0, top0) in zip(known, before):
        a = model.answer_id(k["answer"])
        probs = model.next_token_probs(k["prompt"])[0]
        out.append(int(probs.argmax()) != top0 or float(probs[a]) < 0.5 * p0)
    return out


def check_fact(model, f, facts, candidates, d, rng, ctx) -> dict:
    prompt, subject = d["fact"]["prompt"], f["subject"]
    a = model.answer_id(f["object"])
    greedy = int(model.next_token_logits(prompt)[0].argmax())
    known_fact = f["train_count"] > 0 and greedy == a
    c = d["claims"]
    row = {"fact_id": f.get("fact_id"), "train_count": f["train_count"], "claims": c, "truth": {}}
    t = row["truth"]
    t["recall"] = known_fact
    t["strongly_stored"] = f["train_count"] >= 8
    carrying = [MemoryId.parse(m) for m in d["subspace"]["memories"]]
    pos = d["subspace"]["positions"]
    if f["train_count"] > 0:
        train = [(tpl.format(subject), f["object"]) for tpl in f["train_templates"] if tpl.format(subject) != prompt]
        t["ablation_removes_fact"] = removed_share(model, carrying, train, pos) >= REMOVES_SHARE if carrying else False
        others = [g for g in facts if g["subject"] != subject and g["train_count"] >= 8]
        fresh = [(g["train_templates"][-1].format(g["subject"]), g["object"]) for g in rng.sample(others, 20)]
        spared = removed_share(model, carrying, fresh, pos, answered_only=True)
        if spared == spared:  # some of the fresh facts are answered
            t["ablation_spares_other_facts"] = spared <= SPARES_SHARE
    if known_fact:
        s, e = model.find_subject(prompt, subject)
        T = model.encode(prompt)["input_ids"].shape[1]
        at_subject = storage_profile(model, prompt, (s, e), a)
        at_last = storage_profile(model, prompt, (T - 1, T), a)
        t["traced_layer"] = int(np.argmax(at_subject))
        t["peak_at_subject"] = bool(at_subject.max() > at_last.max())
        # the edit: ROME at the traced layer to another object of the relation
        new = rng.choice([o for o in candidates.get(f["relation_id"], []) if o != f["object"]])
        safety = d["edit_safety"]
        facts_known = d["_known"]
        before = []
        for k in facts_known:
            probs = model.next_token_probs(k["prompt"])[0]
            before.append((float(probs[model.answer_id(k["answer"])]), int(probs.argmax())))
        req = EditRequest(prompt, subject, new, target_true=f["object"])
        j = apply_edits(model, [req], "rome", {"layer": int(c["traced_layer"])}, progress=False, context=ctx)
        try:
            dmg = damaged(model, facts_known, before)
        finally:
            j.undo(model)
        t["edit_safe"] = float(np.mean(dmg)) <= SAFE_SHARE
        row["edit"] = {"damaged": dmg, "spill": [abs(x) for x in safety.get("spill", [])],
                       "damaged_share": float(np.mean(dmg)), "predicted_moved_share": safety["moved_share"]}
    row["right"] = {k: (c[k] == t[k]) for k in CLAIMS if k in t}
    return row


def testbed_bench(args) -> dict:
    tb = default_testbed()
    model = load_model(tb / "model")
    facts, candidates = load_facts(tb)
    sample = stratified_facts(facts, args.per_bucket, args.seed)
    unseen = unseen_facts(facts, candidates, args.unseen, seed=args.seed)
    rng = random.Random(f"bench-dossier-{args.seed}")
    ctx = EditContext()
    rows = []
    t0 = time.perf_counter()
    for f in track(sample + unseen, desc="dossiers", unit="fact", enabled=True):
        prompt = f["train_templates"][0].format(f["subject"])
        others = [g for g in facts if g["subject"] != f["subject"]]
        known = [{"prompt": g["train_templates"][0].format(g["subject"]), "answer": g["object"],
                  "subject": g["subject"]} for g in rng.sample(others, args.known)]
        paraphrases = [prompt] + [t.format(f["subject"]) for t in f["heldout_templates"]]
        d = build_dossier(model, prompt, f["subject"], f["object"], paraphrases=paraphrases, known=known,
                          facts=facts, samples=args.samples, seed=args.seed, ablate_positions=args.ablate_positions)
        d["_known"] = known
        rows.append(check_fact(model, f, facts, candidates, d, rng, ctx))
    elapsed = time.perf_counter() - t0
    table = {}
    for k in CLAIMS:
        r = [row["right"][k] for row in rows if k in row["right"]]
        claimed = [bool(row["claims"][k]) if k != "traced_layer" else None for row in rows if k in row["right"]]
        table[k] = {"n": len(r), "right": int(sum(r)), "rate": float(np.mean(r)) if r else None,
                    "claimed_true": (int(sum(claimed)) if claimed and claimed[0] is not None else None)}
    spill = [s for row in rows if "edit" in row for s in row["edit"]["spill"]]
    dmg = [x for row in rows if "edit" in row for x in row["edit"]["damaged"]]
    key_auroc = auroc(np.array(spill), np.array(dmg, dtype=float)) if dmg and 0 < sum(dmg) < len(dmg) else None
    return {"table": table, "key_auroc_spill_vs_damage": key_auroc, "n_keys": len(dmg),
            "n_damaged_keys": int(sum(dmg)), "n_facts": len(sample), "n_unseen": len(unseen),
            "seconds": elapsed, "seconds_per_dossier": elapsed / len(rows), "rows": rows,
            "provenance": provenance(model.identity, per_bucket=args.per_bucket, unseen=args.unseen,
                                     known=args.known, samples=args.samples, seed=args.seed,
                                     ablate_positions=args.ablate_positions)}


def gpt2_small(args) -> dict:
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tb = default_testbed()
    tok = PreTrainedTokenizerFast.from_pretrained(str(tb / "model"))
    model = from_hf(AutoModelForCausalLM.from_config(GPT2Config()).eval(), tok, name_or_path="gpt2-config",
                    check=False)
    facts, _ = load_facts(tb)
    f = facts[0]
    prompt = f["train_templates"][0].format(f["subject"])
    paraphrases = [prompt] + [t.format(f["subject"]) for t in f["heldout_templates"]]
    t, cpu = time.perf_counter(), time.process_time()
    d = build_dossier(model, prompt, f["subject"], f["object"], paraphrases=paraphrases, facts=facts,
                      stats_tokens=args.stats_tokens, corpus="wikitext", stats_dir=args.stats_dir, progress=True)
    return {"model": "random GPT2Config() 12x768, d_ffn 3072", "threads": torch.get_num_threads(),
            "tokens": model.encode(prompt)["input_ids"].shape[1], "paraphrases": len(paraphrases),
            "stats_tokens": args.stats_tokens, "seconds": time.perf_counter() - t,
            "cpu_seconds": time.process_time() - cpu, "sections_s": d["timings_s"]}


def mquake(args) -> dict:
    model = load_model(default_testbed() / "model")
    cases = load_mquake(limit=args.mquake)
    t = time.perf_counter()
    r = multihop_accuracy(model, cases, args.method, progress=True)
    r["seconds_per_case"] = (time.perf_counter() - t) / len(cases)
    return r


def two_hop(args) -> dict:
    tb = default_testbed()
    facts, _ = load_facts(tb)
    return testbed_two_hop(load_model(tb / "model"), facts, n=args.two_hop, seed=args.seed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-bucket", type=int, default=3)
    ap.add_argument("--unseen", type=int, default=4)
    ap.add_argument("--known", type=int, default=50)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ablate-positions", default="last", choices=("last", "all"))
    ap.add_argument("--gpt2-small", action="store_true")
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--stats-dir", default=None)
    ap.add_argument("--mquake", type=int, default=None, help="MQuAKE cases to run on the testbed model")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--two-hop", type=int, default=None, help="composed testbed facts to ask")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.gpt2_small:
        out = gpt2_small(args)
        print(out)
    elif args.mquake:
        out = mquake(args)
        print({k: v for k, v in out.items() if k not in ("cases", "provenance")})
        for c in out["cases"][:3]:
            print(c)
    elif args.two_hop:
        out = two_hop(args)
        print({k: v for k, v in out.items() if k != "examples"})
    else:
        out = testbed_bench(args)
        print(f"{'claim':30s} {'n':>4s} {'right':>6s} {'rate':>6s} {'claimed yes':>11s}")
        for k, v in out["table"].items():
            rate = "-" if v["rate"] is None else f"{v['rate']:.2f}"
            print(f"{k:30s} {v['n']:4d} {v['right']:6d} {rate:>6s} {str(v['claimed_true']):>11s}")
        print(f"per-key AUROC of |s_j| for damage: {out['key_auroc_spill_vs_damage']} "
              f"({out['n_damaged_keys']}/{out['n_keys']} keys damaged); "
              f"{out['seconds_per_dossier']:.1f} s per dossier")
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
