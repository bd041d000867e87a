"""ROME (Meng et al., 2022): each request is a rank-one update of one layer's W_out.

The equations are in :mod:`ffkv.edit.rome` (the update), :mod:`ffkv.edit.compute_key` (k*) and
:mod:`ffkv.edit.compute_value` (v*). Published layers: GPT-2 XL 17 of 48, GPT-J 5 of 28; other depths use
the same relative depth, below the top layer. ``layer="trace"`` picks the layer by causal tracing of the
requests (:func:`ffkv.locate.layer_choice.trace_layer`, the peak of ``ffkv trace --kind mlp``).
On a mixture-of-experts model ``expert=e`` rewrites expert e's W_out of that layer (``expert="top"``: the
expert with the largest routing weight at each request's subject's last token); the default None edits a
dense W_out (a Qwen2-MoE shared expert, a layer without experts) and is refused on an MoE layer without one.
"""

from __future__ import annotations

import copy

from ...errors import FfkvError
from ...progress import track
from ..compute_key import compute_expert_keys, routed_experts
from ..rome import rome_edit
from .common import VALUE_DEFAULTS, VALUE_DOCS, tuned

NAME = "rome"
SUMMARY = "rank-one update of one layer's W_out per request (Meng et al., 2022)"
BATCHED = False
HPARAM_DOCS = {
    "layer": "the FFN layer whose W_out is rewritten; 'trace' picks it by causal tracing of the requests",
    "clamp_norm_factor": "||delta|| <= clamp_norm_factor * ||h|| after every step",
    "trace_noise": "noise of layer='trace' (as ffkv trace --noise: s3 = 3 x embedding std, or a number)",
    "expert": "MoE models: the expert whose W_out is rewritten (an index, or 'top': the heaviest routed one); "
              "None: the layer's dense W_out",
    **VALUE_DOCS,
}

# (family, n_layers) -> layer: the published choices and the testbed's.
LAYER_TABLE = {("gpt2", 48): 17, ("gpt2", 36): 12, ("gpt2", 24): 8, ("gpt2", 12): 4, ("gpt-j", 28): 5,
               ("llama", 32): 5, ("gpt-neox", 32): 5, ("gpt2", 6): 0, ("llama", 6): 0}
# relative depth of the layer when no entry matches (GPT-2 XL: 17 / 48)
RELATIVE_DEPTH = 17 / 48


def default_layer(model) -> int:
    """ROME's layer on this model (the table, else the relative depth)."""
    key = (model.family, model.n_layers)
    if key in LAYER_TABLE:
        return LAYER_TABLE[key]
    # below the top layer: an edit at the subject's last token must reach the prediction through attention
    return max(0, min(model.n_layers - 2, round(RELATIVE_DEPTH * model.n_layers)))


def defaults(model) -> dict:
    hp = {**copy.deepcopy(VALUE_DEFAULTS), "layer": default_layer(model), "clamp_norm_factor": 4.0,
          "trace_noise": "s3", "expert": None}
    hp.update(tuned(model, NAME))
    return hp


def layers(hp: dict) -> list[int]:
    return [] if hp["layer"] == "trace" else [hp["layer"]]


def apply(model, requests, hp: dict, journal, context) -> None:
    """One rank-one update per request, in order (a later request sees the earlier edits)."""
    layer = hp["layer"]
    expert = hp.get("expert")
    prefixes = context.context_prefixes(model, hp["prefixes"], hp["seed"])
    if expert is None:
        stats = context.layer_stats(model, [layer], hp)[layer]
    for r in track(requests, desc="ROME", unit="edit", enabled=context.progress and len(requests) > 1):
        if expert is None:
            rome_edit(model, r, hp, stats, journal, prefixes, progress=context.progress)
            continue
        e = pick_expert(model, r, layer, expert)
        compute_expert_keys(model, [r], layer, e, [""])  # refuses an unrouted expert before its statistics
        site = (layer, e)
        rome_edit(model, r, {**hp, "expert": e}, context.layer_stats(model, [site], hp)[site], journal, prefixes,
                  progress=context.progress)


def pick_expert(model, request, layer: int, expert) -> int:
    """The expert index an ``expert`` hyperparameter names for one request ('top': its heaviest routed one)."""
    if expert == "top":
        return routed_experts(model, request, layer)[0][0]
    if isinstance(expert, bool) or not isinstance(expert, int):
        raise FfkvError(f"hyperparameter expert={expert!r} is not an expert index", "pass an integer or 'top'")
    return expert
