"""The numbers that say whether an edit worked: ROME's CounterFact metrics and EasyEdit's accuracies.

Both families are computed from one teacher-forced forward pass over ``prompt + target`` pairs
(:func:`score_continuations`), so they are measured on exactly the same tokens.

ROME (Meng et al. 2022, CounterFact), per case, with NLL(t | p) the *mean* token negative log-likelihood of
the whole target sequence t after prompt p (``P(t|p) = exp(-NLL)``):

    ES = mean_p [ NLL(true|p) > NLL(new|p) ]            over the rewrite prompt       (efficacy score)
    EM = mean_p [ P(new|p) - P(true|p) ]                                              (efficacy magnitude)
    PS, PM: the same over the paraphrase prompts                                      (paraphrase)
    NS = mean_p [ NLL(new|p) > NLL(true_p|p) ],  NM = mean_p [ P(true_p|p) - P(new|p) ]  over neighbors
    S  = harmonic mean of the case means of ES, PS and NS
    GE = ROME's n-gram entropy of greedy generations (fluency)

EasyEdit (Yao et al. 2023), per case, teacher-forced token-level top-1 accuracy:

    reliability    = mean_j [ argmax p(. | p, t_<j) = t_j ]  for t = target_new, p = the rewrite prompt
    generalization = the same on the paraphrase prompts
    locality       = mean_j [ argmax_post(. | p, t_<j) = argmax_pre(. | p, t_<j) ]  on the locality
                     (neighborhood) prompts with their true answer t: the edit leaves predictions as they were
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import FfkvError

# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class ContinuationScore:
    """Teacher-forced reading of one target after one prompt.

    nll: mean token NLL of the target (nats); hits: per target token, argmax == token;
    pred: per target token, the argmax token id (for EasyEdit's locality).
    """

    nll: float
    hits: list[bool]
    pred: list[int]

    @property
    def prob(self) -> float:
        """ROME's probability of a multi-token target: ``exp(-mean token NLL)``."""
        return math.exp(-self.nll)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.hits)) if self.hits else float("nan")


