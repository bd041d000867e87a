"""The engine: every forward pass ffkv makes, whole or in part, in the spirit of baukit's ``Trace(stop=True)``.

:func:`ffkv.models.hooks.intervene` reads and rewrites sites during a forward pass; :func:`run` decides which
part of the network that pass covers and what comes out of it:

    out = run(model, input_ids,                       # (B, T') tokens at positions prefix_len .. prefix_len+T'-1
              reads=[("coef", 3)], edits=[...],       # as for intervene
              start_layer=l0, start_resid=h,          # begin at layer l0 with residual h (B, T', d_model)
              cache=ref_cache, prefix_len=t0,         # positions < t0 from a reference run's key/value cache
              cache_rows=rows,                        # (B,) which cached row each batch row continues
              stop_after=l1,                          # run no layer deeper than l1 (then head must be "none")
              head="full" | "last" | "none" | (rows, positions))
    out.logits   (B, T', V) | (B, V) | None | (n, ..., V)
    out.rec      the Recording of ``reads``          out.cache   the run's own cache (return_cache=True)

Start. A change at token ``t0`` and layer ``l0`` of a causal transformer leaves every position ``< t0`` and every
layer ``< l0`` as it was. Positions ``< t0`` come from a key/value cache of a reference run (the model's own
``Cache``), cropped to ``t0`` and tiled over the batch (:func:`tile_cache`); layers ``< l0`` are not run: the
decoder-layer list is temporarily replaced by its suffix (:func:`layer_suffix`, the same layer objects, so hooks
keep working) and the residual entering ``l0`` is written with a ``resid_pre`` edit.

Stop. ``stop_after=l`` raises an internal exception in a hook on layer ``l``'s output and catches it here:
no deeper layer, no final norm and no head run. Hooks are removed whatever happens (also when the model or
an edit raises), and the layer list is restored.

Head. ``"full"``: the model's own forward pass and LM head, logits (B, T', V). ``"last"``: the model's own head
at the last position only (``logits_to_keep=1``), (B, V). ``"none"``: no head; the run stops after the deepest
layer that a read or edit needs (or ``stop_after``). ``(rows, positions)`` with rows (n,) and positions (n, ...):
the body runs to the last layer and stops, and the family's real head :meth:`MemoryModel.unembed` (final norm,
final projection, unembedding, final-logit soft-capping) is applied only to ``h[rows, positions]``, giving
(n, ..., V): a loss that reads a few positions per row then costs ``n x V`` logits instead of ``B x T' x V``.

Reads without copies. ``copy_reads=False`` keeps the very tensor the model produced at each read site (no
clone). That is exact unless the model updates the tensor in place later in the pass: one supported family
does (Falcon's parallel layers run ``mlp_output += attention_output``, so ``ffn_out``/``ffn_write`` are copied
there, :data:`COPIED_READS`), and every uncopied read's version counter is checked after the run, so an
in-place update elsewhere is an error, never a silently wrong value. ``copy_reads=True`` copies every read
(what :func:`intervene` does by default).

Cost model (:class:`Cost`): forward passes and *layer-token units*, ``rows x positions x layers`` actually
run; a forward pass of ``B`` rows over ``T'`` new tokens through layers ``l0..l1`` costs ``B T' (l1 - l0 + 1)``.
To first order the FLOPs of a decoder layer are proportional to the tokens it processes (attention over the
cached prefix adds ``O(t0)`` per token); a head adds ``B T' d_model V`` multiply-adds (full), ``B d_model V``
(last) or ``n d_model V`` (at positions).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from ..errors import FfkvError
from .adapters import get_path
from .hooks import Intervention, Recording, intervene, normalize_site

if TYPE_CHECKING:
    from .model import MemoryModel

HEADS = ("full", "last", "none")
# Families whose forward pass updates a read site's tensor in place after it was produced: those sites are
# copied even in a run with copy_reads=False (the version check in run() catches any family not listed).
COPIED_READS = {"falcon": ("ffn_out", "ffn_write")}


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


@dataclass
class Run:
    """What :func:`run` returns. logits: see ``head``; rec: the reads; cache: the run's cache or None;
    stopped_after: the deepest layer that ran."""

    logits: torch.Tensor | None
    rec: Recording
    cache: Any = None
    stopped_after: int | None = None


class _Stop(Exception):
    """Raised in the hook after the stop layer; caught by :func:`run` (never escapes it)."""


# ----------------------------------------------------------------------------------------------- pieces
@contextlib.contextmanager
def layer_suffix(model: "MemoryModel", start: int):
    """Make the model run only decoder layers ``start..L-1`` (the layer objects are the same ones).

    Hooks registered on ``model.layer(l)`` keep working, since the suffix holds the same modules. Families
    that pick each layer's mask or rotary embedding from ``config.layer_types[i]`` by list position (Gemma-2/3,
    Qwen3) get the suffix of that list too. Both are restored on exit.
    """
    if start == 0:
        yield
        return
    parent_path, _, name = model.spec.layers.rpartition(".")
    parent = get_path(model.hf, parent_path)
    full = getattr(parent, name)
    cfg = getattr(parent, "config", None)
    types = getattr(cfg, "layer_types", None)
    setattr(parent, name, nn.ModuleList(list(full)[start:]))
    if types is not None:
        cfg.layer_types = list(types)[start:]
    try:
        yield
    finally:
        setattr(parent, name, full)
        if types is not None:
            cfg.layer_types = types


def tile_cache(cache, rows: torch.Tensor, length: int, layers: range | None = None):
    """A new cache with the reference cache's rows ``rows`` (B,) and its first ``length`` positions.

    The reference cache is not modified (a run appends to the copy). None when ``length == 0``. ``layers``: the
    decoder layers the run will execute (default: all); the others get a zero-copy view of the right shape (the
    model reads only their length), so a run of one layer copies one layer's keys and values, not all of them.
    """
    if length == 0 or cache is None:
        return None
    new = copy.copy(cache)
    new.layers = []
    for i, layer in enumerate(cache.layers):
        lay = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            if layer.keys.shape[-2] < length:
                raise FfkvError(f"the prompt is longer than the model's sliding attention window "
                                f"({layer.keys.shape[-2]} tokens)", "use a shorter prompt")
            if layers is None or i in layers:
                lay.keys = layer.keys[rows.to(layer.keys.device), :, :length]
                lay.values = layer.values[rows.to(layer.values.device), :, :length]
            else:
                shape = (rows.numel(), *layer.keys.shape[1:-2], length, layer.keys.shape[-1])
                lay.keys = layer.keys[:1, ..., :length, :].expand(shape)
                lay.values = layer.values[:1, ..., :length, :].expand(
                    (rows.numel(), *layer.values.shape[1:-2], length, layer.values.shape[-1]))
            if hasattr(lay, "cumulative_length"):
                lay.cumulative_length = length
        new.layers.append(lay)
    return new


def _stop_hook(box: dict):
    def hook(module, args, kwargs, output):
        box["hidden"] = output if torch.is_tensor(output) else output[0]
        raise _Stop
    return hook


def _stop_pre_hook(module, args, kwargs):
    raise _Stop


def _copied_sites(model: "MemoryModel", copy_reads: bool):
    return True if copy_reads else COPIED_READS.get(model.family, ())


def _check_versions(rec: Recording):
    for key, version in rec.versions.items():
        if rec[key]._version != version:
            raise FfkvError(f"the model updated site {key} in place after it was read, so an uncopied read "
                            f"is not its value at the site", "read it with copy_reads=True and report the family")


# ----------------------------------------------------------------------------------------------- the run
def run(model: "MemoryModel", input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
        reads: Iterable = (), edits: Iterable[Intervention] = (), head="full", start_layer: int = 0,
        start_resid: torch.Tensor | None = None, cache=None, prefix_len: int = 0,
        cache_rows: torch.Tensor | None = None, stop_after: int | None = None, keep_grad: bool = False,
        copy_reads: bool = True, return_cache: bool = False, cost: Cost | None = None,
        backward: bool = False, stop_at: tuple[str, int] | None = None) -> Run:
    """One forward pass over layers ``start_layer ..`` and positions ``prefix_len ..`` (module docstring).

    input_ids: (B, T'); attention_mask: (B, prefix_len + T') or None (all ones when a prefix is cached);
    start_resid: (B, T', d_model) the residual entering ``start_layer`` (None: from the embeddings, only
    with ``start_layer == 0``); cache: a reference run's cache holding positions ``< prefix_len``, row
    ``cache_rows[b]`` (default 0) continuing batch row b. ``cost``/``backward``: add this pass to a
    :class:`Cost` (``backward=True`` when the caller will backpropagate through it). ``stop_at=(site, l)``
    (head "none"): stop inside layer ``l`` as soon as that site is computed, e.g. ``("coef", l)`` skips layer
    l's ``W_out`` and what follows; every other read and edit must lie in an earlier layer. Returns a
    :class:`Run`.
    """
    L = model.n_layers
    B, T = input_ids.shape
    reads, edits = list(reads), list(edits)
    start_layer = model.check_layer(start_layer)
    if start_layer and start_resid is None:
        raise FfkvError(f"a run that starts at layer {start_layer} needs start_resid", "pass the residual entering it")
    at = None
    if isinstance(head, str):
        if head not in HEADS:
            raise FfkvError(f"unknown head {head!r}", f"use one of {', '.join(HEADS)} or (rows, positions)")
    else:
        rows, positions = (torch.as_tensor(x, device=input_ids.device, dtype=torch.long) for x in head)
        at = rows.view(-1, *[1] * (positions.dim() - 1)), positions
        head = "at"
    keys = [normalize_site(model, *r) if isinstance(r, tuple) else normalize_site(model, r) for r in reads]
    keys += [normalize_site(model, e.site, e.layer) for e in edits]
    stop_key = None
    if stop_at is not None:
        stop_key = normalize_site(model, *stop_at)
        if head != "none" or stop_after is not None:
            raise FfkvError("a run that stops at a site has no head and no stop_after", "pass head='none' only")
        later = [k for k in keys if k != stop_key and (k[1] is None or k[1] >= stop_key[1])]
        if later:
            raise FfkvError(f"sites {later} do not lie before {stop_key}", "stop at the deepest site read")
        stop_after = stop_key[1]
    if stop_after is not None:
        if head != "none":
            raise FfkvError(f"a run that stops after layer {stop_after} has no head", "pass head='none'")
        stop = model.check_layer(stop_after)
    elif head == "none":
        stop = max([l for _, l in keys if l is not None], default=L - 1)
    else:
        stop = L - 1
    deeper = [k for k in keys if k[1] is not None and not start_layer <= k[1] <= stop]
    if stop < start_layer or deeper:
        raise FfkvError(f"sites {deeper} lie outside the layers {start_layer}..{stop} that this run covers"
                        if deeper else f"stop layer {stop} is before start layer {start_layer}",
                        "read and edit only layers the run covers")
    if start_resid is not None:
        edits.insert(0, Intervention("resid_pre", start_layer, "set", value=start_resid))
    past = None
    if prefix_len:
        rows_c = cache_rows if cache_rows is not None else torch.zeros(B, dtype=torch.long)
        past = tile_cache(cache, rows_c, prefix_len, range(start_layer, stop + 1))
        if attention_mask is None:
            attention_mask = torch.ones(B, prefix_len + T, dtype=torch.long, device=input_ids.device)
    kwargs: dict = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if past is not None:
        kwargs["cache"] = past
    kwargs["use_cache"] = past is not None or return_cache
    if head == "last":
        kwargs["logits_to_keep"] = 1
    box: dict = {}
    out = None
    stops = head in ("none", "at")
    if return_cache and stops and stop < L - 1:
        raise FfkvError("a run that stops early returns no cache", "run to the last layer for return_cache")
    with layer_suffix(model, start_layer), intervene(model, reads=reads, edits=edits, keep_grad=keep_grad,
                                                     copy=_copied_sites(model, copy_reads)) as rec:
        if stop_key is not None:
            module, kind = model.site_module(*stop_key)
            handle = module.register_forward_pre_hook(_stop_pre_hook, with_kwargs=True) if kind == "pre" else \
                module.register_forward_hook(_stop_hook({}), with_kwargs=True)
        else:
            handle = model.layer(stop).register_forward_hook(_stop_hook(box), with_kwargs=True) if stops else None
        try:
            out = model.hf(**kwargs)
        except _Stop:
            pass
        finally:
            if handle is not None:
                handle.remove()
    _check_versions(rec)
    if cost is not None:
        cost.add(B, T, stop - start_layer + 1, backward=backward)
    logits = None
    if head in ("full", "last"):
        logits = out.logits if head == "full" else out.logits[:, -1]
    elif head == "at":
        r, p = at
        logits = model.unembed(box["hidden"][r, p])
    new_cache = out.cache if (return_cache and out is not None) else None
    return Run(logits, rec, new_cache, stop)


# ----------------------------------------------------------------------------------------------- shorthands
def run_tail(model: "MemoryModel", input_ids: torch.Tensor, start_layer: int, start_resid: torch.Tensor | None,
             cache=None, prefix_len: int = 0, cache_rows: torch.Tensor | None = None,
             edits: Iterable[Intervention] = (), reads: Iterable = (), keep_grad: bool = False,
             cost: Cost | None = None, backward: bool = False) -> tuple[torch.Tensor, Recording]:
    """Last-position logits of a run that starts at layer ``start_layer`` and position ``prefix_len``.

    input_ids: (B, T') the tokens at positions ``prefix_len .. prefix_len + T' - 1``; start_resid
    (B, T', d_model); cache/cache_rows as in :func:`run`. Returns ``(logits (B, vocab), recording)``.
    """
    out = run(model, input_ids, reads=reads, edits=edits, head="last", start_layer=start_layer,
              start_resid=start_resid, cache=cache, prefix_len=prefix_len, cache_rows=cache_rows,
              keep_grad=keep_grad, cost=cost, backward=backward)
    return out.logits, out.rec


@torch.no_grad()
def reference_run(model: "MemoryModel", input_ids: torch.Tensor, edits: Iterable[Intervention] = (),
                  reads: Iterable = (), cost: Cost | None = None):
    """A full forward pass that also returns its key/value cache: ``(logits (B, T, vocab), rec, cache)``."""
    out = run(model, input_ids, attention_mask=torch.ones_like(input_ids), reads=reads, edits=edits,
              return_cache=True, cost=cost)
    return out.logits, out.rec, out.cache


@torch.no_grad()
def check_tail(model: "MemoryModel", input_ids: torch.Tensor, start_layer: int, prefix_len: int) -> float:
    """Max |logit difference| between a tail run and the full run it replaces (0 up to float error)."""
    reads = [("resid_pre", start_layer)]
    logits, rec, cache = reference_run(model, input_ids, reads=reads)
    tail, _ = run_tail(model, input_ids[:, prefix_len:], start_layer,
                       rec["resid_pre", start_layer][:, prefix_len:], cache, prefix_len,
                       torch.arange(input_ids.shape[0]))
    return (tail - logits[:, -1]).abs().max().item()


@torch.no_grad()
def capture_coefficients(model: "MemoryModel", input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
    """Memory coefficients m (the input of W_out, site ``coef``) of ``layers`` (default: all), one pass.

    input_ids, attention_mask: (B, T). Returns ``{layer: (B, T, d_ffn)}``, the tensors the model itself fed
    W_out (no copy). No head runs and the pass stops at the deepest requested coefficient (before that
    layer's W_out).
    """
    layers = list(range(model.n_layers)) if layers is None else [model.check_layer(l) for l in layers]
    out = run(model, input_ids, attention_mask=attention_mask, reads=[("coef", l) for l in layers], head="none",
              copy_reads=False, stop_at=("coef", max(layers)))
    return {l: out.rec["coef", l] for l in layers}
