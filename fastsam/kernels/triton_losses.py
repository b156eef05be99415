"""Triton kernels for the SAM ascent losses (OBF and BiSAM), forward with the gradient fused in.

One program handles one row of ``logits [B, C]``. It reads the row, computes the per-example
value *and* the per-example gradient with respect to the logits, and writes both: the loss
into ``loss [B]`` (float32) and the gradient into ``grad [B, C]`` (the logits' dtype). The
autograd glue in :mod:`fastsam.losses` saves ``grad`` and only rescales it by ``grad_output``
in the backward pass, so the logits are never read again after the forward.

Row widths:

* ``C <= BLOCK`` (ONE_CHUNK): the row is loaded once into registers; value and gradient are
  computed from that single read.
* ``C > BLOCK``: an *online* logsumexp over chunks of ``BLOCK`` columns. Each lane keeps its
  own running max ``m`` and rescaled sum ``s`` (no cross-lane reduction inside the loop), so the
  live state is a handful of ``BLOCK``-vectors whatever ``C`` is: no register spills for
  vocabulary-sized rows (128256 or 262144 columns). The softmax gradient needs the final
  normaliser, so a second sweep re-reads the row (usually from L2) and writes the gradient.
  Sigmoid-OBF needs no normaliser and always finishes in one sweep.

Conventions shared by every kernel:

* float32 math whatever the logits' dtype; gradient stored in the logits' dtype.
* ``target == ignore_index``: the row's value and gradient are 0 (the kernel writes the zeros
  itself, so ``grad`` needs no separate memset).
* a target outside ``[0, C)`` that is not ``ignore_index`` makes the row's value and gradient
  NaN. Nothing is read out of bounds.
* ``WRITE_GRAD=False`` (logits that need no gradient): only the values are computed; no [B, C]
  store, and no second sweep for wide rows. (The host checks targets only for CPU tensors: a check
  on a GPU tensor would need a device-to-host sync.)

This module imports triton at the top: import it lazily (``fastsam.losses`` does). It must not
import anything from ``fastsam.optim``.
"""

# No `from __future__ import annotations` in a module with @triton.jit kernels: triton 3.0's
# interpreter recognizes constexpr parameters only by their evaluated annotation (a string
# 'tl.constexpr' is taken for a runtime argument and tl.arange then fails).

import math

import torch
import triton
import triton.language as tl

from ._tables import on_device as _on_device

# log(e - 1): the shift that makes the BiSAM "-log" lower bound pass through 0 at x = 0
# (eq. 18 of Xie et al.: phi(x) = 1 - log(1 + exp(log(e-1) - x)), phi(0) = 1 - log(e) = 0).
LOG_E_MINUS_1 = math.log(math.e - 1.0)

