"""Choose the layer to edit by causal tracing: the peak of ``ffkv trace --kind mlp`` at the subject's last token.

For each request (prompt with the subject filled in, ``request.text``; subject ``request.subject``), the MLP causal
trace :func:`ffkv.locate.trace.causal_trace` (kind="mlp", ROME's definition and ``ffkv trace``'s defaults: noise
s3, 10 samples, window 10, seed 1 as ROME's RandomState(1)) gives ``scores[t, l]``, the probability of the answer
with the MLP outputs of the window around layer l restored at token t. At the subject's last token ``e - 1``:

    layer = argmax_{l < L - 1} (1/|R|) sum_{r in R} scores_r[e_r - 1, l]

(the average indirect effect ``mean_r (scores_r - low_r)`` has the same argmax). The answer is the request's
``target_true`` when given (the fact being rewritten), else the model's top prediction (ROME's trace default).

The top layer is never chosen (n_layers > 1). ROME edits the MLP at the subject's last token, and what that MLP
writes reaches the prediction at the last token only through the attention of later layers: an update at the top
layer has no later layer to carry it unless the subject ends the prompt. ROME's own choices sit in the middle of
the network (GPT-2 XL: 17 of 48) and :func:`ffkv.edit.hparams.rome_layer` keeps its relative-depth default below
the top layer for the same reason.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from ..errors import FfkvError
from ..models.model import MemoryModel
from .trace import TraceResult, causal_trace


class TracedRequest(Protocol):
    """What a layer choice reads of an edit request (:class:`ffkv.edit.requests.EditRequest` has it)."""

    text: str
    subject: str
    target_true: str | None


def subject_last_scores(result: TraceResult) -> np.ndarray:
    """``scores[e - 1, :]`` of one trace: restored P(answer) per layer at the subject's last token, (n_layers,)."""
    return np.asarray(result.scores)[result.subject_range[1] - 1]


def trace_profile(model: MemoryModel, requests: Sequence[TracedRequest], **options) -> np.ndarray:
    """Mean over the requests of :func:`subject_last_scores` of their MLP traces, (n_layers,).

    options: keyword arguments of :func:`ffkv.locate.trace.causal_trace` (noise, samples, window, seed,
    subjects, ...); ``kind`` is "mlp" and the answer is each request's ``target_true`` (else the top prediction).
    """
    requests = list(requests)
    if not requests:
        raise FfkvError("no requests to trace", "pass at least one edit request")
    if "kind" in options or "answer" in options:
        raise FfkvError("the layer choice traces kind='mlp' for each request's own answer",
                        "leave kind and answer out of the trace options")
    rows = [subject_last_scores(causal_trace(model, r.text, r.subject, kind="mlp", answer=r.target_true,
                                             **options)) for r in requests]
    return np.mean(rows, axis=0)


def trace_layer(model: MemoryModel, requests: Sequence[TracedRequest], **options) -> int:
    """The layer where the MLP trace at the subject's last token peaks, averaged over ``requests`` (never the
    top layer; see the module docstring). options: as :func:`trace_profile`, ``ffkv trace``'s defaults."""
    profile = trace_profile(model, requests, **options)
    return int(np.argmax(profile[: max(1, model.n_layers - 1)]))