def pair_token_ids(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``target`` as its continuation.

    The target's ids are read off the tokenization of ``prompt + target`` when that starts with the
    prompt's own ids (so the boundary is tokenized as the model sees the whole string, as ROME does);
    otherwise the target is tokenized alone.
    """
    p = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + target)["input_ids"]
    if len(full) > len(p) and full[: len(p)] == p:
        t = full[len(p):]
    else:
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not t:
        raise FfkvError(f"target {target!r} tokenizes to nothing after {prompt!r}", "give a non-empty target")
    return p, t


@torch.no_grad()
def score_continuations(model, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[ContinuationScore]:
    """Teacher-forced scores of each ``(prompt, target)`` pair, batched.

    For a pair with prompt ids p (length P) and target ids t (length T), the logits at positions
    ``P-1 .. P+T-2`` predict ``t_0 .. t_{T-1}``: ``NLL = -(1/T) Σ_j log softmax(logits[P-1+j])[t_j]``.
    Batches are right-padded (positions of real tokens are unchanged) and sorted by length so that
    padding stays small; the result is in the input order.
    """
    tok = model.require_tokenizer()
    ids = [pair_token_ids(tok, p, t) for p, t in pairs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i][0]) + len(ids[i][1]))
    out: list[ContinuationScore | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [ids[i][0] + ids[i][1] for i in chunk]
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logits = model.hf(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits
        for r, i in enumerate(chunk):
            p, t = ids[i]
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=logits.device)
            logp = torch.log_softmax(logits[r, pos].float(), dim=-1)  # (T, vocab)
            target = torch.tensor(t, device=logits.device)
            nll = -logp.gather(1, target[:, None]).squeeze(1)
            pred = logp.argmax(-1)
            out[i] = ContinuationScore(nll=float(nll.mean()), hits=(pred == target).tolist(), pred=pred.tolist())
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- fluency

_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation marks, a dependency-free stand-in for ``nltk.word_tokenize``."""
    return _WORD.findall(text)


def ngram_entropy_of_text(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: ``mean_n w_n H_n``, H_n the entropy (bits) of the n-gram
    frequency distribution of the text's words. Repetitive text (a collapsed model) scores low."""
    words = word_tokenize(text)
    terms = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        if not grams:
            terms.append(0.0)
            continue
        f = np.array(list(grams.values()), dtype=np.float64)
        f /= f.sum()
        terms.append(w * float(-(f * np.log2(f)).sum()))
    return float(np.mean(terms))


def ngram_entropy(texts: Sequence[str]) -> float:
    """ROME's ``n_gram_entropy`` (arithmetic mean over texts)."""
    if not texts:
        return float("nan")
    return float(np.mean([ngram_entropy_of_text(t) for t in texts]))


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuations, returned with their prompts (as ROME's ``generate_fast`` returns them).

    Left-padded batch; generation stops at the model's context length.
    """
    if not prompts:
        return []
    tok = model.require_tokenizer()
    batch = model.encode(list(prompts), padding_side="left")
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    new = max_new_tokens if ctx is None else max(0, min(max_new_tokens, ctx - batch["input_ids"].shape[1]))
    if new == 0:
        return [tok.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"]]
    # As ROME's generate_fast: a fixed number of tokens, no stop at end-of-text.
    cfg = copy.deepcopy(model.hf.generation_config)
    cfg.update(max_new_tokens=new, do_sample=False, num_beams=1, eos_token_id=None,
               pad_token_id=tok.pad_token_id, max_length=None, min_new_tokens=None)
    out = model.hf.generate(**batch, generation_config=cfg)
    return [tok.decode(ids, skip_special_tokens=True) for ids in out]


@torch.no_grad()
def perplexity(model, texts: Sequence[str], batch_size: int = 32) -> float:
    """``exp`` of the mean token NLL of ``texts`` (every token after the first), pooled over all tokens."""
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = model.encode(list(texts[start:start + batch_size]))
        logits = model.hf(**batch).logits[:, :-1].float()
        target = batch["input_ids"][:, 1:]
        mask = batch["attention_mask"][:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))


# ---------------------------------------------------------------------------------------------- per case

ROME_KEYS = ("ES", "EM", "PS", "PM", "NS", "NM")
EASYEDIT_KEYS = ("reliability", "generalization", "locality")


def _mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def case_pairs(case) -> list[tuple[str, str, str]]:
    """The ``(group, prompt, target)`` triples one case is scored on.

    groups: rw_new, rw_true, para_new, para_true, nb_true, nb_new.
    """
    triples = [("rw_new", case.rewrite_prompt, case.target_new)]
    if case.target_true is not None:
        triples.append(("rw_true", case.rewrite_prompt, case.target_true))
    for p in case.paraphrase_prompts:
        triples.append(("para_new", p, case.target_new))
        if case.target_true is not None:
            triples.append(("para_true", p, case.target_true))
    for p, true in case.neighborhood:
        triples.append(("nb_true", p, true))
        triples.append(("nb_new", p, case.target_new))
    return triples


def case_metrics(case, scores: dict[str, list[ContinuationScore]], pre_locality: list[list[int]] | None) -> dict:
    """One case's ROME and EasyEdit metrics from its scored pairs (grouped as in :func:`case_pairs`).

    Returns fractions (ES, NS, ... in [0, 1]; magnitudes in [-1, 1]); NaN where the data has no such
    prompt (no target_true, no paraphrase). ``nb_pred`` (argmax ids on the neighborhood pairs) is
    returned so that a later measurement can compute locality against it.
    """
    g = scores
    m: dict = {}
    if g.get("rw_true"):
        m["ES"] = _mean(t.nll > n.nll for n, t in zip(g["rw_new"], g["rw_true"]))
        m["EM"] = _mean(n.prob - t.prob for n, t in zip(g["rw_new"], g["rw_true"]))
    else:
        m["ES"] = m["EM"] = float("nan")
    if g.get("para_true"):
        m["PS"] = _mean(t.nll > n.nll for n, t in zip(g["para_new"], g["para_true"]))
        m["PM"] = _mean(n.prob - t.prob for n, t in zip(g["para_new"], g["para_true"]))
    else:
        m["PS"] = m["PM"] = float("nan")
    nb_t, nb_n = g.get("nb_true", []), g.get("nb_new", [])
    m["NS"] = _mean(n.nll > t.nll for n, t in zip(nb_n, nb_t))
    m["NM"] = _mean(t.prob - n.prob for n, t in zip(nb_n, nb_t))
    m["reliability"] = _mean(x for s in g["rw_new"] for x in s.hits)
    m["generalization"] = _mean(s.accuracy for s in g.get("para_new", []))
    m["neighborhood_acc"] = _mean(s.accuracy for s in nb_t)
    nb_pred = [s.pred for s in nb_t]
    if pre_locality is None:
        m["locality"] = 1.0 if nb_pred else float("nan")  # the unedited model agrees with itself
    else:
        m["locality"] = _mean(_mean(a == b for a, b in zip(post, pre)) for post, pre in zip(nb_pred, pre_locality))
    m["nb_pred"] = nb_pred
    m["p_new"] = g["rw_new"][0].prob
    m["p_true"] = g["rw_true"][0].prob if g.get("rw_true") else float("nan")
    return m


def score_case_groups(model, cases: Sequence, batch_size: int = 64) -> list[dict[str, list]]:
    """Score every (prompt, continuation) pair of every case in one batched pass.

    Returns, per case, ``{group: [score, ...]}`` with the groups of :func:`case_pairs` (rewrite, paraphrase,
    neighborhood, ...), so that all cases share the batches instead of scoring one case at a time.
    """
    triples, owner = [], []
    for ci, c in enumerate(cases):
        for t in case_pairs(c):
            triples.append(t)
            owner.append(ci)
    scores = score_continuations(model, [(p, t) for _, p, t in triples], batch_size=batch_size)
    grouped: list[dict[str, list]] = [dict() for _ in cases]
    for (group, _, _), ci, s in zip(triples, owner, scores):
        grouped[ci].setdefault(group, []).append(s)
    return grouped


def measure_cases(model, cases, pre_locality: list | None = None, n_gen_prompts: int = 2,
                  gen_tokens: int = 20, batch_size: int = 32) -> list[dict]:
    """ROME + EasyEdit metrics (and generation entropy GE) of every case, with the model as it is now.

    All cases' pairs go through :func:`score_continuations` together. ``pre_locality``: per case, the
    ``nb_pred`` of the unedited model (None when this *is* the unedited model). GE is computed on the
    first ``n_gen_prompts`` generation prompts of each case (its rewrite and paraphrase prompts when the
    data has none), ``gen_tokens`` new tokens each; ``n_gen_prompts=0`` skips it.
    """
    grouped = score_case_groups(model, cases, batch_size)
    rows = []
    for ci, c in enumerate(cases):
        rows.append(case_metrics(c, grouped[ci], None if pre_locality is None else pre_locality[ci]))
    if n_gen_prompts > 0:
        prompts, gen_owner = [], []
        for ci, c in enumerate(cases):
            ps = generation_prompts(c)[:n_gen_prompts]
            prompts += ps
            gen_owner += [ci] * len(ps)
        texts = []
        for start in range(0, len(prompts), batch_size):
            texts += greedy_generate(model, prompts[start:start + batch_size], gen_tokens)
        per_case: list[list[str]] = [[] for _ in cases]
        for ci, t in zip(gen_owner, texts):
            per_case[ci].append(t)
        for row, ts in zip(rows, per_case):
            row["GE"] = ngram_entropy(ts)
            row["generations"] = ts
    return rows


def generation_prompts(case) -> list[str]:
    """The case's generation prompts; for layouts without any (flat CounterFact, zsRE), its rewrite and
    paraphrase prompts, which also start from the subject."""
    return list(case.generation_prompts) or [case.rewrite_prompt, *case.paraphrase_prompts]


# ---------------------------------------------------------------------------------------------- summaries


def mean_ci(values) -> dict:
    """Mean and the half-width of its normal 95% interval (1.96 s / sqrt(n)); NaNs are left out."""
    x = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                   dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else float("nan")
    return {"mean": float(x.mean()), "ci95": None if math.isnan(half) else float(half), "n": int(x.size)}


def harmonic_mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


def summarize(rows: list[dict], scale: float = 100.0) -> dict:
    """ROME's and EasyEdit's tables from per-case rows (``pre_<key>`` / ``post_<key>`` fields).

    Means and 95% CIs are scaled by ``scale`` (100: percent, and GE x 100 as ROME prints it), so they
    read like the published tables. S is the harmonic mean of the ES, PS and NS means (ROME).
    """
    out: dict = {"rome": {}, "easyedit": {}}
    for stage in ("pre", "post"):
        if not any(f"{stage}_ES" in r for r in rows):
            continue
        rome = {}
        for k in (*ROME_KEYS, "GE"):
            st = mean_ci(r.get(f"{stage}_{k}") for r in rows)
            rome[k] = _scaled(st, scale)
        rome["S"] = harmonic_mean([rome[k]["mean"] for k in ("ES", "PS", "NS") if rome[k]["mean"] is not None])
        out["rome"][stage] = rome
        out["easyedit"][stage] = {k: _scaled(mean_ci(r.get(f"{stage}_{k}") for r in rows), scale)
                                  for k in (*EASYEDIT_KEYS, "neighborhood_acc")}
    return out


def _scaled(st: dict, scale: float) -> dict:
    return {"mean": None if st["mean"] is None else st["mean"] * scale,
            "ci95": None if st["ci95"] is None else st["ci95"] * scale, "n": st["n"]}


# ---------------------------------------------------------------------------------------------- rankings


def ranks(x) -> np.ndarray:
    """Ranks 1..n of ``x``, ties given their mean rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # ties: the mean of their ranks
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels``: P(score of a positive > score of a
    negative), ties counting one half (Mann-Whitney U / (n_pos n_neg)); NaN without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = ranks(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's of the tie-averaged ranks); NaN when either is constant."""
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