# Column chunk per loop iteration (the row block), per kernel, on the GPU; num_warps follows
# from it (_config: 8 row elements per thread per live vector, at most 16 warps).
# - softmax OBF: 8192 columns with 16 warps (16 per thread) covers ImageNet-1k and -21k heads in
#   1 and 3 chunks; sm_90 registers (ptxas 13.4 through triton 3.9, every launched variant):
#   32-43 one-chunk, 67-84 chunked, no spill.
# - sigmoid OBF and BiSAM: 2048 columns with 8 warps (8 per thread): 21-78 registers, no spill,
#   3 programs of 256 threads resident per SM (24 KiB of a row in flight per SM per load). At
#   8192 / 16 warps they needed 56-128 registers: BiSAM-log with a gradient sat at 128, the cap
#   for 512 threads, and sigmoid OBF without a gradient on rows of odd width (bf16, fp16) spilled
#   8 bytes at the 64 registers ptxas chose to fit two programs per SM.
# bench/aot_launches.py compiles every launched variant for sm_90 and fails on any spill.
# Interpreter (CPU): every tl op is a numpy call with ~10-50 us of Python overhead, so bigger
# chunks are strictly cheaper; 16384 keeps a 70000-wide row at 5 chunks per sweep.
_MAX_BLOCK_GPU = {"softmax": 8192, "sigmoid": 2048, "bisam": 2048}
_MAX_BLOCK_INTERPRET = 16384


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _log1p(x):
    # log(1 + x) for x in [0, 1] without losing the low bits of small x (Goldberg's trick:
    # the rounding error of 1 + x cancels between log(w) and w - 1). Triton has no log1p.
    w = 1.0 + x
    d = w - 1.0
    return tl.where(d == 0.0, x, tl.log(w) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _online_update(m, s, x):
    """Per-lane online logsumexp step: (m, s) with s = sum exp(seen - m), add x.

    Returns (m_new, s_new, e, gt): e = exp(min(m, x) - max(m, x)) is the only exp needed
    (one of the two exponents is always 0), gt says whether x became the new max. -inf in
    either operand (masked lanes, an empty lane) gives e = 0 instead of exp(nan).
    """
    hi = tl.maximum(m, x)
    lo = tl.minimum(m, x)
    e = tl.where(lo == float("-inf"), 0.0, tl.exp(lo - tl.where(lo == float("-inf"), 0.0, hi)))
    gt = x > m
    s = tl.where(gt, s * e + 1.0, s + e)
    return hi, s, e, gt


@triton.jit
def _merge_lanes(m_vec, s_vec):
    """Row max m and the per-lane factors exp(m_lane - m) that rescale each lane's sums to m."""
    m = tl.max(m_vec, axis=0)
    scale = tl.where(m_vec == float("-inf"), 0.0, tl.exp(m_vec - m))
    return m, scale


@triton.jit
def _zero_row(g_row, C, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=g_row.dtype.element_ty)
    for start in range(0, C, BLOCK):
        tl.store(g_row + start + cols, zero, mask=start + cols < C)


@triton.jit
def _round_bf16_bits(bits):
    """float32 bit patterns (uint32) rounded to the nearest bfloat16, ties to even, returned as
    float32 bit patterns whose low 16 bits are 0 (so any fp32 -> bf16 conversion is then exact).

    NaN must stay NaN: adding the rounding increment to a NaN whose low mantissa bits are set
    carries into the exponent and the sign. The GPU's canonical NaN 0x7FFFFFFF (what sm_90
    arithmetic produces) would become 0x80000000 = -0.0 and 0xFFFFFFFF would wrap to +0.0: bf16
    rows with NaN logits or an out-of-range target would get zero gradients on a GPU, while the
    x86 NaNs of the CPU tests (0x7FC00000, 0xFFC00000) survive. NaNs (tested on the integer bits,
    immune to any float-compare folding) keep their sign and get the quiet bit, which the
    truncation to 16 bits keeps (0x7F800001 truncated alone would become +inf).
    """
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, (bits | 0x00400000) & 0xFFFF0000, rounded)


@triton.jit
def _store_grad(ptrs, g, mask):
    """Store float32 g into the gradient buffer, rounding to nearest even for bfloat16.

    The hardware fp32 -> bf16 conversion already rounds to nearest even; the Triton CPU
    interpreter (3.x) truncates instead, which would double the bf16 error in the tests. Rounding
    the bits (:func:`_round_bf16_bits`) and storing their upper half gives the same bits on both:
    a few integer ops, free next to the store.
    """
    OUT: tl.constexpr = ptrs.dtype.element_ty
    if OUT == tl.bfloat16:
        # the rounded pattern's upper half is the bf16 value: moved as bits, so no float
        # conversion is involved (the interpreter's mangles float32 subnormals)
        bits = _round_bf16_bits(g.to(tl.uint32, bitcast=True))
        tl.store(ptrs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, g.to(OUT), mask=mask)


