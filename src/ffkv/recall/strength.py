"""Storage strength of a fact: how much of the answer survives when its most attributed memories go off.

For a prompt ``P`` (subject ``s``) and an answer token ``y``:

1. *Attribution* of every memory ``(l, i)``: integrated gradients of the answer's centered logit
   ``f = z_y - mean(z)`` at the last position, along the path that scales every coefficient from 0 to its
   value, summed over positions (:func:`memory_attribution`, ffkv's one integrated gradients with the options
   :data:`ATTRIBUTION`). Unlike log p, f does not saturate as ``p(y) → 1``.
2. *Ablation curve*: switch off the top-k memories (at every position) for a grid of k and read ``p_k(y)``
   (:func:`ffkv.locate.interventions.ablation_curve` with ``positions="all"``).
3. *Storage strength* = the area under the ablation curve ``p_k(y)`` over the grid (index-spaced, so
   roughly log k), in [0, 1]: how much of the answer there is and how much of it survives. Near 0 for a fact
   the model does not recall or that one memory carries; near 1 for a confident fact that many carry.
   *Survival* = the area under ``S(k) = min(1, p_k(y) / p_0(y))``, the same curve relative to the intact
   answer: robustness alone, whatever the confidence.
4. *Redundancy* = ``k_50``, the fewest top memories whose ablation halves ``p(y)`` (grid max + 1 if none).
5. *Trace concentration*: the share of the positive indirect effect of the MLP causal trace
   (``ffkv.locate.trace.causal_trace``) at its single best (token, layer) site.
6. *Answer margin*: ``z_y - max_{j≠y} z_j`` at the last position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import FfkvError
from ..locate.attribution import integrated_gradients, top_memories
from ..locate.interventions import ablation_curve, memories_off, variant_probs
from ..locate.trace import causal_trace
from ..models.memory_id import MemoryId
from ..models.model import MemoryModel

DEFAULT_KS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# Storage strength's integrated gradients (ffkv.locate.attribution's options): one joint path over every layer
# and position, the centered logit, 16 geometric steps. See memory_attribution.
ATTRIBUTION = {"rule": "geometric", "target": "centered_logit", "path": "joint", "positions": "all"}


def resolve_answer(model: MemoryModel, prompt: str, answer: str | int | None) -> int:
    """The answer's first token id (the model's answer rule); ``None`` means the model's own greedy answer."""
    if answer is None:
        return int(model.next_token_logits(prompt)[0].argmax())
    if isinstance(answer, int):
        if not 0 <= answer < model.vocab_size:
            raise FfkvError(f"answer token id {answer} is outside the vocabulary", "pass text or a valid id")
        return answer
    return model.answer_id(answer)


def answer_margin(logits: torch.Tensor, answer_id: int) -> float:
    """``z_y - max_{j≠y} z_j`` of one logit vector (vocab,): > 0 iff y is the greedy answer."""
    z = logits.float()
    other = z.clone()
    other[answer_id] = -float("inf")
    return float(z[answer_id] - other.max())


def memory_attribution(model: MemoryModel, prompt: str, answer_id: int, steps: int = 16,
                       off: list[MemoryId] = ()) -> torch.Tensor:
    """Integrated gradients of every memory for the answer's centered logit, (n_layers, d_ffn), float32:
    :func:`ffkv.locate.attribution.integrated_gradients` with the options :data:`ATTRIBUTION`.

    Every layer's coefficients are set to ``α m_l`` (m_l: their clean values, at every position) and α goes
    from 0 to 1 for all layers at once:
    ``a_{l,i} = Σ_t m_{t,l,i} · Σ_k w_k ∂f/∂m_{t,l,i} (α_k m)``, ``f = z_y - mean(z)`` at the last position;
    the K intervals have edges ``0, 10^-3, ..., 1`` (geometric) and α_k, w_k are their midpoints and widths,
    because a memory with a large coefficient saturates the final norm within the first percent of the path.
    By completeness ``Σ a ≈ f(m) - f(0)``. Plain gradient × activation fails where the
    final norm saturates (a memory that alone writes the answer has ∂f/∂m ≈ 0); scaling one layer at a time
    misses memories whose layer is redundant with another layer. One forward/backward pass, ``steps`` rows.
    ``off``: memories already switched off (their coefficients are 0 on the whole path).
    """
    return integrated_gradients(model, prompt, int(answer_id), steps=steps, off=off, **ATTRIBUTION)


