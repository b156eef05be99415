"""Host side of the Triton SAM ops: the tables a launch reads, built once per layout and reused.

A *plan* holds what does not change from step to step for one op on one set of tensors: the
(device, dtype) groups, each group's int64 address table with every static column filled in, its
block table, the launch geometry, the hyper-parameter row indices. A step then only reads what
changes: the gradients' addresses (one C-level pass; the caching allocator usually hands out the
same addresses, and then the uploaded table is reused as it is) and the few values of the
hyper-parameter *rows* (a row per param group; Adam's bias corrections change every step).
Host work per step is then a few C-level passes over the tensor list, not Python per tensor.

Plans are cached when the parameters come as a :class:`fastsam._sequences.Tensors` (a tuple that
carries its plans: they live exactly as long as it does, so no cache keeps a deleted model's
tensors alive) and the op's other tensor arguments are tuples: a tuple is immutable, so the same
tuple object means the same tensors, and the plan keeps a reference to it, so that its id is not
reused. The parameters' addresses are checked on every call (``p.data = ...`` replaces a
storage); the other tensors of a tuple must keep their storage (fastsam.SAM owns those buffers
and passes new tuples when it replaces one). Lists, plain tuples of parameters, or any tensor
that is not contiguous get a plan built for the call (non-contiguous tensors staged through
contiguous copies).
"""

import ctypes
import functools
import itertools
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import _host
from .._sequences import TRUSTED_PTRS
from . import _tables as T
from . import triton_launch as L

_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_contig = Tensor.is_contiguous
_dtype_of = operator.attrgetter("dtype")
_device_of = operator.attrgetter("device")
_is_none = functools.partial(operator.is_, None)

CACHE = T.TableCache()  # device mirrors of tables and row tables, by (op, device, dtype, kind)
_MAX_PLANS = 8  # per Tensors object: its ops (perturb, second step, restore), F-SAM's two buffer sets
_PLANS_ATTR = "_fastsam_plans"
_EPOCH = [0]  # plans built before the last clear() are not used again


def clear() -> None:
    """Drop every device table and invalidate every cached plan (tests; a launch geometry changed)."""
    CACHE.clear()
    _EPOCH[0] += 1


def forget(params: object) -> None:
    """Drop the plans cached on ``params`` (a :class:`fastsam._sequences.Tensors`)."""
    d = getattr(params, "__dict__", None)
    if d is not None:
        d.pop(_PLANS_ATTR, None)


class Staging:
    """Contiguous stand-ins for non-contiguous tensors (copied back after the op if mutated).

    The kernels address row-major contiguous memory (the ESAM mask index is the row-major
    element index). Parameters are nearly always contiguous; a non-contiguous one (a transposed
    view, channels_last) costs a copy in and out, one op per such tensor.
    """

    def __init__(self) -> None:
        self.back: list[tuple[Tensor, Tensor]] = []
        self.keep: list[Tensor] = []
        self.copies: dict[int, Tensor] = {}

    def stage(self, t: Tensor, mutated: bool) -> Tensor:
        c = t.contiguous()
        self.keep.append(c)
        self.copies[id(t)] = c
        if mutated:
            self.back.append((t, c))
        return c

    def current(self, t: Tensor) -> Tensor:
        """What the kernels read and wrote for ``t``: its staged copy, or ``t`` itself."""
        return self.copies.get(id(t), t)

    def finish(self) -> None:
        for orig, c in self.back:
            orig.copy_(c)


# A column of a table: (aligned list or None, mutated by the op, check: "param", "grad" (autograd
# guarantees shape and dtype), "like" (must match the parameter's numel and dtype), "flag" (0-dim
# float32 F-SAM flags)).
Col = tuple[Sequence[Tensor | None] | None, bool, str]


def groups_of(params: Sequence[Tensor]) -> list[T.Group]:
    """(device, dtype) groups; the usual single group is found with two C-level passes."""
    dts, devs = set(map(_dtype_of, params)), set(map(_device_of, params))
    if len(dts) == 1 and len(devs) == 1:
        return [T.Group(devs.pop(), dts.pop(), list(range(len(params))))]
    return T.group_by_device_dtype(params)


