"""Per-tensor reads of a SAM step's host code (issue #16): addresses, sizes, gradients,
contiguity and autograd version bumps of a tensor list.

A fused step's host work is a few cached launches plus these reads, each a pass over every
parameter; as Python-level passes they cost ~50-100 ns a tensor each (the tensor's Python getters),
~20 of them per AdamW SAM step. ``csrc/host.cpp`` does each pass as one C loop (~2-25 ns a
tensor). It is the extension kind ``"host"`` of :mod:`fastsam.kernels._ext` (built just in time,
~20 s once per machine, or ahead of time with ``FASTSAM_BUILD_EXT=1``), loaded by
:func:`activate`, which :class:`fastsam.SAM` calls on its first step with a fused backend
(triton, cuda, cpp); until then, and wherever it cannot be built, the Python twins below run.
Both give the same values (``tests/test_host_ext.py``); only the host time differs.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

_grad_of = operator.attrgetter("grad")
_M: Any = None  # the C++ module once activate() loaded it
_TRIED = [False]


def activate() -> bool:
    """Load (building once if needed) the C++ helpers; True when they are in use. At most one
    attempt per process; a failure warns once (fastsam.kernels._ext) and keeps the Python twins."""
    global _M
    if not _TRIED[0]:
        _TRIED[0] = True
        from .kernels import _ext

        _M = _ext.load("host")
    return _M is not None


def active() -> bool:
    """True when the C++ helpers are in use."""
    return _M is not None


def addresses(ts: Sequence[Tensor | None]) -> tuple[int, ...]:
    """``data_ptr()`` of every tensor, 0 for None (and for tensors without storage)."""
    if _M is not None:
        return _M.addresses(ts)
    return tuple(0 if t is None else t.data_ptr() for t in ts)


def layout(ts: Sequence[Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(addresses, numels)`` of a list of tensors: what cached checks and plans are keyed on."""
    if _M is not None:
        return _M.layout(ts)
    return tuple(map(Tensor.data_ptr, ts)), tuple(map(Tensor.numel, ts))


def layout_equal(ts: Sequence[Tensor], ptrs: tuple[int, ...], numels: tuple[int, ...] | None = None) -> bool:
    """The tensors still have the addresses ``ptrs`` (and sizes ``numels`` unless None): a cached
    layout's check without building the tuples."""
    if _M is not None:
        return _M.layout_equal(ts, ptrs, numels)
    if tuple(map(Tensor.data_ptr, ts)) != ptrs:
        return False
    return numels is None or tuple(map(Tensor.numel, ts)) == numels


def grads(ts: Sequence[Tensor]) -> list[Tensor | None]:
    """``.grad`` of every tensor (None where it has none)."""
    if _M is not None:
        return _M.grads(ts)
    return list(map(_grad_of, ts))


def all_contiguous(ts: Sequence[Tensor | None]) -> bool:
    """Every tensor (None skipped) is strided and contiguous. False also for a sparse one: the
    caller's own check then says what is wrong."""
    if _M is not None:
        return _M.all_contiguous(ts)
    return all(t is None or (t.layout == torch.strided and t.is_contiguous()) for t in ts)


def bump_versions(ts: Sequence[Tensor | None]) -> None:
    """Bump the autograd version counter of every tensor (None skipped), as an in-place op does."""
    if _M is not None:
        _M.bump_versions(ts)
        return
    present = [t for t in ts if t is not None]
    if present:
        torch._C._increment_version(present)


def consecutive_scalars(ts: Sequence[Tensor | None]) -> bool:
    """The tensors are 0-dim views of one storage at consecutive offsets, in order (Adam's step
    counters as :class:`fastsam.SAM` keeps them)."""
    if _M is not None:
        return _M.consecutive_scalars(ts)
    if not ts or any(t is None or t.dim() != 0 for t in ts):
        return False
    st, off = ts[0].untyped_storage().data_ptr(), ts[0].storage_offset()
    return all(t.untyped_storage().data_ptr() == st and t.storage_offset() == off + i  # type: ignore[union-attr]
               for i, t in enumerate(ts))


def count_none(ts: Sequence[Any]) -> int:
    """How many entries are None (identity; ``ts.count(None)`` would call ``Tensor.__eq__``)."""
    if _M is not None:
        return _M.count_none(ts)
    return sum(map(operator.is_, ts, itertools.repeat(None)))


def same(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """``a`` and ``b`` hold the same objects, in order (identity)."""
    if _M is not None:
        return _M.same(a, b)
    return len(a) == len(b) and all(map(operator.is_, a, b))


def state_same(state: Any, skeys: tuple, svals: tuple, entries: tuple) -> bool:
    """A base optimizer's ``state`` is as a cached plan saw it: the same keys in order (``skeys``)
    mapping to the same dicts (``svals``) holding the same objects (``entries``: every dict's values
    in order). False when a state dict or a tensor in one was replaced, added or removed."""
    if _M is not None:
        return _M.state_same(state, skeys, svals, entries)
    if not isinstance(state, dict) or len(state) != len(skeys) or not all(map(operator.is_, state, skeys)) or not all(
            map(operator.is_, state.values(), svals)):
        return False
    try:
        now = tuple(itertools.chain.from_iterable(map(dict.values, svals)))
    except TypeError:  # a state that is not a dict
        return False
    return len(now) == len(entries) and all(map(operator.is_, now, entries))
