"""Partial forward passes: run only the part of the network a change can reach.

A change made at token ``t`` and layer ``l`` of a causal transformer leaves every position ``< t`` and every
layer ``< l`` exactly as it was. Causal tracing and integrated gradients make thousands of such changes, so
recomputing the whole network for each one (as ROME's and Dai et al.'s code do) wastes most of the work.
:func:`run_tail` computes only the block ``positions >= t0`` x ``layers >= l0``:

- positions ``< t0`` come from a key/value cache of a reference run (the model's own ``past_key_values``),
  cropped to ``t0`` and tiled over the batch;
- layers ``< l0`` are not run: the decoder-layer list is temporarily replaced by its suffix and the residual
  entering layer ``l0`` is written with a ``resid_pre`` edit.

Both use only what every Hugging Face causal LM already supports (its cache and its layer list), so the same
code runs on all adapter families; :func:`check_tail` compares a tail run with a full run and the test suite
runs it on every family.

Cost accounting: :class:`Cost` counts forward passes and *layer-token units*, ``rows x positions x layers``
actually run (a forward pass of ``B`` rows over ``T`` tokens through ``L`` layers costs ``B T L``); the FLOPs
of a decoder layer are, to first order, proportional to the number of tokens it processes.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapters import get_path
from ..models.hooks import Intervention, intervene
from ..models.model import MemoryModel


@dataclass
class Cost:
    """Work done: forward passes, backward passes and layer-token units (rows x positions x layers)."""

    forward_passes: int = 0
    backward_passes: int = 0
    layer_tokens: int = 0
    backward_layer_tokens: int = 0

    def add(self, rows: int, positions: int, layers: int, backward: bool = False):
        self.forward_passes += 1
        self.layer_tokens += rows * positions * layers
        if backward:
            self.backward_passes += 1
            self.backward_layer_tokens += rows * positions * layers

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@contextlib.contextmanager
def layer_suffix(model: MemoryModel, start: int):
    """Make the model run only decoder layers ``start..L-1`` (the layer objects are the same ones).

    Hooks registered on ``model.layer(l)`` keep working, since the suffix holds the same modules.
    """
    if start == 0:
        yield
        return
    parent_path, _, name = model.spec.layers.rpartition(".")
    parent = get_path(model.hf, parent_path)
    full = getattr(parent, name)
    setattr(parent, name, nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(parent, name, full)


def tile_cache(cache, rows: torch.Tensor, length: int):
    """A new cache with the reference cache's rows ``rows`` and its first ``length`` positions.

    The reference cache is not modified (a tail run appends to the copy). None when ``length == 0``.
    """
    if length == 0 or cache is None:
        return None
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        lay = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            if layer.keys.shape[-2] < length:
                from ..errors import FfkvError

                raise FfkvError(f"the prompt is longer than the model's sliding attention window "
                                f"({layer.keys.shape[-2]} tokens)", "use a shorter prompt")
            lay.keys = layer.keys[rows.to(layer.keys.device), :, :length]
            lay.values = layer.values[rows.to(layer.values.device), :, :length]
            if hasattr(lay, "cumulative_length"):
                lay.cumulative_length = length
        new.layers.append(lay)
    return new


def run_tail(model: MemoryModel, input_ids: torch.Tensor, start_layer: int, start_resid: torch.Tensor | None,
             cache=None, prefix_len: int = 0, cache_rows: torch.Tensor | None = None,
             edits: list[Intervention] = (), reads=(), keep_grad: bool = False, cost: Cost | None = None,
             backward: bool = False):
    """Last-position logits of a run that starts at layer ``start_layer`` and position ``prefix_len``.

    input_ids: (B, T') the tokens at positions ``prefix_len .. prefix_len + T' - 1``.
    start_resid: (B, T', d_model) the residual entering ``start_layer`` at those positions (None: computed
    from the embeddings, only when ``start_layer == 0``).
    cache: a reference cache holding positions ``< prefix_len``; ``cache_rows`` (B,) picks its row per
    batch row. Returns ``(logits (B, vocab), recording)``.
    """
    B, T = input_ids.shape
    all_edits = list(edits)
    if start_resid is not None:
        all_edits.insert(0, Intervention("resid_pre", start_layer, "set", value=start_resid))
    past = None
    if prefix_len:
        rows = cache_rows if cache_rows is not None else torch.zeros(B, dtype=torch.long)
        past = tile_cache(cache, rows, prefix_len)
    mask = torch.ones(B, prefix_len + T, dtype=torch.long, device=input_ids.device)
    with layer_suffix(model, start_layer), intervene(model, reads=reads, edits=all_edits,
                                                     keep_grad=keep_grad) as rec:
        out = model.hf(input_ids=input_ids, attention_mask=mask, past_key_values=past,
                       use_cache=past is not None, logits_to_keep=1)
    if cost is not None:
        cost.add(B, T, model.n_layers - start_layer, backward=backward)
    return out.logits[:, -1], rec


@torch.no_grad()
def reference_run(model: MemoryModel, input_ids: torch.Tensor, edits=(), reads=(), cost: Cost | None = None):
    """A full forward pass that also returns its key/value cache: ``(logits (B, T, vocab), rec, cache)``."""
    B, T = input_ids.shape
    with intervene(model, reads=reads, edits=edits) as rec:
        out = model.hf(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
    if cost is not None:
        cost.add(B, T, model.n_layers)
    return out.logits, rec, out.past_key_values


@torch.no_grad()
def check_tail(model: MemoryModel, input_ids: torch.Tensor, start_layer: int, prefix_len: int) -> float:
    """Max |logit difference| between a tail run and the full run it replaces (0 up to float error)."""
    reads = [("resid_pre", start_layer)]
    logits, rec, cache = reference_run(model, input_ids, reads=reads)
    tail, _ = run_tail(model, input_ids[:, prefix_len:], start_layer,
                       rec["resid_pre", start_layer][:, prefix_len:], cache, prefix_len,
                       torch.arange(input_ids.shape[0]))
    return (tail - logits[:, -1]).abs().max().item()