def _sub(lst: Sequence, idx: list[int] | None) -> Sequence:
    return lst if idx is None else [lst[i] for i in idx]


def column_ptrs(params: Sequence[Tensor], idx: list[int] | None, col: Col, dtype: torch.dtype,
                numels: list[int], st: Staging | None) -> list[int]:
    """One column of addresses (0 = no entry), checked against the parameters (companions must
    have their parameter's numel and dtype: the kernels follow raw addresses); non-contiguous
    tensors staged when ``st`` is given (a plan that stages is not cached)."""
    lst, mutated, check = col
    n = len(numels)
    if lst is None:
        return [0] * n
    ts = _sub(lst, idx)
    dense = not any(map(_is_none, ts))  # not `None in ts`: that calls Tensor.__eq__
    present = ts if dense else [t for t in ts if t is not None]
    dev = params[0 if idx is None else idx[0]].device
    if check == "like":
        if set(map(_dtype_of, present)) - {dtype} or set(map(_device_of, present)) - {dev} or (
            list(map(_numel, ts)) != numels if dense
            else any(t is not None and t.numel() != k for t, k in zip(ts, numels))
        ):
            raise ValueError("backend='triton': a state/buffer tensor does not match its parameter's "
                             f"dtype ({dtype}), device ({dev}) or number of elements")
    elif check == "flag" and any(t.dtype != torch.float32 or t.numel() != 1 or t.device != dev for t in present):
        raise ValueError("fsam ready flags must be 1-element float32 tensors on the parameter's device")
    if not all(map(_contig, present)):
        if st is None:
            raise _NotCacheable
        ts = [t if t is None or t.is_contiguous() else st.stage(t, mutated) for t in ts]
        dense = not any(map(_is_none, ts))
    return list(map(_data_ptr, ts)) if dense else [0 if t is None else t.data_ptr() for t in ts]


class _NotCacheable(Exception):
    """A tensor of a would-be cached plan needs staging: build the plan for this call only."""


class GroupPlan:
    """One (device, dtype) group's static launch data."""

    __slots__ = ("group", "idx", "n", "rows", "dyn", "numels", "block", "warps", "nprog", "blocks", "nblk",
                 "fit_base", "tab_m", "tab", "tab_key", "vec", "base", "total_numel")

    def __init__(self, group: T.Group, idx: list[int] | None, rows: list[int], dyn: list[tuple[int, int]],
                 numels: list[int]) -> None:
        self.group = group
        self.idx = idx
        self.n = len(numels)
        self.rows = rows  # the column-major int table, dynamic columns zero
        self.dyn = dyn  # (column, which dynamic list) filled per call
        self.numels = numels
        self.total_numel = sum(numels)
        self.tab_m: T.DeviceMirror | None = None
        self.tab: Tensor | None = None
        self.tab_key: tuple | None = None
        self.vec: dict[str, bool] = {}
        self.base = 0  # first partial slot of this group

    def table(self, dyn_lists: Sequence[Sequence[int]], hrow: Sequence[int] | None, ncols: int, hcol: int,
              skip_cols: tuple[int, ...]) -> Tensor:
        """The device table for this call: the static rows with the dynamic columns (gradient
        addresses, hyper-parameter rows) filled in, uploaded only when they changed."""
        # the previous call's dynamic values (lists of ints compare at C speed; the row index is
        # usually the very same tuple object)
        last = self.tab_key
        if last is not None and self.tab is not None and last[0] == dyn_lists and (
                last[1] is hrow or last[1] == hrow):
            return self.tab
        key = ([list(d) for d in dyn_lists], hrow if hrow is None or type(hrow) is tuple else list(hrow))
        rows = list(self.rows)
        n = self.n
        for (col, which), vals in zip(self.dyn, dyn_lists):
            rows[col * n:(col + 1) * n] = vals
            assert which >= 0
        if hrow is not None:
            rows[hcol * n:(hcol + 1) * n] = hrow
        assert self.tab_m is not None
        self.tab = self.tab_m.get(tuple(rows), self.group.device)
        self.vec = L._vector_flags(self.tab_m, rows, n, ncols, skip_cols=skip_cols)
        self.tab_key = key
        return self.tab


