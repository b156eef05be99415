"""Tensor-group layer for the multi-tensor Triton kernels (host side only; no triton import).

A fused op receives Python lists of tensors (parameters, gradients, optimizer state, ...). The
kernels see them as *device tables*:

- one **group** per (device, dtype): the tensors of a group share one launch set;
- an **int64 table**, column-major (entry ``col * ntensors + t``): one column of data addresses
  per list (0 where a list has no entry for a tensor), the element counts, and the global element
  offsets (ESAM mask index);
- a **float table** of per-tensor hyperparameters (rho, lr, ...), column-major likewise, in the
  group's compute dtype;
- a **block table** ``blocks[b] = t * 2^32 + j``: block ``b`` covers elements
  ``[j * BLOCK, (j + 1) * BLOCK)`` of tensor ``t``. Every tensor has at least one block (an
  empty tensor gets one fully masked block, so per-tensor flags are still written). Persistent
  programs walk the blocks with a grid stride, so a launch costs the same whatever the number
  of tensors.

Tables are mirrored on the device and cached: a table is re-uploaded only when its host values
change (new storage, new hyperparameter values), with a pinned, non-blocking copy on CUDA, so a
step never waits on the device. The block table depends only on element counts and BLOCK.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Counts of uploads (host -> device table copies) since import: the launch-count test and the
# benchmark read it (a copy is no kernel launch, but it is device work all the same).
UPLOADS = [0]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math dtype of a parameter dtype: float32 for fp32/bf16/fp16, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class DeviceMirror:
    """A 1-D device tensor that mirrors a tuple of host numbers, re-uploaded only on change.

    A new device tensor is allocated on every change (never overwritten in place), so a kernel
    still queued on the stream keeps reading the values it was launched with; the caching
    allocator recycles the old block in stream order.
    """

    __slots__ = ("dtype", "key", "device", "tensor", "_memo", "_memo_for", "_streams")

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.key: tuple | None = None
        self.device: torch.device | None = None
        self.tensor: Tensor | None = None
        self._memo: dict[str, object] = {}
        self._memo_for: Tensor | None = None
        self._streams: set[int] = set()  # CUDA streams the current tensor was handed out on

    def memo(self, name: str, fn: Callable[[], object]) -> object:
        """``fn()``, computed once per uploaded table: host-side facts about the current values
        (e.g. whether every address is 16-byte aligned) at no cost on the steps that reuse it."""
        if self._memo_for is not self.tensor:
            self._memo, self._memo_for = {}, self.tensor
        if name not in self._memo:
            self._memo[name] = fn()
        return self._memo[name]

    def get(self, values: tuple, device: torch.device) -> Tensor:
        if self.tensor is not None and values == self.key and device == self.device:
            if device.type == "cuda":
                self._on_stream()
            return self.tensor
        self.tensor = upload(values, self.dtype, device)
        self.key, self.device = values, device
        if device.type == "cuda":
            self._streams = {torch.cuda.current_stream(device).cuda_stream}  # allocated (and copied) here
        return self.tensor

    def _on_stream(self) -> None:
        """A kept table used on another stream than the one it was allocated on: recorded there,
        so that the caching allocator does not hand its memory out again (when the table is
        replaced) before that stream's kernels have read it."""
        assert self.tensor is not None and self.device is not None
        cur = torch.cuda.current_stream(self.device)
        if cur.cuda_stream not in self._streams:
            self.tensor.record_stream(cur)
            self._streams.add(cur.cuda_stream)


def upload(values: Sequence[int | float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host values -> new device tensor, without a host sync (pinned + non_blocking on CUDA)."""
    UPLOADS[0] += 1
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype) if len(values) else torch.zeros(1, dtype=dtype)
    host = torch.tensor(values if len(values) else [0], dtype=dtype, pin_memory=device.type == "cuda")
    out = torch.empty(host.shape, dtype=dtype, device=device)
    out.copy_(host, non_blocking=True)
    return out


class BlockTable:
    """``blocks[b] = t * 2^32 + j`` for every BLOCK-element block of every tensor (>= 1 per tensor)."""

    __slots__ = ("key", "device", "tensor", "count", "_mirror")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.device: torch.device | None = None
        self.tensor: Tensor | None = None
        self.count = 0
        self._mirror = DeviceMirror(torch.int64)  # (its stream bookkeeping)

    def get(self, numels: tuple[int, ...], block: int, device: torch.device) -> tuple[Tensor, int]:
        key = (numels, block)
        if self.tensor is not None and key == self.key and device == self.device:
            if device.type == "cuda":
                self._mirror._on_stream()
            return self.tensor, self.count
        counts = torch.tensor([max(1, -(-n // block)) for n in numels], dtype=torch.int64)
        total = int(counts.sum()) if len(numels) else 0
        tid = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        j = torch.arange(total, dtype=torch.int64) - first
        host = tid * (1 << 32) + j
        self.tensor = self._mirror.get(tuple(host.tolist()), device)
        self.key, self.device, self.count = key, device, total
        return self.tensor, self.count


@dataclass
class Group:
    """The tensors of one (device, dtype) group: ``idx`` are positions in the op's main list."""

    device: torch.device
    dtype: torch.dtype
    idx: list[int]

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.dtype)


def group_by_device_dtype(tensors: Sequence[Tensor]) -> list[Group]:
    """Groups in order of first appearance; within a group the list order is kept."""
    groups: dict[tuple[torch.device, torch.dtype], Group] = {}
    for i, t in enumerate(tensors):
        key = (t.device, t.dtype)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(t.device, t.dtype, [])
        g.idx.append(i)
    return list(groups.values())


class TableCache:
    """Per (op, device, dtype, table kind) mirrors; a few optimizers alternating only cost uploads."""

    def __init__(self) -> None:
        self._mirrors: dict[tuple, DeviceMirror] = {}
        self._blocks: dict[tuple, BlockTable] = {}

    def mirror(self, key: tuple, dtype: torch.dtype) -> DeviceMirror:
        m = self._mirrors.get(key)
        if m is None:
            m = self._mirrors[key] = DeviceMirror(dtype)
        return m

    def blocks(self, key: tuple) -> BlockTable:
        b = self._blocks.get(key)
        if b is None:
            b = self._blocks[key] = BlockTable()
        return b

    def clear(self) -> None:
        self._mirrors.clear()
        self._blocks.clear()


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def on_device(dev: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: a context that makes it ``dev`` when it is
    another one (a model on cuda:1 while cuda:0 is current), as torch's own ops do implicitly;
    a no-op otherwise."""
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        return torch.cuda.device(dev)
    return contextlib.nullcontext()
