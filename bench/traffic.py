"""Count what a step costs without timing it: kernels, bytes moved, peak live tensor memory.

A GPU step that is bandwidth-bound takes about ``bytes moved / achieved bandwidth`` plus a few
microseconds per launch. Both counts can be taken on a CPU, from the very code that runs on the
GPU, so the GPU targets of issues 3 and 4 split into a part measured here (bytes, launches,
memory) and a part only a GPU can measure (the bandwidth a kernel achieves).

``Meter`` is a context manager that records, for everything run inside it:

* every ATen op (a ``TorchDispatchMode``): count by name, and bytes under a simple traffic model:
  each op reads each tensor argument once (a tensor passed twice, as in ``addcmul_(v, g, g)``,
  once) and writes each output and each mutated argument once (``numel * itemsize`` of the
  argument, not of its storage). Exceptions: ``_WRITE_ONLY`` (the mutated argument is not read:
  ``copy_``, ``fill_``, ...); ``_READS_NOTHING`` (factories, ``*_like``); ``_NO_TRAFFIC`` (views,
  ``empty``, ``detach``); ``_READS_INDEXED`` (``gather``-like ops and ``nll_loss``: the source is
  read only where the index points, bytes of the output); ``_UNREAD_ARGS``
  (``nll_loss_backward`` uses ``self`` for its shape); ``_SCATTERS`` (an in-place scatter touches
  one element per index). On a GPU an ATen op is about one kernel (a ``_foreach_`` op is one or
  more launches of ``multi_tensor_apply``; see the limits below). The model is a lower bound for
  ops that read an input twice internally (``log_softmax`` reads its row for the max and again
  for the sum and the write: counted once). Ops on a tensor marked ``_fastsam_host_counter``
  (the buffer behind fastsam's Adam step counters, which live on the CPU as torch keeps them)
  are host work, not kernels: counted apart in ``host_ops``, with no bytes.
* every Triton kernel launch in the interpreter (``TRITON_INTERPRET=1``): count by kernel name,
  and the bytes of every executed load and store (masked-off lanes excluded), split into data
  (floating-point) and index bytes (integer loads: address tables, offsets, targets). These are
  exact: a value loaded twice is counted twice.
* live tensor memory: every storage that an ATen op creates inside the window is tracked until
  it is freed (``weakref.finalize`` on the storage); ``peak_bytes`` is the most that was alive at
  once, ``end_bytes`` what is still alive at the end: on a GPU, how far ``max_memory_allocated``
  rises above what was allocated before the window, without the caching allocator's 512-byte
  rounding.

The interpreter's own copies of the kernel arguments are excluded (the dispatch mode is suspended
during a launch). fastsam's fused ops take their traceable custom-op form when a dispatch mode is
active (``fastsam._compat.may_be_traced``); inside a ``Meter`` that check ignores the Meter's own
mode, so what is counted is the eager path a training loop runs. Ops in the ``fastsam::``
namespace (the custom ops, if something else makes them run) are counted apart (``custom_ops``),
their bytes through the Triton launches inside them, their outputs' memory like any other.

Known limits, each small for what is measured here: an ATen op that runs further ops inside its
kernel shows as one (``nll_loss_backward`` zero-fills its output first: two launches on CUDA);
ops on CPU scalars count as well (torch Adam's step counter, a CPU tensor on a GPU too: one
``_foreach_add_`` per step); ``torch.tensor(...)`` is not dispatched, so its memory is not seen
(on CUDA fastsam's per-step hyper-parameter table is ``empty`` + ``copy_``, a few hundred bytes).
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

# ATen op base names (the overload name dropped) that need a rule other than "read every tensor
# argument, write every output and every mutated argument".
_NO_TRAFFIC = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "set_", "resize_", "_local_scalar_dense", "_to_copy_meta",
})
_READS_NOTHING = frozenset({
    "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones",
    "new_full", "zeros", "ones", "full", "scalar_tensor", "arange", "randint", "randn", "rand",
})
_WRITE_ONLY = frozenset({  # the mutated argument is written without being read
    "copy_", "fill_", "zero_", "_foreach_copy_", "_foreach_zero_", "normal_", "uniform_",
    "random_", "bernoulli_", "exponential_",
})
_UNREAD_ARGS = {  # arguments an op uses for their shape only
    "nll_loss_backward": {"self"}, "nll_loss2d_backward": {"self"},
}
_SCATTERS = frozenset({"scatter_", "scatter_add_"})  # touch one element of ``self`` per index
_READS_INDEXED = frozenset({  # the first tensor argument is read only where an index points
    "gather", "index_select", "take_along_dim", "index", "nll_loss_forward", "nll_loss2d_forward",
})


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _nbytes(x: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(x))


def _fresh_outputs(func: Any, out: Any) -> list[Any]:
    """The outputs of an op that are new tensors (not an in-place or ``out=`` argument returned)."""
    returns = func._schema.returns
    outs = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
    return [o for r, o in zip(returns, outs) if r.alias_info is None]


def _bound_args(func: Any, args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    """(schema argument, value) for every argument the call passed."""
    bound = []
    for i, a in enumerate(func._schema.arguments):
        if not a.kwarg_only and i < len(args):
            bound.append((a, args[i]))
        elif a.name in kwargs:
            bound.append((a, kwargs[a.name]))
    return bound


def op_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[int, int]:
    """(bytes read, bytes written) of one ATen op under the traffic model of the module docstring.
    A tensor passed twice (``addcmul_(v, g, g)``) is read once."""
    name = func._schema.name.split("::")[-1]
    if func.is_view or name in _NO_TRAFFIC:
        return 0, 0
    bound = _bound_args(func, args, kwargs)
    if name in _SCATTERS:  # reads the index and the source, writes one element per index
        named = {a.name: v for a, v in bound}
        index, target = named["index"], named["self"]
        n = index.numel() * target.element_size()
        return _nbytes(index) + _nbytes(named.get("src")) + (n if name == "scatter_add_" else 0), n
    seen: set[tuple] = set()

    def once(ts: list[torch.Tensor]) -> int:
        total = 0
        for t in ts:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    read = written = 0
    first_tensor_arg = True
    for a, value in bound:
        ts = _tensors(value)
        if not ts:
            continue
        mutated = a.alias_info is not None and a.alias_info.is_write
        if mutated:
            written += _nbytes(ts)
        is_out_arg = mutated and a.kwarg_only  # out= arguments are written only
        if (name in _READS_NOTHING or is_out_arg or (mutated and name in _WRITE_ONLY)
                or a.name in _UNREAD_ARGS.get(name, ())):
            continue
        if first_tensor_arg and name in _READS_INDEXED:
            read += _nbytes(out)  # one element per output element
        else:
            read += once(ts)
        first_tensor_arg = False
    return read, written + _nbytes(_fresh_outputs(func, out))  # mutated arguments counted above


@dataclass
class Counts:
    """What one ``Meter`` window recorded (see the module docstring)."""

    torch_ops: Counter = field(default_factory=Counter)
    host_ops: Counter = field(default_factory=Counter)  # ops on host-side counters (Adam's steps): no kernel
    torch_read: int = 0
    torch_written: int = 0
    custom_ops: Counter = field(default_factory=Counter)
    triton_launches: Counter = field(default_factory=Counter)
    triton_read: int = 0
    triton_written: int = 0
    triton_index_bytes: int = 0
    peak_bytes: int = 0
    end_bytes: int = 0

    @property
    def kernels(self) -> int:
        """ATen ops + Triton launches (on a GPU: kernels, a foreach op counted once)."""
        return sum(self.torch_ops.values()) + sum(self.triton_launches.values())

    @property
    def data_bytes(self) -> int:
        """Bytes read + written, index loads of the Triton kernels excluded."""
        return self.torch_read + self.torch_written + self.triton_read + self.triton_written

    def summary(self) -> dict[str, Any]:
        return {
            "kernels": self.kernels,
            "torch_ops": dict(self.torch_ops),
            "triton_launches": dict(self.triton_launches),
            "custom_ops": dict(self.custom_ops),
            "host_ops": dict(self.host_ops),
            "torch_bytes": self.torch_read + self.torch_written,
            "triton_data_bytes": self.triton_read + self.triton_written,
            "triton_index_bytes": self.triton_index_bytes,
            "data_bytes": self.data_bytes,
            "peak_bytes": self.peak_bytes,
            "end_bytes": self.end_bytes,
        }


class _Mode(TorchDispatchMode):
    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.c = counts
        self.live: dict[int, int] = {}
        self.cur = 0

    def _freed(self, key: int) -> None:
        self.cur -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        namespace, name = func._schema.name.split("::")
        self._track(func, args, kwargs, out)
        if namespace == "fastsam":
            self.c.custom_ops[name] += 1  # its Triton launches are counted by the interpreter hooks
            return out
        if namespace == "profiler" or func.is_view or name in _NO_TRAFFIC:
            return out  # record_function markers, views, allocations: no kernel on a GPU
        if any(getattr(t, "_fastsam_host_counter", False) for t in _tensors(args)):
            self.c.host_ops[name] += 1  # Adam's step counters live on the CPU (as torch keeps them): no kernel
            return out
        self.c.torch_ops[name] += 1
        r, w = op_bytes(func, args, kwargs, out)
        self.c.torch_read += r
        self.c.torch_written += w
        return out

    def _track(self, func, args, kwargs, out) -> None:
        """Start tracking the storages the op created (not views or storages of its inputs)."""
        if func.is_view:
            return
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(_fresh_outputs(func, out)):
            st = t.untyped_storage()
            key = st.data_ptr()
            if key and key not in self.live and key not in inputs and st.nbytes():
                self.live[key] = st.nbytes()
                self.cur += st.nbytes()
                self.c.peak_bytes = max(self.c.peak_bytes, self.cur)
                weakref.finalize(st, self._freed, key)


class Meter:
    """``with Meter() as m: step()`` then ``m.counts`` (a ``Counts``); see the module docstring.

    Triton launches are counted only under ``TRITON_INTERPRET=1`` (the interpreter's loads and
    stores are what is measured); compiled GPU launches are not seen.
    """

    def __init__(self) -> None:
        self.counts = Counts()
        self._mode = _Mode(self.counts)
        self._undo: list[Any] = []

    def _patch_interpreter(self) -> None:
        try:
            import numpy as np
            from triton.runtime import interpreter as I
        except Exception:  # no triton: ATen ops only
            return
        c = self.counts
        builder = I.InterpreterBuilder
        load0, store0, call0 = builder.create_masked_load, builder.create_masked_store, I.GridExecutor.__call__

        def count(ptrs, mask, data_field: str) -> None:
            """Bytes of the lanes the mask lets through: index bytes for integer pointees."""
            n = int(np.count_nonzero(np.broadcast_to(mask.data, ptrs.data.shape)))
            ty = ptrs.get_element_ty()
            nbytes = n * ((ty.primitive_bitwidth + 7) // 8)  # int1: a byte in memory
            if ty.is_int():
                c.triton_index_bytes += nbytes
            else:
                setattr(c, data_field, getattr(c, data_field) + nbytes)

        # (builder, ptrs, mask, ...): the trailing cache / eviction / volatile arguments differ
        # between Triton releases (3.0 and 3.6: five or six, 3.9: four or five), hence *rest
        def load(b, ptrs, mask, *rest):
            count(ptrs, mask, "triton_read")
            return load0(b, ptrs, mask, *rest)

        def store(b, ptrs, value, mask, *rest):
            count(ptrs, mask, "triton_written")
            return store0(b, ptrs, value, mask, *rest)

        def call(ex, *args, **kwargs):
            c.triton_launches[ex.fn.__name__] += 1
            with _disable_current_modes():  # the interpreter's argument copies are not the kernel's
                return call0(ex, *args, **kwargs)

        builder.create_masked_load, builder.create_masked_store, I.GridExecutor.__call__ = load, store, call
        self._undo.append(lambda: (setattr(builder, "create_masked_load", load0),
                                   setattr(builder, "create_masked_store", store0),
                                   setattr(I.GridExecutor, "__call__", call0)))

    def _patch_fastsam(self) -> None:
        """``may_be_traced`` without this Meter's mode (see the module docstring)."""
        import sys

        import fastsam.kernels.triton_sam  # noqa: F401  # the modules that import may_be_traced,
        import fastsam.losses  # noqa: F401  # imported before they are patched
        from fastsam import _compat

        orig = _compat.may_be_traced

        def may_be_traced(probe: torch.Tensor) -> bool:
            with _disable_current_modes():
                return orig(probe)

        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("fastsam") and getattr(mod, "may_be_traced", None) is orig:
                mod.may_be_traced = may_be_traced
                self._undo.append(lambda mod=mod: setattr(mod, "may_be_traced", orig))

    def __enter__(self) -> Meter:
        self._patch_interpreter()
        self._patch_fastsam()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.counts.end_bytes = self._mode.cur
