"""``backend="triton"``: the SAM step as a few multi-tensor Triton launches (DESIGN.md section 4).

Same functions and signatures as :mod:`fastsam.reference` (``sam_perturb_``, ``gsam_combine_``,
``sam_restore_``, ``sam_restore_sgd_``, ``sam_restore_adam_``). Per (device, dtype) group of
tensors, whatever the number of tensors:

=============================  =======  ==================================================
op                             kernels  passes over parameter-sized memory (fp32, AdamW)
=============================  =======  ==================================================
first step (K1 + K2)           2        K1 reads g (1); K2 reads w, g, writes w, w_old (4)
second step, SGD/Adam (K3)     1        reads w_old, g, m, v; writes w, m, v (7 for Adam)
GSAM (extra reduction)         +1       reads gs, g_old (2); K3 also reads g_old, writes g
restore only / GSAM combine    1 / 2
=============================  =======  ==================================================

No host sync anywhere: the global norm is reduced on the device (K1 writes one partial per
program into its slice of a buffer shared by every group; every K2 program re-reduces the whole
buffer), "N finite" is a device flag, and the per-tensor tables are uploaded with pinned,
non-blocking copies only when they change (see :mod:`fastsam.kernels._tables`).

Every op is a ``torch.library.custom_op`` (``fastsam::sam_*``) with fake kernels, so graphs that
contain them compile (``torch.compile``; the CPU interpreter rules out ``triton_op``). Custom ops
cannot mutate lists with ``None`` entries under compile (torch 2.13), so optional per-tensor
entries travel as dense lists plus index lists. In plain eager mode the public functions call the
implementation directly (the dispatcher costs more than the kernels on a ViT-sized list) and bump
the version counters of the mutated parameters / gradients themselves.

Host cost per call is a few C-level passes over the lists (addresses, sizes, dtypes, contiguity):
~0.3 ms for the first step and ~0.9 ms for the AdamW second step with 152 tensors on a slow,
shared 2-core VM. Non-contiguous tensors are staged through contiguous copies (correct, not fast).

CPU tensors run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported); :func:`fastsam.functional.resolve_backend` refuses them otherwise.
"""

import contextlib
import ctypes
import functools
import itertools
import math
import operator
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from .._compat import custom_op, eager_under_compile_on_old_torch, may_be_traced
from ..reference import check_accumulate_args, dual_exponent
from . import _tables as T
from . import _triton_kernels as K

FUSED_UPDATES = True  # this backend implements sam_restore_sgd_ / sam_restore_adam_
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Kernel launches since import (tests and the benchmark read the difference around a step), and
# whether a launch is in progress (the interpreter copies its tensor arguments with torch ops;
# op-counting tests skip those, they are no device work on a GPU).
LAUNCHES = [0]
IN_LAUNCH = [False]


# ------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class LaunchConfig:
    """Launch geometry (predictions; ``bash bench/gpu_suite.sh`` sweeps them on the GPU).

    GPU: ``block`` = 2048 elements per program iteration with 8 warps is 8 fp32 per thread, two
    16-byte loads per list per iteration. Registers decided the warps (``python -m
    fastsam.kernels._triton_aot`` reports them from ptxas, sm_90): with 4 warps (16 elements per
    thread) the AdamW K3 needed 224 registers a thread; with 8 warps the vectorized kernels need
    32-80 (K1 32-64, the AdamW K3 80, K2 with every option on 126).
    ``programs_per_sm`` = 4 is a cap on the persistent grid (4 x 132 = 528 programs on an H100):
    a persistent grid must be resident all at once, so after a kernel family's first launch the
    grid shrinks to what its register count allows (80 registers: 3 programs of 256 threads per
    SM; 126: 2). 3 x 2048 x 4 B = 24 KiB per list in flight per SM, and K2/K3 read 2-5 lists:
    above the ~25 KiB/SM that 3.35 TB/s x ~1 us DRAM latency needs over 132 SMs. It is also the
    number of norm partials per dtype group, which every K2 program re-reads (<= 528 x 4 B, L2).
    Interpreter: every program and every op costs Python time, so few programs and big blocks.

    ``vectorize``: full blocks run a copy of the kernel body with an all-true mask, and, when
    every address of a dtype group's table is a multiple of 16 bytes (always, for tensors from
    torch's allocators; a view at an odd offset turns it off for its group), the pointers carry
    that fact: the compiler then emits 16-byte vector loads/stores (ld.global.v4.b32: 4 fp32 or
    8 bf16 per instruction instead of one). Off: one masked body, scalar accesses (the GPU
    benchmark's sweep compares both).
    """

    block: int = 2048
    num_warps: int = 8
    programs_per_sm: int = 4
    interp_block: int = 1024
    interp_programs: int = 2
    vectorize: bool = True


_CONFIG = LaunchConfig(
    block=int(os.environ.get("FASTSAM_TRITON_BLOCK", 2048)),
    num_warps=int(os.environ.get("FASTSAM_TRITON_WARPS", 8)),
    programs_per_sm=int(os.environ.get("FASTSAM_TRITON_PROGRAMS_PER_SM", 4)),
    vectorize=os.environ.get("FASTSAM_TRITON_VECTORIZE", "1").strip().lower() not in ("0", "false", "no", "off"),
)


def get_config() -> LaunchConfig:
    return _CONFIG


@contextlib.contextmanager
def configure(**changes: int) -> Iterator[LaunchConfig]:
    """Temporarily change the launch geometry (tests, benchmark sweeps)."""
    global _CONFIG
    old = _CONFIG
    new = replace(old, **changes)
    for b in (new.block, new.interp_block):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block sizes must be powers of two >= 16 (tl.arange), got {b}")
    _CONFIG = new
    try:
        yield _CONFIG
    finally:
        _CONFIG = old


_SM_COUNT: dict[int, int] = {}


def _geometry(device: torch.device, fit_key: tuple | None = None) -> tuple[int, int, int]:
    """(BLOCK, max programs, num_warps) for a device: ``programs_per_sm`` per SM, fewer when the
    kernels of ``fit_key``'s family were seen to need more registers than that allows."""
    cfg = _CONFIG
    if device.type == "cpu":
        return cfg.interp_block, cfg.interp_programs, 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    sms = _SM_COUNT.get(idx)
    if sms is None:
        sms = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    per_sm = min(cfg.programs_per_sm, _FIT.get(fit_key, cfg.programs_per_sm)) if fit_key else cfg.programs_per_sm
    return cfg.block, max(1, sms * per_sm), cfg.num_warps


