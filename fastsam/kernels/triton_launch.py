"""Launch side of the Triton kernels: geometry (block, warps, resident grid), the launch itself,
dtype maps and the per-group launch flags.

The persistent grid of a kernel family must be resident all at once: after a family's first
launch on a GPU, the grid shrinks to what the compiled kernel's register count lets stay on an
SM (``_resident_programs``). ``LAUNCHES`` counts launches (tests and benchmarks read the
difference around a step); ``IN_LAUNCH`` is set while a launch runs (the interpreter copies its
tensor arguments with torch ops, which op-counting tools skip).
"""

import contextlib
import functools
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from . import _tables as T
from . import _triton_kernels as K

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
