"""A fact's dossier: every view ffkv has of one fact ``prompt -> answer``, joined in one report.

Each section is computed by the one owner of its method; this module only chooses the inputs and joins the
results (nothing here re-derives a trace, an attribution or a strength):

    tracing      :func:`ffkv.locate.trace.causal_trace` (kind ``mlp``, window 1: one layer per cell) on every
                 paraphrase: the peak (token, layer) of the indirect effect, the peak token's role (last subject
                 token, other subject token, last token, other) and the agreement across paraphrases
                 ``agreement = |{p : peak_layer(p) = mode}| / |P|`` (also for the token role).
    memories     knowledge neurons shared by the paraphrases (:func:`ffkv.locate.neurons.knowledge_neurons`) and
                 the top sub-updates of the prompt that promote the answer
                 (:func:`ffkv.memory.subupdates.sub_updates`, each read through the vocabulary:
                 ``promotion_i = m_i (E v_i)[a]``, :func:`ffkv.memory.values.value_logits`); a sub-update
                 *carries* the fact when its promotion is at least :data:`CARRIER_SHARE` of the largest.
    subspace     the carrying memories: the knowledge neurons and the carrying sub-updates; the span of their values ``V = [v_i]`` (d_model, k): its rank and the share of
                 the answer's unembedding row inside it, ``||P_V u_a|| / ||u_a||``; and the ablation test: the
                 memories switched off (``m_i := 0``, :func:`ffkv.locate.interventions.memories_off`) at the
                 prediction position (``ablate_positions="last"``, where they were found; or ``"all"``) on each
                 paraphrase, on the control facts, and for random layer-matched
                 memories (:func:`ffkv.locate.interventions.random_matched`). A prompt counts as *removed* when
                 the answer is no longer the top-1 token or P(answer) falls below half of its intact value.
    storage      :func:`ffkv.recall.strength.storage_strength` (strength, survival, redundancy k_50, margin).
    verdict      :func:`ffkv.recall.verdict.query_signals` and the shipped :class:`ffkv.recall.verdict
                 .VerdictModel`: "recall" or "retrieve" (the greedy answer's signals, as ``ffkv recall``).
    edit_safety  the spill-over a rank-one update at the traced layer l* would make (ROME's update
                 ``ΔW = r (C^-1 k*)^T / (k*^T C^-1 k*)`` with ``r = v* - W k*``): on another stored key k_j the
                 layer's output moves by ``ΔW k_j = s_j r`` with

                     s_j = (C^-1 k*)^T k_j / (k*^T C^-1 k*)           (s* = 1 on the edited key itself)

                 C = E[k k^T] from :func:`ffkv.edit.stats.layer_stats`, k* and k_j the coefficients at the
                 subject's last token (:func:`ffkv.edit.compute_key.compute_keys`, no context prefixes). The
                 known keys are the control facts' and (on a testbed) other facts' keys; a key is *moved* when
                 ``|s_j| >= move_threshold``. ``||C^-1 k*||`` is reported too. This is ffkv's own measure
                 (``ffkv.edit.interference`` did not exist when it was written).

The claims the report makes (``claims``) are booleans a ground truth can check; bench/bench_dossier.py checks
them on the testbed and docs/dossier.md gives how often each is right.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .. import validate
from ..edit.compute_key import compute_keys
from ..edit.requests import EditRequest
from ..edit.stats import layer_stats
from ..errors import FfkvError
from ..io import provenance
from ..locate.interventions import memories_off, random_matched, variant_probs
from ..locate.neurons import MAX_NEURONS, knowledge_neurons
from ..locate.trace import causal_trace, noise_level
from ..memory.subupdates import sub_updates
from ..memory.values import value_logits, write_values
from ..models.memory_id import MemoryId
from ..models.model import MemoryModel
from ..progress import bar
from ..recall.strength import storage_strength
from ..recall.verdict import DEFAULT_WEIGHTS, VerdictModel, query_signals
from ..testbed.datasets import load_facts

SECTIONS = ("fact", "tracing", "memories", "subspace", "storage", "verdict", "edit_safety", "claims")
# A prompt's fact is "removed" by an ablation when P(answer) falls below this fraction of its intact value (or the
# top-1 token stops being the answer).
REMOVED_BELOW = 0.5
# The ablation "removes the fact" when it removes it on at least this share of the paraphrases, and "spares other
# facts" when it removes at most this share of the control facts.
REMOVES_SHARE = 0.5
SPARES_SHARE = 0.2
# A promoting sub-update carries the fact (joins the ablated set) when its promotion is at least this share of the
# largest one's: the long tail of faint promoters is in every prompt's update.
CARRIER_SHARE = 0.1
# Where the ablation switches the carrying memories off: "last" (the prediction position, where the knowledge
# neurons and the sub-updates are read; Dai et al.'s suppression) or "all" (every position).
ABLATE_POSITIONS = ("last", "all")
# A rank-one update moves a known key when |s_j| >= this (a tenth of the edit's own change lands on it).
MOVE_THRESHOLD = 0.1
# The edit is predicted "safe" when it moves at most this share of the known keys.
SAFE_SHARE = 0.05


# ----------------------------------------------------------------------------------------------- inputs
def testbed_facts_of(model: MemoryModel) -> list[dict] | None:
    """The facts of the testbed the model was loaded from (``<testbed>/model`` beside ``<testbed>/data``), else
    None."""
    p = Path(str(model.name_or_path))
    data = p.parent / "data" / "facts.jsonl"
    if p.name == "model" and data.exists():
        return load_facts(data)[0]
    return None


def find_fact(facts: list[dict] | None, subject: str, answer: str, prompt: str) -> dict | None:
    """The testbed fact of ``subject`` whose object is ``answer`` (else whose templates render ``prompt``)."""
    if not facts:
        return None
    mine = [f for f in facts if f["subject"] == subject]
    for f in mine:
        if f["object"].strip().lower() == answer.strip().lower():
            return f
    for f in mine:
        if any(t.format(subject) == prompt for t in f["train_templates"] + f["heldout_templates"]):
            return f
    return None


def parse_control(text: str) -> tuple[str, str, str | None]:
    """``"PROMPT|ANSWER"`` or ``"PROMPT|ANSWER|SUBJECT"`` -> (prompt, answer, subject or None)."""
    parts = [p.strip() for p in str(text).split("|")]
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise FfkvError(f"control fact {text!r} is not PROMPT|ANSWER[|SUBJECT]",
                        "write e.g. --control 'The Louvre is in|Paris|The Louvre'")
    return parts[0], parts[1], (parts[2] if len(parts) == 3 and parts[2] else None)


def _check_fact(model: MemoryModel, prompt: str, subject: str, answer: str, what: str):
    if not str(prompt or "").strip():
        raise FfkvError(f"{what} is empty", "pass the fact's prompt, e.g. --prompt 'Ana Boll was born in'")
    if not str(answer or "").strip():
        raise FfkvError("the answer is empty", "pass the fact's answer, e.g. --answer Paris")
    if subject is not None:
        if not str(subject).strip():
            raise FfkvError("the subject is empty", "pass the subject as written in the prompt")
        if subject not in prompt:
            raise FfkvError(f"subject {subject!r} does not occur in {what} {prompt!r}",
                            "spell the subject exactly as it appears in every prompt")
    model.encode(prompt)  # empty / too long: the model's own one-line refusal


# ----------------------------------------------------------------------------------------------- sections
def _role(t: int, subject_range: tuple[int, int], n_tokens: int) -> str:
    s, e = subject_range
    if t == e - 1:
        return "subject_last"
    if s <= t < e:
        return "subject"
    if t == n_tokens - 1:
        return "last"
    return "other"


def _agreement(values: list) -> tuple[object, float]:
    mode, n = Counter(values).most_common(1)[0]
    return mode, n / len(values)


def tracing_section(model, paraphrases, subject, answer_id, noise, samples, seed, window) -> dict:
    """Causal traces (kind mlp) of every paraphrase: peaks, roles, agreement, the traced layer."""
    rows, last_subject = [], []
    for p in paraphrases:
        r = causal_trace(model, p, subject, kind="mlp", answer=answer_id, noise=noise, samples=samples,
                         window=window, seed=seed)
        t, l = r.peak()
        ie = r.indirect_effects
        s, e = r.subject_range
        last_subject.append(ie[e - 1])
        rows.append({"prompt": p, "peak_token": t, "peak_token_text": r.tokens[t],
                     "peak_role": _role(t, r.subject_range, len(r.tokens)), "peak_layer": l,
                     "peak_effect": float(ie[t, l]), "total_effect": float(r.total_effect),
                     "p_clean": float(r.high_score), "p_corrupted": float(r.low_score),
                     "subject_range": [s, e]})
    layer, layer_agree = _agreement([r["peak_layer"] for r in rows])
    role, role_agree = _agreement([r["peak_role"] for r in rows])
    mean_last = np.mean(np.stack(last_subject), 0)
    return {"kind": "mlp", "window": window, "samples": samples, "noise": noise, "paraphrases": rows,
            "layer": int(layer), "layer_agreement": layer_agree, "token_role": role,
            "token_role_agreement": role_agree,
            "mean_effect_at_subject_last": [float(x) for x in mean_last],
            "consensus_layer_at_subject_last": int(np.argmax(mean_last))}


def memories_section(model, prompt, paraphrases, answer_id, kn_options, top_sub_updates, per_layer) -> dict:
    """Knowledge neurons shared across the paraphrases, and the prompt's top sub-updates promoting the answer."""
    kn = knowledge_neurons(model, paraphrases, answer_id, check=False, **kn_options)
    su = sub_updates(model, prompt, top_n=per_layer, value_top=10)
    answer_text = model.decode([answer_id])
    promoting = []
    for layer in su["layers"]:
        rows = layer["sub_updates"]
        if not rows:
            continue
        idx = [r["index"] for r in rows]
        ua = value_logits(model, layer["layer"], idx)[:, answer_id]  # (n,) (E v_i)[a]
        for r, u in zip(rows, ua.tolist()):
            promotion = r["coef"] * u
            if promotion > 0:
                promoting.append({"memory": r["memory"], "layer": r["layer"], "index": r["index"],
                                  "coef": r["coef"], "value_norm": r["value_norm"], "score": r["score"],
                                  "promotion": promotion, "answer_in_top_tokens": answer_text in r["promotes"],
                                  "promotes": r["promotes"][:5]})
    promoting.sort(key=lambda r: -r["promotion"])
    top = promoting[0]["promotion"] if promoting else 0.0
    for r in promoting:
        r["carrier"] = r["promotion"] >= CARRIER_SHARE * top
    return {"knowledge_neurons": [{"memory": str(n.memory), "layer": n.layer, "index": n.index,
                                   "attribution": n.attribution} for n in kn.neurons],
            "per_paraphrase_neurons": [len(ns) for ns in kn.per_prompt],
            "kn_options": {"threshold": kn.threshold, "share": kn.share, "steps": kn.steps, "method": kn.method},
            "sub_updates": promoting[:top_sub_updates],
            "prediction": su["prediction"][:3]}


