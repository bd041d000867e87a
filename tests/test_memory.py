"""The key-value atlas on models with planted memories: mining, values, agreement, sub-updates, queries."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ffkv.errors import FfkvError
from ffkv.io import load_safetensors
from ffkv.memory import corpus as corpus_mod
from ffkv.memory.atlas import Atlas, parse_memory
from ffkv.memory.merge import merge_atlases
from ffkv.memory import miner as miner_mod
from ffkv.memory.miner import POSITION_BITS, batch_coefficients, mine, state_path
from ffkv.memory.oracle import brute_force_triggers
from ffkv.memory.topk import TriggerBuffers, merge_topk
from ffkv.testbed.planted import WORDS


def _planted_text(path, n_docs=40, seed=0, facts=True):
    """Random word sentences; with ``facts``, some sentences state the planted facts ("... tower paris")."""
    rng = random.Random(seed)
    plain = [w for w in WORDS if w not in ("tower", "castle", "river", "paris", "london", "rome")]
    lines = []
    for d in range(n_docs):
        sents = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(plain) for _ in range(rng.randint(2, 8))]
            if facts and rng.random() < 0.3:
                trig, targ = rng.choice([("tower", "paris"), ("castle", "london"), ("river", "rome")])
                words += [trig, targ]
            sents.append(" ".join(words) + " .")
        lines += [" ".join(sents), ""]
    path.write_text("\n".join(lines))
    return path


# L1.30/L1.31 (river) never fire in the planted model: the layer-0 river memories already write the fact
# into the residual, and the layer-1 norm shrinks the trigger channel below the key's bias.
FIRING = {"tower": [(1, 5)], "castle": [(0, 7)], "river": [(0, 20), (0, 21)]}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return _planted_text(tmp_path_factory.mktemp("corpus") / "planted.txt")


@pytest.fixture(scope="module")
def planted_atlas(planted, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas") / "a"
    mine(planted.model, corpus_file, out, top_k=8, batch_tokens=96, progress=False)
    return Atlas(out, model=planted.model)


def _dense(atlas, layer, kind):
    tm = atlas.trigger_matrix(layer, kind)
    g = np.where(tm["unit"] >= 0, (tm["unit"] << POSITION_BITS) + tm["position"], -1)
    return g, tm["coef"]


# ------------------------------------------------------------------------------------------- top-k merge
@pytest.mark.parametrize("sparse_share", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("negate", [False, True])
def test_merge_topk_is_exact_with_ties(sparse_share, negate):
    """Quantized values (many ties, -0.0, NaN) merged batch by batch == one full sort by (value, id)."""
    g = torch.Generator().manual_seed(1)
    R, k = 7, 5
    chunks = [torch.randint(-3, 4, (n, R), generator=g).float() / 2 for n in (3, 9, 1, 12, 6, 20)]
    chunks[1][0, 0], chunks[2][0, 1] = -0.0, float("nan")
    buf_v = torch.full((R, k), float("-inf"))
    buf_g = torch.full((R, k), -1, dtype=torch.long)
    start = 0
    for c in chunks:
        ids = torch.arange(start, start + c.shape[0])
        buf_v, buf_g = merge_topk(buf_v, buf_g, c, ids, k, negate=negate, sparse_share=sparse_share)
        start += c.shape[0]
    allv = torch.cat(chunks).numpy()
    allv = np.where(np.isnan(allv), -np.inf if not negate else np.inf, allv) + 0.0
    ids = np.arange(allv.shape[0])
    for r in range(R):
        v = -allv[:, r] if negate else allv[:, r]
        order = np.lexsort((ids, -v))[:k]
        assert buf_g[r].tolist() == ids[order].tolist()
        assert np.allclose(buf_v[r].numpy(), v[order])


@pytest.mark.parametrize("sparse_share", [0.05, 1.0])
@pytest.mark.parametrize("negate", [False, True])
def test_merge_topk_block_search_is_exact_with_nans_and_a_first_batch(sparse_share, negate):
    """Batches of many rows (the block-maximum search, and its k-th-block bound on the first batch), NaN inside
    blocks next to real candidates, ties and ragged block tails == one full sort by (value, id)."""
    g = torch.Generator().manual_seed(3)
    R, k = 6, 4
    # few ties (values to 2 decimals), so that few blocks reach a key's bound and the block path is taken
    chunks = [(torch.randn(n, R, generator=g) * 100).round() / 100 for n in (203, 64, 17, 130)]
    for c in chunks:
        nan = torch.rand(c.shape, generator=g) < 0.05
        c[nan] = float("nan")
    chunks[0][8:16, 2] = float("nan")  # a whole block of one key is NaN
    chunks[0][0, 3] = float("nan")  # NaN is the block's extreme ...
    chunks[0][1, 3] = -100.0 if negate else 100.0  # ... beside the key's best value
    buf_v = torch.full((R, k), float("-inf"))
    buf_g = torch.full((R, k), -1, dtype=torch.long)
    start = 0
    for c in chunks:
        ids = torch.arange(start, start + c.shape[0])
        buf_v, buf_g = merge_topk(buf_v, buf_g, c, ids, k, negate=negate, sparse_share=sparse_share)
        start += c.shape[0]
    allv = torch.cat(chunks).numpy()
    allv = np.where(np.isnan(allv), -np.inf if not negate else np.inf, allv) + 0.0
    ids = np.arange(allv.shape[0])
    for r in range(R):
        v = -allv[:, r] if negate else allv[:, r]
        order = np.lexsort((ids, -v))[:k]
        assert buf_g[r].tolist() == ids[order].tolist()
        assert np.array_equal(buf_v[r].numpy(), v[order])
    assert buf_g[3, 0].item() == 1


@pytest.mark.parametrize("sparse_share", [0.0, 1.0])
@pytest.mark.parametrize("negate", [False, True])
def test_merge_topk_window_mode_is_order_free(sparse_share, negate):
    """Batches of a sort window in any order (ties everywhere, as ReLU zeros) == one full sort by (value, g)."""
    g = torch.Generator().manual_seed(2)
    R, k, stride = 6, 4, 8
    windows = []
    for w in range(3):  # units 10w..10w+9, positions < stride
        gids = torch.tensor([(u << POSITION_BITS) + t for u in range(10 * w, 10 * w + 10) for t in range(stride)])
        vals = torch.randint(-2, 3, (gids.numel(), R), generator=g).float()
        perm = torch.randperm(gids.numel(), generator=g)
        windows.append((10 * w, [(gids[p].sort().values, vals[p][gids[p].sort().indices])
                                 for p in perm.split(13)]))
    buf_v = torch.full((R, k), float("-inf"))
    buf_g = torch.full((R, k), -1, dtype=torch.long)
    all_g, all_v = [], []
    for u0, chunks in windows:
        for ids, v in chunks:
            buf_v, buf_g = merge_topk(buf_v, buf_g, v, ids, k, negate=negate, sparse_share=sparse_share,
                                      window=(u0, stride))
            all_g.append(ids), all_v.append(v)
    G, V = torch.cat(all_g).numpy(), torch.cat(all_v).numpy()
    for r in range(R):
        v = -V[:, r] if negate else V[:, r]
        order = np.lexsort((G, -v))[:k]
        assert buf_g[r].tolist() == G[order].tolist()
        assert np.array_equal(buf_v[r].numpy(), v[order] + 0.0)


# ------------------------------------------------------------------------------------------- mining
def test_coefficients_match_the_coef_site_for_every_family(tiny_models):
    """Mining's reader returns exactly what ``intervene(reads=[("coef", l)])`` records, for every adapter."""
    from ffkv.models.hooks import intervene

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    for mt, m in tiny_models.items():
        coefs, gids = batch_coefficients(m, ids, mask, torch.tensor([0, 1, 2]))
        with intervene(m, reads=[("coef", l) for l in range(m.n_layers)]) as rec:
            m.hf(input_ids=ids, attention_mask=mask)
        sel = mask.reshape(-1).bool()
        for l in range(m.n_layers):
            assert torch.equal(coefs[l], rec["coef", l].reshape(-1, m.d_ffn)[sel]), mt
        assert gids.tolist()[:8] == [0, 1, 2, 3, 4, 5, 6, 1 << POSITION_BITS]
        buf = TriggerBuffers(m.n_layers, m.d_ffn, 2)
        for l, c in enumerate(coefs):
            buf.update(c, gids, layer=l)
        top = torch.cat(coefs, 1).max(0)
        assert torch.equal(buf.top_v[:, 0], top.values), mt
        assert torch.equal(buf.top_g[:, 0], gids[top.indices]), mt


