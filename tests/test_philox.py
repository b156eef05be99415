"""The ESAM mask function: Philox4x32-10 in plain PyTorch (docs/design.md section 2.5)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fastsam import _philox
from fastsam._philox import keep_mask, keep_threshold, philox4x32_10, philox_uint32

# Random123 known-answer vectors for philox4x32_10: (counter, key, expected output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_random123_known_answers(ctr, key, expected):
    c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
    out = philox4x32_10(*c, *key)
    assert [int(o) for o in out] == list(expected)


def test_vectorized_equals_scalar_calls():
    idx = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**40 + 7])
    got = philox_uint32(idx, seed=123456789, step=42)
    for i, r in zip(idx.tolist(), got.tolist()):
        one = philox4x32_10(
            torch.tensor([i & 0xFFFFFFFF]), torch.tensor([i >> 32]), torch.tensor([0]), torch.tensor([0]),
            123456789, 42,
        )[0]
        assert int(one) == r
        assert 0 <= r < 2**32


def test_counter_high_word_is_used():
    # i and i + 2^32 share the low word; the high word must change the result
    a = philox_uint32(torch.tensor([7]), 1, 2)
    b = philox_uint32(torch.tensor([7 + 2**32]), 1, 2)
    assert int(a) != int(b)


def test_keep_threshold_and_mask_semantics():
    assert keep_threshold(1.0) == 2**32
    assert keep_threshold(0.5) == 2**31
    # index 0, seed 0, step 0 gives 0x6627E8D5 = 1713891541 (first KAT word)
    r0 = 0x6627E8D5
    assert bool(keep_mask(0, 1, 0, 0, (r0 + 1) / 2**32)[0])  # threshold r0 + 1 > r0: kept
    assert not bool(keep_mask(0, 1, 0, 0, r0 / 2**32)[0])  # threshold r0: r0 < r0 is false
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="swp_keep"):
            keep_threshold(bad)


def test_keep_mask_chunking_matches_direct(monkeypatch):
    monkeypatch.setattr(_philox, "MASK_CHUNK_CPU", 1000)  # force several chunks
    start, n, beta = 2**32 - 1500, 3333, 0.37
    got = keep_mask(start, n, 9, 3, beta)
    direct = philox_uint32(torch.arange(start, start + n), 9, 3) < keep_threshold(beta)
    assert torch.equal(got, direct)
    frac = got.float().mean().item()
    assert abs(frac - beta) < 0.05  # 3333 Bernoulli(0.37) draws: std 0.008


def test_mask_depends_on_seed_and_step():
    a = keep_mask(0, 4096, 0, 0, 0.5)
    assert not torch.equal(a, keep_mask(0, 4096, 1, 0, 0.5))
    assert not torch.equal(a, keep_mask(0, 4096, 0, 1, 0.5))
    assert torch.equal(a, keep_mask(0, 4096, 0, 0, 0.5))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_matches_triton_philox_and_randint():
    """Triton's philox with the mask kernel's counter words (lo, hi, 0, 0) and key seed64 = step *
    2^32 + seed is this function (int64 indices reach the high word), and so is tl.randint on
    int32 offsets."""
    import triton
    from _triton_probes import philox_probe_kernel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    idx = torch.cat([torch.arange(0, 300), torch.arange(2**31 - 5, 2**31 + 5),
                     torch.arange(2**32 - 3, 2**32 + 200), torch.tensor([5 * 2**33 + 11])])
    idx = idx.to(dev)
    small = idx.cpu() < 2**31
    for seed, step in [(0, 0), (7, 3), (2**32 - 1, 2**20 + 5)]:
        out = torch.empty(idx.numel(), dtype=torch.int32, device=dev)
        out32 = torch.zeros(idx.numel(), dtype=torch.int32, device=dev)
        philox_probe_kernel[(triton.cdiv(idx.numel(), 256),)](out, out32, idx, step * 2**32 + seed, idx.numel(),
                                                              BLOCK=256)
        want = philox_uint32(idx.cpu(), seed, step)
        assert torch.equal(out.cpu().to(torch.int64) & 0xFFFFFFFF, want)
        assert torch.equal((out32.cpu().to(torch.int64) & 0xFFFFFFFF)[small], want[small])


def test_word0_shortcut_equals_full_philox():
    """philox_uint32 skips the work that cannot reach output word 0 (the zero counter words'
    first products, the last round's other words): same bits as the full function."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.arange(0, 3000), torch.arange(2**32 - 64, 2**32 + 64),
                     torch.randint(0, 2**40, (3000,), generator=gen)])
    zero = torch.zeros_like(idx)
    for seed, step in ((0, 0), (7, 3), (2**32 - 1, 2**32 - 1), (123456789, 987654321)):
        full = _philox.philox4x32_10(idx & 0xFFFFFFFF, idx >> 32, zero, zero, seed, step)[0]
        assert torch.equal(_philox.philox_uint32(idx, seed, step), full), (seed, step)
