"""Rows of a batch that one step works on, and the way back: the host-side compaction that the aligner
(:class:`~gpu_align.align.FaceAligner`) and the run's align stage share.

A step often reads only some photos of a batch (the usable ones, those without given faces, those with a crop)
as a compacted list, and its outputs go back to their batch rows. :class:`Rows` holds that subset once, so no
step keeps its own list of ids next to a dict of positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from gpu_align.device import to_device

T = TypeVar("T")


@dataclass(frozen=True)
class Rows:
    """Rows ``ids`` (ascending) of a batch of ``size``; compacted, row ``ids[k]`` lands at position ``k``.

    Host data only: building one never touches the device; :meth:`index` and :meth:`mask` are one asynchronous
    host→device copy each (:func:`~gpu_align.device.to_device`: no host sync; a plain ``torch.tensor(...,
    device="cuda")`` would wait for the stream's queued work).
    """

    ids: tuple[int, ...]
    size: int
    _pos: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pos", {i: k for k, i in enumerate(self.ids)})

    @classmethod
    def where(cls, keep: Iterable[bool]) -> Rows:
        """The rows whose ``keep`` entry is true (``keep``: one bool per row of the batch)."""
        flags = list(keep)
        return cls(tuple(i for i, k in enumerate(flags) if k), len(flags))

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __contains__(self, row: object) -> bool:
        return row in self._pos

    def __or__(self, other: Rows) -> Rows:
        return Rows(tuple(sorted({*self.ids, *other.ids})), self.size)

    def __and__(self, other: Rows) -> Rows:
        return Rows(tuple(i for i in self.ids if i in other), self.size)

    def __sub__(self, other: Rows) -> Rows:
        return Rows(tuple(i for i in self.ids if i not in other), self.size)

    def position(self, row: int) -> int:
        """Where batch row ``row`` (one of :attr:`ids`) lands in the compacted list."""
        return self._pos[row]

    def positions(self, rows: Iterable[int]) -> list[int]:
        """:meth:`position` of each of ``rows`` (e.g. a sub-subset's ids: which compacted item each reads)."""
        return [self._pos[i] for i in rows]

    def take(self, items: Sequence[T]) -> list[T]:
        """The compacted list: ``items[i]`` for each row ``i`` (``items``: one entry per batch row)."""
        return [items[i] for i in self.ids]

    def only(self, items: Sequence[T]) -> list[T | None]:
        """``items`` (one entry per batch row) with None at every row not in this subset."""
        return [v if i in self._pos else None for i, v in enumerate(items)]

    def scatter(self, values: Sequence[T], fill: Sequence[T]) -> list[T]:
        """Back to batch rows: ``values[k]`` at row ``ids[k]``, ``fill[i]`` at every other row ``i``."""
        out = list(fill)
        for i, v in zip(self.ids, values, strict=True):
            out[i] = v
        return out

    def index(self, device: torch.device) -> torch.Tensor:
        """``(len(self),)`` int64 row indices on ``device``."""
        return to_device(torch.tensor(self.ids, dtype=torch.int64), device)

    def mask(self, device: torch.device) -> torch.Tensor:
        """``(size,)`` bool on ``device``, True at these rows."""
        return to_device(torch.tensor([i in self._pos for i in range(self.size)], dtype=torch.bool), device)


__all__ = ["Rows"]