def _carrying(memories: dict) -> list[MemoryId]:
    seen, out = set(), []
    for r in memories["knowledge_neurons"] + [r for r in memories["sub_updates"] if r["carrier"]]:
        key = (r["layer"], r["index"])
        if key not in seen:
            seen.add(key)
            out.append(MemoryId(r["layer"], r["index"]))
    return out


def _removed(p0: float, p1: float, top1: int, answer_id: int) -> bool:
    return bool(top1 != answer_id or p1 < REMOVED_BELOW * p0)


def _ablate(model, prompt, answer_id, memory_sets, positions: str) -> list[dict]:
    """P(answer) of ``prompt`` intact and with each memory set switched off (at the last position or everywhere)."""
    at = None if positions == "all" else [model.encode(prompt)["input_ids"].shape[1] - 1]
    p, top = variant_probs(model, prompt, answer_id, [[]] + [memories_off(ms, at) for ms in memory_sets])
    return [{"p_before": float(p[0]), "p_after": float(p[k]), "top_after": int(top[k]),
             "was_top": bool(int(top[0]) == answer_id),
             "removed": _removed(float(p[0]), float(p[k]), int(top[k]), answer_id)} for k in range(1, len(p))]


def subspace_section(model, carrying, paraphrases, answer_id, controls, random_trials, seed,
                     positions: str = "last") -> dict:
    """The span of the carrying memories' values and what switching them off does (module docstring)."""
    if positions not in ABLATE_POSITIONS:
        raise FfkvError(f"unknown ablation positions {positions!r}", f"use one of {', '.join(ABLATE_POSITIONS)}")
    if not carrying:
        return {"memories": [], "rank": 0, "answer_in_span": 0.0, "paraphrases": [], "controls": [],
                "removed_share": 0.0, "control_removed_share": 0.0, "random_removed_share": 0.0,
                "positions": positions}
    V = torch.stack([write_values(model, m.layer)[:, m.index].detach().float() for m in carrying], 1)  # (d_model, k)
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    rank = int((S > S.max() * 1e-6).sum()) if S.numel() else 0
    u_a = model.unembedding.weight[answer_id].detach().float()
    Q = U[:, :rank]
    in_span = float((Q.T @ u_a).norm() / u_a.norm().clamp_min(1e-12))
    randoms = [[MemoryId(l, i) for l, i in random_matched(model, [(m.layer, m.index) for m in carrying], seed + k)]
               for k in range(random_trials)]
    para, rand = [], []
    for p in paraphrases:
        res = _ablate(model, p, answer_id, [carrying] + randoms, positions)
        para.append({"prompt": p, **res[0]})
        rand += [r["removed"] for r in res[1:]]
    ctrl = []
    for c in controls:
        cid = model.answer_id(c["answer"])
        ctrl.append({"prompt": c["prompt"], "answer": c["answer"],
                     **_ablate(model, c["prompt"], cid, [carrying], positions)[0]})
    share = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    return {"memories": [str(m) for m in carrying], "rank": rank, "singular_values": [float(s) for s in S],
            "answer_in_span": in_span, "positions": positions, "paraphrases": para, "controls": ctrl,
            "removed_share": share([r["removed"] for r in para]),
            # a control the model does not answer has no fact to remove: the share is over the answered ones
            "control_removed_share": share([r["removed"] for r in ctrl if r["was_top"]]),
            "n_controls_answered": sum(r["was_top"] for r in ctrl),
            "random_removed_share": share(rand), "random_trials": random_trials}


