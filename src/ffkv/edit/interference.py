"""Interference, predicted before an edit: which other stored keys the update moves, and by how much.

ROME writes ΔW = u v^T into one layer's W_out (:mod:`.rome`), with

    u = v* - W k* - b        (d_model,)          v = C^-1 k* / (k*^T C^-1 k*)        (d_ffn,)

so for any other key k_j of that layer (another fact's subject, read at its subject's last token) the layer's
output changes by exactly

    Δy_j = ΔW k_j = α_j u        α_j = v . k_j = (C^-1 k*)^T k_j / (k*^T C^-1 k*)     (α(k*) = 1)

A key of W_out is the input of W_out, computed by the layers below and the layer's own W_in: editing W_out
does not change it, so Δy_j is the whole change of the edited layer's output at that token. MEMIT's batched
update of a layer, ΔW_l = R_l K_l^T (λ C_l + K_l K_l^T)^-1 = U V^T (:mod:`.memit`), gives Δy_j = U (V^T k_j)
the same way, and so does AlphaEdit's null-space projected one (:mod:`.methods.alphaedit`). Everything here
is computed on the unedited model with the methods' own pieces (the key
:func:`.compute_key.compute_keys`, the target :func:`.compute_value.compute_targets`, the closed forms
:func:`.rome.rank_one_update` and :func:`.memit.memit_layer_update`, the statistics of an
:class:`.context.EditContext`), so sharing the context with the edit that follows makes the prediction the
update itself. For MEMIT the first edited layer's update is exact; the later layers' keys and residuals
depend on the earlier layers' updates, which are not applied here: their prediction assumes each earlier
layer delivered its share of the residual (R_l = (z - h) / m for every layer) and reads their keys on the
unedited model (``exact`` per layer in the report says which is which).

Per known fact j (a probe: a prompt template and a subject) the report gives ``shift`` = ||Δy_j||,
``relative`` = ||Δy_j|| / ||W k_j|| and α_j; per request, three diagnostics of the fact being edited:

    concentration   share of the subject-last-token MLP indirect effect at the edited layer(s):
                    max(IE_l, 0) / Σ_l max(IE_l, 0), IE_l = p_*,clean(l) - p_* of the MLP causal trace
                    (:func:`ffkv.locate.trace.causal_trace`, kind="mlp", answer = target_true); ``peak`` is
                    max_l IE_l and ``p_true`` the clean P(target_true) (the naive baselines)
    spread          1 - mean_p cos(k_p, mean_p k_p) over the key of the subject in each paraphrase template p
                    (the request's prompt and ``paraphrases``): 0 when every phrasing reads the same key
    paraphrase_gain mean_p α(k_p): the share of u the update writes at each paraphrase (1 at k*)

    from ffkv.edit.interference import predict_interference, known_fact_probes
    probes = known_fact_probes(testbed / "data" / "known_facts.json", exclude=[req.subject])
    rep = predict_interference(model, [req], "rome", probes=probes, context=ctx)
    rep.moved(0.05)        # [(probe index, relative shift)], largest first
    rep.summary()          # max / mean relative shift, facts moved, concentration, spread
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import FfkvError
from ..io import read_json
from ..locate.layer_choice import subject_last_scores
from ..locate.trace import causal_trace
from .compute_key import compute_keys, read_at_subject, shared_write_scale
from .compute_value import compute_targets
from .context import EditContext
from .hparams import resolve_hparams
from .memit import memit_layer_update
from .methods import alphaedit as alphaedit_method
from .requests import EditRequest, as_requests
from .rome import rank_one_update, target_value
from .stats import cholesky_factor

__all__ = ["InterferenceReport", "RequestDiagnostics", "predict_interference", "known_fact_probes",
           "probe_requests", "update_factors", "layer_output_shift", "trace_concentration", "key_spread"]

METHODS = ("rome", "memit", "alphaedit")


@dataclass
class RequestDiagnostics:
    """What the edited fact itself says about its locality (module docstring)."""

    subject: str
    concentration: float
    peak: float
    p_true: float
    total_effect: float
    spread: float
    paraphrase_gain: float
    n_paraphrases: int
    ie: list[float] = field(default_factory=list)  # IE_l per layer at the subject's last token

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class InterferenceReport:
    """The predicted spill-over of one edit call on the probes (module docstring).

    factors: {layer: (U (d_model, n), V (d_ffn, n))} the predicted ΔW_l = U V^T, float64.
    delta_out: {layer: (n_probes, d_model)} Δy_j; shift, relative, alpha: {layer: (n_probes,)} / (n_probes, n).
    exact: {layer: bool} whether the layer's prediction is the update itself (module docstring).
    """

    method: str
    layers: list[int]
    requests: list[dict]
    probes: list[dict]
    factors: dict
    delta_out: dict
    shift: dict
    relative: dict
    alpha: dict
    exact: dict
    diagnostics: list[RequestDiagnostics]
    hparams: dict = field(default_factory=dict)

    def total_relative(self) -> np.ndarray:
        """(n_probes,) ||Σ_l Δy_{j,l}|| / ||W k_j|| summed over the edited layers' relative shifts."""
        return np.sum([self.relative[l] for l in self.layers], axis=0)

    def moved(self, threshold: float = 0.05) -> list[tuple[int, float]]:
        """Probes whose relative shift (summed over layers) exceeds ``threshold``, largest first."""
        r = self.total_relative()
        idx = np.argsort(-r)
        return [(int(i), float(r[i])) for i in idx if r[i] > threshold]

    def summary(self, thresholds: Sequence[float] = (0.01, 0.05, 0.1)) -> dict:
        """Scalar features of the prediction (the criterion's candidates) and the request diagnostics."""
        r = self.total_relative()
        d = self.diagnostics
        out = {"max_relative": float(r.max()) if r.size else 0.0,
               "mean_relative": float(r.mean()) if r.size else 0.0,
               "sum_relative": float(r.sum()),
               "max_shift": float(np.max([self.shift[l].max() for l in self.layers])) if r.size else 0.0,
               "update_norm": float(np.sqrt(sum(float((self.factors[l][0] @ self.factors[l][1].T).norm()) ** 2
                                                for l in self.layers))),
               "concentration": float(np.mean([x.concentration for x in d])),
               "peak": float(np.mean([x.peak for x in d])),
               "p_true": float(np.mean([x.p_true for x in d])),
               "spread": float(np.mean([x.spread for x in d])),
               "paraphrase_gain": float(np.mean([x.paraphrase_gain for x in d])),
               "n_probes": int(r.size)}
        for t in thresholds:
            out[f"moved_{t:g}"] = int((r > t).sum())
        return out

    def to_json(self, top: int = 20) -> dict:
        moved = self.moved(0.0)[:top]
        return {"method": self.method, "layers": self.layers, "requests": self.requests, "exact": self.exact,
                "summary": self.summary(), "diagnostics": [x.to_json() for x in self.diagnostics],
                "top_moved": [{**self.probes[i], "relative": r} for i, r in moved], "hparams": self.hparams}