def _vector_flags(tab_mirror: T.DeviceMirror, rows: Sequence[int], n: int, ncols: int,
                  skip_cols: tuple[int, ...] = ()) -> dict[str, bool]:
    """SPLIT / ALIGNED constexprs of a group's launch: ALIGNED when every address in the table's
    first ``ncols`` columns (the addresses, ``n`` entries each; columns ``skip_cols`` excluded:
    the 1-element F-SAM flags, never read as vectors) is a multiple of 16 bytes (0 = no tensor
    counts as aligned); computed once per uploaded table."""
    if not _CONFIG.vectorize:
        return {"SPLIT": False, "ALIGNED": False}

    def low_bits() -> int:
        bits = 0
        for c in range(ncols):
            if c not in skip_cols:
                bits |= functools.reduce(operator.or_, rows[c * n:(c + 1) * n], 0)
        return bits

    return {"SPLIT": True, "ALIGNED": tab_mirror.memo("low_bits", low_bits) & 15 == 0}


_TL_DTYPE = {
    torch.float32: K.tl.float32,
    torch.bfloat16: K.tl.bfloat16,
    torch.float16: K.tl.float16,
    torch.float64: K.tl.float64,
}

_CACHE = T.TableCache()


def _check_group(g: T.Group) -> None:
    if g.dtype not in _TL_DTYPE:
        raise ValueError(f"backend='triton' supports float32/bfloat16/float16/float64 tensors, got {g.dtype}")
    if g.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1 set "
            "before triton is imported); use backend='foreach' (or 'auto') on CPU"
        )
    if g.device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' runs on CUDA tensors, got {g.device}")


def _rne_bf16(g: T.Group) -> bool:
    """Round bf16 stores by hand: only under the interpreter, which truncates fp32 -> bf16 (the
    GPU conversion already rounds to nearest even)."""
    return g.dtype == torch.bfloat16 and g.device.type == "cpu"


# Programs per SM that stay resident, learned from the compiled kernels' register counts, per
# launch family (the kernels that share one grid size: K1 + K2, KG + K3) and variant.
_FIT: dict[tuple, int] = {}
_REGS_PER_SM = 65536  # sm_70 .. sm_90: 64 K 32-bit registers per SM
_THREADS_PER_SM = 2048