def _p_answer(model: MemoryModel, prompt: str, answer_id: int, off: list[MemoryId]) -> float:
    """P(answer) at the last position with the memories ``off`` switched off at every position."""
    p, _ = variant_probs(model, prompt, answer_id, [memories_off(off)])
    return float(p[0])


def adaptive_ablation(model: MemoryModel, prompt: str, answer_id: int, ks=DEFAULT_KS, steps: int = 16,
                      rerank_steps: int = 8, rerank_until: int = 16
                      ) -> tuple[list[int], np.ndarray, list[MemoryId], torch.Tensor]:
    """The ablation curve with the ranking recomputed after every ablation step up to ``rerank_until``.

    At grid step j the memories ranked so far are off; integrated gradients on that ablated model
    (``rerank_steps`` steps) pick the next ``k_{j+1} - k_j`` memories. This follows self-repair: a backup
    memory that is silent in the clean run (its layer's input is dominated by the fact already written)
    fires once the first copy is off, and is ranked next. Beyond ``rerank_until`` memories the last ranking
    is followed (the fact is gone by then for all but the most redundant facts, and each re-rank costs a
    backward pass). Returns ``(ks, p_k, ranking, first attribution)``.
    """
    ks = sorted(set(int(k) for k in ks))
    d = model.d_ffn
    off: list[MemoryId] = []
    ps, first, order = [], None, []
    for j, k in enumerate(ks):
        ps.append(_p_answer(model, prompt, answer_id, off[:k]))
        if j + 1 == len(ks):
            break
        need = ks[j + 1] - len(off)
        if need <= 0:
            continue
        if first is None or k < rerank_until:
            a = memory_attribution(model, prompt, answer_id, steps if first is None else rerank_steps, off)
            first = a if first is None else first
            flat = a.reshape(-1).clone()
            for mid in off:
                flat[mid.flat(d)] = -float("inf")
            order = [MemoryId.from_flat(i, d) for i in torch.argsort(flat, descending=True).tolist()]
        taken = set(off)
        off += [m for m in order if m not in taken][:need]
    if first is None:
        first = memory_attribution(model, prompt, answer_id, steps)
    return ks[:len(ps)], np.array(ps), off, first


def survival(p: np.ndarray) -> np.ndarray:
    """``S(k) = min(1, p_k / p_0)``: the fraction of the answer's probability left after ablation."""
    p0 = max(float(p[0]), 1e-12)
    return np.minimum(1.0, p / p0)


def curve_area(s: np.ndarray) -> float:
    """Trapezoid area under ``S`` over the k grid's index, normalized to [0, 1]."""
    if len(s) < 2:
        return float(s[0]) if len(s) else float("nan")
    return float(((s[1:] + s[:-1]) / 2).sum() / (len(s) - 1))


def k_half(ks: list[int], s: np.ndarray) -> int:
    """``k_50``: the smallest k with ``S(k) <= 1/2``; ``max(ks) + 1`` if the answer survives every k."""
    for k, v in zip(ks, s):
        if k > 0 and v <= 0.5:
            return int(k)
    return int(max(ks)) + 1