# ----------------------------------------------------------------------------------------------------- probes


def probe_requests(probes) -> list[EditRequest]:
    """Probes as requests: EditRequests, ``(template, subject[, answer])`` tuples or ``{prompt|template,
    subject[, answer|prediction|object]}`` dicts (a testbed ``known_facts.json`` / ``facts.jsonl`` record)."""
    out = []
    for p in probes:
        if isinstance(p, EditRequest):
            out.append(p)
        elif isinstance(p, (tuple, list)):
            out.append(EditRequest(p[0], p[1], p[2] if len(p) > 2 else "", p[2] if len(p) > 2 else None))
        elif isinstance(p, dict):
            template = p.get("template") or p.get("prompt") or (p.get("train_templates") or [None])[0]
            answer = p.get("answer") or p.get("prediction") or p.get("attribute") or p.get("object") or ""
            if template is None or "subject" not in p:
                raise FfkvError(f"probe {str(p)[:80]} has no template and subject",
                                "give {template, subject} records (a testbed known_facts.json)")
            out.append(EditRequest(template, p["subject"], answer, answer or None))
        else:
            raise FfkvError(f"probe {p!r} is not a request, tuple or record", "pass (template, subject) pairs")
    for r in out:
        if r.prompt.count("{}") != 1:
            raise FfkvError(f"probe subject {r.subject!r} does not occur in {r.prompt!r}",
                            "give templates with one '{}' where the subject goes")
    return out


