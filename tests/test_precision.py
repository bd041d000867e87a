"""Half precision: every capability on a bf16 model agrees with the float32 model within stated tolerances,
and (with a GPU) the same capabilities on CUDA agree with the CPU (docs/precision.md states the tolerances).

Two models, each loaded twice from one folder with ``load_model(path, dtype=...)``: the default testbed's
trained GPT-2 (6 x 128, d_ffn 512) and a planted-memory LLaMA (2 x 64, d_ffn 128, gated FFN, RMSNorm).
:func:`capabilities` runs causal tracing (exact and approximate), integrated gradients and knowledge neurons,
mining, the second-moment statistics, a ROME and a MEMIT edit (then undone) and explain on one model and
returns what they computed; the tests compare two such runs. Accumulations that must be float32 or wider
(statistics, IG sums, value optimisation, top-k buffers, journal deltas) are checked directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import ffkv
from ffkv.edit.api import apply_edits, target_probs
from ffkv.edit.compute_value import compute_targets
from ffkv.edit.hparams import default_hparams
from ffkv.edit.requests import EditRequest
from ffkv.edit.stats import layer_stats, token_windows
from ffkv.errors import FfkvError
from ffkv.locate.approx import approx_trace
from ffkv.locate.attribution import DEFAULT_TOL, completeness, integrated_gradients
from ffkv.locate.neurons import knowledge_neurons
from ffkv.locate.trace import causal_trace
from ffkv.memory.explain import explain
from ffkv.memory.miner import mine, trigger_file
from ffkv.models.engine import capture_coefficients
from ffkv.testbed import default_testbed
from ffkv.testbed.planted import WORDS, planted_model, save_planted

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

# Tolerances, bf16 model vs float32 model (probabilities are in [0, 1]; docs/precision.md)
TOL_BF16 = {"trace": 0.01, "approx": 0.03, "ig_rel": 0.05, "completeness": DEFAULT_TOL, "stats_rel": 0.02,
            "explain_rel": 0.02, "value": 0.05}
# CPU vs CUDA in the same dtype: float32 (TF32 off) is near-exact; bf16 differs by kernel rounding order
TOL_DEVICE = {torch.float32: {"trace": 1e-4, "approx": 1e-3, "ig_rel": 1e-3, "completeness": DEFAULT_TOL,
                              "stats_rel": 1e-4, "explain_rel": 1e-4, "value": 1e-3},
              torch.bfloat16: TOL_BF16}


# ------------------------------------------------------------------------------------------------ models


def _words(n: int, seed: int) -> list[str]:
    g = np.random.default_rng(seed)
    return [" ".join(g.choice(WORDS, size=int(g.integers(4, 9)))) for _ in range(n)]


def _testbed_case():
    tb = Path(default_testbed())
    facts = [json.loads(l) for l in open(tb / "data" / "facts.jsonl")][:60]
    texts = [t.format(f["subject"]) + " " + f["object"] + "." for f in facts for t in f["train_templates"][:2]]
    memit = [EditRequest("The native language of {} is", f["subject"], " French") for f in facts[6::6][:4]]
    return {"path": tb / "model", "prompt": "The native language of Quoux Kurte is", "subject": "Quoux Kurte",
            "answer": " Dutch", "other": " French", "texts": texts,
            "rome": EditRequest("The native language of {} is", "Quoux Kurte", " French"), "memit": memit}


def _planted_case(folder: Path):
    save_planted(planted_model(arch="llama"), folder)
    return {"path": folder, "prompt": "the old tower", "subject": "old tower", "answer": " paris",
            "other": " london", "texts": _words(120, 0),
            "rome": EditRequest("the old {}", "tower", " rome"),
            "memit": [EditRequest("a big {}", "castle", " paris"), EditRequest("the blue {}", "river", " london")],
            # the planted LLaMA's gated FFN outputs are ~30x larger (h ~ 6500): larger steps (as tests/test_edit.py)
            "hparams": {"v_lr": 200.0, "max_update_ratio": 1e4, "v_num_grad_steps": 10, "prefixes": [[4, 3]],
                        "stats_tokens": 3000},
            "rome_hparams": {"layer": 1}, "memit_hparams": {"layers": [1]},
            # its one layer's residual (~6500) enters an RMSNorm and the head (gain 25): MEMIT's delta, clamped
            # to 4 ||h||, does not reach the targets in 10 steps in either dtype, so only agreement is checked
            "memit_succeeds": False}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {"gpt2": _testbed_case(), "llama": _planted_case(tmp_path_factory.mktemp("planted") / "llama")}


# ------------------------------------------------------------------------------------------------ runs


def capabilities(case: dict, dtype: str, device: str, tmp: Path) -> dict:
    """Every capability on ``case``'s model loaded in ``dtype`` on ``device``; tensors come back on the CPU."""
    mm = ffkv.load_model(case["path"], dtype=dtype, device=device)
    P, S, A = case["prompt"], case["subject"], case["answer"]
    out: dict = {"dtype": mm.dtype}
    tr = causal_trace(mm, P, S, kind="hidden", answer=A, noise=0.1)
    out["trace"], out["trace_high"] = np.asarray(tr.scores), tr.high_score
    out["approx"] = np.asarray(approx_trace(mm, P, S, answer=A, noise=0.1).scores)
    attr = integrated_gradients(mm, P, A)
    out["ig"] = attr
    out["completeness"] = completeness(mm, P, A, attr)
    out["neurons"] = [(n.layer, n.index) for n in knowledge_neurons(mm, [P], A, check=False).neurons]
    # mining
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(case["texts"]) + "\n")
    mine(mm, str(corpus), tmp / f"atlas-{dtype}-{device}", top_k=5)
    out["atlas"] = {l: pq.read_table(tmp / f"atlas-{dtype}-{device}" / trigger_file(l)).to_pydict()
                    for l in range(mm.n_layers)}
    ids = mm.encode(case["texts"])
    coef = capture_coefficients(mm, ids["input_ids"].to(mm.device), ids["attention_mask"].to(mm.device),
                                list(range(mm.n_layers)))
    keep = ids["attention_mask"].reshape(-1).bool()
    out["coef"] = {l: coef[l].reshape(keep.numel(), -1)[keep.to(coef[l].device)].cpu() for l in coef}
    # statistics (not cached: each run computes its own)
    st = layer_stats(mm, [mm.n_layers - 1], corpus=case["texts"], n_tokens=4000, window=16, cache=False,
                     stats_dir=tmp / "stats", progress=False)[mm.n_layers - 1]
    out["C"], out["C_tokens"] = st.C, st.n_tokens
    # edits, undone bit for bit
    before = {k: v.detach().clone().cpu() for k, v in mm.hf.state_dict().items()}
    hp, sd = case.get("hparams", {}), tmp / f"st-{dtype}-{device}"
    j = apply_edits(mm, case["rome"], "rome", {**hp, **case.get("rome_hparams", {})}, stats_dir=sd,
                    corpus=case["texts"], progress=False)
    out["rome_prob"] = target_probs(mm, case["rome"])[0]
    j = apply_edits(mm, case["memit"], "memit", {**hp, **case.get("memit_hparams", {})}, stats_dir=sd,
                    corpus=case["texts"], journal=j, progress=False)
    out["memit_probs"] = target_probs(mm, case["memit"])
    out["memit_succeeds"] = case.get("memit_succeeds", True)
    out["memit_opt_probs"] = [t["target_prob"] for t in j.entries[1].info["targets"]]  # MEMIT's first layer
    out["journal_dtypes"] = {e.u.dtype for e in j.entries} | {e.v.dtype for e in j.entries}
    out["rome_info"] = j.entries[0].info
    j.undo(mm)
    after = mm.hf.state_dict()
    out["undo_exact"] = all(torch.equal(before[k], after[k].cpu()) for k in before)
    out["param_dtypes"] = {v.dtype for v in after.values() if v.is_floating_point()}
    try:
        out["explain"] = explain(mm, P, [A, case["other"]]).check
    except FfkvError as e:
        out["explain"] = e
    return out