def _resident_programs(n_regs: int, num_warps: int) -> int:
    """Programs of ``num_warps`` warps that fit on one SM at ``n_regs`` registers a thread
    (allocated per warp in units of 256, i.e. 8 per thread)."""
    per_warp = -(-n_regs // 8) * 8 * 32
    return max(1, min(_REGS_PER_SM // (per_warp * num_warps), _THREADS_PER_SM // (32 * num_warps)))


def _launch(kernel, grid: tuple[int], *args, num_warps: int, fit_key: tuple | None = None, **meta) -> None:
    LAUNCHES[0] += 1
    IN_LAUNCH[0] = True
    try:
        dev = args[0].device
        with T.on_device(dev):
            ck = kernel[grid](*args, num_warps=num_warps, **meta)
        # The persistent grid must be resident all at once (a program that waits for a free slot
        # runs its whole share after the others, alone on its SM): remember how many programs of
        # this variant fit, for the next sizing of this family's grid (the first call uses the
        # configured programs_per_sm).
        n_regs = getattr(ck, "n_regs", None) if fit_key is not None and dev.type == "cuda" else None
        if isinstance(n_regs, int) and n_regs > 0:
            fit = _resident_programs(n_regs, num_warps)
            if fit < _FIT.get(fit_key, 1 << 30):
                _FIT[fit_key] = fit
    finally:
        IN_LAUNCH[0] = False


# ------------------------------------------------------------------------------ tables
class _Staging:
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


# A column of a table: (aligned list or None, mutated by the op, check: "like" = must match the
# parameter's numel and dtype, "grad" = autograd already guarantees that, "flag" = the 0-dim float32
# F-SAM flags).
_Col = tuple[Sequence[Tensor | None] | None, bool, str]

_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_contig = Tensor.is_contiguous
_dtype_of = operator.attrgetter("dtype")
_device_of = operator.attrgetter("device")
_is_none = functools.partial(operator.is_, None)


def _groups(params: Sequence[Tensor]) -> list[T.Group]:
    """(device, dtype) groups; the usual single group is found with two C-level passes."""
    dts, devs = set(map(_dtype_of, params)), set(map(_device_of, params))
    if len(dts) == 1 and len(devs) == 1:
        return [T.Group(devs.pop(), dts.pop(), list(range(len(params))))]
    return T.group_by_device_dtype(params)


def _columns(params: Sequence[Tensor], idx: list[int] | None, cols: list[_Col], dtype: torch.dtype,
             offsets: Sequence[int] | None, st: _Staging) -> tuple[list[int], list[int]]:
    """Column-major int64 table of a group: one column of addresses per list (0 = no entry), then
    the numels [, then the global offsets]; returns (table, numels).

    Companion tensors must have their parameter's numel and dtype: the kernels follow raw
    addresses, so a mismatch would read or write out of bounds. The per-tensor work is done by
    ``map`` over unbound tensor methods (C-level iteration): ~0.1-0.3 us per tensor and column.
    """
    sel = (lambda lst: lst) if idx is None else (lambda lst: [lst[i] for i in idx])
    ws = sel(params)
    dev = ws[0].device
    numels = list(map(_numel, ws))
    table: list[int] = []
    for lst, mutated, check in cols:
        if lst is None:
            table += [0] * len(ws)
            continue
        ts = sel(lst)
        dense = not any(map(_is_none, ts))  # not `None in ts`: that calls Tensor.__eq__, ~0.1 ms
        present = ts if dense else [t for t in ts if t is not None]
        if check == "like":
            if set(map(_dtype_of, present)) - {dtype} or set(map(_device_of, present)) - {dev} or (
                list(map(_numel, ts)) != numels if dense
                else any(t is not None and t.numel() != n for t, n in zip(ts, numels))
            ):
                raise ValueError("backend='triton': a state/buffer tensor does not match its parameter's "
                                 f"dtype ({dtype}), device ({dev}) or number of elements")
        elif check == "flag" and any(t.dtype != torch.float32 or t.numel() != 1 or t.device != dev for t in present):
            raise ValueError("fsam ready flags must be 1-element float32 tensors on the parameter's device")
        if not all(map(_contig, present)):
            ts = [t if t is None or t.is_contiguous() else st.stage(t, mutated) for t in ts]
            dense = not any(map(_is_none, ts))  # not `None in ts`: that calls Tensor.__eq__, ~0.1 ms
        table += list(map(_data_ptr, ts)) if dense else [0 if t is None else t.data_ptr() for t in ts]
    table += numels
    if offsets is not None:
        table += offsets if idx is None else [offsets[i] for i in idx]
    return table, numels


def _acc_dtype(groups: list[T.Group]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in groups) else torch.float32


def _gather_partials(bufs: dict[torch.device, Tensor], slices: list[tuple[torch.device, int, int]],
                     rows: int, stride: int) -> None:
    """Model split over devices: copy every group's partial slice into every other device's buffer
    (device-to-device copies in stream order, no host sync)."""
    if len(bufs) < 2:
        return
    for dev, base, cnt in slices:
        for other, buf in bufs.items():
            if other != dev:
                for k in range(rows):
                    lo = k * stride + base
                    buf[lo:lo + cnt].copy_(bufs[dev][lo:lo + cnt], non_blocking=True)


# ------------------------------------------------------------------------------ first step
def _perturb_impl(
    params: list[Tensor], grads: list[Tensor], w_old: list[Tensor], ema: list[Tensor], ema_ready: list[Tensor],
    g_old: list[Tensor], rhos: list[float], etas: list[float], adaptive: list[bool], offsets: list[int],
    p: float, fsam_sigma: float | None, fsam_lambda: float, swp_keep: float, seed: int, step: int,
    ema_out: list[Tensor] | None = None, ready_out: list[Tensor] | None = None,
) -> Tensor:
    """K1 over every group, then K2 over every group (so every K2 sees every partial).

    Every table is built and checked before the first launch, and K1 writes only its partials
    and flag snapshots: an error up to the K2 launches changes nothing. K2 writes a group's
    parameters, ``w_old``, ``g_old`` and the F-SAM outputs in one launch; if a later group's K2
    launch fails, the groups already perturbed are restored from their ``w_old`` before the error
    propagates (the parameters are unchanged on an exception)."""
    if not params:
        return torch.ones((), dtype=torch.bool)
    fsam = fsam_sigma is not None
    if fsam and (len(ema) != len(params) or len(ema_ready) != len(params)):
        raise ValueError("fsam_sigma is set: ema and ema_ready need one tensor per parameter")
    ema_out = ema if (not fsam or ema_out is None) else ema_out
    ready_out = ema_ready if (not fsam or ready_out is None) else ready_out
    if fsam and (len(ema_out) != len(params) or len(ready_out) != len(params)):
        raise ValueError("ema_out and ready_out need one tensor per parameter")
    gsam = len(g_old) > 0
    swp = swp_keep < 1.0
    q = dual_exponent(p)
    qmode = 2 if q == 2.0 else (1 if q == 1.0 else 0)
    any_adaptive = any(adaptive)
    groups = _groups(params)
    acc = _acc_dtype(groups)
    q_hi = struct.unpack("f", struct.pack("f", q))[0] if qmode == 0 else q  # q = q_hi + q_lo exactly
    scal_vals = (q_hi, q - q_hi, fsam_sigma if fsam else 0.0, fsam_lambda, swp_keep, 1.0 - fsam_lambda)
    thr = int(swp_keep * 4294967296.0) if swp else 0
    cols: list[_Col] = [(params, True, "param"), (grads, False, "grad"), (w_old, True, "like"),
                        (ema if fsam else None, False, "like"), (ema_ready if fsam else None, False, "flag"),
                        (g_old if gsam else None, True, "like"), (ema_out if fsam else None, True, "like"),
                        (ready_out if fsam else None, True, "flag")]
    st = _Staging()
    plans = []
    total = 0
    for g in groups:
        _check_group(g)
        idx = None if len(groups) == 1 else g.idx
        rows, numels = _columns(params, idx, cols, g.dtype, offsets, st)
        gi = g.idx
        hyp = [rhos[i] for i in gi] + [etas[i] for i in gi] + [1.0 if adaptive[i] else 0.0 for i in gi]
        ct = g.compute_dtype
        key = ("perturb", g.device, g.dtype)
        tab_m = _CACHE.mirror(key + ("tab",), torch.int64)
        tab = tab_m.get(tuple(rows), g.device)
        vec = _vector_flags(tab_m, rows, len(numels), len(cols), skip_cols=(K.P_READY.value, K.P_READY_OUT.value))
        fit_key = ("perturb", g.device, g.dtype, qmode, fsam, any_adaptive, gsam, swp, vec["ALIGNED"], _CONFIG)
        block, max_prog, warps = _geometry(g.device, fit_key)
        hyp_t = _CACHE.mirror(key + ("hyp",), ct).get(tuple(hyp), g.device)
        scal = _CACHE.mirror(key + ("scal",), ct).get(scal_vals, g.device)
        blocks, nblk = _CACHE.blocks(key).get(tuple(numels), block, g.device)
        nprog = max(1, min(nblk, max_prog))
        snap = torch.empty(len(g.idx), dtype=torch.float32, device=g.device) if fsam else tab
        plans.append((g, block, warps, tab, hyp_t, scal, blocks, nblk, nprog, total, snap, vec, fit_key))
        total += nprog

    bufs: dict[torch.device, Tensor] = {}
    oks: dict[torch.device, Tensor] = {}
    for g in groups:
        if g.device not in bufs:
            bufs[g.device] = torch.empty(2 * total, dtype=acc, device=g.device)  # (S, E) per program
            oks[g.device] = torch.empty((), dtype=torch.uint8, device=g.device)
    pt = _TL_DTYPE[acc]
    for g, block, warps, tab, hyp_t, scal, blocks, nblk, nprog, base, snap, vec, fit_key in plans:
        _launch(
            K.perturb_partials_kernel, (nprog,), tab, len(g.idx), hyp_t, scal, blocks, nblk, bufs[g.device], base,
            total, snap,
            DT=_TL_DTYPE[g.dtype], CT=_TL_DTYPE[g.compute_dtype], PT=pt, QMODE=qmode, FSAM=fsam,
            ADAPTIVE=any_adaptive, BLOCK=block, num_warps=warps, fit_key=fit_key, **vec,
        )
    _gather_partials(bufs, [(pl[0].device, pl[9], pl[8]) for pl in plans], 2, total)
    pblock = T.next_pow2(total)
    result = oks[params[0].device].view(torch.bool)  # made before the writes: nothing can fail after them
    done: list[T.Group] = []
    try:
        for g, block, warps, tab, hyp_t, scal, blocks, nblk, nprog, _base, snap, vec, fit_key in plans:
            _launch(
                K.perturb_apply_kernel, (nprog,), tab, len(g.idx), hyp_t, scal, blocks, nblk, bufs[g.device], total,
                total, snap, oks[g.device], seed & 0xFFFFFFFF, step & 0xFFFFFFFF, thr,
                DT=_TL_DTYPE[g.dtype], CT=_TL_DTYPE[g.compute_dtype], PT=pt, QMODE=qmode, FSAM=fsam,
                ADAPTIVE=any_adaptive, GSAM=gsam, SWP=swp, RNE_BF16=_rne_bf16(g), BLOCK=block, PBLOCK=pblock,
                num_warps=warps, fit_key=fit_key, **vec,
            )
            done.append(g)
        st.finish()
    except BaseException:
        # groups already perturbed (and the staged copies of those not yet written back) go back
        # to w: their w_old holds it bit for bit
        for g in done:
            idx = [i for i in g.idx if id(params[i]) not in st.copies]  # staged ones were never written back
            if idx:
                torch._foreach_copy_([params[i] for i in idx], [st.current(w_old[i]) for i in idx])
        raise
    return result


# ------------------------------------------------------------------------------ second step
_NHYP = 8  # K.S_NHYP
_ZERO_ROW = (0.0,) * _NHYP
_NO_ADAM_ROW = (0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0)  # eps = sqrt(bc2) = 1: see _adam_rows


def _sgd_rows(n: int, upd: Sequence[bool], lr: list[float], wd: list[float], mom: list[float],
              damp: list[float], fresh: Sequence[bool]) -> list[tuple[float, ...]]:
    """Per-tensor SGD hyp rows: lr, weight_decay, momentum, 1 - dampening, fresh."""
    return [(lr[i], wd[i], mom[i], 1.0 - damp[i], 1.0 if fresh[i] else 0.0, 0.0, 0.0, 0.0) if upd[i]
            else _ZERO_ROW for i in range(n)]


def _adam_rows(n: int, lr: list[float], b1: list[float], b2: list[float], eps: list[float], wd: list[float],
               steps: Sequence[float | None]) -> list[tuple[float, ...]]:
    """Per-tensor Adam hyp rows (torch's scalars, computed in float64 as torch does on the host):
    weight_decay, 1 - beta1, beta2, 1 - beta2, eps, lr / bc1, sqrt(bc2), 1 - lr * wd with
    ``bc = 1 - beta^t``. Memoised: tensors share a handful of (hyperparameters, step) keys."""
    memo: dict[tuple[float, ...], tuple[float, ...]] = {}
    rows = []
    for i in range(n):
        t = steps[i]
        if t is None:  # no update; eps = sqrt(bc2) = 1 keep the discarded lanes of the branch-free K3 NaN-free
            rows.append(_NO_ADAM_ROW)
            continue
        key = (lr[i], b1[i], b2[i], eps[i], wd[i], t)
        row = memo.get(key)
        if row is None:
            bc1 = 1.0 - b1[i] ** t
            bc2 = 1.0 - b2[i] ** t
            row = memo[key] = (wd[i], 1.0 - b1[i], b2[i], 1.0 - b2[i], eps[i], lr[i] / bc1, math.sqrt(bc2),
                               1.0 - lr[i] * wd[i])
        rows.append(row)
    return rows


_CSCALAR = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


def _increment_steps(steps: Sequence[Tensor | None], undo: list[Callable[[], None]]) -> list[float | None]:
    """``step += 1`` on Adam's 0-dim step tensors (as torch's ``step_t += 1``), returning the new
    values. torch keeps them on the CPU, so this is host memory: written in place through their
    addresses (~0.5 us a tensor, against ~4 us for ``torch._foreach_add_`` on 0-dim CPU tensors,
    0.6 ms a step on a ViT-B), then their version counters are bumped. Appends to ``undo`` the
    exact reverse (``step - 1``: integers below 2^24 are exact in float32)."""
    out: list[float | None] = []
    touched: list[Tensor] = []

    def revert() -> None:
        for t in touched:
            t -= 1

    undo.append(revert)
    done: list[Tensor] = []
    seen: set[int] = set()
    f32, f64 = torch.float32, torch.float64
    at32, at64 = ctypes.c_float.from_address, ctypes.c_double.from_address
    for s in steps:
        if s is None:
            out.append(None)
            continue
        dt = s.dtype
        if not s.is_cpu or (dt is not f32 and dt is not f64) or s.numel() != 1 or id(s) in seen:
            s += 1  # any other layout (a step on the device would make float(s) a host sync)
            touched.append(s)
            out.append(float(s))
            continue
        seen.add(id(s))
        cell = (at32 if dt is f32 else at64)(s.data_ptr())
        v = cell.value + 1.0
        cell.value = v
        touched.append(s)
        out.append(float(cell.value))  # as stored (float32 rounding, as torch's step_t += 1)
        done.append(s)
    if done:
        _bump_versions(done)
    return out


def _second_step_impl(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    w_old: Sequence[Tensor | None],
    g_old: Sequence[Tensor | None] | None,
    s1: Sequence[Tensor | None] | None,
    s2: Sequence[Tensor | None] | None,
    s3: Sequence[Tensor | None] | None,
    hyper: Callable[[], list[tuple[float, ...]]] | None,
    *,
    mode: int,
    gsam_alpha: float,
    nesterov: bool = False,
    maximize: bool = False,
    amsgrad: bool = False,
    decoupled: bool = False,
    params_mutated: bool = True,
) -> None:
    """Shared launcher of restore / GSAM combine / SGD / Adam (aligned lists, None = no entry).

    ``hyper(undo)`` gives the per-tensor hyp rows; it runs after the tables are validated and
    appends to ``undo`` what reverses its own side effects (Adam's step counters).

    On an exception in a launch the optimizer state (momentum buffers, Adam moments, step
    counters) is put back as it was, and every parameter is either unchanged or restored from its
    ``w_old``, then the error propagates. With several dtype groups the update modes launch the
    largest group last and keep copies of what the smaller groups' launches write to state and
    to parameters that have no ``w_old``; the accumulators of MODE_ACCUM and gradients are not
    kept (the caller's buffers: fastsam.SAM writes new sums out of place and recomputes .grad)."""
    n = len(params)
    if n == 0:
        return
    gsam = gsam_alpha > 0 and g_old is not None and any(
        go is not None and g is not None for go, g in zip(g_old, grads))
    updates = mode != K.MODE_RESTORE
    accum = mode == K.MODE_ACCUM
    cols: list[_Col] = [(params, params_mutated, "param"), (grads, gsam and not accum, "like"),
                        (w_old, False, "like"),
                        (g_old if gsam else None, False, "like"), (s1, updates, "like"),
                        (s2, updates and not accum, "like"), (s3, updates, "like")]
    groups = _groups(params)
    acc = _acc_dtype(groups)
    st = _Staging()
    plans = []
    total = 0
    for g in groups:
        _check_group(g)
        rows, numels = _columns(params, None if len(groups) == 1 else g.idx, cols, g.dtype, None, st)
        key = ("second", mode, gsam, g.device, g.dtype)  # restore / GSAM / update tables apart
        tab_m = _CACHE.mirror(key + ("tab",), torch.int64)
        tab = tab_m.get(tuple(rows), g.device)
        vec = _vector_flags(tab_m, rows, len(numels), len(cols))
        fit_key = key + (nesterov, maximize, amsgrad, decoupled, vec["ALIGNED"], _CONFIG)
        block, max_prog, warps = _geometry(g.device, fit_key)
        blocks, nblk = _CACHE.blocks(key).get(tuple(numels), block, g.device)
        nprog = max(1, min(nblk, max_prog))
        plans.append([g, block, warps, tab, None, None, blocks, nblk, nprog, total, vec, fit_key, sum(numels)])
        total += nprog
    saved: list[tuple[Tensor, Tensor]] = []
    if len(plans) > 1 and mode in (K.MODE_SGD, K.MODE_ADAM):
        # launched in size order; the state (and the parameters with no w_old to restore from)
        # that every group but the last (largest) writes is kept
        plans.sort(key=lambda pl: pl[12])
        state = [lst for lst in (s1, s2, s3) if lst is not None]
        for pl in plans[:-1]:
            for i in pl[0].idx:
                if grads[i] is None:
                    continue
                keep = [lst[i] for lst in state] + ([params[i]] if w_old[i] is None else [])
                for t in keep:
                    if t is not None:
                        t = st.current(t)
                        saved.append((t, t.clone()))
    undo: list[Callable[[], None]] = []
    hyp_rows = hyper(undo) if hyper is not None else [_ZERO_ROW] * n
    try:
        for pl in plans:
            g = pl[0]
            ct = g.compute_dtype
            key = ("second", mode, gsam, g.device, g.dtype)  # restore / GSAM / update tables apart
            sub = hyp_rows if len(groups) == 1 else [hyp_rows[i] for i in g.idx]
            cm = tuple(itertools.chain.from_iterable(zip(*sub)))  # column-major
            pl[4] = _CACHE.mirror(key + ("hyp", mode), ct).get(cm, g.device)
            pl[5] = _CACHE.mirror(key + ("scal",), ct).get((float(gsam_alpha),), g.device)

        bufs: dict[torch.device, Tensor] = {}
        pt = _TL_DTYPE[acc]
        if gsam:
            for g in groups:
                if g.device not in bufs:
                    bufs[g.device] = torch.empty(5 * total, dtype=acc, device=g.device)
            for g, block, warps, tab, _h, _s, blocks, nblk, nprog, base, vec, fit_key, _n in plans:
                _launch(K.gsam_partials_kernel, (nprog,), tab, len(g.idx), blocks, nblk, bufs[g.device], base,
                        total, DT=_TL_DTYPE[g.dtype], CT=_TL_DTYPE[g.compute_dtype], PT=pt, BLOCK=block,
                        num_warps=warps, fit_key=fit_key, **vec)
            _gather_partials(bufs, [(pl[0].device, pl[9], pl[8]) for pl in plans], 5, total)
        pblock = T.next_pow2(total)
        for g, block, warps, tab, hyp_t, scal, blocks, nblk, nprog, _base, vec, fit_key, _n in plans:
            part = bufs[g.device] if gsam else tab
            _launch(
                K.second_step_kernel, (nprog,), tab, len(g.idx), hyp_t, scal, blocks, nblk, part, total, total,
                DT=_TL_DTYPE[g.dtype], CT=_TL_DTYPE[g.compute_dtype], PT=pt, MODE=mode, GSAM=gsam,
                NESTEROV=nesterov, MAXIMIZE=maximize, AMSGRAD=amsgrad, DECOUPLED=decoupled, RNE_BF16=_rne_bf16(g),
                BLOCK=block, PBLOCK=pblock, num_warps=warps, fit_key=fit_key, **vec,
            )
        st.finish()
    except BaseException:
        for t, old in saved:
            t.copy_(old)
        for fn in reversed(undo):
            fn()
        rest = [i for i in range(n) if w_old[i] is not None and id(params[i]) not in st.copies]
        if rest and params_mutated:
            torch._foreach_copy_([params[i] for i in rest], [st.current(w_old[i]) for i in rest])  # type: ignore
        raise


def _scatter(n: int, dense: Sequence[Tensor], idx: Sequence[int]) -> list[Tensor | None]:
    out: list[Tensor | None] = [None] * n
    for t, i in zip(dense, idx):
        out[i] = t
    return out


def _dense(xs: Sequence[Tensor | None] | None) -> tuple[list[Tensor], list[int]]:
    if xs is None:
        return [], []
    idx = [i for i, t in enumerate(xs) if t is not None]
    return [xs[i] for i in idx], idx  # type: ignore[misc]


# ------------------------------------------------------------------------------ custom ops
# The ops are registered with torch.library.custom_op so that torch.compile graphs contain them as
# opaque nodes. In plain eager mode the public functions call the same implementation directly:
# the dispatcher costs 1-3 ms per call on a ViT-sized list (argument checks, one version bump per
# mutated tensor), more than the kernels. The direct path bumps the version counters of the
# user-visible mutated tensors (parameters; gradients for GSAM) itself, so autograd still sees
# the in-place writes.
_DIRECT = [False]


def _traced(probe: Tensor) -> bool:
    """True when something may trace the call (see :func:`fastsam._compat.may_be_traced`), unless
    inside :func:`direct`."""
    return not _DIRECT[0] and may_be_traced(probe)


_BUMP_LIST: list[bool | None] = [None]  # does _increment_version take a tuple? (decided on first use)


def _bump_versions(tensors: Sequence[Tensor]) -> None:
    if _BUMP_LIST[0] is not False:
        try:
            torch._C._increment_version(tuple(tensors))  # one call for the whole list (torch >= 2.5)
            _BUMP_LIST[0] = True
            return
        except (TypeError, RuntimeError):  # torch 2.4: "increment_version expect a Tensor as input"
            if _BUMP_LIST[0]:
                raise
            _BUMP_LIST[0] = False
    for t in tensors:  # one tensor per call
        torch._C._increment_version(t)


@contextlib.contextmanager
def call_directly() -> Iterator[None]:
    """Always take the direct path (tests count every torch op the implementation issues; a
    TorchDispatchMode cannot look inside a custom op)."""
    _DIRECT[0] = True
    try:
        yield
    finally:
        _DIRECT[0] = False


@custom_op("fastsam::sam_perturb", mutates_args=("params", "w_old", "ema", "ema_ready", "g_old", "ema_out",
                                                 "ready_out"))
def _op_perturb(
    params: list[Tensor], grads: list[Tensor], w_old: list[Tensor], ema: list[Tensor], ema_ready: list[Tensor],
    g_old: list[Tensor], rhos: list[float], etas: list[float], adaptive: list[bool], offsets: list[int],
    p: float, fsam_sigma: Optional[float], fsam_lambda: float, swp_keep: float, seed: int, step: int,  # noqa: UP045
    ema_out: list[Tensor], ready_out: list[Tensor],
) -> Tensor:
    """``ema_out`` / ``ready_out`` empty: the F-SAM state is updated in place (``ema`` and
    ``ema_ready`` are declared mutated for that case)."""
    return _perturb_impl(params, grads, w_old, ema, ema_ready, g_old, rhos, etas, adaptive, offsets,
                         p, fsam_sigma, fsam_lambda, swp_keep, seed, step, ema_out or None, ready_out or None)


@_op_perturb.register_fake
def _(params, grads, w_old, ema, ema_ready, g_old, rhos, etas, adaptive, offsets, p, fsam_sigma,
      fsam_lambda, swp_keep, seed, step, ema_out, ready_out):
    dev = params[0].device if params else torch.device("cpu")
    return torch.empty((), dtype=torch.bool, device=dev)


def _second_step_body(
    params: Sequence[Tensor], grads: Sequence[Tensor | None], w_old: Sequence[Tensor | None],
    g_old: Sequence[Tensor | None] | None, s1: Sequence[Tensor | None], s2: Sequence[Tensor | None],
    s3: Sequence[Tensor | None], steps: Sequence[Tensor | None], hyper: Sequence[float], fresh: Sequence[bool],
    mode: int, gsam_alpha: float, nesterov: bool, maximize: bool, amsgrad: bool, decoupled: bool,
) -> None:
    """Aligned lists (None = no entry). ``hyper``: the optimizer's raw values, 5 per tensor
    (SGD: lr, weight_decay, momentum, dampening, -; Adam: lr, beta1, beta2, eps, weight_decay)."""
    n = len(params)
    h = [hyper[5 * i:5 * i + 5] for i in range(n)]
    upd = [g is not None for g in grads]

    def rows(undo: list[Callable[[], None]]) -> list[tuple[float, ...]]:
        if mode == K.MODE_SGD:
            return _sgd_rows(n, upd, [x[0] for x in h], [x[1] for x in h], [x[2] for x in h], [x[3] for x in h],
                             fresh)
        # Adam: torch increments the step first, then computes the bias corrections from it
        t = _increment_steps([steps[i] if upd[i] else None for i in range(n)], undo)
        return _adam_rows(n, [x[0] for x in h], [x[1] for x in h], [x[2] for x in h], [x[3] for x in h],
                          [x[4] for x in h], t)

    _second_step_impl(params, grads, w_old, g_old, s1, s2, s3, rows, mode=mode, gsam_alpha=gsam_alpha,
                      nesterov=nesterov, maximize=maximize, amsgrad=amsgrad, decoupled=decoupled)


def _second_step_dense(
    params: list[Tensor], grads: list[Tensor], grad_idx: list[int], w_old: list[Tensor], w_old_idx: list[int],
    g_old: list[Tensor], g_old_idx: list[int], state1: list[Tensor], state1_idx: list[int],
    state2: list[Tensor], state2_idx: list[int], state3: list[Tensor], state3_idx: list[int],
    steps: list[Tensor], steps_idx: list[int], hyper: list[float], fresh: list[bool], mode: int,
    gsam_alpha: float, nesterov: bool, maximize: bool, amsgrad: bool, decoupled: bool,
) -> None:
    """Custom-op form: optional entries as dense lists plus index lists (torch.compile cannot
    functionalize a mutated ``Tensor?[]`` holding None)."""
    n = len(params)
    _second_step_body(params, _scatter(n, grads, grad_idx), _scatter(n, w_old, w_old_idx),
                      _scatter(n, g_old, g_old_idx), _scatter(n, state1, state1_idx),
                      _scatter(n, state2, state2_idx), _scatter(n, state3, state3_idx),
                      _scatter(n, steps, steps_idx), hyper, fresh, mode, gsam_alpha, nesterov, maximize, amsgrad,
                      decoupled)


@custom_op("fastsam::sam_second_step", mutates_args=("params", "state1", "state2", "state3", "steps"))
def _op_second_step(
    params: list[Tensor], grads: list[Tensor], grad_idx: list[int], w_old: list[Tensor], w_old_idx: list[int],
    g_old: list[Tensor], g_old_idx: list[int], state1: list[Tensor], state1_idx: list[int],
    state2: list[Tensor], state2_idx: list[int], state3: list[Tensor], state3_idx: list[int],
    steps: list[Tensor], steps_idx: list[int], hyper: list[float], fresh: list[bool], mode: int,
    gsam_alpha: float, nesterov: bool, maximize: bool, amsgrad: bool, decoupled: bool,
) -> None:
    """Restore (+ SGD / Adam update); ``grads`` are only read (no GSAM)."""
    _second_step_dense(params, grads, grad_idx, w_old, w_old_idx, g_old, g_old_idx, state1, state1_idx, state2,
                       state2_idx, state3, state3_idx, steps, steps_idx, hyper, fresh, mode, 0.0, nesterov,
                       maximize, amsgrad, decoupled)


@custom_op("fastsam::sam_second_step_gsam",
                         mutates_args=("params", "grads", "state1", "state2", "state3", "steps"))
def _op_second_step_gsam(
    params: list[Tensor], grads: list[Tensor], grad_idx: list[int], w_old: list[Tensor], w_old_idx: list[int],
    g_old: list[Tensor], g_old_idx: list[int], state1: list[Tensor], state1_idx: list[int],
    state2: list[Tensor], state2_idx: list[int], state3: list[Tensor], state3_idx: list[int],
    steps: list[Tensor], steps_idx: list[int], hyper: list[float], fresh: list[bool], mode: int,
    gsam_alpha: float, nesterov: bool, maximize: bool, amsgrad: bool, decoupled: bool,
) -> None:
    """GSAM variant: the combined gradient is written back into ``grads``."""
    _second_step_dense(params, grads, grad_idx, w_old, w_old_idx, g_old, g_old_idx, state1, state1_idx, state2,
                       state2_idx, state3, state3_idx, steps, steps_idx, hyper, fresh, mode, gsam_alpha, nesterov,
                       maximize, amsgrad, decoupled)


@_op_second_step.register_fake
def _(*args, **kwargs):
    return None


@_op_second_step_gsam.register_fake
def _(*args, **kwargs):
    return None


def _restore_body(params: Sequence[Tensor], w_old: Sequence[Tensor]) -> None:
    n = len(params)
    _second_step_impl(params, [None] * n, w_old, None, None, None, None, None, mode=K.MODE_RESTORE,
                      gsam_alpha=0.0)


def _gsam_body(grads: Sequence[Tensor], g_old: Sequence[Tensor], alpha: float) -> None:
    # the gradients stand in for the table's "parameters"; nothing is restored (no w_old)
    _second_step_impl(grads, grads, [None] * len(grads), g_old, None, None, None, None, mode=K.MODE_RESTORE,
                      gsam_alpha=alpha, params_mutated=False)


def _accumulate_body(params: Sequence[Tensor], grads: Sequence[Tensor | None], w_old: Sequence[Tensor | None],
                     g_old: Sequence[Tensor | None] | None, acc: Sequence[Tensor | None], reset: Sequence[bool],
                     weight: float, scale: float, gsam_alpha: float,
                     acc_in: Sequence[Tensor | None] | None = None) -> None:
    n = len(params)
    row = (float(weight), float(scale))
    rows = [row + (1.0 if reset[i] else 0.0,) + _ZERO_ROW[3:] if acc[i] is not None else _ZERO_ROW
            for i in range(n)]
    src = None  # column S_2: the running sums when they are read from other tensors than acc
    if acc_in is not None:
        src = [None if (acc[i] is None or reset[i] or acc_in[i] is acc[i]) else acc_in[i] for i in range(n)]
        if all(t is None for t in src):
            src = None
    _second_step_impl(params, grads, w_old, g_old, acc, src, None, lambda undo: rows, mode=K.MODE_ACCUM,
                      gsam_alpha=gsam_alpha)


@custom_op("fastsam::sam_restore_accumulate", mutates_args=("params", "acc"))
def _op_restore_accumulate(
    params: list[Tensor], grads: list[Tensor], grad_idx: list[int], w_old: list[Tensor], w_old_idx: list[int],
    g_old: list[Tensor], g_old_idx: list[int], acc: list[Tensor], acc_idx: list[int], acc_in: list[Tensor],
    acc_in_idx: list[int], reset: list[bool], weight: float, scale: float, gsam_alpha: float,
) -> None:
    """m-SAM micro-batch: restore + GSAM combine + accumulate (dense lists + index lists)."""
    n = len(params)
    _accumulate_body(params, _scatter(n, grads, grad_idx), _scatter(n, w_old, w_old_idx),
                     _scatter(n, g_old, g_old_idx), _scatter(n, acc, acc_idx), reset, weight, scale, gsam_alpha,
                     _scatter(n, acc_in, acc_in_idx) if acc_in_idx else None)


@_op_restore_accumulate.register_fake
def _(*args, **kwargs):
    return None


@custom_op("fastsam::sam_restore", mutates_args=("params",))
def _op_restore(params: list[Tensor], w_old: list[Tensor]) -> None:
    _restore_body(params, w_old)


@_op_restore.register_fake
def _(params, w_old):
    return None


@custom_op("fastsam::sam_gsam_combine", mutates_args=("grads",))
def _op_gsam_combine(grads: list[Tensor], g_old: list[Tensor], alpha: float) -> None:
    _gsam_body(grads, g_old, alpha)


@_op_gsam_combine.register_fake
def _(grads, g_old, alpha):
    return None


# ------------------------------------------------------------------------------ public API
@eager_under_compile_on_old_torch
@torch.no_grad()
def sam_perturb_(
    params: list[Tensor],
    grads: list[Tensor],
    w_old: list[Tensor],
    ema: list[Tensor] | None,
    ema_ready: list[Tensor] | None,
    g_old: list[Tensor] | None,
    rhos: list[float],
    etas: list[float],
    adaptive: list[bool],
    offsets: list[int],
    *,
    p: float = 2.0,
    fsam_sigma: float | None = None,
    fsam_lambda: float = 0.9,
    swp_keep: float = 1.0,
    seed: int = 0,
    step: int = 0,
    ema_out: list[Tensor] | None = None,
    ready_out: list[Tensor] | None = None,
) -> Tensor:
    """Triton twin of :func:`fastsam.reference.sam_perturb_` (K1 + K2 per (device, dtype) group)."""
    if not params:
        return torch.ones((), dtype=torch.bool)
    fs = fsam_sigma is not None
    args = (list(ema or []) if fs else [], list(ema_ready or []) if fs else [], list(g_old or []))
    outs = (list(ema_out) if fs and ema_out is not None else [],
            list(ready_out) if fs and ready_out is not None else [])
    if _traced(params[0]):
        return torch.ops.fastsam.sam_perturb(
            list(params), list(grads), list(w_old), *args, [float(r) for r in rhos], [float(e) for e in etas],
            [bool(a) for a in adaptive], [int(o) for o in offsets], float(p),
            None if fsam_sigma is None else float(fsam_sigma), float(fsam_lambda), float(swp_keep), int(seed),
            int(step), *outs,
        )
    ok = _perturb_impl(params, grads, w_old, *args, rhos, etas, adaptive, offsets, p, fsam_sigma, fsam_lambda,
                       swp_keep, seed, step, outs[0] or None, outs[1] or None)
    _bump_versions(params)
    return ok


@eager_under_compile_on_old_torch
@torch.no_grad()
def gsam_combine_(grads: list[Tensor], g_old: list[Tensor], alpha: float) -> None:
    """Triton twin of :func:`fastsam.reference.gsam_combine_` (reduction + combine: 2 launches)."""
    if not grads:
        return
    if _traced(grads[0]):
        torch.ops.fastsam.sam_gsam_combine(list(grads), list(g_old), float(alpha))
    else:
        _gsam_body(grads, g_old, float(alpha))
        _bump_versions(grads)


@eager_under_compile_on_old_torch
@torch.no_grad()
def sam_restore_(params: list[Tensor], w_old: list[Tensor]) -> None:
    """``w <- w_old`` exactly (1 launch per group)."""
    if not params:
        return
    if _traced(params[0]):
        torch.ops.fastsam.sam_restore(list(params), list(w_old))
    else:
        _restore_body(params, w_old)
        _bump_versions(params)


def _floats(x: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(x, (int, float)):
        return [float(x)] * n
    vals = [float(v) for v in x]
    if len(vals) != n:
        raise ValueError(f"{name}: expected a float or {n} values, got {len(vals)}")
    return vals


def _second_step_call(params, grads, w_old, g_old, s1, s2, s3, steps, hyper, fresh, *, mode, gsam_alpha,
                      nesterov=False, maximize=False, amsgrad=False, decoupled=False) -> None:
    n = len(params)
    if n == 0:
        return
    if g_old is None or gsam_alpha <= 0:
        g_old = None
    gsam = g_old is not None and any(go is not None and g is not None for go, g in zip(g_old, grads))
    if not _traced(params[0]):
        _second_step_body(params, grads, w_old, g_old, s1, s2, s3, steps, hyper, fresh, mode,
                          float(gsam_alpha) if gsam else 0.0, nesterov, maximize, amsgrad, decoupled)
        _bump_versions(list(params) + ([g for g in grads if g is not None] if gsam else []))
        return
    op = torch.ops.fastsam.sam_second_step_gsam if gsam else torch.ops.fastsam.sam_second_step
    dense = [x for lst in (grads, w_old, g_old if gsam else None, s1, s2, s3, steps) for x in _dense(lst)]
    op(list(params), *dense, [float(v) for v in hyper], [bool(f) for f in fresh], mode, float(gsam_alpha),
       bool(nesterov), bool(maximize), bool(amsgrad), bool(decoupled))


@eager_under_compile_on_old_torch
@torch.no_grad()
def sam_restore_sgd_(
    params: list[Tensor],
    grads: list[Tensor | None],
    w_old: list[Tensor | None],
    g_old: list[Tensor | None] | None,
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | list[float],
    weight_decay: float | list[float] = 0.0,
    momentum: float | list[float] = 0.0,
    dampening: float | list[float] = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    gsam_alpha: float = 0.0,
) -> None:
    """Triton twin of :func:`fastsam.reference.sam_restore_sgd_`: one K3 launch per group (GSAM +1).

    ``None`` momentum buffers (momentum != 0) are allocated here (``empty_like``, no launch),
    stored into the list, and initialised by the kernel with the first ``d``.
    """
    n = len(params)
    lrs, wds = _floats(lr, n, "lr"), _floats(weight_decay, n, "weight_decay")
    moms, damps = _floats(momentum, n, "momentum"), _floats(dampening, n, "dampening")
    fresh = [False] * n
    bufs: list[Tensor | None] = [None] * n
    for i in range(n):
        if grads[i] is None or moms[i] == 0:
            continue
        if momentum_buffers[i] is None:
            bufs[i] = torch.empty_like(params[i], memory_format=torch.preserve_format)
            fresh[i] = True
        else:
            bufs[i] = momentum_buffers[i]
    hyper = [v for i in range(n) for v in (lrs[i], wds[i], moms[i], damps[i], 0.0)]
    _second_step_call(params, grads, w_old, g_old, bufs, [None] * n, [None] * n, [None] * n, hyper, fresh,
                      mode=K.MODE_SGD, gsam_alpha=gsam_alpha, nesterov=nesterov, maximize=maximize)
    for i in range(n):  # handed over once the op succeeded (an exception leaves the list as it was)
        if fresh[i]:
            momentum_buffers[i] = bufs[i]


@eager_under_compile_on_old_torch
@torch.no_grad()
def sam_restore_adam_(
    params: list[Tensor],
    grads: list[Tensor | None],
    w_old: list[Tensor | None],
    g_old: list[Tensor | None] | None,
    exp_avgs: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    max_exp_avg_sqs: list[Tensor | None] | None,
    steps: list[Tensor | None],
    *,
    lr: float | list[float],
    beta1: float | list[float] = 0.9,
    beta2: float | list[float] = 0.999,
    eps: float | list[float] = 1e-8,
    weight_decay: float | list[float] = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    gsam_alpha: float = 0.0,
) -> None:
    """Triton twin of :func:`fastsam.reference.sam_restore_adam_`: one K3 launch per group (GSAM +1).

    ``steps`` are 0-dim tensors (torch keeps them on the CPU, so reading them is no device
    sync); they are incremented in place and the bias corrections go into the per-tensor table.
    """
    n = len(params)
    lrs, b1s, b2s = _floats(lr, n, "lr"), _floats(beta1, n, "beta1"), _floats(beta2, n, "beta2")
    epss, wds = _floats(eps, n, "eps"), _floats(weight_decay, n, "weight_decay")
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    hyper = [x for i in range(n) for x in (lrs[i], b1s[i], b2s[i], epss[i], wds[i])]
    _second_step_call(params, grads, w_old, g_old, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None,
                      steps, hyper, [False] * n, mode=K.MODE_ADAM, gsam_alpha=gsam_alpha, maximize=maximize,
                      amsgrad=amsgrad, decoupled=decoupled_weight_decay)


@eager_under_compile_on_old_torch
@torch.no_grad()
def sam_restore_accumulate_(
    params: list[Tensor],
    grads: list[Tensor | None],
    w_old: list[Tensor | None],
    g_old: list[Tensor | None] | None,
    acc: list[Tensor | None],
    reset: list[bool],
    *,
    weight: float,
    scale: float = 1.0,
    gsam_alpha: float = 0.0,
    acc_in: list[Tensor | None] | None = None,
) -> None:
    """Triton twin of :func:`fastsam.reference.sam_restore_accumulate_`: one K3 launch (MODE 3)
    per group, GSAM +1. Reads ``w_old`` and ``g`` (+ the running sum unless reset, from
    ``acc_in`` when given), writes ``w`` and ``acc``: 5 parameter-sized passes, against 2
    (restore) + 3 (``acc += weight * g``) as separate ops, and 8 instead of 10 with GSAM (the
    combined gradient is not written back)."""
    check_accumulate_args(params, grads, w_old, acc, reset, acc_in)
    n = len(params)
    if n == 0:
        return
    if g_old is None or gsam_alpha <= 0:
        g_old, gsam_alpha = None, 0.0
    if not _traced(params[0]):
        _accumulate_body(params, grads, w_old, g_old, acc, reset, weight, scale, gsam_alpha, acc_in)
        _bump_versions(list(params) + [a for a in acc if a is not None])
        return
    dense = [x for lst in (grads, w_old, g_old, acc, acc_in) for x in _dense(lst)]
    torch.ops.fastsam.sam_restore_accumulate(list(params), *dense, [bool(r) for r in reset], float(weight),
                                             float(scale), float(gsam_alpha))
