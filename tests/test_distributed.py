"""torchrun with the gloo backend on 2 CPU processes (issue 17, item 3): ``ffkv atlas mine`` and ``ffkv edit
stats`` shard the corpus by rank and combine exactly; a rank that dies is restarted and resumes its shard."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ffkv.cli import cli
from ffkv.errors import FfkvError
from ffkv.io import load_safetensors
from ffkv.edit import stats as stats_mod
from ffkv.edit.stats import accumulate_second_moments, accumulate_text_second_moments, layer_stats
from ffkv.memory.miner import DIE_ENV, mine, rank_state_path, state_path
from ffkv.models import distributed
from ffkv.models.loading import load_model
from ffkv.testbed.planted import WORDS

SRC = Path(__file__).resolve().parents[1] / "src"

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch has no torch.distributed with gloo")


def _text(path: Path, n_docs: int, seed: int) -> Path:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(WORDS[:30]) for _ in range(rng.randint(1, 7))]  # short ones repeat: dedup
            if rng.random() < 0.3:
                words += rng.choice([["tower", "paris"], ["castle", "london"], ["river", "rome"]])
            sents.append(" ".join(words) + " .")
        docs.append(" ".join(sents))
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="module")
def planted_dir(planted, tmp_path_factory):
    from ffkv.testbed.planted import save_planted

    return save_planted(planted, tmp_path_factory.mktemp("m") / "planted")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Five files (a sort window never spans two) and one long enough for two windows of its own: 6+ windows,
    dealt 0,2,4,.. to rank 0 and 1,3,.. to rank 1."""
    folder = tmp_path_factory.mktemp("corpus") / "c"
    folder.mkdir()
    for i in range(5):
        _text(folder / f"part-{i}.txt", 12 + 3 * i, seed=i)
    _text(folder / "part-9-long.txt", 700, seed=9)
    return folder