@pytest.fixture(scope="module")
def runs(cases, tmp_path_factory):
    memo = {}

    def get(name: str, dtype: str, device: str = "cpu") -> dict:
        if (name, dtype, device) not in memo:
            memo[name, dtype, device] = capabilities(cases[name], dtype, device,
                                                     tmp_path_factory.mktemp(f"{name}-{dtype}-{device}"))
        return memo[name, dtype, device]

    return get


def assert_agree(a: dict, b: dict, tol: dict, what: str):
    """The results of two capability runs agree within ``tol`` (see the tolerance tables above)."""
    assert np.abs(a["trace"] - b["trace"]).max() <= tol["trace"], what
    assert abs(a["trace_high"] - b["trace_high"]) <= tol["trace"], what
    assert np.nanmax(np.abs(a["approx"] - b["approx"])) <= tol["approx"], what
    scale = float(a["ig"].abs().max())
    assert float((a["ig"] - b["ig"]).abs().max()) <= tol["ig_rel"] * scale, what
    for c in (a["completeness"], b["completeness"]):  # each run's IG sums to its own F(m) - F(0)
        F = max(abs(r["exact"]) for r in c)
        assert max(abs(r["error"]) for r in c) <= tol["completeness"] * F + 1e-6, (what, c)
    top = set(a["neurons"][:3])
    assert top <= set(b["neurons"]) and set(b["neurons"][:3]) <= set(a["neurons"]), what
    rel = float((a["C"] - b["C"]).norm() / a["C"].norm())
    assert rel <= tol["stats_rel"], (what, rel)
    assert a["C_tokens"] == b["C_tokens"]
    for r in (a, b):
        assert r["undo_exact"], what
        assert r["rome_prob"] > 0.5, (what, r["rome_prob"])
        if r["memit_succeeds"]:
            assert min(r["memit_probs"]) > 0.5, (what, r["memit_probs"])
    # the value optimisation (float32 delta, float32 loss) ends at nearly the same target probabilities
    assert np.abs(np.subtract(a["memit_opt_probs"], b["memit_opt_probs"])).max() <= tol["value"], what
    _atlases_agree(a, b, what)


