"""Self-consistency: sample the answer n times and see how often the model agrees with itself.

The answer is the first token after the prompt (as everywhere in ffkv: ``answer_id``). Sampling at
temperature T draws from ``p_T = softmax(z / T)``; T = 0 is the greedy answer ``argmax z``. Because
``argmax z`` does not depend on T, the greedy answer's accuracy cannot change with temperature while its
confidence ``max p_T`` grows as T falls: lowering the temperature makes a wrong recall more confident, never
more correct. :func:`temperature_table` measures exactly that over a data set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import FfkvError
from ..models.model import MemoryModel
from .stats import expected_calibration_error
from .strength import resolve_answer

TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def tempered_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p_T = softmax(z / T)`` (…, vocab); T = 0 is the one-hot of ``argmax z``."""
    if temperature < 0:
        raise FfkvError(f"temperature must be >= 0, got {temperature}", "use 0 (greedy) or more")
    z = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).float()
    return torch.softmax(z / temperature, -1)


def sample_answers(logits: torch.Tensor, n: int, temperature: float, seed: int = 0) -> torch.Tensor:
    """n answer tokens drawn from ``p_T`` of one logit vector (vocab,) -> (n,) ids."""
    if n < 1:
        raise FfkvError(f"the number of samples must be >= 1, got {n}", "pass n >= 1 (--samples)")
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(tempered_probs(logits, temperature).cpu(), n, replacement=True, generator=g)


@dataclass
class SelfConsistency:
    """n sampled answers against the greedy one."""

    prompt: str
    temperature: float
    n: int
    greedy: str
    greedy_id: int
    agreement: float  # fraction of samples equal to the greedy answer
    expected_agreement: float  # p_T(greedy), the agreement's expectation
    distribution: dict[str, float] = field(default_factory=dict)  # sampled answer -> frequency
    entropy: float = 0.0  # of the sampled answer distribution, nats
    answer_agreement: float | None = None  # fraction of samples equal to a given answer

    def to_json(self) -> dict:
        return asdict(self)


def self_consistency(model: MemoryModel, prompt: str, n: int = 20, temperature: float = 1.0, seed: int = 0,
                     answer: str | None = None, logits: torch.Tensor | None = None) -> SelfConsistency:
    """Sample the answer to ``prompt`` n times at ``temperature``; agreement with greedy and the distribution."""
    z = model.next_token_logits(prompt)[0] if logits is None else logits
    greedy = int(z.argmax())
    draws = sample_answers(z, n, temperature, seed).tolist()
    counts = Counter(draws)
    freq = np.array(list(counts.values()), float) / n
    dist = {model.decode([t]): c / n for t, c in counts.most_common()}
    given = None
    if answer is not None:
        a = resolve_answer(model, prompt, answer)
        given = counts.get(a, 0) / n
    return SelfConsistency(prompt=prompt, temperature=temperature, n=n, greedy=model.decode([greedy]),
                           greedy_id=greedy, agreement=counts.get(greedy, 0) / n,
                           expected_agreement=float(tempered_probs(z, temperature)[greedy]),
                           distribution=dist, entropy=float(-(freq * np.log(freq)).sum()),
                           answer_agreement=given)


def temperature_table(logits: torch.Tensor, answer_ids, temperatures=TEMPERATURES, n_samples: int = 20,
                      seed: int = 0) -> list[dict]:
    """Accuracy and calibration over a data set at each temperature.

    logits: (N, vocab) at each query's last position; answer_ids: (N,) true answers. For each T:
    ``greedy_accuracy`` (argmax z, the same at every T), ``sampled_accuracy`` (mean over queries of the
    accuracy of ``n_samples`` draws from p_T), ``confidence`` (mean ``p_T(greedy)``), the confidence on wrong
    greedy answers, the ECE of ``p_T(greedy)`` as the greedy answer's probability of being right, and the
    mean self-consistency (agreement of the draws with greedy).
    """
    y = torch.as_tensor(answer_ids, dtype=torch.long, device=logits.device)
    greedy = logits.argmax(-1)
    right = (greedy == y).cpu().numpy()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for T in temperatures:
        p = tempered_probs(logits, T).cpu()
        conf = p[torch.arange(len(y)), greedy.cpu()].numpy()
        draws = torch.multinomial(p, n_samples, replacement=True, generator=g)  # (N, n)
        rows.append({
            "temperature": float(T),
            "greedy_accuracy": float(right.mean()),
            "sampled_accuracy": float((draws == y.cpu()[:, None]).float().mean()),
            "confidence": float(conf.mean()),
            "confidence_when_wrong": float(conf[~right].mean()) if (~right).any() else float("nan"),
            "confidence_when_right": float(conf[right].mean()) if right.any() else float("nan"),
            "self_consistency": float((draws == greedy.cpu()[:, None]).float().mean()),
            "ece": expected_calibration_error(conf, right),
            "n": int(len(y)),
        })
    return rows
