"""MEMIT (Meng et al., 2023): one batch of requests spread over a range of layers.

The equations are in :mod:`ffkv.edit.memit`. Published layers: GPT-2 XL 13-17, GPT-J 3-8; other depths
end at ROME's layer and span about 5 / 48 of the model. On a mixture-of-experts model ``expert`` names the
expert rewritten at each layer (one index for all layers, or a list aligned with ``layers``).
"""

from __future__ import annotations

import copy

from ..memit import layer_experts, memit_edit
from .common import VALUE_DEFAULTS, VALUE_DOCS, tuned
from .rome import default_layer

NAME = "memit"
SUMMARY = "one update for a batch of requests, spread over several layers (Meng et al., 2023)"
BATCHED = True
HPARAM_DOCS = {
    "layers": "the FFN layers whose W_out are rewritten, the residual target is set after the last",
    "clamp_norm_factor": "||delta|| <= clamp_norm_factor * ||h|| after every step",
    "mom2_update_weight": "lambda in (lambda C + K K^T): larger keeps the layer's other outputs closer",
    "expert": "MoE models: the expert whose W_out is rewritten at each layer (one index for all, or a list "
              "aligned with layers); None: the layers' dense W_out",
    **VALUE_DOCS,
}

# (family, n_layers) -> layers: the published choices and the testbed's.
LAYERS_TABLE = {("gpt2", 48): [13, 14, 15, 16, 17], ("gpt-j", 28): [3, 4, 5, 6, 7, 8],
                ("llama", 32): [4, 5, 6, 7, 8], ("gpt-neox", 32): [3, 4, 5, 6, 7, 8],
                ("gpt2", 6): [0, 1, 2], ("llama", 6): [0, 1, 2]}


def default_layers(model) -> list[int]:
    key = (model.family, model.n_layers)
    if key in LAYERS_TABLE:
        return list(LAYERS_TABLE[key])
    top = default_layer(model)
    n = max(1, min(5, top + 1, round(model.n_layers * 5 / 48)))
    return list(range(top - n + 1, top + 1))


def defaults(model) -> dict:
    hp = {**copy.deepcopy(VALUE_DEFAULTS), "layers": default_layers(model), "clamp_norm_factor": 0.75,
          "mom2_update_weight": 15000.0, "expert": None}
    hp.update(tuned(model, NAME))
    return hp


def layers(hp: dict) -> list[int]:
    return list(hp["layers"])


def apply(model, requests, hp: dict, journal, context) -> None:
    """The whole batch at once: one journal entry of rank len(requests) per layer."""
    sites = [l if e is None else (l, e) for l, e in zip(hp["layers"], layer_experts(hp))]
    stats = context.layer_stats(model, sites, hp)
    memit_edit(model, requests, hp, stats, journal, context.context_prefixes(model, hp["prefixes"], hp["seed"]),
               progress=context.progress)