def _keys(model, layer, facts: list[dict]) -> torch.Tensor:
    """k at ``layer`` at the subject's last token (the prompt's last token when a fact has no subject), (n, d_ffn)."""
    reqs = []
    for f in facts:
        subj = f.get("subject")
        if not subj or subj not in f["prompt"]:
            # no subject: the key of the prompt's last word, read as a one-word subject
            words = f["prompt"].rsplit(None, 1)
            subj = words[-1]
        reqs.append(EditRequest(f["prompt"], subj, target=" x"))
    return compute_keys(model, reqs, layer, [""])


def edit_safety_section(model, layer, prompt, subject, known: list[dict], corpus, stats_tokens, stats_dir,
                        move_threshold, progress) -> dict:
    """The spill-over s_j of a rank-one update at ``layer`` onto the known keys (module docstring)."""
    C = layer_stats(model, [layer], corpus=corpus, n_tokens=stats_tokens, stats_dir=stats_dir,
                    progress=progress)[layer].C.double()
    C = C + 1e-8 * torch.eye(C.shape[0], dtype=C.dtype) * C.diagonal().mean().clamp_min(1e-12)
    k_star = _keys(model, layer, [{"prompt": prompt, "subject": subject}])[0].double().cpu()
    c_inv_k = torch.linalg.solve(C, k_star)  # (d_ffn,) C^-1 k*
    denom = float(c_inv_k @ k_star)
    out = {"layer": int(layer), "k_norm": float(k_star.norm()), "c_inv_k_norm": float(c_inv_k.norm()),
           "k_c_inv_k": denom, "move_threshold": move_threshold, "n_known": len(known), "moved": [],
           "n_moved": 0, "moved_share": 0.0, "max_spill": 0.0, "measure": "ffkv.dossier (s_j = k_j^T C^-1 k* / "
                                                                          "k*^T C^-1 k*)"}
    if known:
        K = _keys(model, layer, known).double().cpu()  # (n, d_ffn)
        s = (K @ c_inv_k) / denom
        order = torch.argsort(-s.abs())
        moved = [{"prompt": known[j]["prompt"], "answer": known[j].get("answer"), "spill": float(s[j])}
                 for j in order.tolist() if abs(float(s[j])) >= move_threshold]
        out.update(moved=moved[:20], n_moved=len(moved), moved_share=len(moved) / len(known),
                   max_spill=float(s.abs().max()), spill=[float(x) for x in s])
    out["safe"] = bool(out["moved_share"] <= SAFE_SHARE)
    return out