def _torchrun(args: list[str], env_extra: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "FFKV_PROGRESS": "0", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ffkv.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


MINE_OPTS = ["--top-k", "5", "--batch-tokens", "64", "--checkpoint-every", "1", "--threads", "1"]


def test_single_process_costs_nothing():
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert not torch.distributed.is_initialized()
    assert distributed.all_gather_bytes(b"ab") == [b"ab"]
    assert distributed.all_reduce_sum(torch.ones(2, dtype=torch.float32)).dtype == torch.float64
    assert distributed.local_device("cuda") == "cuda"  # no torchrun: the device as given


def test_torchrun_mine_equals_one_process_byte_for_byte_and_resumes(planted_dir, corpus, tmp_path):
    """Rank 1 dies hard after its 2nd checkpointed batch (torchrun stops the group); the same command again
    resumes every rank's shard from its own state, and rank 0 writes one atlas equal to one process's."""
    out = tmp_path / "atlas2"
    cmd = ["atlas", "mine", str(planted_dir), "--corpus", str(corpus), "--out", str(out), *MINE_OPTS]
    died = _torchrun(cmd, {DIE_ENV: "2@1"})
    assert died.returncode != 0 and "exitcode  : 17" in died.stderr, died.stderr[-3000:]
    assert load_safetensors(rank_state_path(out, 1, 2) / "state.safetensors")[1]["batches"] == 2  # its shard's state
    assert not out.exists()

    again = _torchrun([*cmd, "--json"])
    assert again.returncode == 0, again.stderr[-3000:]
    reported = json.loads(again.stdout)  # rank 0 alone reports
    assert reported["world_size"] == 2 and reported["status"] == "complete"
    assert not state_path(out).exists()

    one = tmp_path / "atlas1"
    res = CliRunner().invoke(cli, ["atlas", "mine", str(planted_dir), "--corpus", str(corpus), "--out", str(one),
                                   *MINE_OPTS], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    tables = sorted(p.relative_to(one) for p in one.rglob("*.parquet"))
    assert len(tables) == 3 and tables == sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    for rel in tables:  # triggers/layer-*.parquet and units.parquet
        assert (out / rel).read_bytes() == (one / rel).read_bytes(), rel
    m1, m2 = json.loads((one / "atlas.json").read_text()), json.loads((out / "atlas.json").read_text())
    assert (m1.pop("world_size"), m2.pop("world_size")) == (1, 2)
    assert m1 == m2  # units, tokens, batches: the ranks' together are the one process's
    assert json.loads((out / "run.json").read_text())["calls"] == 2  # the restarted rank resumed its state


def test_resume_with_another_number_of_processes_is_refused(planted, corpus, tmp_path):
    out = tmp_path / "a"
    rank_state_path(out, 0, 3).mkdir(parents=True)
    with pytest.raises(FfkvError, match="begun by 3 process"):
        mine(planted.model, corpus, out, top_k=3, progress=False)


def test_torchrun_stats_equal_one_process(planted_dir, corpus, tmp_path, monkeypatch):
    """``ffkv edit stats --texts`` (ROME/MEMIT's default sample; the token stream shards alike, see below) on 2
    ranks: C equals one process's to 1e-6 relative, the counts exactly; rank 0's file is then the cache that an
    edit in one process reads."""
    text = corpus / "part-9-long.txt"
    res = _torchrun(["edit", "stats", str(planted_dir), "--layers", "0-1", "--corpus", str(text), "--texts", "300",
                     "--stats-dir", str(tmp_path / "s2"), "--json", "--threads", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    reported = json.loads(res.stdout)["layers"]
    mm = load_model(str(planted_dir))
    kw = dict(n_tokens=None, n_texts=300)
    one = layer_stats(mm, [0, 1], corpus=text, stats_dir=tmp_path / "s1", progress=False, cache=False, **kw)
    for l in (0, 1):
        tensors, meta = load_safetensors(reported[str(l)]["path"])  # rank 0 wrote it
        assert meta["n_tokens"] == one[l].n_tokens == reported[str(l)]["n_tokens"] > 2000
        assert meta["n_texts"] == one[l].n_texts == reported[str(l)]["n_texts"] == 300
        C2, C1 = tensors["C"], one[l].C
        assert C2.dtype == torch.float64
        assert float((C2 - C1).abs().max() / C1.abs().max()) < 1e-6

    def no_pass(*a, **k):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(stats_mod, "accumulate_second_moments", no_pass)
    monkeypatch.setattr(stats_mod, "accumulate_text_second_moments", no_pass)
    cached = layer_stats(mm, [0, 1], corpus=text, stats_dir=tmp_path / "s2", progress=False, **kw)
    assert str(cached[1].path) == reported["1"]["path"]


def _moe():
    """A tiny random Qwen2-MoE (4 experts and a shared expert per layer) with the testbed's word tokenizer."""
    from transformers import AutoModelForCausalLM

    from ffkv.models.moe import MoEModel, tiny_moe_config
    from ffkv.testbed.planted import word_tokenizer

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_moe_config("qwen2_moe")).eval()
    return MoEModel.from_hf_checked(hf, word_tokenizer(), "tiny-qwen2_moe", True)


STATS_KEYS = [0, (1, 2)]  # a layer (the shared expert's keys) and an expert (its keys, at the tokens routed to it)


def _moe_rank_run(corpus: str, out: str, result: str):
    """What each rank runs (``python -m torch.distributed.run ... tests/test_distributed.py MOE ...``): mine the
    MoE model, and the token-stream statistics of a layer and of one expert; rank 0 saves the statistics."""
    torch.set_num_threads(1)
    model = _moe()
    meta = mine(model, corpus, out, top_k=4, batch_tokens=48, progress=False)
    stats = layer_stats(model, STATS_KEYS, corpus=corpus, n_tokens=1000, window=32, batch_size=4, cache=False,
                        progress=False)
    if distributed.is_main():
        torch.save({"world_size": meta["world_size"], **{str(k): (s.C, s.n_tokens) for k, s in stats.items()}},
                   result)
    distributed.close()


def test_torchrun_moe_atlas_and_expert_stats_equal_one_process(corpus, tmp_path):
    """Mixture of experts: every (layer, expert) table of 2 ranks equals one process's byte for byte; the
    token-stream statistics of a layer and of an expert (tokens routed to it, counted per rank) to 1e-6."""
    text = tmp_path / "c"  # the five short files: five sort windows
    text.mkdir()
    for f in sorted(corpus.glob("part-[0-4].txt")):
        (text / f.name).write_text(f.read_text())
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          __file__, "MOE", str(text), str(tmp_path / "a2"), str(tmp_path / "r.pt")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    torch.set_num_threads(1)
    model = _moe()
    mine(model, text, tmp_path / "a1", top_k=4, batch_tokens=48, progress=False)
    one = layer_stats(model, STATS_KEYS, corpus=text, n_tokens=1000, window=32, batch_size=4, cache=False,
                      progress=False)
    tables = sorted(p.relative_to(tmp_path / "a1") for p in (tmp_path / "a1").rglob("*.parquet"))
    assert len(tables) == 2 * 5 + 1  # per layer: the shared expert and 4 experts; units
    for rel in tables:
        assert (tmp_path / "a2" / rel).read_bytes() == (tmp_path / "a1" / rel).read_bytes(), rel
    got = torch.load(tmp_path / "r.pt")
    assert got["world_size"] == 2
    for k, s in one.items():
        C2, n2 = got[str(k)]
        assert n2 == s.n_tokens > 0
        assert float((C2 - s.C).abs().max() / s.C.abs().max()) < 1e-6


def test_sharded_accumulation_adds_up(planted):
    """The ranks' batches are the one process's batches dealt round-robin: the parts add up to the whole."""
    mm = planted.model
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(2, 40, (21, 16), generator=g)
    whole, n = accumulate_second_moments(mm, windows, [0, 1], batch_size=4, progress=False)
    parts = [accumulate_second_moments(mm, windows, [0, 1], batch_size=4, progress=False, shard=(r, 3))
             for r in range(3)]
    assert sum(p[1] for p in parts) == n == windows.numel()
    for l in (0, 1):
        torch.testing.assert_close(sum(p[0][l] for p in parts), whole[l], rtol=1e-12, atol=1e-12)
    seqs = [windows[i, : 3 + i % 11].tolist() for i in range(21)]
    whole, n = accumulate_text_second_moments(mm, seqs, [1], batch_tokens=40, progress=False)
    parts = [accumulate_text_second_moments(mm, seqs, [1], batch_tokens=40, progress=False, shard=(r, 2))
             for r in range(2)]
    assert parts[0][1] > 0 and parts[1][1] > 0 and parts[0][1] + parts[1][1] == n
    torch.testing.assert_close(parts[0][0][1] + parts[1][0][1], whole[1], rtol=1e-12, atol=1e-12)


if __name__ == "__main__" and sys.argv[1:2] == ["MOE"]:
    _moe_rank_run(*sys.argv[2:5])