def _atlases_agree(a: dict, b: dict, what: str):
    """Trigger tables of two runs over the same corpus: each key's r-th largest (smallest) coefficient moves by
    at most the largest change of any one coefficient between the runs (order statistics are 1-Lipschitz in
    the max norm), whatever the ties do to which trigger holds rank r. The change is measured on one batched
    capture; the miner's batches are shaped otherwise, which moves a half-precision value by an ulp or two,
    hence a slack of 4 ulp of the narrower dtype at the largest coefficient."""
    eps = max(torch.finfo(a["dtype"]).eps, torch.finfo(b["dtype"]).eps)
    for l in a["atlas"]:
        top = float(a["coef"][l].float().abs().max())
        bound = float((a["coef"][l].float() - b["coef"][l].float()).abs().max()) + 4 * eps * top + 1e-6
        ta, tb = a["atlas"][l], b["atlas"][l]
        assert ta["index"] == tb["index"] and ta["rank"] == tb["rank"] and ta["kind"] == tb["kind"], what
        assert np.abs(np.asarray(ta["coef"]) - np.asarray(tb["coef"])).max() <= bound, (what, l)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name,dtype", [("gpt2", "bfloat16"), ("llama", "bfloat16"), ("llama", "float16")])
def test_half_agrees_with_float32(runs, name, dtype):
    """fp16 (10 mantissa bits) is held to bf16's (7 bits) tolerances; GPT-2 runs it only in bf16 (time)."""
    f32, half = runs(name, "float32"), runs(name, dtype)
    assert half["dtype"] == getattr(torch, dtype) and half["param_dtypes"] == {getattr(torch, dtype)}
    assert_agree(f32, half, TOL_BF16, f"{name} {dtype} vs float32")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_bf16_accumulates_in_float32(runs, name):
    """What must be float32 or wider in a bf16 model is: IG attributions, C (float64, equal to a float64 sum of
    the bf16 coefficients to float32 rounding, far below bf16's 2^-8), the journal's u and v, the top-k
    buffers (trigger coefficients are the model's bf16 values exactly, as float32)."""
    b16 = runs(name, "bfloat16")
    assert b16["ig"].dtype == torch.float32
    assert b16["C"].dtype == torch.float64
    assert b16["journal_dtypes"] == {torch.float32}
    assert b16["rome_info"]["target_prob"] > 0.5
    for l, t in b16["atlas"].items():
        c = np.asarray(t["coef"], dtype=np.float32)
        assert np.array_equal(torch.tensor(c).bfloat16().float().numpy(), c), l  # bf16 values, no rounding
        # ties (frequent in bf16) go to the earlier trigger: (unit, position) ascending within equal values
        idx, kind, rank = (np.asarray(t[k]) for k in ("index", "kind", "rank"))
        gid = np.asarray(t["unit"], dtype=np.int64) * 2 ** 20 + np.asarray(t["position"])
        same = (idx[1:] == idx[:-1]) & (kind[1:] == kind[:-1]) & (rank[1:] == rank[:-1] + 1) & (c[1:] == c[:-1])
        assert (gid[1:][same] > gid[:-1][same]).all(), l