class Plan:
    """The static launch data of one op over one set of tensors (see the module doc)."""

    __slots__ = ("key", "epoch", "refs", "groups", "pptrs", "n", "total", "acc", "bufs", "snap", "hrow", "hrows",
                 "hkey", "steps_buf", "steps_idx", "cacheable", "pblock")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.epoch = _EPOCH[0]
        self.refs: tuple = ()
        self.groups: list[GroupPlan] = []
        self.pptrs: tuple = ()
        self.n = 0
        self.total = 0  # partial slots over all groups
        self.acc = torch.float32
        self.bufs: dict[torch.device, Tensor] = {}
        self.snap: dict[int, Tensor] = {}
        self.hrow: list[int] | None = None  # per-tensor hyper-parameter row (all groups, list order)
        self.hrows: list[tuple] = []  # the rows' values
        self.hkey: tuple | None = None  # the hyper-parameter sequences hrow was computed from
        self.steps_buf: Tensor | None = None  # Adam: the step tensors are views of this buffer
        self.steps_idx: list[int] | None = None
        self.cacheable = True
        self.pblock = 0  # the PBLOCK constexpr (triton_sam._pblock), once known

    def buffer(self, device: torch.device, size: int) -> Tensor:
        """A partial-sum buffer of this plan (reused: each step's writes come after the previous
        step's reads in stream order)."""
        b = self.bufs.get(device)
        if b is None or b.numel() < size:
            b = self.bufs[device] = torch.empty(size, dtype=self.acc, device=device)
        return b


def plan_key(kind: tuple, *args: object) -> tuple | None:
    """The cache key of a plan over ``args`` (the parameters first, then tuples of tensors or
    None), or None when nothing can be cached: the parameters are not a ``Tensors`` (which holds
    the plans) or another argument is not a tuple."""
    if getattr(args[0], "__dict__", None) is None or any(a is not None and not isinstance(a, tuple)
                                                          for a in args[1:]):
        return None
    return kind + tuple(id(a) for a in args[1:])


def lookup(key: tuple | None, params: Sequence[Tensor]) -> "Plan | None":
    """The cached plan for ``key`` if the parameters still have the addresses it was built for."""
    d = getattr(params, "__dict__", None)
    ptrs = None if d is None else d.pop(TRUSTED_PTRS, None)  # the caller read them just now (fastsam.SAM)
    if key is None:
        return None
    plans = d.get(_PLANS_ATTR)  # type: ignore[union-attr]
    plan = None if plans is None else plans.get(key)
    if plan is None:
        return None
    if plan.epoch != _EPOCH[0] or (ptrs != plan.pptrs if ptrs is not None else
                                   not _host.layout_equal(params, plan.pptrs)):
        del plans[key]
        return None
    plans.move_to_end(key)
    return plan


def store(key: tuple | None, plan: Plan, params: Sequence[Tensor], refs: tuple) -> None:
    """Keep ``plan`` on ``params`` (``refs``: the other tuples of the key, kept alive so that
    their ids stay theirs; never ``params`` itself, which would make a reference cycle)."""
    if key is None or not plan.cacheable:
        return
    plan.key, plan.refs = key, refs
    plans = params.__dict__.setdefault(_PLANS_ATTR, OrderedDict())
    plans[key] = plan
    while len(plans) > _MAX_PLANS:
        plans.popitem(last=False)


