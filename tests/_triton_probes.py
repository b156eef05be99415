"""Probe kernels for the tests (imported only where triton is installed).

Module scope on purpose, and no ``from __future__ import annotations``: triton 3.0's interpreter
needs ``triton.language`` in the kernel's globals and an evaluated ``tl.constexpr`` annotation.
"""

import triton
import triton.language as tl


@triton.jit
def philox_probe_kernel(out_ptr, out32_ptr, idx_ptr, seed64, n, BLOCK: tl.constexpr):
    """``out[i]``: word 0 of ``tl.philox(seed64, lo(idx), hi(idx), 0, 0)``, the call the ESAM
    mask kernel makes. ``out32[i]``: ``tl.randint(seed64, int32(idx))``, Triton's public counter
    RNG, for the indices below 2^31 (Triton 3.0 runs a 64-bit Philox for int64 offsets, later
    releases split them into two 32-bit words; the int32 form is the same on every release)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    idx = tl.load(idx_ptr + offs, mask=m, other=0)
    zero = idx.to(tl.uint32) * 0
    r, _r1, _r2, _r3 = tl.philox(seed64, idx.to(tl.uint32), (idx >> 32).to(tl.uint32), zero, zero)
    tl.store(out_ptr + offs, r, mask=m)
    small = m & (idx < 2**31)
    tl.store(out32_ptr + offs, tl.randint(seed64, idx.to(tl.int32)), mask=small)


@triton.jit
def strided_loop_kernel(out_ptr, n):
    """``for b in range(pid, n, nprog)``: the persistent-grid loop of every fastsam kernel."""
    pid = tl.program_id(0)
    for b in range(pid, n, tl.num_programs(0)):
        tl.store(out_ptr + b, b)


def interpreter_problem():
    """None if the interpreter runs the persistent loop; else why not (a string). Triton releases
    up to at least 3.6 convert ``program_id`` with ``int(ndarray)``, which numpy >= 2.3 refuses for
    arrays of ndim 1 ("only 0-dimensional arrays can be converted to Python scalars")."""
    import torch

    out = torch.zeros(5, dtype=torch.int32)
    try:
        strided_loop_kernel[(2,)](out, 5)
    except Exception as e:  # reported to the user as is
        return f"{type(e).__name__}: {e}"
    if out.tolist() != [0, 1, 2, 3, 4]:
        return f"wrong result {out.tolist()}"
    return None
