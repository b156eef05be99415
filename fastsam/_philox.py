"""Philox4x32-10 in plain PyTorch integer ops: the ESAM weight-mask function (docs/design.md section 2.5).

Every backend (reference, foreach, Triton, C++/CUDA) must produce the *same* keep/drop mask bit
for bit, so the mask is a pure function of (seed, step, global element index):

    r = Philox4x32-10(counter=(i mod 2^32, i div 2^32, 0, 0), key=(seed mod 2^32, t mod 2^32))[0]
    keep  iff  r < floor(beta * 2^32)          (unsigned compare)

This is what Triton's ``tl.randint(seed64, i)`` returns (as int32 bits) with
``seed64 = t * 2^32 + seed``: Triton splits the 64-bit seed into the key (lo, hi) and the
offset into the counter (lo, hi, 0, 0).

Values are held in int64 tensors in [0, 2^32). The 32x32 -> 64-bit products that Philox needs
would overflow a signed int64 (0xD2511F53 * 0xFFFFFFFF > 2^63), which is undefined behaviour in
the C++ kernels behind torch, so each product is split into 16-bit halves: every partial product
is below 2^48 and every sum below 2^49.
"""

from __future__ import annotations

import torch

_M0 = 0xD2511F53  # Philox4x32 round multipliers (Salmon et al., SC'11; Random123)
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9  # Weyl key increments (golden ratio, sqrt(3) - 1)
_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_ROUNDS = 10

# Elements processed per chunk when a long index range is turned into a mask. The Philox state is
# ~8 int64 temporaries per element and the ~300 ops of the 10 rounds each stream them, so on a CPU
# the chunk should stay cache-resident: 2^16 elements (512 KiB per temporary) ran at 171 ns per
# element on this 2-core EPYC against 615 for 2^22 (1 thread; 105 vs 413 on 2). On a GPU every op
# is a launch, so chunks are large there (2^22: peak ~256 MiB of temporaries).
MASK_CHUNK = 1 << 22
MASK_CHUNK_CPU = 1 << 16


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product ``m * x`` for x in [0, 2^32), m < 2^32.

    In-place where possible: this is the hot loop of the mask (2 calls per round, 10 rounds).
    """
    p_lo = (x & 0xFFFF).mul_(m)  # < 2^48
    p_hi = (x >> 16).mul_(m)  # < 2^48
    # m * x = p_hi * 2^16 + p_lo; fold the low 16 bits of p_hi into the low word first.
    s = (p_hi & 0xFFFF).bitwise_left_shift_(16).add_(p_lo)  # < 2^48 + 2^32
    hi = p_hi.bitwise_right_shift_(16).add_(s >> 32)  # < 2^32, exact
    return hi, s.bitwise_and_(_MASK32)


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with 10 rounds on int64 tensors holding unsigned 32-bit values.

    Args:
        c0..c3: counter words, int64 tensors (same shape) with values in [0, 2^32).
        k0, k1: key words, Python ints in [0, 2^32).
    Returns:
        The four output words as int64 tensors in [0, 2^32).
    """
    k0 &= _MASK32
    k1 &= _MASK32
    for r in range(_ROUNDS):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1.bitwise_xor_(c1).bitwise_xor_(k0), lo1, hi0.bitwise_xor_(c3).bitwise_xor_(k1), lo0
    return c0, c1, c2, c3


def _philox_word0(c0: torch.Tensor, c1: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """``philox4x32_10(c0, c1, 0, 0, k0, k1)[0]`` with the work that cannot reach word 0 skipped:
    round 1 multiplies the zero counter word c2 (its product is 0), and the last round only
    needs ``hi(M1 * c2) ^ c1 ^ k0``. 18 of the 20 products; same bits (tested against the full
    function)."""
    k0 &= _MASK32
    k1 &= _MASK32
    # round 1 with c2 = c3 = 0: (hi1, lo1) = (0, 0)
    hi0, lo0 = _mulhilo(_M0, c0)
    c0, c1, c2, c3 = c1.bitwise_xor(k0), torch.zeros_like(c0), hi0.bitwise_xor_(k1), lo0
    for _ in range(1, _ROUNDS - 1):
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1.bitwise_xor_(c1).bitwise_xor_(k0), lo1, hi0.bitwise_xor_(c3).bitwise_xor_(k1), lo0
    k0 = (k0 + _W0) & _MASK32
    hi1, _ = _mulhilo(_M1, c2)
    return hi1.bitwise_xor_(c1).bitwise_xor_(k0)


def philox_uint32(index: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """First Philox output word for global element indices ``index`` (int64, >= 0).

    Returns an int64 tensor in [0, 2^32): ``Philox(counter=(i mod 2^32, i div 2^32, 0, 0),
    key=(seed mod 2^32, step mod 2^32))[0]``.
    """
    index = index.to(torch.int64)
    return _philox_word0(index & _MASK32, index >> 32, seed, step)


def keep_threshold(beta: float) -> int:
    """``floor(beta * 2^32)``: an element is kept iff its Philox word is below this."""
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"swp_keep must be in (0, 1], got {beta!r}")
    return int(beta * 4294967296.0)


def keep_mask(start: int, count: int, seed: int, step: int, beta: float,
              device: torch.device | str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """Bool keep-mask for the global element indices ``start .. start + count - 1``.

    Works in chunks (``MASK_CHUNK_CPU`` / ``MASK_CHUNK`` elements) so the int64 temporaries stay
    bounded (and in cache on a CPU).
    ``out`` (bool, ``count`` elements, contiguous) may be given to write into.
    """
    thr = keep_threshold(beta)
    if out is None:
        out = torch.empty(count, dtype=torch.bool, device=device)
    if thr >= 1 << 32:
        out.fill_(True)
        return out
    chunk = MASK_CHUNK_CPU if out.device.type == "cpu" else MASK_CHUNK
    for lo in range(0, count, chunk):
        n = min(chunk, count - lo)
        idx = torch.arange(start + lo, start + lo + n, dtype=torch.int64, device=out.device)
        torch.lt(philox_uint32(idx, seed, step), thr, out=out[lo:lo + n])
    return out
