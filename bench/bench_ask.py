"""Retrieval against recall on a testbed: accuracy by frequency bucket for three routes of ``ffkv ask``.

    weights     the model answers from its weights
    retrieval   the top-k BM25 passages of the world index are placed before the question
    auto        the recall verdict decides per query (ffkv.recall.verdict.judge)

Queries are held-out paraphrases; never-seen subjects (bucket 0) are invented (ffkv.recall.data.unseen_facts)
and stated in the index like every other fact, so only retrieval can know them. An answer is correct when its
first token is the object's first token (the model's answer rule). Prints one JSON object (with provenance) and
a table; ``--out`` writes the JSON.

    python bench/bench_ask.py --per-bucket 20 --out docs/figures/recall_ask.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

import ffkv
from ffkv.io import provenance, write_json
from ffkv.progress import track
from ffkv.recall.ask import ask
from ffkv.recall.data import load_testbed_facts, stratified_facts, unseen_facts
from ffkv.recall.index import build_index, open_index, world_passages
from ffkv.testbed import default_testbed
from ffkv.testbed.buckets import BUCKET_NAMES, bucket_of

ROUTES = ("weights", "retrieval", "auto")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", type=Path, default=None)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the testbed's model/)")
    ap.add_argument("--per-bucket", type=int, default=20)
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tb = args.testbed or Path(default_testbed())
    mm = ffkv.load_model(args.model or tb / "model")
    facts, cands = load_testbed_facts(tb)
    chosen = [f for f in stratified_facts(facts, args.per_bucket, args.seed) if f["train_count"] > 0]
    chosen += unseen_facts(facts, cands, args.per_bucket, args.seed)
    tmp = Path(tempfile.mkdtemp())
    db = build_index(world_passages(facts + [f for f in chosen if f["train_count"] == 0]), tmp / "world.sqlite")
    rng = random.Random(args.seed)
    rows = []
    t0 = time.time()
    with open_index(db) as ix:
        for f in track(chosen, desc="ask", unit="query", enabled=True):
            q = rng.choice(f["heldout_templates"]).format(f["subject"])
            target = mm.answer_id(f["object"])
            row = {"bucket": bucket_of(f["train_count"]), "object": f["object"], "question": q}
            for route in ROUTES:
                a = ask(mm, q, ix, route=route, k=args.k, subject=f["subject"])
                ok = bool(a.answer) and mm.answer_id(a.answer) == target
                row[route] = ok
                if route == "auto":
                    row["routed_to"] = a.route
                if route == "retrieval":
                    row["retrieved_fact"] = any(p.text.startswith(f["subject"]) or f["subject"] in p.text
                                                and f["object"] in p.text for p in a.passages)
            rows.append(row)
    table = {}
    for b in BUCKET_NAMES:
        rs = [r for r in rows if r["bucket"] == b]
        if rs:
            table[b] = {r_: sum(x[r_] for x in rs) / len(rs) for r_ in ROUTES}
            table[b]["retrieval_share"] = sum(x["routed_to"] == "retrieval" for x in rs) / len(rs)
            table[b]["fact_retrieved"] = sum(x["retrieved_fact"] for x in rs) / len(rs)
            table[b]["n"] = len(rs)
    out = {"table": table, "seconds": round(time.time() - t0, 1),
           "provenance": provenance(mm.identity, testbed=str(tb), per_bucket=args.per_bucket, k=args.k,
                                    seed=args.seed, routes=list(ROUTES))}
    print(f"{'bucket':>7} {'n':>3} " + " ".join(f"{r:>9}" for r in ROUTES) + "  to-retrieval  fact-in-top-k")
    for b, v in table.items():
        print(f"{b:>7} {v['n']:>3} " + " ".join(f"{v[r]:9.2f}" for r in ROUTES)
              + f"  {v['retrieval_share']:12.2f}  {v['fact_retrieved']:13.2f}")
    if args.out:
        write_json(args.out, out)
    json.dump(out["table"], sys.stdout)
    print()


if __name__ == "__main__":
    main()
