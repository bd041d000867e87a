"""Knowledge neurons (Dai et al., ACL 2022): the memories whose attribution to a fact is high on most of its
paraphrases.

For each prompt p of a fact (its paraphrases), with attributions ``A_p`` (n_layers, d_ffn) from
:func:`ffkv.locate.attribution.integrated_gradients`:

    N_p = {(l, i) : A_p[l, i] > threshold * max A_p}          (coarse filter, threshold = 0.2)
    N   = {(l, i) : |{p : (l, i) in N_p}| >= share * |prompts|} (kept when shared by >= share of the prompts)

Each kept neuron is reported with its mean attribution over the prompts, largest first. There is no loop that
tunes the threshold until 2-5 neurons remain (Dai et al.'s released code does that); the counts are what the
thresholds give.

method="ig" computes exact integrated gradients for every layer. method="screen" first ranks memories by one
forward and one backward pass (gradient x activation, equal up to sign to attribution patching with a zero
baseline), then scores exactly, with integrated gradients, only the layers holding the top ``candidates``; the
attribution of memories outside those layers is taken as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from ..errors import FfkvError
from ..models.memory_id import MemoryId
from ..models.model import MemoryModel
from ..models.engine import Cost
from ..progress import track
from .attribution import (DEFAULT_MAX_STEPS, DEFAULT_RULE, DEFAULT_TOL, completeness, grad_x_activation,
                          integrated_gradients)
from .interventions import specificity as neuron_specificity

METHODS = ("ig", "screen")
# Default caps (``ffkv neurons`` shows them in --help): coarse neurons kept per prompt (the largest), and the
# screen's candidates. Dai et al.'s code tunes the threshold until 2-5 neurons remain; uncapped, a near-flat
# attribution (a random or undertrained model) passes thousands of memories through ``threshold * max``.
MAX_NEURONS = 20
CANDIDATES = 50


class Neuron(NamedTuple):
    """One knowledge neuron: the memory ``(layer, index)`` and its (mean) attribution.

    Unpacks as ``layer, index, attribution``; :attr:`memory` is its :class:`MemoryId` (``str()`` -> "L1.5", or
    "L1.E2.5" for a neuron of expert 2: an :class:`ExpertNeuron`). :attr:`expert` is None for a dense memory.
    """

    layer: int
    index: int
    attribution: float
    expert = None  # a class attribute, not a field: unpacking stays (layer, index, attribution)

    @property
    def memory(self) -> MemoryId:
        return MemoryId(self.layer, self.index, self.expert)


class ExpertNeuron(Neuron):
    """A knowledge neuron of routed expert :attr:`expert`: memory index ``index`` of that expert at ``layer``."""

    def __new__(cls, layer: int, index: int, attribution: float, expert: int):
        self = super().__new__(cls, layer, index, attribution)
        self.expert = expert
        return self

    def __repr__(self):
        return f"ExpertNeuron(layer={self.layer}, expert={self.expert}, index={self.index}, " \
               f"attribution={self.attribution})"


def _neuron(layer: int, index: int, attribution: float, experts: dict | None) -> Neuron:
    if experts and layer in experts:
        return ExpertNeuron(layer, index, attribution, experts[layer])
    return Neuron(layer, index, attribution)


@dataclass
class NeuronsResult:
    """Knowledge neurons of one fact. neurons: [Neuron(layer, index, mean attribution)], largest first."""

    answer: str | int | list
    prompts: list[str]
    neurons: list[Neuron]
    per_prompt: list[list[Neuron]]
    threshold: float
    share: float
    steps: int
    method: str
    cost: dict = field(default_factory=dict)
    dropped: list[Neuron] = field(default_factory=list)  # removed as common to background facts
    max_neurons: int | None = None
    rule: str = DEFAULT_RULE
    completeness: list[list[dict]] = field(default_factory=list)  # per prompt: attribution.completeness(...)
    specificity: dict | None = None  # interventions.specificity(...) of ``neurons``
    experts: dict[int, int] | None = None  # {layer: expert} attributed (MoE), None: dense memories

    @property
    def memories(self) -> list[MemoryId]:
        return [n.memory for n in self.neurons]

    def completeness_error(self, min_change: float = 1e-3) -> dict:
        """The worst completeness over prompts and layers whose exact change is at least ``min_change``:
        ``{"max_abs_error", "max_relative_error", "n_paths"}`` (errors None when no path qualifies)."""
        rows = [c for cs in self.completeness for c in cs if abs(c["exact"]) >= min_change]
        if not rows:
            return {"max_abs_error": None, "max_relative_error": None, "n_paths": 0}
        return {"max_abs_error": max(abs(c["error"]) for c in rows),
                "max_relative_error": max(c["relative_error"] for c in rows), "n_paths": len(rows)}

    def to_json(self) -> dict:
        return {"answer": self.answer, "prompts": self.prompts,
                "neurons": [list(n) for n in self.neurons],
                "memories": [str(m) for m in self.memories],
                "per_prompt": [[list(n) for n in ns] for ns in self.per_prompt],
                "threshold": self.threshold, "share": self.share, "steps": self.steps, "method": self.method,
                "max_neurons": self.max_neurons, "dropped": [list(n) for n in self.dropped], "rule": self.rule,
                "completeness": {**self.completeness_error(), "per_prompt": self.completeness},
                "specificity": self.specificity, "cost": self.cost,
                "experts": None if self.experts is None else {str(l): e for l, e in self.experts.items()}}


def coarse_neurons(attr: torch.Tensor, threshold: float, max_neurons: int | None = None,
                   experts: dict[int, int] | None = None) -> list[Neuron]:
    """``{(l, i): A[l, i] > threshold * max A}`` of one prompt's attributions (n_layers, d_ffn), largest first;
    at most ``max_neurons`` of them (the largest) when given. experts ``{layer: e}``: row l holds expert e's
    memories (the neurons are :class:`ExpertNeuron`)."""
    top = float(attr.max())
    if top <= 0:
        return []
    idx = (attr > threshold * top).nonzero().tolist()
    found = sorted((_neuron(l, i, float(attr[l, i]), experts) for l, i in idx), key=lambda n: -n.attribution)
    return found if max_neurons is None else found[:max_neurons]


def shared_neurons(per_prompt: list[list[Neuron]], attrs: list[torch.Tensor], share: float,
                   experts: dict[int, int] | None = None) -> list[Neuron]:
    """Neurons in at least ``share`` of the prompts' sets, with their mean attribution, largest first."""
    counts: dict[tuple[int, int], int] = {}
    for ns in per_prompt:
        for n in ns:
            counts[n.layer, n.index] = counts.get((n.layer, n.index), 0) + 1
    need = share * len(per_prompt)
    mean = torch.stack(attrs).mean(0)
    kept = [_neuron(l, i, float(mean[l, i]), experts) for (l, i), c in counts.items() if c >= need - 1e-9]
    return sorted(kept, key=lambda n: -n.attribution)