def build(op: str, mode: object, params: Sequence[Tensor], cols: list[Col], dyn: list[int], offsets: Sequence[int]
          | None, st: Staging | None, fit: tuple, ncols: int, skip_cols: tuple[int, ...] = ()) -> Plan:
    """Build a plan: groups, static columns (``dyn``: indices into ``cols`` filled per call),
    block tables, geometry. ``st`` None: cacheable (raises _NotCacheable on a non-contiguous
    static tensor)."""
    plan = Plan()
    plan.n = len(params)
    plan.pptrs = tuple(map(_data_ptr, params))
    groups = groups_of(params)
    plan.acc = torch.float64 if any(g.dtype == torch.float64 for g in groups) else torch.float32
    total = 0
    for g in groups:
        L._check_group(g)
        idx = None if len(groups) == 1 else g.idx
        ws = _sub(params, idx)
        numels = list(map(_numel, ws))
        table: list[int] = []
        for c, col in enumerate(cols):
            if c in dyn:
                table += [0] * len(numels)
                continue
            table += column_ptrs(params, idx, col, g.dtype, numels, st)
        table += numels
        if offsets is not None:
            table += list(_sub(offsets, idx))
        table += [0] * len(numels)  # the hyper-parameter row column, filled per call
        gp = GroupPlan(g, idx, table, [(c, c) for c in dyn], numels)
        key = (op, mode, g.device, g.dtype)
        # a cached plan keeps its own table (two plans alternating, as F-SAM's buffer sets do,
        # would otherwise re-upload every step); a one-call plan shares the op's, whose values
        # usually match the previous call's
        gp.tab_m = T.DeviceMirror(torch.int64) if st is None else CACHE.mirror(key + ("tab",), torch.int64)
        gp.fit_base = key + fit
        block, max_prog, warps = L._geometry(g.device)
        gp.block, gp.warps = block, warps
        gp.blocks, gp.nblk = CACHE.blocks(key).get(tuple(numels), block, g.device)
        gp.nprog = max(1, min(gp.nblk, max_prog))
        gp.base = total
        total += gp.nprog
        plan.groups.append(gp)
    plan.total = total
    return plan


def fit_geometry(gp: GroupPlan, fit_key: tuple) -> tuple[int, int]:
    """(programs, warps) of a group's launch under its family's register fit (which the first
    launch on a GPU learns)."""
    block, max_prog, warps = L._geometry(gp.group.device, fit_key)
    if block != gp.block:  # the configured geometry changed since the plan was built
        raise _NotCacheable
    return max(1, min(gp.nblk, max_prog)), warps


def rows_index(keys: Sequence[tuple]) -> tuple[list[int], list[tuple]]:
    """Per-tensor row index and the distinct rows, in order of first appearance."""
    seen: dict[tuple, int] = {}
    idx = [seen.setdefault(k, len(seen)) for k in keys]
    return idx, list(seen)


def row_table(op: str, mode: object, device: torch.device, ct: torch.dtype, rows: list[tuple]) -> Tensor:
    """The hyper-parameter row table on the device (row-major), re-uploaded only when a value
    changed (a few rows: a param group each)."""
    flat = tuple(itertools.chain.from_iterable(rows)) if rows else (0.0,)
    return CACHE.mirror((op, mode, device, ct, "hyp"), ct).get(flat, device)


# ------------------------------------------------------------------------------ Adam step counters
def steps_view_buffer(steps: Sequence[Tensor | None]) -> tuple[Tensor | None, list[int] | None]:
    """(buffer, element index per tensor) when every present step tensor is a 0-dim float view of
    one contiguous CPU buffer (fastsam's fused update makes them so): their increments and values
    are then one op on the buffer. (None, None) otherwise."""
    base = None
    idx: list[int] = []
    for s in steps:
        if s is None:
            idx.append(-1)
            continue
        b = s._base
        if b is None or not s.is_cpu or s.dim() != 0 or b.dim() != 1 or not b.is_contiguous() or (
                base is not None and b is not base):
            return None, None
        base = b
        idx.append(s.storage_offset() - b.storage_offset())
    return base, idx