# ----------------------------------------------------------------------------------------------- the dossier
def build_dossier(model: MemoryModel, prompt: str, subject: str, answer: str,
                  paraphrases: list[str] | None = None, controls: list | None = None,
                  known: list[dict] | None = None, facts: list[dict] | None = None,
                  noise: str | float = "s3", samples: int = 10, window: int = 1, seed: int = 0,
                  kn_method: str = "ig", kn_steps: int = 20, kn_threshold: float = 0.2, kn_share: float = 0.5,
                  max_neurons: int | None = MAX_NEURONS, top_sub_updates: int = 10, per_layer: int = 10,
                  random_trials: int = 3, ablate_positions: str = "last", adaptive: bool = True,
                  verdict_samples: int | None = None,
                  weights: str | Path | None = None, corpus="auto", stats_tokens: int = 100_000,
                  stats_dir: str | Path | None = None, move_threshold: float = MOVE_THRESHOLD,
                  n_known: int = 50, n_controls: int = 5, progress: bool = False) -> dict:
    """The dossier of the fact ``prompt -> answer`` about ``subject``: a dict with :data:`SECTIONS`.

    paraphrases: prompts of the same fact (each spells the subject; the prompt is always the first). Default:
    the testbed's held-out templates when the fact is one of ``facts`` (default: the facts of the testbed the
    model was loaded from), else the prompt alone. controls: other facts the ablation must spare, as
    ``{"prompt", "answer"[, "subject"]}`` dicts or ``"PROMPT|ANSWER[|SUBJECT]"`` strings (default on a testbed:
    ``n_controls`` facts of other subjects seen at least 8 times; the spared share counts the controls the model
    answers). known: the stored facts whose keys the edit-safety section checks
    (default: the controls plus, on a testbed, ``n_known`` other facts). The other options are those of the
    owners (module docstring): noise / samples / window / seed of the trace; kn_* of the knowledge neurons;
    per_layer / top_sub_updates of the sub-updates; ablate_positions ("last" or "all") and random_trials of the
    ablation; adaptive of the storage strength; verdict_samples / weights
    of the verdict; corpus / stats_tokens / stats_dir of C (ROME's 100,000 tokens by default).
    """
    t_start = time.perf_counter()
    _check_fact(model, prompt, subject, answer, "the prompt")
    samples = validate.integer(samples, "samples", lo=1)
    move_threshold = validate.number(move_threshold, "move_threshold", lo=0.0)
    if ablate_positions not in ABLATE_POSITIONS:
        raise FfkvError(f"unknown ablation positions {ablate_positions!r}", f"use one of {', '.join(ABLATE_POSITIONS)}")
    answer_id = model.answer_id(answer)
    if facts is None:
        facts = testbed_facts_of(model)
    fact = find_fact(facts, subject, answer, prompt)
    if paraphrases:
        extra, source = [p for p in paraphrases if p != prompt], "given"
    elif fact is not None:
        extra = [t.format(subject) for t in fact["heldout_templates"] if t.format(subject) != prompt]
        source = "testbed heldout_templates"
    else:
        extra, source = [], "prompt only"
    paraphrases = [prompt] + list(dict.fromkeys(extra))
    for p in paraphrases[1:]:
        _check_fact(model, p, subject, answer, "paraphrase")
    controls = [_control(c) for c in (controls or [])]
    rng = np.random.default_rng(seed)
    others = [f for f in facts if f["subject"] != subject] if facts else []
    # controls: facts the model is likely to know (seen 8 times or more, where the testbed has them)
    frequent = [f for f in others if f["train_count"] >= 8] or others
    if not controls and frequent:
        for j in rng.choice(len(frequent), size=min(n_controls, len(frequent)), replace=False).tolist():
            f = frequent[j]
            controls.append({"prompt": f["train_templates"][0].format(f["subject"]), "answer": f["object"],
                             "subject": f["subject"]})
    for c in controls:
        _check_fact(model, c["prompt"], c.get("subject"), c["answer"], "control prompt")
    if known is None:
        known = list(controls)
        if others:
            for j in rng.choice(len(others), size=min(n_known, len(others)), replace=False).tolist():
                f = others[j]
                known.append({"prompt": f["train_templates"][0].format(f["subject"]), "answer": f["object"],
                              "subject": f["subject"]})
    if isinstance(noise, str) and noise.startswith("s") and facts:
        noise = noise_level(model, noise, [f["subject"] for f in facts])[0]  # s3 over the data set's subjects
    timings = {}
    steps = ("tracing", "memories", "subspace", "storage", "verdict", "edit_safety")
    with bar(total=len(steps), desc="dossier", unit="section", enabled=progress) as b:
        def timed(name, fn):
            b.set_postfix_str(name)
            t = time.perf_counter()
            out = fn()
            timings[name] = round(time.perf_counter() - t, 3)
            b.update(1)
            return out

        tracing = timed("tracing", lambda: tracing_section(model, paraphrases, subject, answer_id, noise, samples,
                                                           seed, window))
        kn_options = {"method": kn_method, "steps": kn_steps, "threshold": kn_threshold, "share": kn_share,
                      "max_neurons": max_neurons}
        memories = timed("memories", lambda: memories_section(model, prompt, paraphrases, answer_id, kn_options,
                                                              top_sub_updates, per_layer))
        carrying = _carrying(memories)
        subspace = timed("subspace", lambda: subspace_section(model, carrying, paraphrases, answer_id, controls,
                                                              random_trials, seed, ablate_positions))
        st = timed("storage", lambda: storage_strength(model, prompt, answer_id, subject=subject, adaptive=adaptive))
        verdict = timed("verdict", lambda: _verdict(model, prompt, subject, st, verdict_samples, weights, seed))
        safety = timed("edit_safety", lambda: edit_safety_section(model, tracing["layer"], prompt, subject, known,
                                                                  corpus, stats_tokens, stats_dir, move_threshold,
                                                                  progress))
    greedy = [int(model.next_token_logits(p)[0].argmax()) for p in paraphrases]
    storage = {k: v for k, v in st.to_json().items() if k != "trace"}
    fact_section = {"prompt": prompt, "subject": subject, "answer": answer, "answer_id": answer_id,
                    "answer_token": model.decode([answer_id]), "paraphrases": paraphrases,
                    "paraphrase_source": source,
                    "answered": [g == answer_id for g in greedy], "answered_share": float(np.mean(
                        [g == answer_id for g in greedy])),
                    "testbed_fact": None if fact is None else {k: fact.get(k) for k in (
                        "fact_id", "relation_id", "object", "train_count")},
                    "controls": controls}
    claims = {
        "trace_layers_agree": tracing["layer_agreement"] >= 0.5,
        "traced_layer": tracing["layer"],
        "peak_at_subject": tracing["token_role"] in ("subject_last", "subject"),
        "carried_by_memories": bool(carrying),
        "ablation_removes_fact": subspace["removed_share"] >= REMOVES_SHARE,
        "ablation_spares_other_facts": subspace["control_removed_share"] <= SPARES_SHARE,
        "redundant": st.redundancy > 1,
        "strongly_stored": st.strength >= 0.5,
        "recall": verdict["verdict"] == "recall",
        "edit_safe": safety["safe"],
    }
    return {"fact": fact_section, "tracing": tracing, "memories": memories, "subspace": subspace,
            "storage": storage, "verdict": verdict, "edit_safety": safety, "claims": claims,
            "timings_s": {**timings, "total": round(time.perf_counter() - t_start, 3)},
            "provenance": provenance(model.identity, noise=noise, samples=samples, window=window, seed=seed,
                                     kn=kn_options, top_sub_updates=top_sub_updates, per_layer=per_layer,
                                     random_trials=random_trials, ablate_positions=ablate_positions,
                                     adaptive=adaptive, corpus=str(corpus),
                                     stats_tokens=stats_tokens, move_threshold=move_threshold)}