def screened_attributions(model: MemoryModel, prompt: str, answer, steps: int, candidates: int, rule: str,
                          cost: Cost, **ig_options) -> torch.Tensor:
    """Integrated gradients on the layers of the ``candidates`` memories with the largest gradient x
    activation; zero elsewhere. (n_layers, d_ffn)."""
    return _screened(model, prompt, answer, steps, candidates, rule, cost, **ig_options)[0]


def _screened(model, prompt, answer, steps, candidates, rule, cost, **ig_options):
    """(screened attribution, full IG of the screened layers, those layers)."""
    gxa = grad_x_activation(model, prompt, answer, cost=cost)
    top = gxa.flatten().topk(min(candidates, gxa.numel())).indices
    layers = sorted({MemoryId.from_flat(int(j), model.d_ffn).layer for j in top})
    ig = integrated_gradients(model, prompt, answer, steps=steps, layers=layers, rule=rule, cost=cost, **ig_options)
    keep = torch.zeros_like(ig, dtype=torch.bool).flatten()
    keep[top] = True
    return ig * keep.reshape(ig.shape), ig, layers


def _answers(prompts: list[str], answer) -> list:
    """One answer per prompt: a shared answer (text or token id) or a list with one per prompt."""
    if isinstance(answer, (list, tuple)):
        if len(answer) != len(prompts):
            raise FfkvError(f"{len(answer)} answers for {len(prompts)} prompts", "give one answer, or one per prompt")
        return list(answer)
    return [answer] * len(prompts)


