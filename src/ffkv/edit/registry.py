"""The edit methods: one registry that ``apply_edits``, evaluation, hyperparameter checks and the CLI read.

    from ffkv.edit.registry import METHODS, get_method
    m = get_method("memit")
    m.defaults(model)            # default hyperparameters on this model
    m.layers(hp)                 # the layers they edit
    m.batched                    # True: one update for many requests (evaluation batches distinct subjects)
    m.apply(model, requests, hp, journal, context)

Adding a method is one module in ``ffkv/edit/methods/`` (see its ``__init__``) and one line in ``METHODS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from ..errors import FfkvError
from ..models.model import MemoryModel
from .methods import alphaedit, ft_l, kn, memit, rome


@dataclass(frozen=True)
class EditMethod:
    """One edit method. ``apply(model, requests, hp, journal, context) -> None`` edits through the journal."""

    name: str
    summary: str                                   # one line, for --help and docs tables
    defaults: Callable[[MemoryModel], dict]        # default hyperparameters on this model (a fresh dict)
    layers: Callable[[dict], list[int]]            # the layers an hparams dict edits ([]: not known before)
    apply: Callable                                # apply(model, requests, hp, journal, context) -> None
    batched: bool                                  # True: one update for many requests (MEMIT)
    hparam_docs: dict[str, str]                    # hyperparameter -> one-line meaning

    @classmethod
    def from_module(cls, module: ModuleType) -> "EditMethod":
        """The method a module of :mod:`ffkv.edit.methods` exports (NAME, SUMMARY, BATCHED, HPARAM_DOCS,
        defaults, layers, apply)."""
        return cls(module.NAME, module.SUMMARY, module.defaults, module.layers, module.apply, module.BATCHED,
                   dict(module.HPARAM_DOCS))


METHODS: dict[str, EditMethod] = {
    "rome": EditMethod.from_module(rome),
    "memit": EditMethod.from_module(memit),
    "kn": EditMethod.from_module(kn),
    "alphaedit": EditMethod.from_module(alphaedit),
    "ft-l": EditMethod.from_module(ft_l),
}


def get_method(name: str | EditMethod) -> EditMethod:
    """The registered method called ``name`` (an :class:`EditMethod` is returned as it is)."""
    if isinstance(name, EditMethod):
        return name
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise FfkvError(f"unknown edit method {name!r}", f"use one of {', '.join(METHODS)}") from None
