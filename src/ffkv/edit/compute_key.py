"""The key k* of an edit: the subject's memory coefficients, averaged over context prefixes.

ROME reads the key at the subject's last token, averaged over short texts the model itself generates in
front of the prompt, so that the edit fires whatever precedes the subject:

    k* = (1 / N) Σ_j k(x_j + prompt(subject))        x_0 = "" and x_1..x_{N-1} generated prefixes

k(·) is the input of W_out at layer l (``coef``), shape (d_ffn,). The same k* is used in the update's
numerator and in C^-1 k* (r-ROME's fix of ROME's "disabling edits", which came from mixing the averaged
key with the key of the bare prompt).

On one expert e of a mixture-of-experts layer the key is the expert's coefficient vector m^e, which exists
only at tokens routed to e (:func:`compute_expert_keys`): an expert that the subject's last token of the bare
prompt is not routed to cannot hold the fact (refused), and k* averages m^e over the context prefixes in
which that token is routed to e (in the others the expert does not run; those prefixes are left out).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import FfkvError
from ..models.engine import run
from ..models.moe import MoEModel, expert_intervene
from .requests import EditRequest, render_batch

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_prefix(model, start: str, length: int, generator: torch.Generator, top_k: int = 5) -> str:
    """One context prefix: ``length`` tokens sampled top-k from the model after ``start``, plus ``". "``."""
    tok = model.require_tokenizer()
    ids = tok(start, add_special_tokens=True)["input_ids"]
    n0 = len(ids)
    specials = set(tok.all_special_ids)
    for _ in range(length):
        logits = model.hf(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()
        if specials:
            logits[list(specials)] = float("-inf")
        top = torch.topk(logits, top_k)
        probs = torch.softmax(top.values, -1).cpu()
        ids.append(int(top.indices[int(torch.multinomial(probs, 1, generator=generator))]))
    text = tok.decode(ids[n0 - len(tok(start, add_special_tokens=False)["input_ids"]):],
                      skip_special_tokens=True)
    text = text.replace("{", "").replace("}", "").replace("\n", " ").strip()
    return text + ". "


def context_prefixes(model, spec: Sequence[Sequence[int]] = ((5, 10),), seed: int = 0,
                     cache: dict | None = None) -> list[str]:
    """``[""] +`` generated prefixes: for each ``(length, count)`` in ``spec``, ``count`` of ``length`` tokens.

    Seeded, so the same model, spec and seed give the same prefixes. ROME generates them once per run and
    sequential edits reuse them (its global cache): pass the same ``cache`` dict (an ``EditContext``'s) to
    every call; None generates them afresh. Nothing is stored on the model.
    """
    key = (tuple(tuple(int(x) for x in s) for s in spec), int(seed))
    cache = cache if cache is not None else {}
    if key not in cache:
        g = torch.Generator().manual_seed(int(seed))
        out = [""]
        for length, count in key[0]:
            for j in range(count):
                out.append(generate_prefix(model, PREFIX_STARTS[j % len(PREFIX_STARTS)], length, g))
        cache[key] = out
    return list(cache[key])


@torch.no_grad()
def compute_keys(model, requests: Sequence[EditRequest], layer: int, prefixes: Sequence[str]) -> torch.Tensor:
    """k* of each request at ``layer``, averaged over ``prefixes``: (n_requests, d_ffn) float32.

    One engine run over all ``len(requests) * len(prefixes)`` texts (right-padded; positions are
    unaffected by padding in a causal model), stopping after ``layer``.
    """
    rows = [(p, r) for r in requests for p in prefixes]
    batch = render_batch(model, rows)
    coef = run(model, batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"],
               reads=[("coef", layer)], head="none", copy_reads=False).rec["coef", layer]  # (B, T, d_ffn)
    k = coef[torch.arange(len(rows), device=coef.device), batch.subject_last].float()
    return k.view(len(requests), len(prefixes), -1).mean(1)


@torch.no_grad()
def read_at_subject(model, requests: Sequence[EditRequest], site: str, layer: int, prefix: str = "") -> torch.Tensor:
    """The activation at ``(site, layer)`` at the subject's last token of each bare prompt: (n, D) float32."""
    batch = render_batch(model, [(prefix, r) for r in requests])
    h = run(model, batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"],
            reads=[(site, layer)], head="none").rec[site, layer]
    return h[torch.arange(len(requests), device=h.device), batch.subject_last].float()


@torch.no_grad()
def compute_expert_keys(model, requests: Sequence[EditRequest], layer: int, expert: int, prefixes: Sequence[str]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """k* of each request in expert ``expert`` of MoE layer ``layer`` and its routing weight there.

    Returns ``(K (n_requests, F) float32, w (n_requests,) float32)``: K averages the expert's coefficients
    m^e at the subject's last token over the prefixes where that token is routed to e, w averages the
    routing weight w_e over the same prefixes. ``prefixes[0]`` must be ``""`` (the bare prompt, as
    :func:`context_prefixes` gives): a request whose bare prompt does not route the subject's last token to
    ``expert`` is refused, naming the experts it is routed to.
    """
    rows = [(p, r) for r in requests for p in prefixes]
    batch = render_batch(model, rows)
    with expert_intervene(model, reads=[(layer, expert)]) as rec:
        run(model, batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"], head="none",
            stop_after=layer)
    cap = rec[layer, expert]
    B, P = len(rows), len(prefixes)
    dense = cap.dense(0.0)  # (B, T, F), 0 where not routed: masked out below
    routed = cap.mask()  # (B, T)
    weight = torch.zeros(routed.shape, dtype=torch.float32, device=routed.device)
    weight[cap.batch, cap.position] = cap.weight.float()
    r = torch.arange(B, device=routed.device)
    at = batch.subject_last.to(routed.device)
    hit = routed[r, at].view(len(requests), P)
    for i in range(len(requests)):
        if not bool(hit[i, 0]):
            top = rec.routing[layer][0][i * P, int(at[i * P])].tolist()
            raise FfkvError(f"the subject's last token of {requests[i].prompt.format(requests[i].subject)!r} is not "
                            f"routed to expert {expert} of layer {layer} (it is routed to experts {sorted(top)}), "
                            "so that expert cannot hold the fact",
                            f"edit one of experts {', '.join(map(str, sorted(top)))} at layer {layer}")
    k = dense[r, at].float().view(len(requests), P, -1)
    w = weight[r, at].view(len(requests), P)
    n = hit.sum(1).clamp_min(1).float()
    return (k * hit[..., None]).sum(1) / n[:, None], (w * hit).sum(1) / n


@torch.no_grad()
def routed_experts(model, request: EditRequest, layer: int, prefix: str = "") -> list[tuple[int, float]]:
    """The experts that the subject's last token of ``prefix + prompt`` is routed to at MoE layer ``layer``,
    with their routing weights, heaviest first."""
    batch = render_batch(model, [(prefix, request)])
    with expert_intervene(model, reads=[layer]) as rec:
        run(model, batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"], head="none",
            stop_after=layer)
    idx, w = rec.routing[layer]
    t = int(batch.subject_last[0])
    pairs = [(int(e), float(x)) for e, x in zip(idx[0, t].tolist(), w[0, t].tolist())]
    return sorted(pairs, key=lambda p: -p[1])


def shared_write_scale(model, layer: int) -> bool:
    """True where the dense W_out of ``layer`` writes through a gate: a Qwen2-MoE shared expert, whose output
    enters the block's as ``sigmoid(g . x) W_s m^s``."""
    return isinstance(model, MoEModel) and model.has_shared_expert(layer) and model.moe_spec.shared_gate is not None


@torch.no_grad()
def shared_gates(model, requests: Sequence[EditRequest], layer: int, prefixes: Sequence[str]) -> torch.Tensor:
    """The shared expert's write scale ``sigmoid(g . x)`` at the subject's last token, averaged over
    ``prefixes`` like k*: (n_requests,) float32."""
    rows = [(p, r) for r in requests for p in prefixes]
    batch = render_batch(model, rows)
    x = run(model, batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"],
            reads=[("ffn_in", layer)], head="none").rec["ffn_in", layer]  # (B, T, D) the block's input
    x = x[torch.arange(len(rows), device=x.device), batch.subject_last]
    return model.shared_gate(layer, x).float().view(len(requests), len(prefixes)).mean(1)