@triton.jit
def _obf_strength(log_inv_py, gamma, lam, inv_one_minus_lam):
    # eq. 17: a = gamma * max(0, (1 - lam / p_y) / (1 - lam)), with lam / p_y = lam * exp(-log p_y).
    # lam = 0 must give r = 0 even where 1/p_y overflows (0 * inf = nan), hence the where.
    # A NaN logit at the target gives a NaN a (and so a NaN gradient row), as in the reference:
    # a plain maximum would turn NaN into 0 (fmax).
    r = tl.where(lam > 0.0, lam * tl.exp(log_inv_py), 0.0)
    return gamma * tl.maximum((1.0 - r) * inv_one_minus_lam, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _phi_and_slope(F, alpha, PHI_TANH: tl.constexpr):
    """BiSAM lower bound phi(F) and its derivative phi'(F), elementwise, float32."""
    if PHI_TANH:
        # eq. 17: phi = tanh(alpha x), phi' = alpha (1 - tanh^2). Triton has no tanh.
        # |x| >= 1/2: tanh|x| = (1 - e)/(1 + e) with e = exp(-2|x|) (never overflows).
        # |x| <  1/2: 1 - e would cancel up to 3 bits, so use tanh x = 2h / (1 + h^2) with
        # h = tanh(x/2) from its odd series to x^9 (next term < 1e-8 relative at x/2 = 1/4).
        # Both branches stay within ~1.5 ulp of tanh over all x (checked against float64).
        x = alpha * F
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        t_big = (1.0 - e) / (1.0 + e)
        hx = 0.5 * ax
        h2 = hx * hx
        h = hx * (1.0 + h2 * (-1.0 / 3.0 + h2 * (2.0 / 15.0 + h2 * (-17.0 / 315.0 + h2 * (62.0 / 2835.0)))))
        t_small = 2.0 * h / (1.0 + h * h)
        t = tl.where(ax < 0.5, t_small, t_big)
        t = tl.where(x < 0.0, -t, t)
        return t, alpha * (1.0 - t * t)
    else:
        # eq. 18: phi = 1 - softplus(log(e-1) - x), phi' = sigmoid(log(e-1) - x). Both from the
        # single e = exp(-|u|): softplus(u) = max(u, 0) + log1p(e); sigmoid(u) = (u>=0 ? 1 : e)/(1+e).
        u = 0.5413248546129181 - F  # LOG_E_MINUS_1 (literal: jit code cannot read module globals)
        e = tl.exp(-tl.abs(u))
        sp = tl.maximum(u, 0.0) + _log1p(e)
        sig = tl.where(u >= 0.0, 1.0, e) / (1.0 + e)
        return 1.0 - sp, sig


# --------------------------------------------------------------------------------------------
# OBF, softmax cross-entropy
# --------------------------------------------------------------------------------------------


@triton.jit
def _obf_softmax_kernel(
    z_ptr, y_ptr, loss_ptr, g_ptr, stride_z, C, inv_c, gamma, lam, inv_one_minus_lam,
    ignore_index, BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    # value_i = (1-a) CE(y) - CE(U) = mean_j z_j - a * lse - (1 - a) z_y   (eq. 15, simplified:
    #           the two lse terms cancel, which also removes a catastrophic cancellation)
    # mean_j z_j is accumulated as sum_j (z_j / C): a plain sum of finite logits can overflow
    # (two of 3e38), and no term of the value is then larger than the largest |logit| (+ log C).
    # grad_i  = 1/C - a * softmax(z) - (1 - a) onehot(y)                  (eq. 16)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = g_ptr + row * C
    y = tl.load(y_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if y == ignore_index:
        if WRITE_GRAD:
            _zero_row(g_row, C, BLOCK)
        tl.store(loss_ptr + row, 0.0)
    else:
        in_range = (y >= 0) & (y < C)
        z_y = tl.load(z_row + tl.where(in_range, y, 0)).to(tl.float32)
        if ONE_CHUNK:
            mask = cols < C
            z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m = tl.max(z, axis=0)
            e = tl.exp(z - m)
            s = tl.sum(e, axis=0)
            log_s = tl.log(s)
            lse = m + log_s
            mean_z = tl.sum(tl.where(mask, z * inv_c, 0.0), axis=0)
            a = _obf_strength(log_s + (m - z_y), gamma, lam, inv_one_minus_lam)
            a = tl.where(in_range, a, float("nan"))
            if WRITE_GRAD:
                g = inv_c - (a / s) * e - tl.where(cols == y, 1.0 - a, 0.0)
                _store_grad(g_row + cols, g, mask)
        else:
            m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
            s_vec = tl.zeros([BLOCK], dtype=tl.float32)
            sz_vec = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, C, BLOCK):
                offs = start + cols
                mask = offs < C
                z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                m_vec, s_vec, _e, _gt = _online_update(m_vec, s_vec, z)
                sz_vec += tl.where(mask, z * inv_c, 0.0)
            m, scale = _merge_lanes(m_vec, s_vec)
            log_s = tl.log(tl.sum(s_vec * scale, axis=0))
            lse = m + log_s
            mean_z = tl.sum(sz_vec, axis=0)
            a = _obf_strength(log_s + (m - z_y), gamma, lam, inv_one_minus_lam)
            a = tl.where(in_range, a, float("nan"))
            if WRITE_GRAD:  # second sweep: the gradient needs the final lse
                for start in range(0, C, BLOCK):
                    offs = start + cols
                    mask = offs < C
                    z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                    g = inv_c - a * tl.exp((z - m) - log_s) - tl.where(offs == y, 1.0 - a, 0.0)
                    _store_grad(g_row + offs, g, mask)
        loss = mean_z - a * lse - (1.0 - a) * z_y
        tl.store(loss_ptr + row, loss)


# --------------------------------------------------------------------------------------------
# OBF, sigmoid cross-entropy (sum of per-class BCE): one sweep whatever C
# --------------------------------------------------------------------------------------------


@triton.jit
def _obf_sigmoid_kernel(
    z_ptr, y_ptr, loss_ptr, g_ptr, stride_z, C, inv_c, gamma, lam, inv_one_minus_lam,
    ignore_index, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    # With S = sum_j softplus(z_j):  L(y) = S - z_y,  L(U) = S - mean_j z_j  (BCE(t, z) =
    # softplus(z) - t z), so value = mean z - a S - (1 - a) z_y and, because
    # d softplus / dz = sigmoid, grad = 1/C - a sigmoid(z) - (1 - a) onehot(y): eq. 16 with
    # p = sigmoid(z) (the paper's "sum_i yhat_i grad z_i" for sigmoid cross-entropy).
    # a depends only on p_y = sigmoid(z_y), known before the sweep. Accumulated: a * softplus(z_j)
    # (a = 0 with an overflowing S must not give 0 * inf) and z_j / C (sum z_j can overflow), as in
    # the reference (obf_loss_reference). At z_j = 0 the gradient uses sigmoid(0) = 1/2 exactly.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = g_ptr + row * C
    y = tl.load(y_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if y == ignore_index:
        if WRITE_GRAD:
            _zero_row(g_row, C, BLOCK)
        tl.store(loss_ptr + row, 0.0)
    else:
        in_range = (y >= 0) & (y < C)
        z_y = tl.load(z_row + tl.where(in_range, y, 0)).to(tl.float32)
        # -log sigmoid(z_y) = softplus(-z_y)
        ey = tl.exp(-tl.abs(z_y))
        log_inv_py = tl.maximum(-z_y, 0.0) + _log1p(ey)
        a = _obf_strength(log_inv_py, gamma, lam, inv_one_minus_lam)
        a = tl.where(in_range, a, float("nan"))
        sp_vec = tl.zeros([BLOCK], dtype=tl.float32)
        sz_vec = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = offs < C
            z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            e = tl.exp(-tl.abs(z))
            p = tl.where(z >= 0.0, 1.0, e) / (1.0 + e)
            sp_vec += tl.where(mask, a * (tl.maximum(z, 0.0) + _log1p(e)), 0.0)
            sz_vec += z * inv_c  # masked lanes loaded 0
            if WRITE_GRAD:
                g = inv_c - a * p - tl.where(offs == y, 1.0 - a, 0.0)
                _store_grad(g_row + offs, g, mask)
        aS = tl.sum(sp_vec, axis=0)
        loss = tl.sum(sz_vec, axis=0) - aS - (1.0 - a) * z_y
        tl.store(loss_ptr + row, loss)


# --------------------------------------------------------------------------------------------
# BiSAM
# --------------------------------------------------------------------------------------------


@triton.jit
def _bisam_kernel(
    z_ptr, y_ptr, loss_ptr, g_ptr, stride_z, C, mu, inv_mu, log_c, alpha, ignore_index,
    BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr, PHI_TANH: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    # F_j = z_j - z_y, v_j = mu * phi(F_j) (v_y = 0), s = softmax(v):
    # value_i = (logsumexp_j v_j - log C) / mu                       (eq. 11 / 14)
    # grad_j  = s_j phi'(F_j) for j != y,  grad_y = -sum_{j != y} s_j phi'(F_j)
    # T = sum_{j != y} exp(v_j - m) phi'(F_j) rides along with the online sum S = sum exp(v_j - m)
    # (same rescaling), so grad_y = -T / S is known after the first sweep.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = g_ptr + row * C
    y = tl.load(y_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if y == ignore_index:
        if WRITE_GRAD:
            _zero_row(g_row, C, BLOCK)
        tl.store(loss_ptr + row, 0.0)
    else:
        in_range = (y >= 0) & (y < C)
        bad = tl.where(in_range, 0.0, float("nan"))
        z_y = tl.load(z_row + tl.where(in_range, y, 0)).to(tl.float32)
        if ONE_CHUNK:
            mask = cols < C
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            ph, dph = _phi_and_slope(z - z_y, alpha, PHI_TANH)
            is_y = cols == y
            v = tl.where(mask, tl.where(is_y, 0.0, mu * ph), float("-inf"))
            m = tl.max(v, axis=0)
            e = tl.exp(v - m)
            w = tl.where(is_y, 0.0, e * dph)
            inv_s = 1.0 / tl.sum(e, axis=0)
            lse = m - tl.log(inv_s)
            if WRITE_GRAD:
                g_y = -tl.sum(w, axis=0) * inv_s
                g = tl.where(is_y, g_y, w * inv_s) + bad
                _store_grad(g_row + cols, g, mask)
        else:
            m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
            s_vec = tl.zeros([BLOCK], dtype=tl.float32)
            t_vec = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, C, BLOCK):
                offs = start + cols
                mask = offs < C
                z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
                ph, dph = _phi_and_slope(z - z_y, alpha, PHI_TANH)
                is_y = offs == y
                v = tl.where(mask, tl.where(is_y, 0.0, mu * ph), float("-inf"))
                w = tl.where(mask & (offs != y), dph, 0.0)
                m_vec, s_vec, e, gt = _online_update(m_vec, s_vec, v)
                t_vec = tl.where(gt, t_vec * e + w, t_vec + e * w)
            m, scale = _merge_lanes(m_vec, s_vec)
            inv_s = 1.0 / tl.sum(s_vec * scale, axis=0)
            log_inv_s = tl.log(inv_s)
            lse = m - log_inv_s
            g_y = -tl.sum(t_vec * scale, axis=0) * inv_s  # = -sum_{j != y} s_j phi'(F_j)
            if WRITE_GRAD:  # second sweep: s_j needs the final lse
                for start in range(0, C, BLOCK):
                    offs = start + cols
                    mask = offs < C
                    z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
                    ph, dph = _phi_and_slope(z - z_y, alpha, PHI_TANH)
                    g = tl.where(offs == y, g_y, tl.exp((mu * ph - m) + log_inv_s) * dph) + bad
                    _store_grad(g_row + offs, g, mask)
        loss = (lse - log_c) * inv_mu + bad
        tl.store(loss_ptr + row, loss)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# Reduction of the per-row values (mean over kept rows, or sum): one launch
# --------------------------------------------------------------------------------------------
@triton.jit
def _reduce_rows_kernel(rows_ptr, y_ptr, val_ptr, scale_ptr, B, ignore_index, MEAN: tl.constexpr,
                        BLOCK: tl.constexpr):
    """One program: ``val`` = sum of rows (``MEAN``: divided by the number of kept rows, NaN
    when there is none), ``scale`` = the gradient of ``val`` w.r.t. a row (``1 / n``, 0 when n = 0, or
    1 for the sum)."""
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, B, BLOCK):
        offs = start + lanes
        m = offs < B
        acc += tl.load(rows_ptr + offs, mask=m, other=0.0)
        if MEAN:
            y = tl.load(y_ptr + offs, mask=m, other=0)
            cnt += tl.where(m & (y != ignore_index), 1, 0)
    total = tl.sum(acc, 0)
    if MEAN:
        n = tl.sum(cnt, 0).to(tl.float32)
        # IEEE division (a plain `/` is div.full.f32 on sm_90, up to 2 ulp off torch's result);
        # 0 / 0 = NaN with no kept row, as F.cross_entropy
        tl.store(val_ptr, tl.math.div_rn(total, n))
        tl.store(scale_ptr, tl.where(n > 0, tl.math.div_rn(1.0, tl.maximum(n, 1.0)), 0.0))  # no kept row: 0
    else:
        tl.store(val_ptr, total)
        tl.store(scale_ptr, 1.0)


def reduce_rows(rows: torch.Tensor, target: torch.Tensor, ignore_index: int,
                mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, row scale), float32 0-d: the reduction of ``F.cross_entropy`` over the per-row
    values ``rows`` [B] (mean over rows whose target is not ``ignore_index``, or sum) in one
    launch where the torch formula takes about nine, and the gradient of the value with respect
    to each row (the same for every row: ``1 / n`` (0 when every row is ignored), or 1)."""
    val = torch.empty((), dtype=torch.float32, device=rows.device)
    scale = torch.empty((), dtype=torch.float32, device=rows.device)
    B = rows.shape[0]
    # GPU: 1024 rows per iteration over 4 warps; the interpreter: one chunk for the test sizes
    block = max(16, min(1024, triton.next_power_of_2(max(B, 1))))
    with _on_device(rows.device):
        _reduce_rows_kernel[(1,)](rows, target.contiguous(), val, scale, B, int(ignore_index), MEAN=mean,
                                  BLOCK=block, num_warps=4)
    return val, scale


def _check_launchable(kernel, logits: torch.Tensor) -> None:
    if logits.device.type != "cuda" and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "fastsam: the triton loss kernels run on CPU tensors only under the Triton interpreter; "
            "set TRITON_INTERPRET=1 before fastsam.kernels.triton_losses (and triton) are imported, "
            "or use backend='reference'"
        )


def _config(C: int, device: torch.device, kind: str = "softmax") -> tuple[int, bool, int]:
    """(BLOCK, ONE_CHUNK, num_warps) for a row of C columns of the ``kind`` kernel
    ("softmax", "sigmoid", "bisam")."""
    max_block = _MAX_BLOCK_GPU[kind] if device.type == "cuda" else _MAX_BLOCK_INTERPRET
    block = min(triton.next_power_of_2(C), max_block)
    # 8 row elements per thread per live vector (16 at 8192 columns, where 16 warps is the most):
    # enough independent loads in flight to hide latency, few enough registers (see _MAX_BLOCK_GPU)
    num_warps = max(4, min(16, block // 256))
    return block, C <= block, num_warps


def _prepare(logits: torch.Tensor, target: torch.Tensor, write_grad: bool):
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"logits: triton kernels support float32/bfloat16/float16, got {logits.dtype}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    B, C = logits.shape
    loss = torch.empty(B, dtype=torch.float32, device=logits.device)
    grad_shape = (B, C) if write_grad else (0,)
    grad = torch.empty(grad_shape, dtype=logits.dtype, device=logits.device)
    return logits, target, loss, grad


def obf_forward(
    logits: torch.Tensor, target: torch.Tensor, gamma: float, lam: float, sigmoid: bool,
    ignore_index: int, write_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row OBF value (float32 [B]) and per-row gradient wrt logits ([B, C], logits dtype).

    ``write_grad=False`` skips the gradient (and, for wide softmax rows, the second sweep) and
    returns an empty ``[0]`` tensor in its place.
    """
    kernel = _obf_sigmoid_kernel if sigmoid else _obf_softmax_kernel
    _check_launchable(kernel, logits)
    logits, target, loss, grad = _prepare(logits, target, write_grad)
    B, C = logits.shape
    if B == 0:
        return loss, grad
    block, one_chunk, num_warps = _config(C, logits.device, "sigmoid" if sigmoid else "softmax")
    args = (logits, target, loss, grad, logits.stride(0), C, 1.0 / C, float(gamma), float(lam),
            1.0 / (1.0 - lam), int(ignore_index))
    with _on_device(logits.device):
        if sigmoid:
            kernel[(B,)](*args, BLOCK=block, WRITE_GRAD=write_grad, num_warps=num_warps)
        else:
            kernel[(B,)](*args, BLOCK=block, ONE_CHUNK=one_chunk, WRITE_GRAD=write_grad, num_warps=num_warps)
    return loss, grad


def bisam_forward(
    logits: torch.Tensor, target: torch.Tensor, mu: float, phi: str, alpha: float, ignore_index: int,
    write_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row BiSAM value (float32 [B]) and per-row gradient wrt logits ([B, C], logits dtype).

    ``write_grad=False``: as in :func:`obf_forward`.
    """
    _check_launchable(_bisam_kernel, logits)
    logits, target, loss, grad = _prepare(logits, target, write_grad)
    B, C = logits.shape
    if B == 0:
        return loss, grad
    block, one_chunk, num_warps = _config(C, logits.device, "bisam")
    with _on_device(logits.device):
        _bisam_kernel[(B,)](
            logits, target, loss, grad, logits.stride(0), C, float(mu), 1.0 / mu, math.log(C),
            float(alpha), int(ignore_index),
            BLOCK=block, ONE_CHUNK=one_chunk, PHI_TANH=(phi == "tanh"), WRITE_GRAD=write_grad,
            num_warps=num_warps,
        )
    return loss, grad
