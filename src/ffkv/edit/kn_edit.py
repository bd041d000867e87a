"""Knowledge-neuron edits (Dai et al., 2022): find a fact's neurons, then move or erase their values.

Attribution by integrated gradients over a layer's memory coefficients w (d_ffn,) at the prompt's last token:

    Attr(w_i) = w_i · ∫_0^1 ∂P(o | α w) / ∂w_i dα  ≈  w_i · (1/m) Σ_{j=1..m} ∂P(o | (j/m) w) / ∂w_i

where P(o | ·) is the probability of the object's first token when the layer's coefficients at that
position are replaced. Knowledge neurons are those with Attr > threshold · max Attr (over all layers),
at most ``max_neurons``.

Edit (update a fact): each knowledge neuron's value moves from the old object's output embedding to the
new one's, v_i <- v_i - λ e_old + λ e_new (e: unembedding rows); per layer that is the rank-one
ΔW = λ (e_new - e_old) 1_S^T with 1_S the indicator of the layer's neurons.

Erase (a relation): neurons found for at least ``min_share`` of the relation's prompts have their values
set to zero, ΔW = -W[:, S] I[S, :] (rank |S|, exact zeros).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from ..models.hooks import Intervention, intervene
from .compute_value import frozen_parameters
from .hparams import resolve_hparams
from .journal import Journal
from .requests import EditRequest, as_requests, render_batch


def integrated_gradients(model, request: EditRequest, answer_id: int, layer: int, steps: int = 10) -> torch.Tensor:
    """Attr(w_i) for every memory of ``layer`` at the prompt's last token: (d_ffn,) float32."""
    batch = render_batch(model, [("", request)])
    last = int(batch.last[0])
    with torch.no_grad(), intervene(model, reads=[("coef", layer)]) as rec:
        model.hf(**batch.inputs)
    w = rec["coef", layer][0, last].float()
    alphas = torch.arange(1, steps + 1, device=model.device, dtype=torch.float32) / steps
    scaled = (alphas[:, None] * w[None, :]).requires_grad_(True)  # (m, d_ffn)
    ids = batch.input_ids.expand(steps, -1)
    mask = batch.attention_mask.expand(steps, -1)
    edit = Intervention("coef", layer, "fn", value=lambda h: scaled[:, None, :].to(h.dtype), positions=[last])
    with frozen_parameters(model), torch.enable_grad(), intervene(model, edits=[edit]):
        logits = model.hf(input_ids=ids, attention_mask=mask).logits[:, last].float()
        torch.softmax(logits, -1)[:, answer_id].sum().backward()
    return (w * scaled.grad.mean(0)).detach()


def find_knowledge_neurons(model, request: EditRequest, answer: str | None = None, layers: Sequence[int] | None = None,
                           steps: int = 10, threshold: float = 0.2, max_neurons: int = 8
                           ) -> list[tuple[int, int, float]]:
    """``[(layer, index, attribution)]`` of the neurons that make ``request.text`` say ``answer``, best first.

    answer defaults to ``request.target_true``, else the model's current top token.
    """
    if answer is not None:
        answer_id = model.answer_id(answer)
    elif request.target_true is not None:
        answer_id = model.answer_id(request.target_true)
    else:
        answer_id = int(model.next_token_probs(request.text)[0].argmax())
    layers = range(model.n_layers) if layers is None else [model.check_layer(l) for l in layers]
    attrs = {l: integrated_gradients(model, request, answer_id, l, steps) for l in layers}
    top = max(float(a.max()) for a in attrs.values())
    if top <= 0:
        return []
    found = [(l, int(i), float(a[i])) for l, a in attrs.items() for i in torch.nonzero(a > threshold * top).flatten()]
    found.sort(key=lambda x: -x[2])
    return found[:max_neurons]


def _indicator(model, indices: Sequence[int]) -> torch.Tensor:
    v = torch.zeros(model.d_ffn, 1)
    v[list(indices), 0] = 1.0
    return v


def kn_edit(model, request: EditRequest, hparams: dict, journal: Journal) -> list:
    """Move the request's knowledge neurons' values from the old object toward the new one (one entry per layer)."""
    neurons = hparams.get("neurons")
    if neurons is None:
        neurons = [(l, i) for l, i, _ in find_knowledge_neurons(model, request, None, hparams.get("layers"),
                                                                  hparams["ig_steps"], hparams["threshold"],
                                                                  hparams["max_neurons"])]
    if not neurons:
        from ..errors import FfkvError

        raise FfkvError(f"no knowledge neurons found for '{request.text}'", "lower threshold or pass neurons=[...]")
    old = request.target_true
    old_id = model.answer_id(old) if old is not None else int(model.next_token_probs(request.text)[0].argmax())
    E = model.unembedding.weight
    direction = (E[model.answer_id(request.target)] - E[old_id]).detach().float().cpu()
    entries = []
    for layer in sorted({int(l) for l, _ in neurons}):
        idx = [int(i) for l, i in neurons if int(l) == layer]
        u = hparams["kn_lambda"] * direction[:, None]
        entries.append(journal.record(model, "kn", layer, u, _indicator(model, idx), [request.to_json()], hparams,
                                      {"neurons": idx}, max_ratio=hparams["max_update_ratio"]))
    return entries


def erase_relation(model, requests: Sequence[EditRequest], hparams: dict | None = None,
                   journal: Journal | None = None) -> Journal:
    """Zero the values of the neurons shared by a relation's prompts (Dai et al.'s erasing); returns the journal.

    requests: prompts of one relation with their true objects (``target_true``; ``target`` is unused).
    hparams: ig_steps, threshold, max_neurons (per prompt), min_share (default 0.5), layers.
    """
    requests = as_requests(requests, need_target=False)
    if any(r.target_true is None for r in requests):
        from ..errors import FfkvError

        raise FfkvError("erasing a relation needs each prompt's true object (target_true)",
                        "give target_true for every prompt")
    hp = resolve_hparams(model, "kn", {k: v for k, v in (hparams or {}).items() if k != "min_share"})
    min_share = float((hparams or {}).get("min_share", 0.5))
    counts: Counter = Counter()
    for r in requests:
        for l, i, _ in find_knowledge_neurons(model, r, r.target_true, hp.get("layers"), hp["ig_steps"],
                                              hp["threshold"], hp["max_neurons"]):
            counts[l, i] += 1
    shared = [n for n, c in counts.items() if c >= min_share * len(requests)]
    journal = journal if journal is not None else Journal()
    start = len(journal)
    try:
        for layer in sorted({l for l, _ in shared}):
            idx = sorted(i for l, i in shared if l == layer)
            u = -model.values(layer)[:, idx].detach().float().cpu()
            v = torch.zeros(model.d_ffn, len(idx))
            v[idx, torch.arange(len(idx))] = 1.0
            journal.record(model, "kn-erase", layer, u, v, [r.to_json() for r in requests], {**hp, "min_share": min_share},
                           {"neurons": idx}, max_ratio=hp["max_update_ratio"])
    except BaseException:
        journal.undo(model, len(journal) - start)
        raise
    return journal
