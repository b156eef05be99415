"""The loss kernels' bf16 gradient store (triton_losses._store_grad) on every float32 bit class.

The CPU tests of the loss kernels only ever produce x86 NaNs (0x7FC00000 / 0xFFC00000), which the
old integer rounding ``(bits + 0x7FFF + lsb) & 0xFFFF0000`` happened to keep. A GPU produces the
canonical NaN 0x7FFFFFFF, which that rounding turned into 0x80000000 (-0.0): bf16 rows with NaN
logits or a bad target got zero gradients on a GPU. Here the production store helper runs in a
tiny kernel on raw bit patterns (interpreter on CPU, compiled on a GPU), so the GPU's patterns
go through exactly the code a GPU runs, and every result is compared with an independent
round-to-nearest-even written in Python integers.

No ``from __future__ import annotations``: triton 3.0's interpreter needs evaluated constexpr
annotations on a module-level kernel.
"""

import random
import struct

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastsam.kernels.triton_losses import _round_bf16_bits, _store_grad  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _round_bits_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    bits = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    tl.store(dst_ptr + offs, _round_bf16_bits(bits).to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _store_bits_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    bits = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    _store_grad(dst_ptr + offs, bits.to(tl.float32, bitcast=True), mask)


def _is_nan32(b: int) -> bool:
    return (b & 0x7F800000) == 0x7F800000 and (b & 0x007FFFFF) != 0


def _rne_bf16(b: int) -> int:
    """bf16 bits of the float32 bits ``b``, round to nearest, ties to even (overflow to inf)."""
    upper, lower = b >> 16, b & 0xFFFF
    if lower > 0x8000 or (lower == 0x8000 and upper & 1):
        upper += 1  # a carry out of the mantissa bumps the exponent: correct, max finite -> inf
    return upper & 0xFFFF


# The GPU canonical NaN and its negative first (the defect), other NaN payloads, infinities, the
# largest finite (rounds to inf), ties both ways, the smallest subnormals, signed zeros.
CASES = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFF8000,
         0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000,
         0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF808000, 0xBF818000,
         0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x00000000, 0x80000000, 0x3F800000]


def _check(pats: list[int], got: list[int]) -> list[str]:
    bad = []
    for b, g in zip(pats, got):
        if _is_nan32(b):
            ok = (g & 0x7F80) == 0x7F80 and (g & 0x007F) != 0  # any bf16 NaN (its payload is free)
        else:
            ok = g == _rne_bf16(b)
        if not ok:
            bad.append(f"0x{b:08X} -> 0x{g:04X}")
    return bad


def test_bf16_gradient_store_rounds_to_nearest_even_and_keeps_every_nan():
    rng = random.Random(16)
    pats = CASES + [rng.getrandbits(32) for _ in range(4096 - len(CASES))]
    src = torch.tensor([struct.unpack("<i", struct.pack("<I", b))[0] for b in pats], dtype=torch.int32, device=DEV)

    # 1. the rounding itself, bits in, bits out (no float conversion involved): every pattern
    out = torch.full((len(pats),), 7, dtype=torch.int32, device=DEV)  # poisoned: every element written
    _round_bits_kernel[(1,)](src, out, len(pats), BLOCK=4096)
    words = [x & 0xFFFFFFFF for x in out.cpu().tolist()]
    assert all(w & 0xFFFF == 0 for w in words), "the rounded pattern must be exactly representable in bf16"
    bad = _check(pats, [w >> 16 for w in words])
    assert not bad, f"{len(bad)} wrong roundings, e.g. {bad[:8]}"

    # 2. the production store (rounding + the store of the bf16 bits), every pattern, subnormals too
    dst = torch.full((len(pats),), 7.0, dtype=torch.bfloat16, device=DEV)
    _store_bits_kernel[(1,)](src, dst, len(pats), BLOCK=4096)
    got = [x & 0xFFFF for x in dst.view(torch.int16).cpu().tolist()]
    bad = _check(pats, got)
    assert not bad, f"{len(bad)} wrong bf16 stores, e.g. {bad[:8]}"

    # the cases above are what they claim: the GPU NaNs are NaN, the ties tie, max finite rounds up
    assert _is_nan32(0x7FFFFFFF) and _is_nan32(0xFFFFFFFF) and not _is_nan32(0x7F800000)
    assert _rne_bf16(0x3F808000) == 0x3F80 and _rne_bf16(0x3F818000) == 0x3F82 and _rne_bf16(0x7F7FFFFF) == 0x7F80
    # and the Python reference agrees with torch's own round-to-nearest-even conversion
    finite = [b for b in pats if not _is_nan32(b)]
    x = torch.tensor(finite, dtype=torch.int64).to(torch.int32).view(torch.float32)
    want = [v & 0xFFFF for v in x.to(torch.bfloat16).view(torch.int16).tolist()]
    assert want == [_rne_bf16(b) for b in finite]
