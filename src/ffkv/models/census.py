"""Parameter census: where a model's parameters are, and how many memories its FFNs hold.

Built from a config alone on the ``meta`` device (shapes, no storage), so a 70B config is counted in
a second on a laptop. Tied embeddings are counted once, as published parameter counts do.
"""

from __future__ import annotations

from collections import Counter

import torch

from .adapters import get_path, spec_for
from .infer import meta_model
from .loading import load_config
from .model import MemoryModel
from .moe import MoEModel, is_moe, moe_census

COMPONENTS = ("embeddings", "attention", "ffn", "norms", "unembedding", "other")


def census(config_or_model) -> dict:
    """Parameters by component, the FFN share and the number of memory slots.

    Accepts a transformers config, a name/path (resolved by :func:`ffkv.models.loading.load_config`,
    including the shipped configs such as ``llama-2-7b``), a :class:`MemoryModel` or an HF model.
    Returns ``{total_params, ffn_params, ffn_share, memory_slots, n_layers, d_ffn, gated,
    ffn_matrices, components: {embeddings, attention, ffn, norms, unembedding, other}, per_layer}``.
    A mixture-of-experts model or config gets :func:`ffkv.models.moe.moe_census` (memory slots by expert),
    with ``d_ffn`` = an expert's width.
    """
    if isinstance(config_or_model, MoEModel) or (not isinstance(config_or_model, (str, MemoryModel, torch.nn.Module))
                                                  and is_moe(config_or_model)):
        out = moe_census(config_or_model)
        return {**out, "d_ffn": out.get("d_expert")}
    if isinstance(config_or_model, MemoryModel):
        hf = config_or_model.hf
    elif isinstance(config_or_model, torch.nn.Module):
        hf = config_or_model
    else:
        config = load_config(config_or_model) if isinstance(config_or_model, str) else config_or_model
        hf = meta_model(config)
    spec = config_or_model.spec if isinstance(config_or_model, MemoryModel) else spec_for(hf)
    layers = get_path(hf, spec.layers)
    layer_prefix = spec.layers + "."
    ffn_paths = {p for p in (spec.mlp, spec.key, spec.up, spec.value) if p is not None}
    counts: Counter = Counter()
    per_layer = [Counter() for _ in layers]
    for name, p in hf.named_parameters():  # de-duplicated: tied weights appear once
        n = p.numel()
        comp = _component(hf, spec, name, layer_prefix, ffn_paths)
        counts[comp] += n
        if name.startswith(layer_prefix):
            per_layer[int(name[len(layer_prefix):].split(".")[0])][comp] += n
    total = sum(counts.values())
    mm_values = get_path(layers[0], spec.value).weight
    d_ffn = mm_values.shape[0] if spec.conv1d else mm_values.shape[1]
    return {
        "model_type": hf.config.model_type,
        "family": spec.family,
        "total_params": total,
        "ffn_params": counts["ffn"],
        "ffn_share": counts["ffn"] / total if total else 0.0,
        "memory_slots": len(layers) * d_ffn,
        "n_layers": len(layers),
        "d_ffn": d_ffn,
        "gated": spec.gated,
        "ffn_matrices": 3 if spec.gated else 2,
        "tied_embeddings": counts["unembedding"] == 0,
        "components": {c: counts[c] for c in COMPONENTS},
        "per_layer": {c: per_layer[0][c] for c in COMPONENTS} if per_layer else {},
    }


def _component(hf, spec, name: str, layer_prefix: str, ffn_paths: set[str]) -> str:
    module_name = name.rsplit(".", 1)[0]
    for path, comp in ((spec.embed, "embeddings"), (spec.pos_embed, "embeddings"),
                       (spec.unembed, "unembedding"), (spec.final_norm, "norms")):
        if path and (module_name == path or module_name.startswith(path + ".")):
            return comp
    if name.startswith(layer_prefix):
        rel = module_name[len(layer_prefix):].split(".", 1)
        rel = rel[1] if len(rel) > 1 else ""
        if rel == spec.attn or rel.startswith(spec.attn + "."):
            return "attention"
        if any(rel == p or rel.startswith(p + ".") for p in ffn_paths):
            return "ffn"
    if "norm" in type(hf.get_submodule(module_name)).__name__.lower():
        return "norms"
    return "other"


def format_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
