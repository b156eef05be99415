"""``backend="cuda"``: the SAM ops as CUDA kernels from ``csrc/`` (no Triton needed).

Same functions and signatures as :mod:`fastsam.reference`, same argument handling as
:mod:`fastsam.kernels.cpp_sam` (one :class:`~fastsam.kernels.cpp_sam.CsrcBackend`, another
extension kind). Per (op phase, dtype group) one launch over any number of tensors: a row table
(device addresses, sizes, per-tensor options) and an item table (tensor, 16384-element chunk) are
uploaded with one non-blocking copy from pinned memory; a fixed grid of 256-thread blocks strides
over the items with 16-byte loads and stores where the tensors are 16-byte aligned.

=============================  =======  ==================================================
op                             kernels  passes over parameter-sized memory (fp32, AdamW)
=============================  =======  ==================================================
first step (K1 + K2)           2        K1 reads g (1); K2 reads w, g, writes w, w_old (4)
second step, SGD/Adam (K3)     1        reads w_old, g, m, v; writes w, m, v (7 for Adam)
GSAM                           +1       reads gs, g_old (2); K3 also reads g_old, writes g
=============================  =======  ==================================================

No host sync: K2 blocks reduce K1's per-block float64 partials themselves and the "N finite"
flag stays on the device. Built only where torch is a CUDA build, nvcc is found and a device is
visible (:mod:`fastsam.kernels._ext`); all tensors of a call must be on one device.
"""

from __future__ import annotations

from . import _ext
from .cpp_sam import SUPPORTED_DTYPES, CsrcBackend

FUSED_UPDATES = True
SHARDED = True  # sam_perturb_ / gsam_combine_ / sam_restore_accumulate_ take reduce= (fastsam._shard)
PER_GROUP = True  # hyper-parameter columns may be PerGroup (see cpp_sam)
__all__ = ["FUSED_UPDATES", "SUPPORTED_DTYPES", "available", "gsam_combine_", "sam_perturb_", "sam_restore_",
           "sam_restore_accumulate_", "sam_restore_adam_", "sam_restore_sgd_"]

_BACKEND = CsrcBackend("cuda", "cuda", "cuda")

sam_perturb_ = _BACKEND.sam_perturb_
gsam_combine_ = _BACKEND.gsam_combine_
sam_restore_ = _BACKEND.sam_restore_
sam_restore_sgd_ = _BACKEND.sam_restore_sgd_
sam_restore_adam_ = _BACKEND.sam_restore_adam_
sam_restore_accumulate_ = _BACKEND.sam_restore_accumulate_


def available() -> bool:
    """True if the CUDA extension is usable here (builds it on the first call of the process)."""
    return _ext.available("cuda")