def increment_steps(plan: Plan | None, steps: Sequence[Tensor | None],
                    undo: list[Callable[[], None]]) -> list[float | None]:
    """``step += 1`` on Adam's step tensors (as torch's ``step_t += 1``), returning the new values;
    appends the exact reverse to ``undo``. A buffer of views: one add and one read; else one
    tensor at a time through its host memory (torch keeps steps on the CPU: no device sync)."""
    buf, idx = (plan.steps_buf, plan.steps_idx) if plan is not None else (None, None)
    if buf is None:
        buf, idx = steps_view_buffer(steps)
        if plan is not None:
            plan.steps_buf, plan.steps_idx = buf, idx
    if buf is not None and idx is not None and all(s is None or s._base is buf for s in steps[:1]):
        buf.add_(1.0)
        undo.append(lambda: buf.sub_(1.0))
        vals = buf.tolist()
        if len(vals) == len(idx) and vals.count(vals[0]) == len(vals) and -1 not in idx:
            return Uniform(vals[0], len(idx))  # the usual step: one value, no per-tensor list
        return [None if i < 0 else vals[i] for i in idx]
    return _increment_each(steps, undo)


class Uniform(Sequence):
    """``n`` copies of one step value (what :func:`increment_steps` returns when every step
    tensor holds the same count), without building the list."""

    __slots__ = ("value", "n")

    def __init__(self, value: float, n: int) -> None:
        self.value, self.n = value, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.value] * len(range(*i.indices(self.n)))
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.value


def _increment_each(steps: Sequence[Tensor | None], undo: list[Callable[[], None]]) -> list[float | None]:
    """One tensor at a time. torch keeps Adam's steps on the CPU: a float32/float64 0-dim CPU
    tensor is written through its address (~0.5 us, against ~4 us for an op on a 0-dim tensor),
    then its version counter bumped; anything else takes ``s += 1``."""
    out: list[float | None] = []
    touched: list[Tensor] = []
    done: list[Tensor] = []
    seen: set[int] = set()
    f32, f64 = torch.float32, torch.float64
    at32, at64 = ctypes.c_float.from_address, ctypes.c_double.from_address

    def revert() -> None:
        for t in touched:
            if t.is_cpu and t.dtype in (f32, f64) and t.numel() == 1:
                cell = (at32 if t.dtype is f32 else at64)(t.data_ptr())
                cell.value = cell.value - 1.0
                bump_versions([t])
            else:
                t -= 1

    undo.append(revert)
    for s in steps:
        if s is None:
            out.append(None)
            continue
        if id(s) in seen:
            out.append(float(s))
            continue
        seen.add(id(s))
        dt = s.dtype
        touched.append(s)
        if not s.is_cpu or (dt is not f32 and dt is not f64) or s.numel() != 1:
            s += 1  # a step on the device would make float(s) a host sync: torch keeps them on the CPU
            out.append(float(s))
            continue
        cell = (at32 if dt is f32 else at64)(s.data_ptr())
        cell.value = cell.value + 1.0
        out.append(float(cell.value))  # as stored (float32 rounding, as torch's step_t += 1)
        done.append(s)
    if done:
        bump_versions(done)
    return out


_BUMP_LIST: list[bool | None] = [None]  # does _increment_version take a tuple? (decided on first use)


def bump_versions(tensors: Sequence[Tensor]) -> None:
    """Bump the version counters of tensors written by a kernel (autograd then sees the in-place
    writes); one C loop with the host helpers (fastsam._host), else one call for the list on
    torch >= 2.5, one per tensor on torch 2.4."""
    if _host.active():
        _host.bump_versions(tensors)
        return
    if _BUMP_LIST[0] is not False:
        try:
            torch._C._increment_version(tuple(tensors))
            _BUMP_LIST[0] = True
            return
        except (TypeError, RuntimeError):  # torch 2.4: "increment_version expect a Tensor as input"
            if _BUMP_LIST[0]:
                raise
            _BUMP_LIST[0] = False
    for t in tensors:
        torch._C._increment_version(t)