@pytest.mark.parametrize("dedup", [True, False])
def test_mining_equals_brute_force(planted, planted_atlas, corpus_file, dedup, tmp_path):
    spec = corpus_mod.CorpusSpec(str(corpus_file))
    units = list(corpus_mod.iter_units(planted.model.tokenizer, spec))
    ref = brute_force_triggers(planted.model, units, top_k=8, batch_tokens=96, dedup=dedup)
    if not dedup:
        mine(planted.model, corpus_file, tmp_path / "nd", top_k=8, batch_tokens=96, progress=False, dedup=False)
        planted_atlas = Atlas(tmp_path / "nd", model=planted.model)
    for layer in range(planted.model.n_layers):
        for kind in ("top", "bottom"):
            g, c = _dense(planted_atlas, layer, kind)
            assert (g == ref[layer][kind]).all()
            assert np.array_equal(c, ref[layer][kind + "_coef"].astype(np.float32))
    assert planted_atlas.meta["tokens"] == sum(len(u.tokens) for u in units)
    # Single-token prefixes ("the", "a", ...) repeat in this corpus: with dedup each appears once per key.
    for layer in range(planted.model.n_layers):
        tm = planted_atlas.trigger_matrix(layer, "bottom")
        prefixes = [tuple(planted_atlas.prefix(u, p)) for u, p in zip(tm["unit"][3], tm["position"][3])]
        assert (len(set(prefixes)) == len(prefixes)) or not dedup


