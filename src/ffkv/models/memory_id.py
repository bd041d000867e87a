"""The name of one memory: ``MemoryId(layer, index, expert=None)``.

A memory is one (key, value) pair of one FFN: row ``index`` of ``W_in`` and column ``index`` of ``W_out``
at decoder layer ``layer``; in a mixture-of-experts layer it also names the ``expert`` whose FFN holds it.
Files and the command line use a readable form: ``L3.17`` (dense) and ``L3.E2.17`` (expert 2).

    MemoryId.parse("L3.17")            -> MemoryId(layer=3, index=17)
    str(MemoryId(3, 17, expert=2))     -> "L3.E2.17"
    MemoryId(3, 17).flat(d_ffn)        -> 3 * d_ffn + 17   (row of the atlas's (L * d_ffn, k) tables)
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple

from ..errors import FfkvError

_PATTERN = re.compile(r"^\s*L(\d+)\.(?:E(\d+)\.)?(\d+)\s*$", re.IGNORECASE)


class MemoryId(NamedTuple):
    """One memory: decoder ``layer``, slot ``index`` in that FFN, and ``expert`` (None for dense FFNs)."""

    layer: int
    index: int
    expert: int | None = None

    def __str__(self) -> str:
        if self.expert is None:
            return f"L{self.layer}.{self.index}"
        return f"L{self.layer}.E{self.expert}.{self.index}"

    @classmethod
    def parse(cls, text: "str | MemoryId | tuple") -> "MemoryId":
        """``"L3.17"`` / ``"L3.E2.17"`` / ``(3, 17)`` / ``(3, 17, 2)`` -> MemoryId; bad input is one FfkvError."""
        if isinstance(text, MemoryId):
            return text
        if isinstance(text, (tuple, list)) and len(text) in (2, 3) and all(
                isinstance(v, int) or v is None for v in text):
            return cls(*text)
        m = _PATTERN.match(str(text))
        if not m:
            raise FfkvError(f"{text!r} is not a memory name", "write a memory as L<layer>.<index>, e.g. L3.17, "
                                                                "or L<layer>.E<expert>.<index> for an expert")
        layer, expert, index = m.groups()
        return cls(int(layer), int(index), None if expert is None else int(expert))

    def flat(self, d_ffn: int) -> int:
        """Row of this memory in a table of all a model's dense memories, ``layer * d_ffn + index``."""
        if self.expert is not None:
            raise FfkvError(f"memory {self} belongs to an expert and has no dense flat index",
                            "index expert tables by (layer, expert, index)")
        return self.layer * d_ffn + self.index

    @classmethod
    def from_flat(cls, flat: int, d_ffn: int) -> "MemoryId":
        return cls(int(flat) // d_ffn, int(flat) % d_ffn)

    def check(self, n_layers: int, d_ffn: int, n_experts: int | None = None) -> "MemoryId":
        """Refuse a memory the model does not have, naming the valid ranges."""
        if not 0 <= self.layer < n_layers:
            raise FfkvError(f"memory {self}: layer {self.layer} is out of range for a {n_layers}-layer model",
                            f"use layers 0..{n_layers - 1}")
        if not 0 <= self.index < d_ffn:
            raise FfkvError(f"memory {self}: index {self.index} is out of range for d_ffn={d_ffn}",
                            f"use indices 0..{d_ffn - 1}")
        if self.expert is not None and (n_experts is None or not 0 <= self.expert < n_experts):
            raise FfkvError(f"memory {self}: the model has {'no experts' if not n_experts else f'{n_experts} experts'}"
                            f" at layer {self.layer}",
                            "drop the E<expert> part" if not n_experts else f"use experts 0..{n_experts - 1}")
        return self


def parse_memories(items: Iterable) -> list[MemoryId]:
    """Many memory names at once (strings, tuples or MemoryIds); a comma-separated string is split."""
    out: list[MemoryId] = []
    for item in ([items] if isinstance(items, str) else items):
        if isinstance(item, str):
            out.extend(MemoryId.parse(p) for p in item.split(",") if p.strip())
        else:
            out.append(MemoryId.parse(item))
    return out
