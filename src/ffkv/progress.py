"""Progress bars: the one place ffkv makes them (issue 13, "never silent").

Every step that can take more than a couple of seconds reports through :func:`bar` or :func:`track`: a tqdm bar on
stderr with a total and an ETA. Bars show when ``enabled`` is true (the CLI passes
:func:`ffkv.clikit.show_progress`, i.e. a terminal and no ``--quiet``); ``FFKV_PROGRESS=1`` forces them on (for a
log file), ``FFKV_PROGRESS=0`` off. Library calls default to ``enabled=False`` so notebooks and tests stay quiet
unless asked.

    for batch in track(batches, desc="mining", unit="batch", enabled=progress):
        ...
    with bar(total=n_tokens, desc="C=E[kk^T]", unit="tok", enabled=progress) as b:
        b.update(n)
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

__all__ = ["bar", "track", "forced"]

T = TypeVar("T")


def forced() -> bool | None:
    """``FFKV_PROGRESS``: True (``1``), False (``0``) or None (unset: the caller decides)."""
    v = os.environ.get("FFKV_PROGRESS", "").strip()
    return None if v == "" else v not in ("0", "false", "no", "off")


def _enabled(enabled: bool) -> bool:
    f = forced()
    return bool(enabled) if f is None else f


def bar(total: int | float | None = None, desc: str = "", unit: str = "it", enabled: bool = False,
        leave: bool = False, **kw) -> tqdm:
    """A tqdm bar on stderr with ``total`` (so it shows an ETA); a no-op bar when not ``enabled``."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave, mininterval=0.5,
                dynamic_ncols=True, disable=not _enabled(enabled), **kw)


def track(iterable: Iterable[T], desc: str = "", unit: str = "it", enabled: bool = False, total: int | None = None,
          leave: bool = False, **kw) -> Iterator[T]:
    """Iterate ``iterable`` with a bar; ``total`` defaults to ``len(iterable)`` when it has one."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return iter(tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave, mininterval=0.5,
                     dynamic_ncols=True, disable=not _enabled(enabled), **kw))