def knowledge_neurons(model: MemoryModel, prompts: Sequence[str] | str, answer: str | int | Sequence,
                      threshold: float = 0.2, share: float = 0.5, steps: int = 20, method: str = "ig", layers=None,
                      rule: str = DEFAULT_RULE, candidates: int = CANDIDATES, max_neurons: int | None = MAX_NEURONS,
                      background: Sequence[tuple[str, str]] | None = None, background_share: float = 0.5,
                      tol: float = DEFAULT_TOL, max_steps: int = DEFAULT_MAX_STEPS,
                      unrelated: Sequence[tuple[str, str | int]] = (), check: bool = True, random_trials: int = 3,
                      seed: int = 0, cost: Cost | None = None, progress: bool = False,
                      experts: dict[int, int] | None = None) -> NeuronsResult:
    """Dai et al.'s knowledge neurons of the fact ``prompts -> answer``: the one implementation in ffkv
    (``ffkv neurons``, ``ffkv edit --method kn``, relation erasing and the ground-truth report call it).

    prompts: the fact's paraphrase prompts (one is allowed). answer: text (the model's answer rule), a token
    id, or one of those per prompt (relation erasing: each prompt's own object). threshold: the coarse filter's
    fraction of the per-prompt maximum. share: the fraction of prompts a neuron must be found in (Dai et al.'s
    p%). steps, layers, rule, tol, max_steps: of :func:`ffkv.locate.attribution.integrated_gradients` (the
    default quadrature is adaptive, within ``tol`` of exact completeness; ``**DAI_IG`` reproduces Dai et al.).
    method: "ig" (exact, every layer) or "screen" (see the module docstring; ``candidates`` memories).
    max_neurons: keep at most this many coarse neurons per prompt, the largest (default :data:`MAX_NEURONS`;
    None: all; Dai et al.'s code instead tunes the threshold until 2-5 remain; the KN edit uses 8).
    background: optional (prompt, answer) pairs of *other* facts; a neuron that is also a coarse neuron of at
    least ``background_share`` of them is generic (it serves many facts), not this fact's, and is moved to
    ``dropped`` (an extension, off by default; Dai et al. do not filter).
    check: report each prompt's completeness (:func:`ffkv.locate.attribution.completeness`) and the neuron
    set's specificity (:func:`ffkv.locate.interventions.specificity`: on the fact, on ``unrelated`` (prompt,
    answer) pairs, and vs ``random_trials`` random layer-matched sets drawn from ``seed``); one forward pass
    per prompt each. experts ``{layer: e}`` (MoE models): the neurons of expert e's routed memories at those
    layers (:class:`ExpertNeuron`, "L1.E2.5"), from ``integrated_gradients(..., experts=experts)``; method "ig"
    only, and the specificity check (dense switches) is skipped. Returns :class:`NeuronsResult`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise FfkvError("no prompts given", "pass at least one --prompt")
    if method not in METHODS:
        raise FfkvError(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")
    if not 0 <= threshold <= 1 or not 0 < share <= 1:
        raise FfkvError(f"threshold {threshold} / share {share} out of range", "use 0 <= threshold <= 1, 0 < share <= 1")
    if max_neurons is not None and max_neurons < 1:
        raise FfkvError(f"max_neurons must be at least 1, got {max_neurons}", "pass max_neurons >= 1 or None")
    if experts is not None and method != "ig":
        raise FfkvError(f"method {method!r} screens dense memories only", "use method='ig' with experts")
    answers = _answers(prompts, answer)
    cost = cost if cost is not None else Cost()
    ig = {"steps": steps, "rule": rule, "tol": tol, "max_steps": max_steps, "cost": cost}
    if experts is not None:
        experts = {int(l): int(e) for l, e in experts.items()}
        ig["experts"] = experts
    attrs, checks = [], []
    for p, a in track(list(zip(prompts, answers)), desc="attribution", unit="prompt", enabled=progress):
        if method == "ig":
            full = integrated_gradients(model, p, a, layers=layers, **ig)
            attrs.append(full)
            lays = layers
        else:
            screened, full, lays = _screened(model, p, a, steps, candidates, rule, cost, tol=tol,
                                             max_steps=max_steps)
            attrs.append(screened)
        if check:
            checks.append(completeness(model, p, a, full, layers=lays) if experts is None else
                          completeness(model, p, a, full, experts=experts))
    per_prompt = [coarse_neurons(a, threshold, max_neurons, experts) for a in attrs]
    kept = shared_neurons(per_prompt, attrs, share, experts)
    dropped = []
    if background:
        counts: dict[tuple[int, int], int] = {}
        for p, a in track(list(background), desc="background", unit="fact", enabled=progress):
            attr = integrated_gradients(model, p, a, layers=layers, **ig)
            for n in coarse_neurons(attr, threshold, max_neurons):
                counts[n.layer, n.index] = counts.get((n.layer, n.index), 0) + 1
        common = {k for k, c in counts.items() if c >= background_share * len(background) - 1e-9}
        dropped = [n for n in kept if (n.layer, n.index) in common]
        kept = [n for n in kept if (n.layer, n.index) not in common]
    spec = neuron_specificity(model, list(zip(prompts, answers)), kept, unrelated, random_trials, seed) \
        if check and experts is None else None
    return NeuronsResult(answer if not isinstance(answer, tuple) else list(answer), prompts, kept, per_prompt,
                         threshold, share, steps, method, cost.as_dict(), dropped, max_neurons, rule, checks, spec,
                         None if experts is None else dict(experts))