def _control(c) -> dict:
    if isinstance(c, str):
        prompt, answer, subject = parse_control(c)
        return {"prompt": prompt, "answer": answer, "subject": subject}
    if isinstance(c, (tuple, list)):
        return {"prompt": c[0], "answer": c[1], "subject": c[2] if len(c) > 2 else None}
    if isinstance(c, dict) and c.get("prompt") and c.get("answer"):
        return {"prompt": c["prompt"], "answer": c["answer"], "subject": c.get("subject")}
    raise FfkvError(f"control fact {c!r} is not a prompt and an answer", "pass 'PROMPT|ANSWER[|SUBJECT]'")


def _verdict(model, prompt, subject, st, n_samples, weights, seed) -> dict:
    """The recall verdict of ``ffkv recall`` (greedy answer's signals, the shipped weights)."""
    vm = VerdictModel.load(weights or DEFAULT_WEIGHTS)
    cfg = vm.signal_settings
    n = int(cfg.get("n_samples", 20) if n_samples is None else n_samples)
    sig = query_signals(model, prompt, subject, n, float(cfg.get("temperature", 1.0)), seed,
                        adaptive=bool(cfg.get("adaptive", True)), known=st)
    score = vm.score_features(sig["features"])
    return {"verdict": vm.verdict(score), "score": score, "threshold": vm.threshold,
            "greedy_answer": sig["strength"].answer, "signals": sig["features"],
            "weights": str(weights or DEFAULT_WEIGHTS)}