def trace_concentration(model: MemoryModel, prompt: str, subject: str, answer_id: int,
                        samples: int = 10, seed: int = 0, window: int = 1, noise: str | float = "s3"
                        ) -> dict:
    """Concentration of the MLP causal trace (:func:`ffkv.locate.trace.causal_trace`).

    ``concentration = max_{t,l} IE⁺ / Σ_{t,l} IE⁺`` with ``IE⁺ = max(0, score - low)``; also the peak site and
    the peak indirect effect as a fraction of ``high - low``. ``window=1`` restores one layer's MLP per cell
    (ROME's window of 10 would cover every layer of a small model).
    """
    r = causal_trace(model, prompt, subject, kind="mlp", answer=int(answer_id), samples=samples, seed=seed,
                     window=window, noise=noise)
    scores = np.asarray(r.scores, dtype=float)
    ie = np.maximum(0.0, scores - float(r.low_score))
    total = ie.sum()
    t, l = np.unravel_index(int(ie.argmax()), ie.shape)
    span = float(r.high_score) - float(r.low_score)
    # A corruption that does not move the answer leaves nothing to localize.
    return {"concentration": float(ie.max() / total) if total > 0 and span > 1e-3 else float("nan"),
            "peak_token": int(t), "peak_layer": int(l),
            "peak_effect": float(ie.max() / span) if abs(span) > 1e-12 else 0.0,
            "high_score": float(r.high_score), "low_score": float(r.low_score)}


@dataclass
class StorageStrength:
    """Every storage signal of one (prompt, answer)."""

    prompt: str
    answer: str
    answer_id: int
    p_answer: float
    rank: int  # 0 = greedy
    margin: float
    strength: float  # area under the ablation curve p_k(y), [0, 1]
    survival: float  # area under S(k) = min(1, p_k / p_0), [0, 1]
    redundancy: int  # k_50
    attribution_top: float  # largest single-memory attribution
    attribution_share: float  # top memory's share of the positive attribution mass
    ks: list[int] = field(default_factory=list)
    curve: list[float] = field(default_factory=list)  # p_k(y)
    top: list[list[int]] = field(default_factory=list)  # top memories [layer, index]
    trace: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def storage_strength(model: MemoryModel, prompt: str, answer: str | int | None = None,
                     subject: str | None = None, ks=DEFAULT_KS, trace: bool = False,
                     trace_samples: int = 10, adaptive: bool = True) -> StorageStrength:
    """Storage strength of ``answer`` (text, token id, or None for the greedy answer) after ``prompt``.

    ``adaptive=True`` re-ranks the memories after every ablation step (:func:`adaptive_ablation`);
    ``False`` ranks once on the intact model (one IG pass, one batched ablation pass: faster, but blind to
    backup memories). ``trace=True`` (needs ``subject``) adds the causal-trace
    concentration.
    """
    if subject is not None:
        model.find_subject(prompt, subject)  # a subject that is not in the prompt is an error up front
    y = resolve_answer(model, prompt, answer)
    logits = model.next_token_logits(prompt)[0].float()
    p = torch.softmax(logits, -1)
    if adaptive:
        ks_used, curve, ranking, attribution = adaptive_ablation(model, prompt, y, ks)
    else:
        attribution = memory_attribution(model, prompt, y)
        ranking = top_memories(attribution, max(ks))
        points = ablation_curve(model, prompt, y, ranking, ks=ks, positions="all")
        ks_used, curve = [c["k"] for c in points], np.array([c["prob"] for c in points])
    s = survival(curve)
    pos = attribution.clamp(min=0)
    tr = None
    if trace:
        if subject is None:
            raise FfkvError("the causal trace needs the subject", "pass subject=... (--subject)")
        tr = trace_concentration(model, prompt, subject, y, samples=trace_samples)
    return StorageStrength(
        prompt=prompt, answer=model.decode([y]), answer_id=y, p_answer=float(p[y]),
        rank=int((logits > logits[y]).sum()), margin=answer_margin(logits, y),
        strength=curve_area(np.asarray(curve, float)), survival=curve_area(s),
        redundancy=k_half(ks_used, s), attribution_top=float(attribution.max()),
        attribution_share=float(pos.max() / pos.sum()) if pos.sum() > 0 else 0.0,
        ks=ks_used, curve=[float(v) for v in curve], top=[[m.layer, m.index] for m in ranking[:16]], trace=tr)