def known_fact_probes(path: str | Path, exclude: Sequence[str] = (), limit: int | None = None) -> list[dict]:
    """The testbed's known facts (``data/known_facts.json``, or ``facts.jsonl``) of subjects not in
    ``exclude``, as probe records ``{template, subject, answer}``."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    else:
        rows = read_json(path)
    skip = set(exclude)
    out = []
    for r in rows:
        if r["subject"] in skip:
            continue
        template = r.get("template") or r["train_templates"][0]
        answer = r.get("prediction") or " " + str(r.get("attribute") or r.get("object")).lstrip()
        out.append({"template": template, "subject": r["subject"], "answer": answer,
                    "fact_id": r.get("fact_id")})
        if limit is not None and len(out) >= limit:
            break
    return out


@torch.no_grad()
def probe_keys(model, probes: Sequence[EditRequest], layer: int, chunk: int = 256) -> torch.Tensor:
    """k_j at ``layer`` for each probe: the coefficients at its subject's last token, bare prompt; (n, d_ffn)."""
    parts = [compute_keys(model, list(probes[s:s + chunk]), layer, [""]) for s in range(0, len(probes), chunk)]
    return torch.cat(parts).double() if parts else torch.zeros(0, model.d_ffn, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------- update


def _check(model, method: str, hp: dict):
    if method not in METHODS:
        raise FfkvError(f"interference is predicted for {', '.join(METHODS)} updates, not {method!r}",
                        f"pass method={METHODS[0]!r}, {METHODS[1]!r} or {METHODS[2]!r}")
    layers = [hp["layer"]] if method == "rome" else list(hp["layers"])
    if hp.get("layer") == "trace" or hp.get("expert") is not None:
        raise FfkvError("interference is predicted for dense layers named by index",
                        "pass layer=<int> (and no expert) in the hyperparameters")
    for l in layers:
        if shared_write_scale(model, l):
            raise FfkvError(f"layer {l} writes through a shared-expert gate", "predict a dense layer")
    return layers


def update_factors(model, requests: Sequence[EditRequest], method: str, hp: dict, context: EditContext,
                   journal=None) -> tuple[dict, dict]:
    """The update the method would make, without making it: ``({layer: (U, V)}, {layer: exact})``.

    ROME (one request at a time, as :func:`ffkv.edit.methods.rome.apply` makes them): U V^T is the sum of
    the requests' rank-one updates, each computed on the unedited model, so it is the update itself for one
    request (a later ROME request sees the earlier edits: ``exact`` is False for several). MEMIT: the batch's
    update of every layer (exact at the first layer; module docstring). AlphaEdit: MEMIT's, with its null-space
    projected solve (:func:`ffkv.edit.methods.alphaedit.projected_update`) against the keys of the earlier
    AlphaEdit edits in ``journal`` (None: no earlier edits).
    """
    layers = _check(model, method, hp)
    stats = context.layer_stats(model, layers, hp)
    prefixes = context.context_prefixes(model, hp["prefixes"], hp["seed"])
    if method == "rome":
        l = layers[0]
        W, b = model.values(l), model.value_bias(l)
        L = cholesky_factor(stats[l].C)
        K = compute_keys(model, requests, l, prefixes)
        tgt = compute_targets(model, requests, "ffn_out", l, hp, prefixes)  # (optimises δ: needs gradients)
        us, vs = [], []
        with torch.no_grad():
            for i in range(len(requests)):
                v_star = target_value(W, b, K[i], tgt.delta[i])
                u, v = rank_one_update(W, b, L, K[i], v_star)
                # the journal applies float32 factors: predict from exactly those
                us.append(u.float().double())
                vs.append(v.float().double())
        return {l: (torch.stack(us, 1), torch.stack(vs, 1))}, {l: len(requests) == 1}
    top = layers[-1]  # MEMIT and AlphaEdit: targets after the last layer, the residual spread over the layers
    tgt = compute_targets(model, requests, "resid_post", top, hp, prefixes)
    z = (tgt.h + tgt.delta).detach()
    cur = read_at_subject(model, requests, "resid_post", top)
    R = (z - cur).T / len(layers)  # (d_model, n): each layer's share, as memit_edit's first layer takes it
    post_norm = model.post_norm
    out, exact = {}, {}
    for j, l in enumerate(layers):
        if post_norm is not None and post_norm(l) is not None:
            raise FfkvError(f"layer {l} normalises its FFN output: MEMIT's write there is solved numerically",
                            "predict interference of ROME on this family")
        K = compute_keys(model, requests, l, prefixes).T
        if method == "alphaedit":
            P, _ = alphaedit_method.projector(context, l, stats[l], hp["nullspace_threshold"])
            cache = (alphaedit_method.state_of(context).sync(journal, l, K.shape[0]) if journal is not None
                     else torch.zeros(K.shape[0], K.shape[0], dtype=torch.float64))
            U, V = alphaedit_method.projected_update(P, cache, K, R, hp["L2"])
        else:
            U, V = memit_layer_update(stats[l].C, K, R, float(hp["mom2_update_weight"]))
        out[l] = (U.float().double(), V.float().double())
        exact[l] = j == 0
    return out, exact


def layer_output_shift(U: torch.Tensor, V: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Δy_j = U V^T k_j for keys (n_probes, d_ffn): ``(Δy (n_probes, d_model), α = K V (n_probes, n))``."""
    alpha = keys.double() @ V.double()
    return alpha @ U.double().T, alpha


# ------------------------------------------------------------------------------------------- diagnostics


def trace_concentration(model, request: EditRequest, layers: Sequence[int], window: int = 1, samples: int = 10,
                        noise="s3", seed: int = 0) -> dict:
    """Concentration, peak and P(target_true) of the request's MLP trace at the subject's last token.

    window: MLP outputs restored per cell (1: one layer, so that IE_l is layer l's alone; ROME's 10 spans a
    whole small model).
    """
    res = causal_trace(model, request.text, request.subject, kind="mlp", answer=request.target_true,
                       window=window, samples=samples, noise=noise, seed=seed)
    ie = subject_last_scores(res) - res.low_score
    pos = np.clip(ie, 0, None)
    total = float(pos.sum())
    return {"concentration": float(pos[list(layers)].sum() / total) if total > 0 else 0.0,
            "peak": float(ie.max()), "p_true": float(res.high_score),
            "total_effect": float(res.high_score - res.low_score), "ie": [float(x) for x in ie]}


@torch.no_grad()
def key_spread(model, request: EditRequest, templates: Sequence[str], layer: int, V: torch.Tensor | None = None
               ) -> dict:
    """Spread of the subject's key over ``[request.prompt, *templates]`` at ``layer`` and the update's gain
    α(k_p) = V^T k_p at each (V: this request's column of the update, (d_ffn,))."""
    temps = [request.prompt] + [t for t in templates if t != request.prompt]
    reqs = [EditRequest(t, request.subject, request.target) for t in temps]
    K = compute_keys(model, reqs, layer, [""]).double()  # (P, d_ffn)
    mean = K.mean(0, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(K, mean.expand_as(K), dim=1)
    gain = float((K @ V.double()).mean()) if V is not None else float("nan")
    return {"spread": float(1 - cos.mean()), "paraphrase_gain": gain, "n_paraphrases": len(temps)}


def paraphrase_templates(prompts: Sequence[str], subject: str) -> list[str]:
    """Rendered paraphrase prompts (a CounterFact case's) as templates; prompts without the subject are left out."""
    return [p.replace(subject, "{}", 1) for p in prompts if subject in p]


# ----------------------------------------------------------------------------------------------------- main


def predict_interference(model, requests, method: str = "rome", hparams=None, probes=(),
                         paraphrases: Sequence[Sequence[str]] | None = None, context: EditContext | None = None,
                         stats_dir=None, trace: bool = True, trace_window: int = 1, trace_samples: int = 10,
                         journal=None) -> InterferenceReport:
    """Predict what editing ``requests`` with ``method`` ("rome" or "memit") does to the probes' keys.

    hparams: overrides of the method's defaults (as :func:`ffkv.edit.apply_edits` takes them; layer and
    statistics must be the edit's). probes: the known facts whose keys are checked (:func:`probe_requests`).
    paraphrases: per request, extra prompt templates (``{}`` for the subject) for the key's spread.
    context: the :class:`EditContext` the edit will use (same statistics and prefixes: the prediction is the
    update itself). trace: run the MLP causal trace for concentration / peak / P(true) (else NaN).
    journal: the journal of the model's earlier edits (AlphaEdit solves against their keys). Nothing of the
    model is changed.
    """
    requests = as_requests(requests)
    hp = resolve_hparams(model, method, hparams)
    method = hp["method"]
    context = (context if context is not None else EditContext()).using(stats_dir=stats_dir, progress=False)
    preqs = probe_requests(probes)
    factors, exact = update_factors(model, requests, method, hp, context, journal)
    layers = sorted(factors)
    delta_out, shift, relative, alpha = {}, {}, {}, {}
    for l in layers:
        with torch.no_grad():
            K = probe_keys(model, preqs, l)
            U, V = factors[l]
            dy, a = layer_output_shift(U, V, K)
            base = K @ model.values(l).double().T  # W k_j (n_probes, d_model)
        delta_out[l] = dy.float()
        shift[l] = dy.norm(dim=1).numpy()
        relative[l] = (dy.norm(dim=1) / base.norm(dim=1).clamp_min(1e-30)).numpy()
        alpha[l] = a.numpy()
    diags = []
    for i, r in enumerate(requests):
        tr = (trace_concentration(model, r, layers, window=trace_window, samples=trace_samples)
              if trace and r.target_true else
              {"concentration": float("nan"), "peak": float("nan"), "p_true": float("nan"),
               "total_effect": float("nan"), "ie": []})
        temps = list(paraphrases[i]) if paraphrases is not None else []
        sp = key_spread(model, r, temps, layers[0], factors[layers[0]][1][:, i])
        diags.append(RequestDiagnostics(r.subject, tr["concentration"], tr["peak"], tr["p_true"],
                                        tr["total_effect"], sp["spread"], sp["paraphrase_gain"],
                                        sp["n_paraphrases"], tr["ie"]))
    probe_rows = [{"template": p.prompt, "subject": p.subject, "answer": p.target} for p in preqs]
    return InterferenceReport(method, layers, [r.to_json() for r in requests], probe_rows, factors, delta_out,
                              shift, relative, alpha, exact, diags, {k: v for k, v in hp.items()})