def test_bf16_statistics_are_a_wide_sum(cases, tmp_path):
    """layer_stats on a bf16 model equals Σ k k^T / N of its bf16 coefficients summed in float64 (to 1e-5);
    a sum in bf16 would be off by ~1e-2."""
    case = cases["gpt2"]
    mm = ffkv.load_model(case["path"], dtype="bfloat16")
    l = 2
    st = layer_stats(mm, [l], corpus=case["texts"], n_tokens=2000, window=16, cache=False, progress=False)[l]
    win = token_windows(mm, case["texts"], 2000, 16)
    k = capture_coefficients(mm, win, layers=[l])[l].reshape(-1, mm.d_ffn).double()
    ref = k.T @ k / k.shape[0]
    assert st.n_tokens == k.shape[0]
    assert float((st.C - ref).norm() / ref.norm()) <= 1e-5


def test_bf16_value_optimisation_is_float32(cases):
    """δ, h and the loss of ROME's value optimisation are float32 on a bf16 model, and they follow the float32
    model's to bf16 tolerance (same steps, final target probability within 0.05)."""
    case = cases["llama"]
    out = {}
    for dtype in ("float32", "bfloat16"):
        mm = ffkv.load_model(case["path"], dtype=dtype)
        hp = {**default_hparams(mm, "rome"), **case["hparams"], "layer": 1}
        out[dtype] = compute_targets(mm, [case["rome"]], "ffn_out", 1, hp, [""])
    t16, t32 = out["bfloat16"], out["float32"]
    assert t16.delta.dtype == t16.h.dtype == torch.float32 and t16.nll.dtype == torch.float32
    assert torch.equal(t16.steps, t32.steps)
    assert abs(float(t16.target_prob[0]) - float(t32.target_prob[0])) <= TOL_BF16["value"]
    assert float((t16.h - t32.h).norm() / t32.h.norm()) <= 0.02


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_bf16_explain_sums_to_logits(runs, name):
    b16 = runs(name, "bfloat16")
    if isinstance(b16["explain"], Exception):
        raise b16["explain"]
    check = b16["explain"]
    scale = max(abs(v) for v in check["actual"].values())
    assert check["error"] <= TOL_BF16["explain_rel"] * max(scale, 1.0)


def test_float32_explain_sums_to_logits(runs):
    check = runs("gpt2", "float32")["explain"]
    assert not isinstance(check, Exception) and check["error"] <= 1e-4


# ------------------------------------------------------------------------------------------------ CPU vs GPU


@pytest.mark.skipif(not CUDA, reason="no CUDA device: the CPU-vs-GPU parity test runs where a GPU is present")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cuda_agrees_with_cpu(runs, name, dtype):
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    try:
        gpu = runs(name, dtype, "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    cpu = runs(name, dtype)
    assert_agree(cpu, gpu, TOL_DEVICE[getattr(torch, dtype)], f"{name} {dtype} cuda vs cpu")


# ------------------------------------------------------------------------------------------------ benchmark


def test_bench_gpu_smoke(tmp_path):
    """bench/bench_gpu.py --smoke runs every capability of the GPU benchmark on tiny shapes and writes its JSON."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    caps = {row["capability"] for s in res["results"].values() for row in s["rows"]}
    for want in ("forward", "mining", "statistics", "trace hidden", "approx trace", "neurons", "ROME edit",
                 "MEMIT batch"):
        assert any(c.startswith(want) for c in caps), (want, caps)
    assert set(res["results"]) == {"tiny-gpt2", "tiny-llama"}
    assert all(row["seconds"] > 0 for s in res["results"].values() for row in s["rows"])
