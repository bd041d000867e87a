"""Knowledge-neuron edits (Dai et al., 2022): find a fact's neurons, then move or erase their values.

The neurons are :func:`ffkv.locate.neurons.knowledge_neurons` of the request's prompt (and answer), with the
edit's hyperparameters: integrated gradients of P(answer) over the memory coefficients at the prompt's last
token (:func:`ffkv.locate.attribution.integrated_gradients`, ``ig_steps`` steps), coarse neurons
``Attr > threshold * max Attr`` over all layers, at most ``max_neurons`` of them. ``ffkv neurons`` with the same
prompt, answer and settings finds the same neurons.

Edit (update a fact): each knowledge neuron's value moves from the old object's output embedding to the
new one's, v_i <- v_i - λ e_old + λ e_new (e: unembedding rows); per layer that is the rank-one
ΔW = λ (e_new - e_old) 1_S^T with 1_S the indicator of the layer's neurons.

Erase (a relation): neurons found for at least ``min_share`` of the relation's prompts (each with its own true
object) have their values set to zero, ΔW = -W[:, S] I[S, :] (rank |S|, exact zeros).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import FfkvError
from ..locate.neurons import Neuron, knowledge_neurons
from ..models.memory_id import parse_memories
from .hparams import resolve_hparams
from .journal import Journal
from .requests import EditRequest, as_requests


def request_answer(model, request: EditRequest, answer: str | None = None) -> str | int:
    """The answer whose neurons a KN edit looks for: ``answer``, else ``request.target_true``, else the
    model's current top token (an id)."""
    if answer is not None:
        return answer
    if request.target_true is not None:
        return request.target_true
    return int(model.next_token_probs(request.text)[0].argmax())


def kn_settings(hparams: dict) -> dict:
    """The keyword arguments of :func:`knowledge_neurons` that a KN hyperparameter dict sets."""
    return {"steps": hparams["ig_steps"], "threshold": hparams["threshold"], "layers": hparams.get("layers"),
            "max_neurons": hparams["max_neurons"]}


def find_knowledge_neurons(model, request: EditRequest, answer: str | None = None, layers: Sequence[int] | None = None,
                           steps: int = 20, threshold: float = 0.2, max_neurons: int = 8) -> list[Neuron]:
    """``[Neuron(layer, index, attribution)]`` that make ``request.text`` say ``answer``, best first:
    :func:`knowledge_neurons` of the one prompt (answer: see :func:`request_answer`)."""
    return knowledge_neurons(model, [request.text], request_answer(model, request, answer), threshold=threshold,
                             steps=steps, layers=layers, max_neurons=max_neurons).neurons


def _indicator(model, indices: Sequence[int]) -> torch.Tensor:
    v = torch.zeros(model.d_ffn, 1)
    v[list(indices), 0] = 1.0
    return v


def kn_edit(model, request: EditRequest, hparams: dict, journal: Journal) -> list:
    """Move the request's knowledge neurons' values from the old object toward the new one (one entry per layer)."""
    given = hparams.get("neurons")
    if given is None:
        neurons = knowledge_neurons(model, [request.text], request_answer(model, request),
                                    **kn_settings(hparams)).memories
    else:
        neurons = [m.check(model.n_layers, model.d_ffn) for m in parse_memories(given)]
    if not neurons:
        raise FfkvError(f"no knowledge neurons found for '{request.text}'", "lower threshold or pass neurons=[...]")
    old = request.target_true
    old_id = model.answer_id(old) if old is not None else int(model.next_token_probs(request.text)[0].argmax())
    E = model.unembedding.weight
    direction = (E[model.answer_id(request.target)] - E[old_id]).detach().float().cpu()
    entries = []
    for layer in sorted({m.layer for m in neurons}):
        idx = [m.index for m in neurons if m.layer == layer]
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
        raise FfkvError("erasing a relation needs each prompt's true object (target_true)",
                        "give target_true for every prompt")
    hp = resolve_hparams(model, "kn", {k: v for k, v in (hparams or {}).items() if k != "min_share"})
    min_share = float((hparams or {}).get("min_share", 0.5))
    found = knowledge_neurons(model, [r.text for r in requests], [r.target_true for r in requests],
                              share=min_share, **kn_settings(hp))
    shared = found.memories
    journal = journal if journal is not None else Journal()
    start = len(journal)
    try:
        for layer in sorted({m.layer for m in shared}):
            idx = sorted(m.index for m in shared if m.layer == layer)
            u = -model.values(layer)[:, idx].detach().float().cpu()
            v = torch.zeros(model.d_ffn, len(idx))
            v[idx, torch.arange(len(idx))] = 1.0
            journal.record(model, "kn-erase", layer, u, v, [r.to_json() for r in requests], {**hp, "min_share": min_share},
                           {"neurons": idx}, max_ratio=hp["max_update_ratio"])
    except BaseException:
        journal.undo(model, len(journal) - start)
        raise
    return journal