def _files(folder):
    """Every file of an atlas folder but run.json (the one file with times in it), as bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "run.json"}


def test_interrupted_run_resumes_to_the_same_atlas(planted, corpus_file, tmp_path):
    opts = dict(top_k=8, batch_tokens=96, progress=False)
    mine(planted.model, corpus_file, tmp_path / "whole", **opts)
    out = tmp_path / "resumed"
    first = mine(planted.model, corpus_file, out, max_batches=3, checkpoint_every=2, **opts)
    # nothing at the target until the atlas is whole; the resumable state waits beside it
    assert first["status"] == "partial" and not out.exists() and state_path(out).is_dir()
    with pytest.raises(FfkvError, match="not an atlas folder"):
        Atlas(out)
    second = mine(planted.model, corpus_file, out, max_batches=2, **opts)
    assert second["tokens"] > first["tokens"]
    mine(planted.model, corpus_file, out, **opts)
    whole = _files(tmp_path / "whole")
    assert {"atlas.json", "units.parquet", "triggers/layer-000.parquet"} <= set(whole)
    assert _files(out) == whole  # byte-identical, times only in run.json
    assert json.loads((out / "run.json").read_text())["calls"] == 3
    assert not state_path(out).exists()
    # A finished atlas is returned as it is; a different top_k is refused.
    assert mine(planted.model, corpus_file, out, **opts)["status"] == "complete"
    with pytest.raises(FfkvError, match="different top_k"):
        mine(planted.model, corpus_file, out, top_k=4, progress=False)


def test_many_sort_windows_resume_to_brute_force(planted, corpus_file, tmp_path, monkeypatch):
    """Small sort windows (many windows, each sorted by length), resumed mid-window, equal the reference."""
    monkeypatch.setattr(miner_mod, "SORT_WINDOW_BATCHES", 2)
    opts = dict(top_k=5, batch_tokens=40, progress=False)
    out = tmp_path / "w"
    n = 0
    while mine(planted.model, corpus_file, out, max_batches=3, checkpoint_every=1, **opts)["status"] != "complete":
        n += 1
    assert n > 3
    units = list(corpus_mod.iter_units(planted.model.tokenizer, corpus_mod.CorpusSpec(str(corpus_file))))
    ref = brute_force_triggers(planted.model, units, top_k=5, batch_tokens=40, dedup=True)
    a = Atlas(out, model=planted.model)
    for layer in range(planted.model.n_layers):
        for kind in ("top", "bottom"):
            g, c = _dense(a, layer, kind)
            assert (g == ref[layer][kind]).all()
            assert np.array_equal(c, ref[layer][kind + "_coef"].astype(np.float32))
    # in corpus order (batches padded to their longest unit) the ids agree and the values to rounding
    cons = brute_force_triggers(planted.model, units, top_k=5, batch_tokens=40, dedup=True, batching="consecutive")
    g, c = _dense(a, 1, "top")
    assert (g == cons[1]["top"]).mean() > 0.95 and np.allclose(c, cons[1]["top_coef"], atol=1e-5)


def test_killed_between_shard_and_state_resumes_exactly(planted, corpus_file, tmp_path, monkeypatch):
    """A crash after the units shard is written but before the buffers: the orphan shard is dropped."""
    from ffkv.memory import miner as mining

    out = tmp_path / "killed"
    real = mining.save_safetensors
    calls = {"n": 0}

    def crash_at_second_shard(path, tensors, meta=None):
        if len(list(state_path(out).glob("units-*.parquet"))) == 2:
            raise KeyboardInterrupt("killed")
        return real(path, tensors, meta=meta)

    monkeypatch.setattr(mining, "SORT_WINDOW_BATCHES", 1)  # small windows: a units shard at most checkpoints
    monkeypatch.setattr(mining, "save_safetensors", crash_at_second_shard)
    with pytest.raises(KeyboardInterrupt):
        mine(planted.model, corpus_file, out, top_k=8, batch_tokens=96, progress=False, checkpoint_every=1)
    monkeypatch.setattr(mining, "save_safetensors", real)
    committed = load_safetensors(state_path(out) / "state.safetensors")[1]["shards"]
    assert len(committed) == 1 and len(list(state_path(out).glob("units-*.parquet"))) == 2  # one not committed
    assert not out.exists()
    mine(planted.model, corpus_file, out, top_k=8, batch_tokens=96, progress=False)
    mine(planted.model, corpus_file, tmp_path / "whole", top_k=8, batch_tokens=96, progress=False)
    assert _files(out) == _files(tmp_path / "whole")


def test_merged_shards_equal_one_run(planted, tmp_path):

    folder = tmp_path / "corpus"
    folder.mkdir()
    _planted_text(folder / "a.txt", n_docs=15, seed=1)
    _planted_text(folder / "b.txt", n_docs=15, seed=2)
    opts = dict(top_k=6, batch_tokens=128, progress=False)
    mine(planted.model, folder, tmp_path / "whole", **opts)
    mine(planted.model, folder / "a.txt", tmp_path / "pa", **opts)
    mine(planted.model, folder / "b.txt", tmp_path / "pb", **opts)
    meta = merge_atlases([tmp_path / "pa", tmp_path / "pb"], tmp_path / "merged")
    whole = Atlas(tmp_path / "whole", model=planted.model)
    assert meta["units"] == whole.meta["units"] and meta["tokens"] == whole.meta["tokens"]
    for layer in range(planted.model.n_layers):
        a = pq.read_table(tmp_path / "whole" / "triggers" / f"layer-{layer:03d}.parquet")
        b = pq.read_table(tmp_path / "merged" / "triggers" / f"layer-{layer:03d}.parquet")
        assert a.to_pydict() == b.to_pydict()
    merged = Atlas(tmp_path / "merged", model=planted.model)
    assert merged.memory_triggers(1, 5) == whole.memory_triggers(1, 5)
    with pytest.raises(FfkvError, match="at least two"):
        merge_atlases([tmp_path / "pa"], tmp_path / "m2")


def test_mining_finds_planted_triggers_first(planted, planted_atlas, corpus_file):
    text = corpus_file.read_text().split()
    for fact in planted.facts:
        n_occ = text.count(fact.trigger)
        assert n_occ >= 3
        for layer, index in FIRING[fact.trigger]:
            trig = planted_atlas.memory_triggers(layer, index)
            assert len(trig) == 8
            last = [t["last_token"] for t in trig]
            assert last[: min(8, n_occ)] == [fact.trigger] * min(8, n_occ), (fact.trigger, last)
            assert fact.trigger not in last[n_occ:]
            best = planted_atlas.trigger_matrix(layer, "top")["coef"][:, 0]
            assert trig[0]["coef"] > 5 * np.median(np.abs(best))


def test_gated_model_mining_finds_planted_triggers(planted_llama, corpus_file, tmp_path):
    mine(planted_llama.model, corpus_file, tmp_path / "g", top_k=4, progress=False)
    atlas = Atlas(tmp_path / "g", model=planted_llama.model)
    fact = planted_llama.fact("tower")
    (layer, index), = fact.memories
    assert [t["last_token"] for t in atlas.memory_triggers(layer, index)] == ["tower"] * 4
    bottom = atlas.memory_triggers(layer, index, "bottom")
    assert all(t["coef"] <= trig["coef"] for t in bottom for trig in atlas.memory_triggers(layer, index))


# ------------------------------------------------------------------------------------------- values
def test_value_projection_ranks_planted_token_first(planted):
    from ffkv.memory.values import project_values

    for fact in planted.facts:
        for layer, index in fact.memories:
            pv = project_values(planted.model, layer, top_n=3, chunk=16)
            assert pv["top_ids"][index, 0] == fact.target_id
            assert pv["max_p"][index] > 0.5
            assert pv["max_p"][index] == pytest.approx(pv["top_p"][index, 0])
    with_norm = project_values(planted.model, 1, norm=True, top_n=3)
    assert with_norm["top_ids"][5, 0] == planted.fact("tower").target_id


def test_agreement_counts_planted_memories(planted_atlas, planted):
    from ffkv.memory.analysis import analyze

    res = analyze(planted_atlas, steps=("values",), progress=False)
    vt = pq.read_table(planted_atlas.path / "values.parquet").to_pydict()
    d = planted.model.d_ffn
    for fact in planted.facts:
        for layer, index in FIRING[fact.trigger]:
            row = layer * d + index
            assert vt["layer"][row] == layer and vt["index"][row] == index
            assert vt["agrees"][row], fact
            assert vt["trigger_next_rank"][row] == 0
    for rec in res["values"]["layers"]:
        rows = [i for i in range(len(vt["layer"])) if vt["layer"][i] == rec["layer"] and vt["trigger_next_id"][i] >= 0]
        assert rec["agreement"] == pytest.approx(np.mean([vt["agrees"][i] for i in rows]))
        assert rec["n_keys"] == len(rows)
        assert 0 <= rec["random"] < 1
    assert sum(res["values"]["top100_max_p_histogram"]) == 100
    stored = json.loads((planted_atlas.path / "analysis" / "values.json").read_text())
    assert stored["model"]["fingerprint"] == planted.model.identity["fingerprint"]


def test_agreement_baseline_is_a_permutation():
    from ffkv.memory.values import agreement

    top1 = np.arange(100)
    res = agreement(top1, top1.copy(), n_random=50)
    assert res["rate"] == 1.0 and res["random"] < 0.05
    assert agreement(top1, np.full(100, -1))["n"] == 0


# ------------------------------------------------------------------------------------------- patterns
def test_planted_keys_are_shallow(planted_atlas, planted):
    from ffkv.memory.patterns import layer_patterns, removal_effects

    pats = layer_patterns(planted_atlas, 1)
    assert pats[5]["label"] == "shallow" and pats[5]["last_token"] == "tower" and pats[5]["last_share"] == 1.0
    assert pats[5]["ngram"] >= 1
    rem = removal_effects(planted_atlas, keys_per_layer=64, seed=0)
    assert [l["n"] > 0 for l in rem["layers"]] == [True, True]


def test_key_pattern_labels():
    from ffkv.memory.patterns import key_pattern

    dec = lambda ids: " ".join(map(str, ids))  # noqa: E731
    shallow = key_pattern([[1, 2, 9], [3, 2, 9], [4, 2, 9], [5, 6]], dec)
    assert shallow["label"] == "shallow" and shallow["ngram"] == 2 and shallow["pattern"] == "2 9"
    words = {1: "the", 2: "ocean", 3: "ship", 4: "sailed", 5: "wave", 6: "storm"}
    sem = key_pattern([[2, 3], [3, 4], [5, 2, 6], [3, 1]], lambda ids: " ".join(words[i] for i in ids))
    assert sem["label"] == "semantic" and ("ship", 0.75) in sem["topic"]


# ------------------------------------------------------------------------------------------- section 5
def test_composition_and_refinement(planted, corpus_file):
    from ffkv.memory.composition import composition_and_refinement, sample_units

    units = sample_units(planted.model, corpus_mod.CorpusSpec(str(corpus_file)), n_units=20)
    res = composition_and_refinement(planted.model, units)
    assert res["n_prefixes"] == sum(len(u.tokens) for u in units)
    for c, r in zip(res["composition"], res["refinement"]):
        assert c["rule"] == "positive"  # GELU: active iff the pre-activation is positive
        assert 0 < c["active_share"] < 1
        assert 0 <= c["zero_agreement"] <= 1
        assert sum(r[k] for k in ("residual", "ffn", "agreement", "composition")) == pytest.approx(1)
    # The last layer's output is the model's output.
    last = res["refinement"][-1]
    assert last["residual"] + last["agreement"] + last["ffn"] + last["composition"] == pytest.approx(1)


def test_composition_rules_for_gated_and_threshold(planted_llama, corpus_file):
    from ffkv.memory.composition import activation_rule, composition_and_refinement, sample_units

    m = planted_llama.model
    assert activation_rule(m, 0) == "gate"
    units = sample_units(m, corpus_mod.CorpusSpec(str(corpus_file)), n_units=8)
    gate = composition_and_refinement(m, units)
    huge = composition_and_refinement(m, units, active_threshold=1e9)
    assert all(0 < c["active_share"] < 1 for c in gate["composition"])
    assert all(c["active_share"] == 0 and c["no_active"] == 1 for c in huge["composition"])


# ------------------------------------------------------------------------------------------- sub-updates
def test_sub_updates_and_switches(planted):
    from ffkv.memory.subupdates import generate_with_memories, sub_updates, switch_effect

    m, fact = planted.model, planted.fact("tower")
    res = sub_updates(m, "the old tower", top_n=3)
    top = res["layers"][1]["sub_updates"][0]
    assert top["memory"] == "L1.5" and top["promotes"][0] == "paris"
    assert res["prediction"][0]["token"] == "paris"
    scores = [s["score"] for s in res["layers"][1]["sub_updates"]]
    assert scores == sorted(scores, reverse=True)
    off = switch_effect(m, "the old tower", off=[(1, 5)])
    assert off["after"][0]["token"] != "paris" and off["kl"] > 1
    assert off["decreased"][0]["token"] == "paris"
    on = switch_effect(m, "the old house", on=[(1, 5, 20.0)], positions=[2])
    assert on["after"][0]["token"] == "paris" and on["before"][0]["token"] != "paris"
    untouched = switch_effect(m, "the old house", on=[(1, 5, 20.0)], positions=[0])
    assert untouched["after"][0]["token"] != "paris"  # forced at another position only
    gen = generate_with_memories(m, "the old tower", off=[(1, 5)], max_new_tokens=3)
    assert gen["before"].split()[0] == "paris" and gen["after"].split()[0] != "paris"
    with pytest.raises(FfkvError, match="out of range"):
        switch_effect(m, "the old tower", off=[(1, 10_000)])
    with pytest.raises(FfkvError, match="out of range"):
        sub_updates(m, "the old tower", position=7)


# ------------------------------------------------------------------------------------------- queries
def test_queries(planted_atlas, planted):
    from ffkv.memory.queries import describe_memory
    from ffkv.memory.values import nearest_values, promotes

    m = planted.model
    assert promotes(m, "paris", n=3)[0]["memory"] == "L1.5"
    rome = {r["memory"] for r in promotes(m, "rome", n=4)}
    assert rome == {"L0.20", "L0.21", "L1.30", "L1.31"}
    near = nearest_values(m, m.values(0)[:, 20].detach(), n=4)
    assert {r["memory"] for r in near} == rome and near[0]["cosine"] == pytest.approx(1, abs=1e-5)
    info = describe_memory(planted_atlas, 0, 7, n=3)
    assert info["value_top_tokens"][0] == "london" and info["agrees"]
    assert [t["last_token"] for t in info["triggers"]] == ["castle"] * 3
    assert parse_memory("L3.17") == (3, 17) and parse_memory("3.17") == (3, 17)
    for bad in ("x", "3"):
        with pytest.raises(FfkvError):
            parse_memory(bad)
    with pytest.raises(FfkvError, match="out of range"):
        planted_atlas.check_memory(2, 0)
    with pytest.raises(FfkvError, match="out of range"):
        planted_atlas.check_memory(0, 128)
    with pytest.raises(FfkvError, match="not in the vocabulary"):
        promotes(m, "zeppelin")
    with pytest.raises(FfkvError, match="dimensions"):
        nearest_values(m, torch.zeros(3))


# ------------------------------------------------------------------------------------------- report
def test_report(planted_atlas):
    from ffkv.memory.report import write_report

    path = write_report(planted_atlas, progress=False, composition_units=10, removal_keys=8)
    html = open(path).read()
    for fig in ("patterns", "agreement", "active", "zero_agreement", "refinement", "top100"):
        assert (planted_atlas.path / "figures" / f"{fig}.png").stat().st_size > 1000
        assert f"figures/{fig}.png" in html
    assert "Sampled memories" in html and "raw measurements" in html
    for name in ("values", "patterns", "removal", "composition"):
        assert (planted_atlas.path / "analysis" / f"{name}.json").exists()


# ------------------------------------------------------------------------------------------- one corpus reader
def test_one_corpus_reader_for_atlas_and_statistics(planted, corpus_file, tmp_path):
    """``--corpus`` is parsed by one function for ``ffkv atlas mine`` and the statistics of ``ffkv edit``."""
    from ffkv.edit.stats import resolve_corpus

    m = planted.model
    name, texts = resolve_corpus(m, str(corpus_file))
    assert name == corpus_file.name
    assert texts == [t for _, t in corpus_mod.documents(corpus_mod.corpus_files(corpus_file))]
    source = corpus_mod.open_corpus(str(corpus_file), m)
    assert source.spec == str(corpus_file.resolve()) and source.fingerprint == corpus_mod.corpus_fingerprint(
        corpus_mod.corpus_files(corpus_file))
    (tmp_path / "d.raw").write_text("the old\ncastle .\n\nthe new bridge\n")
    assert resolve_corpus(m, tmp_path / "d.raw")[1] == ["the old castle .", "the new bridge"]
    listed = corpus_mod.open_corpus(["a b", " ", "c"])
    assert listed.texts_list() == ["a b", "c"] and listed.name == "texts"
    with pytest.raises(FfkvError, match="not a testbed model"):
        corpus_mod.open_corpus("testbed", m)
    with pytest.raises(FfkvError, match="does not exist"):
        resolve_corpus(m, tmp_path / "missing.txt")
    with pytest.raises(FfkvError, match="empty"):
        corpus_mod.open_corpus([])


@pytest.mark.shared_data
def test_named_corpora_resolve_alike(planted, shared_data):
    m = planted.model
    auto, wiki = corpus_mod.open_corpus("auto", m), corpus_mod.open_corpus("wikitext")
    assert auto == wiki and auto.name == "wikitext-2" and auto.spec == "wikitext"
    assert {f.name for f in wiki.files} <= {"train.txt", "valid.txt", "test.txt"} and wiki.files


def test_the_testbed_world_is_a_corpus_for_both(testbed_model):
    from ffkv.edit.stats import resolve_corpus, testbed_world_of

    world = testbed_world_of(testbed_model)
    auto = corpus_mod.open_corpus("auto", testbed_model)
    assert auto.name == f"testbed-{world.seed}-{world.preset}" and auto.texts_list() == world.documents()
    assert corpus_mod.open_corpus(auto.spec) == auto  # what an atlas records resolves again without the model
    assert resolve_corpus(testbed_model, "testbed") == (auto.name, auto.texts_list())


@pytest.mark.parametrize("threshold, topic_share", [(0.5, 0.3), (0.2, 0.1)])
def test_vectorised_patterns_equal_the_per_key_rule(planted_atlas, planted, threshold, topic_share):
    """The whole-layer pattern labels (no loop over keys) == key_pattern applied key by key."""
    from ffkv.memory.patterns import key_pattern, layer_patterns

    tok = planted.model.tokenizer
    a = planted_atlas
    for layer in range(a.n_layers):
        got = layer_patterns(a, layer, threshold=threshold, topic_share=topic_share)
        tm = a.trigger_matrix(layer, "top")
        for i in range(a.d_ffn):
            prefixes = [a.prefix(u, p) for u, p in zip(tm["unit"][i], tm["position"][i]) if u >= 0]
            assert got[i] == {"index": i, **key_pattern(prefixes, lambda ids: tok.decode(list(ids)), threshold,
                                                        topic_share)}, (layer, i)
        ref = [a.next_token(u, p) if u >= 0 else -1 for u, p in zip(tm["unit"][:, 0], tm["position"][:, 0])]
        assert a.next_tokens(layer).tolist() == ref
    assert any(g["topic"] for g in got) and any(g["label"] == "shallow" for g in got)
