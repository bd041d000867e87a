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

import torch

from ..errors import FfkvError
from ..models.model import MemoryModel
from ._run import Cost
from .attribution import grad_x_activation, integrated_gradients

METHODS = ("ig", "screen")


@dataclass
class NeuronsResult:
    """Knowledge neurons of one fact. neurons: [(layer, index, mean attribution)], largest first."""

    answer: str
    prompts: list[str]
    neurons: list[tuple[int, int, float]]
    per_prompt: list[list[tuple[int, int, float]]]
    threshold: float
    share: float
    steps: int
    method: str
    cost: dict = field(default_factory=dict)
    dropped: list[tuple[int, int, float]] = field(default_factory=list)  # removed as common to background facts

    def to_json(self) -> dict:
        return {"answer": self.answer, "prompts": self.prompts,
                "neurons": [[l, i, a] for l, i, a in self.neurons],
                "per_prompt": [[[l, i, a] for l, i, a in n] for n in self.per_prompt],
                "threshold": self.threshold, "share": self.share, "steps": self.steps, "method": self.method,
                "dropped": [[l, i, a] for l, i, a in self.dropped], "cost": self.cost}


def coarse_neurons(attr: torch.Tensor, threshold: float) -> list[tuple[int, int, float]]:
    """``{(l, i): A[l, i] > threshold * max A}`` of one prompt's attributions (n_layers, d_ffn)."""
    top = float(attr.max())
    if top <= 0:
        return []
    idx = (attr > threshold * top).nonzero().tolist()
    return sorted(((l, i, float(attr[l, i])) for l, i in idx), key=lambda x: -x[2])


def shared_neurons(per_prompt: list[list[tuple[int, int, float]]], attrs: list[torch.Tensor],
                   share: float) -> list[tuple[int, int, float]]:
    """Neurons in at least ``share`` of the prompts' sets, with their mean attribution, largest first."""
    counts: dict[tuple[int, int], int] = {}
    for ns in per_prompt:
        for l, i, _ in ns:
            counts[l, i] = counts.get((l, i), 0) + 1
    need = share * len(per_prompt)
    mean = torch.stack(attrs).mean(0)
    kept = [(l, i, float(mean[l, i])) for (l, i), c in counts.items() if c >= need - 1e-9]
    return sorted(kept, key=lambda x: -x[2])


def screened_attributions(model: MemoryModel, prompt: str, answer, steps: int, candidates: int, rule: str,
                          cost: Cost) -> torch.Tensor:
    """Integrated gradients on the layers of the ``candidates`` memories with the largest gradient x
    activation; zero elsewhere. (n_layers, d_ffn)."""
    gxa = grad_x_activation(model, prompt, answer, cost=cost)
    top = gxa.flatten().topk(min(candidates, gxa.numel())).indices
    layers = sorted({int(j) // model.d_ffn for j in top})
    ig = integrated_gradients(model, prompt, answer, steps=steps, layers=layers, rule=rule, cost=cost)
    keep = torch.zeros_like(ig, dtype=torch.bool).flatten()
    keep[top] = True
    return ig * keep.reshape(ig.shape)


def knowledge_neurons(model: MemoryModel, prompts: list[str] | str, answer: str, threshold: float = 0.2,
                      share: float = 0.5, steps: int = 20, method: str = "ig", layers=None, rule: str = "left",
                      candidates: int = 50, background: list[tuple[str, str]] | None = None,
                      background_share: float = 0.5, cost: Cost | None = None,
                      progress: bool = False) -> NeuronsResult:
    """Dai et al.'s knowledge neurons of the fact ``prompts -> answer``.

    prompts: the fact's paraphrase prompts (one is allowed). threshold: the coarse filter's fraction of the
    per-prompt maximum. share: the fraction of prompts a neuron must be found in (Dai et al.'s p%).
    method: "ig" (exact, every layer) or "screen" (see the module docstring).
    background: optional (prompt, answer) pairs of *other* facts; a neuron that is also a coarse neuron of at
    least ``background_share`` of them is generic (it serves many facts), not this fact's, and is moved to
    ``dropped`` (an extension, off by default; Dai et al. do not filter). Returns :class:`NeuronsResult`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise FfkvError("no prompts given", "pass at least one --prompt")
    if method not in METHODS:
        raise FfkvError(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")
    if not 0 <= threshold <= 1 or not 0 < share <= 1:
        raise FfkvError(f"threshold {threshold} / share {share} out of range", "use 0 <= threshold <= 1, 0 < share <= 1")
    cost = cost if cost is not None else Cost()
    it = prompts
    if progress:
        from tqdm import tqdm

        it = tqdm(prompts, desc="attribution", file=__import__("sys").stderr, leave=False)
    attrs = []
    for p in it:
        if method == "ig":
            attrs.append(integrated_gradients(model, p, answer, steps=steps, layers=layers, rule=rule, cost=cost))
        else:
            attrs.append(screened_attributions(model, p, answer, steps, candidates, rule, cost))
    per_prompt = [coarse_neurons(a, threshold) for a in attrs]
    kept = shared_neurons(per_prompt, attrs, share)
    dropped = []
    if background:
        counts: dict[tuple[int, int], int] = {}
        for p, a in background:
            attr = integrated_gradients(model, p, a, steps=steps, layers=layers, rule=rule, cost=cost)
            for l, i, _ in coarse_neurons(attr, threshold):
                counts[l, i] = counts.get((l, i), 0) + 1
        common = {k for k, c in counts.items() if c >= background_share * len(background) - 1e-9}
        dropped = [n for n in kept if (n[0], n[1]) in common]
        kept = [n for n in kept if (n[0], n[1]) not in common]
    return NeuronsResult(answer, prompts, kept, per_prompt, threshold, share, steps, method, cost.as_dict(), dropped)
