"""Sequences the fused ops recognize: per-group columns and cached tensor tuples.

**PerGroup**: per-tensor values that are constant within each parameter group.
The fused ops take hyper-parameters per tensor (``rhos``, ``lr``, ...). A training step's values
come from param groups: a handful of distinct values over hundreds of tensors. ``PerGroup`` is a
read-only sequence with one value per tensor (``values[group_of[i]]``), so every backend can index
it like a list, and the Triton launcher reads the group structure directly: a hyper-parameter
row per group, no per-tensor work per step (fastsam.kernels.triton_sam).

**Tensors**: a tuple of tensors that can carry the launch plans built for it. A plain tuple
cannot be weakly referenced, so a process-wide cache keyed by tuples would keep every cached
tensor alive (a deleted model's weights included); a plan stored on the ``Tensors`` object itself
lives exactly as long as that object (fastsam.SAM keeps its layouts' ``Tensors``; they die with
the optimizer).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload


class PerGroup(Sequence):
    """``values[group_of[i]]`` for tensor ``i``; ``group_of`` a tuple shared by the columns of one
    layout (the launcher recognizes the same tuple object and keeps its rows)."""

    __slots__ = ("values", "group_of")

    def __init__(self, values: tuple, group_of: tuple[int, ...]) -> None:
        self.values = values
        self.group_of = group_of

    def __len__(self) -> int:
        return len(self.group_of)

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list: ...

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.values[g] for g in self.group_of[i]]
        return self.values[self.group_of[i]]

    def __iter__(self) -> Iterator[Any]:
        v = self.values
        return (v[g] for g in self.group_of)

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PerGroup(values={self.values!r}, tensors={len(self.group_of)})"


# fastsam.SAM reads its parameters' addresses once per step and leaves them on the layout's
# Tensors under this name right before an op; the Triton launcher takes them (one use, popped)
# instead of reading them again. Set only by code that has just read them.
TRUSTED_PTRS = "_fastsam_ptrs"


class Tensors(tuple):
    """A tuple of tensors (accepted wherever a tuple is) with room for cached launch plans.

    The tensors must not be replaced while the object is alive (a tuple cannot be); the
    parameters' addresses are still checked on every use (``p.data = ...`` swaps storages).
    """

    # no __slots__: a tuple subclass cannot add slots; its __dict__ holds the plans
    def __repr__(self) -> str:
        return f"Tensors({len(self)} tensors)"
