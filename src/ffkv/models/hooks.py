"""Read and rewrite any site of any layer in one forward pass.

    with intervene(model, reads=[("coef", 3), ("resid_post", 5)],
                   edits=[Intervention("coef", 3, "off", indices=[17, 42]),
                          Intervention("resid_post", 5, "patch", value=clean["resid_post", 5],
                                       positions=[4], batch=[1, 2])]) as rec:
        model(**batch)
    rec["coef", 3]          # (B, T, d_ffn), as the model used it (after the edits)

Sites (``layer`` is None for ``embed``):
    embed        output of the token embedding                   (B, T, d_model)
    resid_pre    residual stream entering layer l                (B, T, d_model)
    resid_post   residual stream leaving layer l                 (B, T, d_model)
    attn_out     attention output of layer l                     (B, T, d_model)
    ffn_in       FFN input (after its norm) of layer l           (B, T, d_model)
    coef         memory coefficients m, the input of W_out       (B, T, d_ffn)
    ffn_out      FFN output W_out m + b = sum_i m_i v_i + b      (B, T, d_model)
    ffn_write    what the FFN adds to the residual stream        (B, T, d_model)
                 (= ffn_out, or post_ffn_norm(ffn_out) in families that normalise the FFN output)

Operations: ``set`` / ``patch`` (write a value or a stored activation), ``scale``, ``add``,
``off`` (zero chosen memories), ``on`` (force chosen memories to a value) and ``fn`` (any function of
the selected slice). Each acts on the slice ``[batch, positions, indices]`` (``None`` = all). Hooks are
removed when the block exits, also on error, so the model is left exactly as it was.

Where each site lives is the adapter's business (:meth:`MemoryModel.site_module`). Partial runs (start at a
layer, stop after one, a head at chosen positions) are :mod:`ffkv.models.engine`, built on :func:`intervene`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Iterable, Sequence

import torch

from ..errors import FfkvError

if TYPE_CHECKING:  # hooks must not import the model at run time (model -> check -> hooks)
    from .model import MemoryModel

SITES = ("embed", "resid_pre", "resid_post", "attn_out", "ffn_in", "coef", "ffn_out", "ffn_write")
OPS = ("set", "patch", "scale", "add", "off", "on", "fn")

Index = None | int | Sequence[int] | torch.Tensor


@dataclass
class Intervention:
    """One rewrite of one site: ``op`` applied to ``h[batch, positions, indices]``.

    value: scalar, tensor broadcastable to the selected slice, a stored activation of the site's full
    shape (``patch``; its own slice is taken), or a callable ``slice -> new slice`` (``fn``).
    """

    site: str
    layer: int | None
    op: str
    value: Any = None
    positions: Index = None
    batch: Index = None
    indices: Index = None

    def __post_init__(self):
        if self.site not in SITES:
            raise FfkvError(f"unknown site '{self.site}'", f"use one of {', '.join(SITES)}")
        if self.op not in OPS:
            raise FfkvError(f"unknown intervention '{self.op}'", f"use one of {', '.join(OPS)}")
        if self.op in ("set", "patch", "scale", "add", "on", "fn") and self.value is None:
            raise FfkvError(f"intervention '{self.op}' needs a value", "pass value=...")

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """Return a rewritten copy of h (B, T, D); h itself is never modified in place."""
        if self.batch is None and self.positions is None and self.indices is None and not h.requires_grad:
            return self._apply_whole(h)
        idx = _block_index(h, self.batch, self.positions, self.indices)
        if self.op == "off":
            new = torch.zeros((), dtype=h.dtype, device=h.device)
        elif self.op == "fn":
            new = self.value(h[idx])
        elif self.op == "patch" or (self.op == "set" and torch.is_tensor(self.value)
                                    and self.value.shape == h.shape):
            new = self.value.to(h.device, h.dtype)
            new = new[idx] if new.shape == h.shape else new
        else:
            v = self.value.to(h.device, h.dtype) if torch.is_tensor(self.value) else self.value
            new = {"set": lambda: v, "on": lambda: v, "scale": lambda: h[idx] * v,
                   "add": lambda: h[idx] + v}[self.op]()
        out = h.clone()
        out[idx] = torch.as_tensor(new, dtype=h.dtype, device=h.device).expand_as(out[idx])
        return out


    def _apply_whole(self, h: torch.Tensor) -> torch.Tensor:
        # The whole tensor is selected: the same values as the indexed path, without building index tensors
        # (a run's starting residual is written this way at every partial run). Not under autograd: there the
        # indexed path's result stays a function of h (a gradient w.r.t. a set site is defined, and zero).
        if self.op == "off":
            return torch.zeros_like(h)
        if self.op == "fn":
            new = self.value(h)
        else:
            v = self.value.to(h.device, h.dtype) if torch.is_tensor(self.value) else self.value
            new = {"set": lambda: v, "patch": lambda: v, "on": lambda: v, "scale": lambda: h * v,
                   "add": lambda: h + v}[self.op]()
        new = torch.as_tensor(new, dtype=h.dtype, device=h.device)
        return new.expand_as(h).clone(memory_format=torch.contiguous_format)


def _as_index(sel: Index, size: int, device) -> torch.Tensor:
    if sel is None:
        return torch.arange(size, device=device)
    t = torch.as_tensor(sel, device=device, dtype=torch.long).reshape(-1)
    if t.numel() and (t.max() >= size or t.min() < -size):
        raise FfkvError(f"index {t.tolist()} out of range for a dimension of size {size}",
                        f"use indices in 0..{size - 1}")
    return t


def _block_index(h, batch, positions, indices):
    """Broadcast index tensors selecting the block ``h[batch][:, positions][..., indices]``."""
    b = _as_index(batch, h.shape[0], h.device)
    t = _as_index(positions, h.shape[1], h.device)
    i = _as_index(indices, h.shape[2], h.device)
    return b[:, None, None], t[None, :, None], i[None, None, :]


class Recording(dict):
    """Activations read during an :func:`intervene` block, keyed by ``(site, layer)``.

    Each value is the site's tensor (B, T, D) as the model used it, i.e. after any edits at that site.
    Detached unless ``keep_grad=True``. ``rec["coef", 3]`` or ``rec[("coef", 3)]``. ``versions`` holds the
    version counter of every read that was kept without a copy (see ``copy`` of :func:`intervene`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.versions: dict = {}

    def __getitem__(self, key):
        if key not in self:
            raise FfkvError(f"site {key} was not recorded", "add it to reads=[...]")
        return super().__getitem__(key)


def normalize_site(model: "MemoryModel", site, layer=None) -> tuple[str, int | None]:
    """``(site, layer)`` from ``("coef", 3)``, ``"coef@3"`` or ``("embed", None)``; the layer made non-negative."""
    if isinstance(site, str) and "@" in site:  # "coef@3"
        site, layer = site.split("@")
        layer = int(layer)
    if site not in SITES:
        raise FfkvError(f"unknown site '{site}'", f"use one of {', '.join(SITES)}")
    if site == "embed":
        return site, None
    if layer is None:
        raise FfkvError(f"site '{site}' needs a layer", "pass (site, layer)")
    return site, model.check_layer(layer)


def _module_for(model: "MemoryModel", site: str, layer: int | None):
    """The module and hook kind ('pre' rewrites its first input, 'post' its first output) of a site.

    The adapter owns this mapping (:meth:`MemoryModel.site_module`): where coefficients are read and where
    the memory writes into the residual stream are facts about a family, not about hooks.
    """
    return model.site_module(site, layer)


def _make_hook(kind: str, key, edits: list[Intervention], rec: Recording | None, keep_grad: bool,
               shape: dict, copy: bool = True):
    def rewrite(h: torch.Tensor) -> torch.Tensor:
        flat = h.dim() == 2  # OPT runs its FFN on (B*T, D): present it as (B, T, D)
        if flat:
            h = h.view(shape["B"], shape["T"], h.shape[-1])
        for e in edits:
            h = e.apply(h)
        if rec is not None:
            rec[key] = h if keep_grad else h.detach()
            if copy:
                # Some models update sub-block outputs in place (Falcon: mlp_out += attn_out), so the model
                # gets a copy and the recording keeps the tensor as it was at this site.
                h = h.clone()
            else:
                rec.versions[key] = h._version
        return h.reshape(-1, h.shape[-1]) if flat else h

    if kind == "pre":
        def pre_hook(module, args, kwargs):
            if args:
                new = rewrite(args[0])
                return (new, *args[1:]), kwargs
            new = rewrite(kwargs["hidden_states"])
            return args, {**kwargs, "hidden_states": new}
        return pre_hook

    def post_hook(module, args, kwargs, output):
        if torch.is_tensor(output):
            return rewrite(output)
        new = rewrite(output[0])
        return (new, *output[1:]) if isinstance(output, tuple) else type(output)((new, *output[1:]))
    return post_hook


@contextlib.contextmanager
def intervene(model: "MemoryModel", reads: Iterable = (), edits: Iterable[Intervention] = (),
              keep_grad: bool = False, copy: bool | Collection[str] = True):
    """Record ``reads`` and apply ``edits`` during every forward pass inside the block.

    reads: sites as ``(site, layer)`` tuples or ``"site@layer"`` strings. Hooks are always removed on
    exit. The forward pass(es) run inside the block; generation works too (the edits apply at every step,
    so use ``positions=None`` for "everywhere").
    copy: True (default) gives the model a copy of every read tensor, so the recording keeps the value at
    the site even if the model later updates that tensor in place; False keeps the very tensor the model
    produced (no copy, no extra memory; exact unless something updates it in place later, which
    ``Recording.versions`` lets a caller check); or the names of the sites to copy.
    """
    rec = Recording()
    groups: dict[tuple, list[Intervention]] = {}
    read_keys = set()
    for r in reads:
        key = normalize_site(model, *r) if isinstance(r, tuple) else normalize_site(model, r)
        read_keys.add(key)
        groups.setdefault(key, [])
    for e in edits:
        key = normalize_site(model, e.site, e.layer)
        groups.setdefault(key, []).append(e)
    handles = []
    shape: dict = {}

    def remember_shape(module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is not None:
            shape["B"], shape["T"] = x.shape[:2]

    try:
        handles.append(model.hf.register_forward_pre_hook(remember_shape, with_kwargs=True))
        for key, group in groups.items():
            module, kind = _module_for(model, *key)
            site_copy = copy if isinstance(copy, bool) else key[0] in copy
            hook = _make_hook(kind, key, group, rec if key in read_keys else None, keep_grad, shape, site_copy)
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield rec
    finally:
        for h in handles:
            h.remove()


def run_with_hooks(model: "MemoryModel", batch: dict, reads: Iterable = (),
                   edits: Iterable[Intervention] = (), keep_grad: bool = False):
    """One forward pass with reads and edits; returns ``(logits, recording)``. logits: (B, T, vocab)."""
    with intervene(model, reads, edits, keep_grad=keep_grad) as rec:
        logits = model.hf(**batch).logits
    return logits, rec


def switch_memories(layer: int, indices: Sequence[int], on_value: float | None = None,
                    positions: Index = None) -> Intervention:
    """Switch memories ``L{layer}.{indices}`` off (``on_value=None``) or force them to ``on_value``."""
    if on_value is None:
        return Intervention("coef", layer, "off", indices=list(indices), positions=positions)
    return Intervention("coef", layer, "on", value=float(on_value), indices=list(indices), positions=positions)

