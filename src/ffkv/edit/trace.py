"""Choose the edit layer by causal tracing (ROME's MLP trace, restoring one layer at a time).

For each request the subject's token embeddings are corrupted with Gaussian noise (σ = noise · std of the
embedding matrix), which destroys the fact; then the FFN output of one layer at the subject's last token is
restored to its clean value. The indirect effect of layer l is

    IE_l = E_noise[ p(o | corrupted, FFN_l restored) ] - E_noise[ p(o | corrupted) ]

with o the object the model predicts now (``target_true``, else its top token). The layer with the largest
IE averaged over the requests is where the fact's key-value lookup happens, and where ROME edits it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..models.hooks import Intervention, intervene
from .requests import EditRequest, render_batch


@torch.no_grad()
def ffn_indirect_effects(model, request: EditRequest, n_samples: int = 8, noise: float = 3.0, seed: int = 0
                         ) -> torch.Tensor:
    """IE_l of every layer's FFN output at the subject's last token: (n_layers,) float32."""
    b = render_batch(model, [("", request)])
    start, end = model.find_subject(request.text, request.subject)
    last = int(b.subject_last[0])
    layers = list(range(model.n_layers))
    with intervene(model, reads=[("ffn_out", l) for l in layers]) as rec:
        probs = torch.softmax(model.hf(**b.inputs).logits[0, int(b.last[0])].float(), -1)
    answer = model.answer_id(request.target_true) if request.target_true else int(probs.argmax())
    clean = {l: rec["ffn_out", l][0, last] for l in layers}
    g = torch.Generator().manual_seed(seed)
    sigma = noise * float(model.embedding.weight.float().std())
    z = (torch.randn(n_samples, end - start, model.d_model, generator=g) * sigma).to(model.device, model.dtype)
    ids = b.input_ids.expand(n_samples, -1)
    mask = b.attention_mask.expand(n_samples, -1)
    corrupt = Intervention("embed", None, "add", value=z, positions=list(range(start, end)))

    def p_answer(edits):
        with intervene(model, edits=edits):
            logits = model.hf(input_ids=ids, attention_mask=mask).logits[:, int(b.last[0])].float()
        return torch.softmax(logits, -1)[:, answer].mean()

    base = p_answer([corrupt])
    return torch.stack([p_answer([corrupt, Intervention("ffn_out", l, "set", value=clean[l], positions=[last])])
                        for l in layers]) - base


def trace_layer(model, requests: Sequence[EditRequest], n_samples: int = 8, noise: float = 3.0, seed: int = 0) -> int:
    """The layer whose FFN output at the subject's last token has the largest mean indirect effect."""
    ie = torch.stack([ffn_indirect_effects(model, r, n_samples, noise, seed) for r in requests]).mean(0)
    return int(ie[: max(1, model.n_layers - 1)].argmax())  # never the top layer (see hparams.rome_layer)
