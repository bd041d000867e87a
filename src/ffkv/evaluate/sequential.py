"""Sequential editing stress test: edit after edit, watch the earlier edits and the rest of the model.

    res = sequential_edits(model, cases[:100], method="rome", probes=probe_pairs(cases[100:150]), every=10)
    res.curve          # one row per measurement: retention of all earlier edits, neighborhood, fluency
    res.collapse       # first step where each criterion failed, at "onset" and "collapse" thresholds

N edits are applied one after another (MEMIT: ``batch_size`` edits per step) without undoing any. After
every step the new edits' efficacy is read (cheap); every ``every`` edits, and after the last, the curve
gets a row:

    retention_ES   mean over all edits so far of ES = [P(new|p) > P(true|p)] on the rewrite prompt
    retention_PS   the same on their paraphrase prompts
    retention_reliability  EasyEdit reliability (top-1 token accuracy of target_new) of all edits so far
    efficacy_at_edit  mean ES of the same edits measured right after each was made
    edited_NS      ROME's NS on the neighborhood prompts of all edits so far
    probe_acc      top-1 token accuracy of the true answers of a fixed probe set of facts not edited
    GE             n-gram entropy of greedy generations from fixed prompts (ROME's fluency)
    ppl            perplexity of the probe sentences (prompt + true answer)

Collapse is the first measured step where retention_ES, probe_acc or GE falls below a fraction of its
reference (efficacy_at_edit for retention, so that a method that never made an edit stick does not count
as forgetting; the unedited model's value otherwise) or ppl rises above a multiple of the unedited value;
"onset" uses mild thresholds (10% loss), "collapse" severe ones (50% loss, 2x perplexity).
At the end the journals are undone in reverse order and the weights checked against the original.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..edit.registry import EditMethod, get_method
from ..errors import FfkvError
from ..io import atomic_path, provenance, write_json, write_parquet
from ..models.loading import weights_fingerprint
from .metrics import greedy_generate, ngram_entropy, perplexity, score_case_groups, score_continuations
from .run import Editor, hparams_record, make_editor, resolve_hparams


@dataclass(frozen=True)
class Thresholds:
    """When a curve counts as failed: fractions of the reference value (ppl: a multiple of it)."""

    retention: float
    probe: float
    fluency: float
    ppl: float


ONSET = Thresholds(retention=0.9, probe=0.9, fluency=0.9, ppl=1.1)
COLLAPSE = Thresholds(retention=0.5, probe=0.5, fluency=0.5, ppl=2.0)


def probe_pairs(cases: Sequence, neighbors: bool = False) -> list[tuple[str, str]]:
    """A fixed probe set from cases that will not be edited: ``(rewrite prompt, true answer)`` pairs
    (and their neighborhood pairs when ``neighbors``)."""
    pairs = [(c.rewrite_prompt, c.target_true) for c in cases if c.target_true is not None]
    if neighbors:
        pairs += [nb for c in cases for nb in c.neighborhood]
    return pairs


def retention_metrics(model, cases: Sequence, score_batch: int = 64) -> dict:
    """ES, PS, reliability and NS (ROME) of all ``cases`` with the model as it is (fractions)."""
    groups = score_case_groups(model, cases, score_batch)
    es, ps, rel, ns = [], [], [], []
    for g in groups:
        if g.get("rw_true"):
            es.append(np.mean([t.nll > n.nll for n, t in zip(g["rw_new"], g["rw_true"])]))
        if g.get("para_true"):
            ps.append(np.mean([t.nll > n.nll for n, t in zip(g["para_new"], g["para_true"])]))
        rel.append(np.mean([h for s in g["rw_new"] for h in s.hits]))
        if g.get("nb_true"):
            ns.append(np.mean([n.nll > t.nll for n, t in zip(g["nb_new"], g["nb_true"])]))
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {"ES": mean(es), "PS": mean(ps), "reliability": mean(rel), "NS": mean(ns)}


def model_health(model, probes: Sequence[tuple[str, str]], gen_prompts: Sequence[str], gen_tokens: int,
                 score_batch: int = 64) -> dict:
    """probe_acc, probe_nll (mean target NLL), ppl of the probe sentences, and GE of greedy generations."""
    out = {"probe_acc": float("nan"), "probe_nll": float("nan"), "ppl": float("nan"), "GE": float("nan")}
    if probes:
        s = score_continuations(model, probes, batch_size=score_batch)
        out["probe_acc"] = float(np.mean([x.accuracy for x in s]))
        out["probe_nll"] = float(np.mean([x.nll for x in s]))
        out["ppl"] = perplexity(model, [p + t for p, t in probes], batch_size=score_batch)
    if gen_prompts and gen_tokens > 0:
        out["GE"] = ngram_entropy(greedy_generate(model, list(gen_prompts), gen_tokens))
    return out


def detect_collapse(curve: list[dict], baseline: dict, th: Thresholds) -> dict:
    """First ``n_edits`` at which each criterion fails (None if never), and the earliest of them."""
    def first(pred):
        for row in curve:
            if row["n_edits"] > 0 and pred(row):
                return row["n_edits"]
        return None

    def below(key, frac):
        ref = baseline.get(key)
        if ref is None or (isinstance(ref, float) and math.isnan(ref)):
            return None
        return first(lambda r: not math.isnan(r[key]) and r[key] < frac * ref)

    out = {
        "retention_ES": first(lambda r: not math.isnan(r["retention_ES"])
                              and r["retention_ES"] < th.retention * r.get("efficacy_at_edit", 1.0)),
        "probe_acc": below("probe_acc", th.probe),
        "GE": below("GE", th.fluency),
        "ppl": None if math.isnan(baseline.get("ppl", float("nan"))) else
        first(lambda r: not math.isnan(r["ppl"]) and r["ppl"] > th.ppl * baseline["ppl"]),
    }
    steps = [v for v in out.values() if v is not None]
    out["first"] = min(steps) if steps else None
    out["thresholds"] = asdict(th)
    return out


@dataclass
class SequentialResult:
    curve: list[dict]  # one row per measurement (n_edits = 0 is the unedited model)
    steps: list[dict]  # one row per edit step: n_edits, latest_ES, edit_seconds
    baseline: dict
    collapse: dict  # {"onset": {...}, "collapse": {...}}
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        last = self.curve[-1] if self.curve else {}
        return {"method": self.meta.get("method"), "n_edits": last.get("n_edits"), "final": last,
                "baseline": self.baseline, "collapse": self.collapse, "curve": self.curve, **self.meta}

    def write(self, out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
        """``curve.parquet``, ``steps.parquet``, ``summary.json`` and ``curves.png`` under ``out_dir``."""
        out_dir = Path(out_dir)
        meta = {**self.meta, "collapse": self.collapse, "baseline": self.baseline}
        paths = {"curve": write_parquet(out_dir / "curve.parquet", _columns(self.curve), meta=meta),
                 "steps": write_parquet(out_dir / "steps.parquet", _columns(self.steps), meta=meta),
                 "summary": write_json(out_dir / "summary.json", self.to_json())}
        paths["figure"] = plot_curves({self.meta.get("method", "edits"): self}, out_dir / "curves.png", title=title)
        return paths


def _columns(rows: list[dict]) -> dict:
    keys = list(rows[0]) if rows else []
    return {k: [r.get(k) for r in rows] for k in keys}


def sequential_edits(model, cases: Sequence, method: str | EditMethod = "rome", hparams=None, stats_dir=None,
                     batch_size: int = 1, every: int = 10, probes: Sequence[tuple[str, str]] = (),
                     gen_prompts: Sequence[str] = (), gen_tokens: int = 20, editor: Editor | None = None,
                     score_batch: int = 64, undo: bool = True, progress: bool = True,
                     on_measure: Callable[["SequentialResult"], None] | None = None) -> SequentialResult:
    """Apply ``cases`` one step (``batch_size`` edits) after another and track the curve (module doc).

    every: measure after every ``every`` edits (rounded to whole steps) and after the last one.
    on_measure: called with the partial result after each measurement (to save progress of long runs).
    undo: undo all edits at the end (in reverse) and check the weights are the original ones.
    """
    if not cases:
        raise FfkvError("no cases to edit", "pass a non-empty edit-data file")
    if batch_size < 1 or every < 1:
        raise FfkvError("batch size and measurement interval must be at least 1", "pass positive values")
    m = get_method(method)
    if editor is None:
        hparams = resolve_hparams(model, m, hparams)
        editor = make_editor(m, hparams, stats_dir, shared_journal=True)
    method = m.name
    original = weights_fingerprint(model.hf)
    hp = hparams_record(hparams)
    meta = {"method": method, "batch_size": batch_size, "every": every, "n_cases": len(cases),
            "edited_case_ids": [c.case_id for c in cases], "distinct_subjects": len({c.subject for c in cases}),
            "n_probes": len(probes), "n_gen_prompts": len(gen_prompts), "gen_tokens": gen_tokens,
            "hparams": hp,
            "provenance": provenance(model.identity, method=method, batch_size=batch_size, every=every,
                                     hparams=hp, n_probes=len(probes), gen_tokens=gen_tokens)}
    t0 = time.perf_counter()
    base = model_health(model, probes, gen_prompts, gen_tokens, score_batch)
    base_ret = retention_metrics(model, cases, score_batch)  # pre-edit: how often new already beats true
    baseline = {**base, **{f"pre_{k}": v for k, v in base_ret.items()}}
    curve = [{"n_edits": 0, "retention_ES": float("nan"), "retention_PS": float("nan"),
              "retention_reliability": float("nan"), "efficacy_at_edit": float("nan"),
              "edited_NS": float("nan"), **base, "n_refused": 0, "seconds": 0.0}]
    steps: list[dict] = []
    journals = []
    result = SequentialResult(curve, steps, baseline, {}, meta)
    n_done, next_measure = 0, every
    bar = tqdm(total=len(cases), desc=f"sequential {method}", disable=not progress, unit="edit")
    try:
        for start in range(0, len(cases), batch_size):
            batch = list(cases[start:start + batch_size])
            t1 = time.perf_counter()
            try:
                journals.append(editor(model, batch))
                refused = None
            except FfkvError as e:  # refused: the model is unchanged, the edits count as failed
                refused = e.line()
            dt = time.perf_counter() - t1
            n_done += len(batch)
            latest = retention_metrics(model, batch, score_batch)
            steps.append({"n_edits": n_done, "latest_ES": latest["ES"], "latest_reliability": latest["reliability"],
                          "n_in_step": len(batch), "edit_seconds": dt, "refused": refused})
            bar.update(len(batch))
            if n_done >= next_measure or n_done == len(cases):
                next_measure = (n_done // every + 1) * every
                ret = retention_metrics(model, cases[:n_done], score_batch)
                health = model_health(model, probes, gen_prompts, gen_tokens, score_batch)
                at_edit = [s["latest_ES"] * s["n_in_step"] for s in steps if not math.isnan(s["latest_ES"])]
                curve.append({"n_edits": n_done, "retention_ES": ret["ES"], "retention_PS": ret["PS"],
                              "retention_reliability": ret["reliability"],
                              "efficacy_at_edit": sum(at_edit) / n_done if at_edit else float("nan"),
                              "edited_NS": ret["NS"], **health,
                              "n_refused": sum(s["n_in_step"] for s in steps if s["refused"]),
                              "seconds": time.perf_counter() - t0})
                result.collapse = {"onset": detect_collapse(curve, baseline, ONSET),
                                   "collapse": detect_collapse(curve, baseline, COLLAPSE)}
                if on_measure is not None:
                    on_measure(result)
    finally:
        bar.close()
        if undo:
            # A shared journal appears once per step: undo each distinct journal once, newest first.
            for j in reversed(list({id(j): j for j in journals}.values())):
                j.undo(model)
    if undo and weights_fingerprint(model.hf) != original:
        raise FfkvError("undoing the sequential edits did not restore the weights",
                        "this is a bug in the edit journal; please report it")
    result.collapse = {"onset": detect_collapse(curve, baseline, ONSET),
                       "collapse": detect_collapse(curve, baseline, COLLAPSE)}
    meta["seconds"] = time.perf_counter() - t0
    return result


def plot_curves(results: dict[str, SequentialResult], path: str | Path, title: str | None = None) -> Path:
    """One figure, four panels (retention, neighborhood, fluency, perplexity), a line per method; the
    collapse step ("first" at the severe thresholds) is marked with a dotted vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [("retention of earlier edits", [("retention_ES", "ES now", "-"), ("retention_PS", "PS now", "--"),
                                              ("efficacy_at_edit", "ES when made", ":")]),
              ("neighborhood / unedited facts", [("edited_NS", "NS (edited cases' neighbors)", "-"),
                                                 ("probe_acc", "probe top-1 acc", "--")]),
              ("fluency: generation entropy", [("GE", "GE", "-")]),
              ("perplexity of probe sentences", [("ppl", "ppl", "-")])]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, series) in zip(axes.flat, panels):
        for ci, (label, res) in enumerate(results.items()):
            xs = [r["n_edits"] for r in res.curve]
            for key, what, style in series:
                ys = [r.get(key, float("nan")) for r in res.curve]
                ax.plot(xs, ys, style, color=colors[ci % len(colors)], marker=".", label=f"{label}: {what}")
            c = (res.collapse.get("collapse") or {}).get("first")
            if c is not None:
                ax.axvline(c, color=colors[ci % len(colors)], linestyle=":", alpha=0.7)
        ax.set_title(name)
        ax.set_xlabel("number of edits")
        if len(results) == 1 or name.startswith("retention"):
            ax.legend(fontsize=7)
        ppl = [r.get("ppl", float("nan")) for res in results.values() for r in res.curve]
        ppl = [p for p in ppl if p == p and p > 0]
        if name.startswith("perplexity") and ppl and max(ppl) / min(ppl) > 20:
            ax.set_yscale("log")  # an exploding perplexity spans decades
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
