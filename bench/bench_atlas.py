"""Mining and the atlas analyses against a length-sorted forward pass over the same sentences, side by side.

    python bench/bench_atlas.py                                   # GPT-2 small from its config, WikiText-2 valid
    python bench/bench_atlas.py --sentences 3000 --composition-units 200 --out figures.json

On one thread, for the model (default: GPT-2 small built from ``GPT2Config()``, random weights, with the testbed's
tokenizer: ids below its vocabulary, which is all mining needs) and the first ``--sentences`` sentences of the
corpus (``ffkv.memory.corpus``, split "sentence", window 64):

    forward     model.hf(**batch) over the sentences sorted by length (globally) and packed into batches of
                --batch-tokens padded tokens: the plain forward pass, LM head included
    body        the same batches through the transformer body only (ffkv.models.engine.run, head="none")
    mine        ffkv.memory.mine() end to end (tokenizing, batching, top-k merge, checkpoints, Parquet)
    analyses    ffkv.memory.analyze() (values + agreement, patterns, removal, composition + refinement), each
                step timed, and the report (figures, index) on top

Ratios: mine / forward and mine / body; analyses / mine. Equality checks printed next to them:
    mining == brute force   the mined tables of the first --check-sentences sentences vs
                            ffkv.memory.oracle.brute_force_triggers (every coefficient kept, one sort per key)
    patterns == per key     the whole-layer pattern labels vs ffkv.memory.patterns.key_pattern key by key (the
                            implementation before vectorising, kept here as the reference; timed too) on
                            --reference-layers layers, and next tokens vs Atlas.next_token key by key
    analyses == direct      ffkv.memory.reference (the analyses as computed before the fast paths, timed too):
                            values.parquet's columns of --reference-layers layers vs reference_project_values
                            (bit for bit), composition + refinement on --reference-units sampled units vs
                            reference_composition (the whole result dict equal), the stored removal summary vs
                            reference_removal (largest relative difference: the same coefficients, read off
                            longer passes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FFKV_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_CORPUS = SHARED / "text" / "wikitext-2" / "valid.txt"


def load(model_arg: str, tokenizer_from: str | None, n_layer: int = 12):
    import torch

    import ffkv
    from ffkv.models.loading import from_hf

    if model_arg == "gpt2-config":
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer)).eval()
        return from_hf(hf, AutoTokenizer.from_pretrained(tokenizer_from), name_or_path="gpt2-config")
    return ffkv.load_model(model_arg)


def sorted_batches(model, units, batch_tokens: int, window: int):
    """Every unit, sorted by length over the whole corpus, packed and right-padded: the forward baseline."""
    from ffkv.memory.miner import batches, encode_units

    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(units, key=lambda u: (len(u.tokens), u.unit))
    return [encode_units(b, pad, model.device) for b in batches(iter(order), batch_tokens, window)]


CPU_SECONDS: dict = {}  # CPU time of the last timed call per label: one thread, so less moved by other jobs


def timed(fn, label: str | None = None):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if label is not None:
        CPU_SECONDS[label] = round(time.process_time() - c, 2)
    return time.perf_counter() - t, out


def check_mining(model, args, tmp: Path) -> dict:
    import numpy as np

    from ffkv.memory.atlas import Atlas
    from ffkv.memory.corpus import CorpusSpec, iter_units
    from ffkv.memory.miner import POSITION_BITS, mine
    from ffkv.memory.oracle import brute_force_triggers

    n = args.check_sentences
    mine(model, args.corpus, tmp / "check", top_k=args.k, batch_tokens=args.batch_tokens, max_units=n)
    a = Atlas(tmp / "check", model=model)
    units = list(iter_units(model.tokenizer, CorpusSpec(args.corpus, max_units=n)))
    ref = brute_force_triggers(model, units, top_k=args.k, batch_tokens=args.batch_tokens)
    equal = True
    for l in range(model.n_layers):
        for kind in ("top", "bottom"):
            tm = a.trigger_matrix(l, kind)
            g = np.where(tm["unit"] >= 0, (tm["unit"] << POSITION_BITS) + tm["position"], -1)
            equal &= bool((g == ref[l][kind]).all())
            equal &= bool(np.array_equal(tm["coef"], ref[l][kind + "_coef"].astype(np.float32)))
    return {"sentences": n, "prefixes": sum(len(u.tokens) for u in units), "equal": equal}


def check_patterns(atlas, layers: int) -> dict:
    from ffkv.memory.patterns import key_pattern, layer_patterns

    tok = atlas.model.tokenizer
    t_ref = t_vec = 0.0
    equal = True
    for l in range(min(layers, atlas.n_layers)):
        dt, got = timed(lambda: layer_patterns(atlas, l))
        t_vec += dt
        tm = atlas.trigger_matrix(l, "top")
        t = time.perf_counter()
        cache: dict = {}

        def decode(ids):
            key = tuple(ids)
            if key not in cache:
                cache[key] = tok.decode(list(ids))
            return cache[key]

        ref = []
        for i in range(atlas.d_ffn):
            prefixes = [atlas.prefix(u, p) for u, p in zip(tm["unit"][i], tm["position"][i]) if u >= 0]
            ref.append({"index": i, **key_pattern(prefixes, decode)})
        nxt = [atlas.next_token(u, p) if u >= 0 else -1 for u, p in zip(tm["unit"][:, 0], tm["position"][:, 0])]
        t_ref += time.perf_counter() - t
        equal &= got == ref and atlas.next_tokens(l).tolist() == nxt
    return {"layers": min(layers, atlas.n_layers), "equal": bool(equal), "seconds_vectorised": round(t_vec, 2),
            "seconds_per_key_reference": round(t_ref, 2)}


def check_analyses(atlas, args) -> dict:
    import numpy as np

    from ffkv.memory.analysis import corpus_spec_of
    from ffkv.memory.composition import composition_and_refinement, sample_units
    from ffkv.memory.reference import reference_composition, reference_project_values, reference_removal

    model = atlas.model
    vt = atlas.values_table().to_pydict()
    lay = np.asarray(vt["layer"])
    values_equal = True
    t_ref_values = 0.0
    for l in range(min(args.reference_layers, atlas.n_layers)):
        dt, ref = timed(lambda: reference_project_values(model, l, targets=atlas.next_tokens(l)))
        t_ref_values += dt
        rows = lay == l
        for col, key in (("top_ids", "top_ids"), ("top_p", "top_p"), ("bottom_ids", "bottom_ids"),
                         ("max_p", "max_p"), ("lse", "lse"), ("value_norm", "value_norm"),
                         ("trigger_next_rank", "target_rank")):
            got = np.asarray([vt[col][i] for i in np.nonzero(rows)[0]])
            values_equal &= bool(np.array_equal(got.astype(ref[key].dtype), ref[key]))
    units = sample_units(model, corpus_spec_of(atlas), n_units=args.reference_units, seed=0)
    t_new, new = timed(lambda: composition_and_refinement(model, units))
    t_ref, ref = timed(lambda: reference_composition(model, units))
    t_rem, rem = timed(lambda: reference_removal(atlas, keys_per_layer=args.removal_keys))
    stored = atlas.analysis("removal")
    worst = 0.0
    for a, b in zip(stored["layers"], rem["layers"]):
        for k, v in b.items():
            if isinstance(v, float):
                worst = max(worst, abs(a[k] - v) / max(abs(v), 1e-12))
    return {"values": {"layers": min(args.reference_layers, atlas.n_layers), "equal": values_equal,
                       "seconds_reference": round(t_ref_values, 2)},
            "composition": {"units": len(units), "prefixes": new["n_prefixes"], "equal": new == ref,
                            "seconds": round(t_new, 2), "seconds_reference": round(t_ref, 2)},
            "removal": {"max_relative_difference": worst, "seconds_reference": round(t_rem, 2)}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-config", help="model folder or gpt2-config")
    ap.add_argument("--n-layer", type=int, default=12, help="layers of gpt2-config (GPT-2 small: 12)")
    ap.add_argument("--tokenizer-from", default=None, help="tokenizer folder for gpt2-config (default: testbed)")
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--composition-units", type=int, default=200)
    ap.add_argument("--removal-keys", type=int, default=64)
    ap.add_argument("--check-sentences", type=int, default=150)
    ap.add_argument("--reference-layers", type=int, default=2)
    ap.add_argument("--reference-units", type=int, default=20, help="units of the composition equality check")
    ap.add_argument("--mining-only", action="store_true", help="skip the LM-head forward and the analyses")
    ap.add_argument("--skip-forward", action="store_true",
                    help="skip the LM-head forward only (the body pass stays the mining baseline)")
    ap.add_argument("--skip-baselines", action="store_true",
                    help="skip both forward baselines (LM-head forward and body): time mining and the analyses only")
    ap.add_argument("--skip-checks", action="store_true",
                    help="time only: no equality checks (mining vs brute force, patterns, analyses vs reference)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    import torch

    from ffkv.memory.analysis import analyze
    from ffkv.memory.atlas import Atlas
    from ffkv.memory.corpus import CorpusSpec, iter_units
    from ffkv.memory.miner import mine
    from ffkv.memory.report import write_report
    from ffkv.models.engine import run

    torch.set_num_threads(1)
    if args.model == "gpt2-config" and args.tokenizer_from is None:
        from ffkv.testbed.build import default_testbed

        args.tokenizer_from = str(default_testbed(build_if_missing=False) / "model")
    model = load(args.model, args.tokenizer_from, args.n_layer)
    units = list(iter_units(model.tokenizer, CorpusSpec(args.corpus, max_units=args.sentences)))
    n_tok = sum(len(u.tokens) for u in units)
    fb = sorted_batches(model, units, args.batch_tokens, 64)
    padded = sum(int(ids.numel()) for ids, _ in fb)
    import subprocess

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
           "model": args.model, "corpus": args.corpus, "composition_units": args.composition_units,
           "removal_keys": args.removal_keys, "n_layers": model.n_layers, "d_model": model.d_model, "d_ffn": model.d_ffn,
           "vocab": model.vocab_size, "sentences": len(units), "prefixes": n_tok,
           "forward_real_token_share": round(n_tok / padded, 4), "top_k": args.k, "threads": 1}
    print(json.dumps({"setup": res}), flush=True)
    with torch.no_grad():
        model.hf(input_ids=fb[0][0][:1], attention_mask=fb[0][1][:1])  # warm-up
        t_fwd = float("nan") if args.mining_only or args.skip_forward or args.skip_baselines else \
            timed(lambda: [model.hf(input_ids=i, attention_mask=m) for i, m in fb], "forward_sorted")[0]
        t_body = float("nan") if args.skip_baselines else \
            timed(lambda: [run(model, i, attention_mask=m, head="none") for i, m in fb], "body_sorted")[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t_mine, meta = timed(lambda: mine(model, args.corpus, tmp / "a", top_k=args.k, batch_tokens=args.batch_tokens,
                                          max_units=args.sentences), "mine")
        atlas = Atlas(tmp / "a", model=model)
        t_an, an = (float("nan"), {"seconds": {}}) if args.mining_only else \
            timed(lambda: analyze(atlas, composition_units=args.composition_units, removal_keys=args.removal_keys),
                  "analyses")
        t_rep = float("nan") if args.mining_only else timed(lambda: write_report(atlas))[0]
        res["seconds"] = {"forward_sorted": round(t_fwd, 2), "body_sorted": round(t_body, 2), "mine": round(t_mine, 2),
                          "analyses": round(t_an, 2), "report_after_analyses": round(t_rep, 2),
                          "analysis_steps": {k: round(v, 2) for k, v in an["seconds"].items()}}
        res["ratios"] = {"mine_vs_forward": round(t_mine / t_fwd, 3), "mine_vs_body": round(t_mine / t_body, 3),
                         "analyses_vs_mine": round(t_an / t_mine, 3),
                         "analyses_and_report_vs_mine": round((t_an + t_rep) / t_mine, 3)}
        res["cpu_seconds"] = dict(CPU_SECONDS)
        cpu = CPU_SECONDS
        res["cpu_ratios"] = {"mine_vs_body": round(cpu["mine"] / cpu["body_sorted"], 3) if "body_sorted" in cpu else None,
                             "analyses_vs_mine": round(cpu["analyses"] / cpu["mine"], 3) if "analyses" in cpu else None}
        res["mine_batches"] = meta["batches"]
        if not args.skip_checks:
            res["patterns_vs_per_key_reference"] = check_patterns(atlas, args.reference_layers)
            if not args.mining_only:
                res["analyses_vs_direct_reference"] = check_analyses(atlas, args)
            res["mining_vs_brute_force"] = check_mining(model, args, tmp)
    print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
