"""Triton kernels of the fused SAM step (imported only when triton is available).

Every kernel walks a *block table* (see :mod:`fastsam.kernels._tables`): entry ``b`` is
``t * 2^32 + j``, block ``j`` (``BLOCK`` elements) of tensor ``t``. A fixed grid of persistent
programs strides over the entries, so one launch covers any number of tensors of one
(device, dtype) group. Per-tensor data come from two tables:

- ``tab`` (int64, column-major: entry ``col * ntab + t``): data addresses (0 = no entry), the
  element count, the global element offset and the hyper-parameter row of the group's ``ntab``
  tensors;
- ``hyp`` (compute dtype, row-major): one row per distinct set of hyper-parameters (a param
  group, an Adam step count): tensors point at their row, so the table stays a few rows;

and ``scal`` (compute dtype) holds the op's scalar options. Math is done in ``CT`` (float32 for
fp32/bf16/fp16 parameters, float64 for float64) and rounded once on store, to nearest even
(``RNE_BF16``: bf16 is rounded by hand under the interpreter, which truncates; on the GPU the
plain conversion already rounds to nearest even).

Each block's work is one ``@triton.jit`` helper (``_k1_block`` ...), called twice per loop
iteration site: once with the all-true mask of a full block (the compiler then emits 16-byte
vector accesses) and once with the tail mask. Under the interpreter every helper call costs a
few ms (it re-patches triton.language): a CPU test step on 2 x 65536 elements went from 0.9 to
1.7 s, test time only; the small helpers of the arithmetic (``_sqrt``, ``_bf16_rne``...) stay
few per block.

Reductions are deterministic: every program writes one partial per quantity into its own slot
of a buffer (no atomics); consumers reduce the whole buffer in a fixed order, every program
getting the same bits.
"""

# No `from __future__ import annotations` in a module with @triton.jit kernels: triton 3.0's
# interpreter recognizes constexpr parameters only by their evaluated annotation (a string
# 'tl.constexpr' is taken for a runtime argument and tl.arange then fails).

import triton
import triton.language as tl


@triton.jit
def _sqrt(x, CT: tl.constexpr):
    """IEEE square root: ``tl.sqrt`` may lower to an approximation for float32 (sqrt_rn is
    float32-only; float64 sqrt is exact)."""
    if CT == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


# Column layouts of the tables (constexpr so the kernels can use them; host code reads .value).
# Perturbation (K1/K2): int64 columns, hyperparameter columns, scalars. EMA / READY are read,
# EMA_OUT / READY_OUT written (the same addresses when the F-SAM state is updated in place).
P_W, P_G, P_WOLD, P_EMA = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
P_READY, P_GOLD, P_EMA_OUT, P_READY_OUT = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
P_NUMEL, P_OFFSET, P_HROW = tl.constexpr(8), tl.constexpr(9), tl.constexpr(10)
P_NCOL = tl.constexpr(11)
# Hyper-parameters come in a small row table (row-major, P_NHYP per row), one row per distinct
# (rho, eta, adaptive): a param group's tensors share a row and the int table's P_HROW column
# says which, so the host never builds a per-tensor float table (and rebuilds none per step).
P_RHO, P_ETA, P_ADAPTIVE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
P_NHYP = tl.constexpr(3)
P_NSCAL = tl.constexpr(6)  # q_hi, q_lo (q = q_hi + q_lo in float64), sigma, lambda, beta, 1 - lambda

# Second step (restore / GSAM / SGD / Adam).
S_W, S_G, S_WOLD, S_GOLD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
S_1, S_2, S_3, S_NUMEL = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
S_HROW = tl.constexpr(8)  # the tensor's row of the hyper-parameter row table (S_NHYP values a row)
S_NCOL = tl.constexpr(9)
# SGD hyp: lr, weight_decay, momentum, 1 - dampening, fresh (1: momentum buffer not initialised yet)
# Adam hyp: weight_decay, 1 - beta1, beta2, 1 - beta2, eps, lr / bc1, sqrt(bc2), 1 - lr * wd
S_NHYP = tl.constexpr(8)
S_NSCAL = tl.constexpr(1)  # gsam_alpha

# Accumulate hyp (m-SAM micro-batches): weight, scale, reset (1: acc starts from 0); the running sum
# is read from column S_2 when it has an address (out of place), else from S_1 (in place)
MODE_RESTORE, MODE_SGD, MODE_ADAM, MODE_ACCUM = 0, 1, 2, 3


@triton.jit
def _ptr(addr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """int64 address -> pointer to DT. ``getattr(DT, "scalar")`` is the dtype itself on every
    Triton version: triton 3.0's compiler hands ``DT`` over as a ``constexpr`` that
    ``tl.pointer_type`` refuses, its interpreter as a plain dtype without ``.value``.

    ALIGNED (the host checked that every address of the table is a multiple of 16 bytes): tell
    the compiler, so that unmasked full blocks use 16-byte vector loads and stores (v4.b32: 4
    fp32 or 8 bf16 values per instruction instead of one)."""
    p = addr.to(tl.pointer_type(getattr(DT, "scalar")))  # noqa: B009
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _bf16_rne(x):
    """float32 -> bf16 round-to-nearest-even by integer arithmetic (NaN stays a quiet NaN)."""
    b = x.to(tl.float32).to(tl.uint32, bitcast=True)
    r = b + 0x7FFF + ((b >> 16) & 1)
    r = tl.where(x != x, b | 0x400000, r)
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


# Scaled sums (see fastsam.reference: "scaled norms"). A sum of |u|^q overflows long before the
# norm (float32: u^2 at |u| > 1.8e19), so each program sums |u * 2^-E|^q with 2^E its running max's
# power of two, rescaling its lanes (exactly: powers of two) when a block brings a larger max. Up to
# under/overflow, which is what the scaling avoids, the scaled sum is the unscaled one times 2^-qE
# bit for bit: every product and sum is the unscaled one shifted by a power of two.
@triton.jit
def _frexp_exp(m, CT: tl.constexpr):
    """``E`` with ``m = f * 2^E``, ``f`` in [0.5, 1) (frexp) for a float ``m >= 0`` of type CT, from
    its bits; clamped so that ``2^-E`` is a normal CT number ([-100, 126] for float32, [-1000,
    1022] for float64: tiny values get a scale that keeps their squares normal; inf and NaN the
    top one, through which they stay inf / NaN)."""
    if CT == tl.float64:
        e = ((m.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32) - 1022
        return tl.minimum(tl.maximum(e, -1000), 1022)
    else:
        e = ((m.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
        return tl.minimum(tl.maximum(e, -100), 126)


@triton.jit
def _pow2(e, CT: tl.constexpr):
    """``2^e`` in CT for an int32 ``e`` <= the exponent of CT's largest power of two, exactly,
    from the bits; 0 below the normal range (a flush where the exact value is a denormal)."""
    if CT == tl.float64:
        b = e.to(tl.int64) + 1023
        return tl.where(b > 0, (tl.maximum(b, 0) << 52).to(tl.float64, bitcast=True), 0.0)
    else:
        b = e + 127
        return tl.where(b > 0, (tl.maximum(b, 0) << 23).to(tl.float32, bitcast=True), 0.0)


@triton.jit
def _e_lo(CT: tl.constexpr):
    """The lowest exponent _frexp_exp returns (a program's running exponent starts there)."""
    if CT == tl.float64:
        return -1000
    else:
        return -100


@triton.jit
def _e_hi(CT: tl.constexpr):
    """The highest exponent _frexp_exp returns (2^-E stays a normal number)."""
    if CT == tl.float64:
        return 1022
    else:
        return 126


@triton.jit
def _frexp_raw(m, CT: tl.constexpr):
    """``E`` with ``m = f * 2^E``, ``f`` in [0.5, 1), for a normal CT ``m > 0`` (no clamp)."""
    if CT == tl.float64:
        return ((m.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32) - 1022
    else:
        return ((m.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126


@triton.jit
def _expo(x, CT: tl.constexpr):
    """An int32 ``e`` with ``|x| < 2^e`` from the exponent bits (exact for normal ``x``: frexp's
    exponent; subnormals and 0 get the smallest normal's; inf / NaN a value above every finite)."""
    if CT == tl.float64:
        return ((x.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32) - 1022
    else:
        return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126


@triton.jit
def _times_pow2(x, k, CT: tl.constexpr):
    """``x * 2^k`` for an int32 ``k`` in [-2 emax, 2 emax] as two multiplies by normal powers of two
    (exact while the result is normal; a power of two alone may not be a CT number)."""
    if CT == tl.float64:
        kc = tl.minimum(k, 2046)
    else:
        kc = tl.minimum(k, 254)
    k1 = kc >> 1
    return (x * _pow2(k1, CT)) * _pow2(kc - k1, CT)


@triton.jit
def _direction(g, m, w, ad, eta, sigma, sh, CT: tl.constexpr, FSAM: tl.constexpr, ADAPTIVE: tl.constexpr):
    """``u = T * d`` (``d = g - sigma m`` with F-SAM, ``T = |w| + eta`` on adaptive tensors) as
    ``(dv, mt, k)`` with ``u = mt * dv * 2^k`` exactly, never overflowing for finite inputs (see
    fastsam.reference "Scaled norms"): ``dv`` is ``d``, with F-SAM ``g 2^-sh - (sigma 2^-sh) m``
    (``k`` then includes ``sh``; finite where ``d`` itself overflows CT); ``mt = T 2^-kt`` in
    [0, 4) (kt: T's exponent, at most CT's largest normal one), ``2^k`` holds ``2^kt`` (``mt = 1``,
    ``kt = 0`` without ASAM; float64: ``mt = T``, ``kt = 0``), and ``eu``: ``|u| < 2^eu`` (-100000
    where u = 0: callers select 0 there, as ``dv 2^(k - s)`` may overflow when T = 0). For any ``s``,
    ``mt * (dv * 2^(k - s))`` is ``fl(T * d) * 2^-s``, the CT product's bits shifted, while
    normal (powers of two commute with rounding)."""
    dv = g
    k = 0
    if FSAM:
        c = _pow2(-sh, CT)
        dv = g * c - (sigma * c) * m  # = (g - sigma m) 2^-sh exactly unless g 2^-sh is subnormal
        k = sh
    mt = 1.0
    nz = dv != 0
    eu = k + _expo(dv, CT)
    if ADAPTIVE:
        T = tl.where(ad, tl.abs(w) + eta, 1.0).to(CT)
        if CT == tl.float64:
            # float64: mt = T itself, k stays a scalar (64-bit lanes are expensive in registers); then
            # dv 2^(k - s) may be subnormal where T is within 4x of float64's largest number
            mt = T
            eu = eu + _expo(T, CT)
        else:
            kt = tl.minimum(_expo(T, CT), _e_hi(CT))
            mt = T * _pow2(-kt, CT)  # exact: 2^-kt is a normal number
            k = k + kt
            eu = eu + kt + 2
        nz = nz & (mt != 0)
    return dv, mt, k, tl.where(nz, eu, -100000)


@triton.jit
def _sum_scaled(part, npart, part_stride, pl, q, QMODE: tl.constexpr, PT: tl.constexpr):
    """(S, E) of all scaled partials (S in ``part[k]``, E in ``part[part_stride + k]``): the sum
    ``S * 2^(qE)`` of |u|^q, with E the largest exponent (a fixed order: the same bits in every
    program). QMODE 0: E is the fractional scale F (a multiple of 2^-15, float64)."""
    pm = pl < npart
    sp = tl.load(part + pl, mask=pm, other=0.0)
    if QMODE == 0:
        ep = tl.load(part + part_stride + pl, mask=pm, other=-8192.0).to(tl.float64)
        emax = tl.max(ep, 0)
        f = tl.exp2(q * (ep - emax))
        return tl.sum(tl.where(pm, sp.to(tl.float64) * f, 0.0), 0), emax
    else:
        ep = tl.load(part + part_stride + pl, mask=pm, other=-2000.0).to(tl.int32)
        emax = tl.max(ep, 0)
        f = _pow2(QMODE * (ep - emax), PT)
        return tl.sum(tl.where(pm, sp * f, 0.0), 0), emax


@triton.jit
def _q_term(x, q, ff):
    """``2^(q (log2(x) - ff))`` for ``x >= 0`` in float64 (0 gives 0, NaN and inf propagate)."""
    nz = x != 0
    return tl.where(nz, tl.exp2(q * (tl.log2(tl.where(nz, x, 1.0)) - ff)), 0.0)


@triton.jit
def _scale_f64(x, fi):
    """``x * 2^-fi`` in float64 for an integer-valued float64 ``fi`` in [-2100, 2100] (two scalings
    by normal powers of two)."""
    f1 = tl.minimum(tl.maximum(fi, -1000.0), 1000.0)
    f2 = tl.minimum(tl.maximum(fi - f1, -1000.0), 1000.0)
    return x * _pow2(-f1.to(tl.int32), tl.float64) * _pow2(-f2.to(tl.int32), tl.float64)


@triton.jit
def _u64(g_raw, m_raw, w_raw, ad, eta, sigma, FSAM: tl.constexpr, ADAPTIVE: tl.constexpr):
    """u in float64 from float32/bf16/fp16 data, as fastsam.reference forms it (``sigma``, ``eta``
    are the CT values of the tables): no overflow for finite inputs."""
    u = g_raw.to(tl.float64)
    if FSAM:
        u = u - sigma.to(tl.float64) * m_raw.to(tl.float64)
    if ADAPTIVE:
        u = u * tl.where(ad, tl.abs(w_raw.to(tl.float64)) + eta.to(tl.float64), 1.0)
    return u


LOG_RES = tl.constexpr(32768.0)  # general-q scales F are multiples of 1 / LOG_RES (see _k1_block)


@triton.jit
def _k1_block(row, hrow, ntab, offs, inb, sigma, sh, ep, q, DT: tl.constexpr, CT: tl.constexpr,
              QMODE: tl.constexpr, FSAM: tl.constexpr, ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr):
    """K1 work of one block (``inb``: the lanes in bounds, the others 0): ``(terms, en)``, the
    block's terms of the scaled sum and the new running scale ``en >= ep`` (the caller rescales
    its accumulator from ``ep`` to ``en``).

    QMODE 1, 2: terms ``|u 2^-en|`` / ``|u 2^-en|^2`` in CT, ``en`` an int32 exponent; with F-SAM
    or ASAM, u is split (:func:`_direction`) so that no finite input overflows, and en may exceed the
    CT range (a "wide" call, see K2). QMODE 0 (general q): terms ``2^(q (log2|u| - en))`` in
    float64 with ``en`` = F, the running max's log2 rounded down to a multiple of 2^-15 (the
    largest term is then >= 1: a power of two just above the max would leave it in [2^-q, 1),
    which underflows for large q = p / (p - 1)); u in float64 (float32 data) or split (float64
    data with F-SAM / ASAM)."""
    g_raw = tl.load(_ptr(tl.load(row + P_G * ntab), DT, ALIGNED) + offs, mask=inb, other=0.0)
    u = g_raw.to(CT)
    m_raw = g_raw
    w_raw = g_raw
    ad = False
    eta = 0.0
    if FSAM:
        r = tl.load(tl.load(row + P_READY * ntab).to(tl.pointer_type(tl.float32)))
        pm = _ptr(tl.load(row + P_EMA * ntab), DT, ALIGNED)
        m_raw = tl.load(pm + offs, mask=tl.where(r != 0, inb, False), other=0.0)  # m = 0 when not ready
    if ADAPTIVE:
        ad = tl.load(hrow + P_ADAPTIVE) != 0
        eta = tl.load(hrow + P_ETA)
        pw = _ptr(tl.load(row + P_W * ntab), DT, ALIGNED)
        w_raw = tl.load(pw + offs, mask=tl.where(ad, inb, False), other=0.0)
    if QMODE == 0:
        if CT == tl.float64 and (FSAM or ADAPTIVE):
            dv, mt, k, eu = _direction(u, m_raw.to(CT), w_raw.to(CT), ad, eta, sigma, sh, CT, FSAM, ADAPTIVE)
            c = tl.max(eu, 0)  # |u| < 2^c
            # |u| 2^-c, in [0, 1) (0 where u = 0: T = 0 may meet a d too large to scale)
            y = tl.where(eu > -100000, mt * tl.abs(_times_pow2(dv, k - c, CT)), 0.0)
            my = tl.max(y, 0)
            fb = tl.floor((c.to(tl.float64) + tl.log2(tl.where(my > 0, my, 1.0))) * LOG_RES) / LOG_RES
            en = tl.where(my > 0, tl.maximum(ep, fb), ep)
            fi = tl.floor(en)
            x = _times_pow2(y, c - fi.to(tl.int32), CT)
        else:
            if CT == tl.float64:
                a = tl.abs(u)
            else:
                a = tl.abs(_u64(g_raw, m_raw, w_raw, ad, eta, sigma, FSAM, ADAPTIVE))
            mx = tl.max(a, 0)
            en = tl.maximum(ep, tl.floor(tl.log2(tl.where(mx > 0, mx, 1e-300)) * LOG_RES) / LOG_RES)
            en = tl.where(mx > 0, en, ep)
            fi = tl.floor(en)
            x = _scale_f64(a, fi)
        return _q_term(x, q, en - fi), en
    else:
        if FSAM or ADAPTIVE:
            dv, mt, k, eu = _direction(u, m_raw.to(CT), w_raw.to(CT), ad, eta, sigma, sh, CT, FSAM, ADAPTIVE)
            en = tl.maximum(ep, tl.max(eu, 0))
            x = mt * tl.abs(_times_pow2(dv, k - en, CT))  # |u| 2^-en: the bits of |u_CT| 2^-en if normal
            if CT == tl.float64 and ADAPTIVE:
                x = tl.where(eu > -100000, x, 0.0)  # T = 0 (dv 2^(k - en) may be inf there)
        else:
            a = tl.abs(u)
            en = tl.maximum(ep, _frexp_exp(tl.max(a, 0), CT))
            x = a * _pow2(-en, CT)
        if QMODE == 2:
            return x * x, en
        else:
            return x, en


@triton.jit
def perturb_partials_kernel(
    tab, ntab, hyp, scal, blocks, nblk, part, part_base, part_stride, snap,
    DT: tl.constexpr, CT: tl.constexpr, PT: tl.constexpr, QMODE: tl.constexpr, FSAM: tl.constexpr,
    ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, ALIGNED: tl.constexpr,
):
    """K1: this program's scaled partial of ``sum |u|^q``: ``S`` into ``part[part_base + pid]``,
    ``E`` into ``part[part_stride + part_base + pid]`` (the sum is ``S * 2^(qE)``).

    ``u = T * d``: ``d = g - sigma * m`` when the tensor's EMA is ready (flag r != 0), else ``g``;
    ``T = |w| + eta`` on adaptive tensors, else 1 (``w`` is not read for the others).
    QMODE 2: q = 2; 1: q = 1 (p = inf); 0: general q (float64 pow). Every block's terms are scaled
    by the running scale (:func:`_k1_block`), the lanes rescaled when it grows. F-SAM: also
    snapshots each tensor's ``fsam_ready`` flag into ``snap[t]`` (K2 writes the flags, possibly in
    place: it reads the snapshot).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    q = tl.load(scal + 0).to(tl.float64) + tl.load(scal + 1).to(tl.float64)
    sigma = tl.load(scal + 2)
    sh = _frexp_raw(1.0 + tl.abs(sigma.to(tl.float64)), tl.float64)  # fsam_shift: 1 + |sigma| < 2^sh
    if QMODE == 0:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        ep = q * 0.0 - 4096.0  # float64; below every scale (|F| < 2200), exact in a float32 partial
    else:
        acc = tl.zeros([BLOCK], dtype=CT)
        ep = _e_lo(CT)
    for b in range(pid, nblk, nprog):
        ent = tl.load(blocks + b)
        t = ent >> 32
        start = tl.multiple_of((ent & 0xFFFFFFFF) * BLOCK, BLOCK)
        row = tab + t
        hrow = hyp + tl.load(row + P_HROW * ntab) * P_NHYP
        offs = start + lanes
        numel = tl.load(row + P_NUMEL * ntab)
        # SPLIT: full blocks get their own copy of the body with an all-true mask (the compiler
        # then knows 16-byte groups are all in or all out and vectorizes); the tail is masked
        if SPLIT and start + BLOCK <= numel:
            terms, en = _k1_block(row, hrow, ntab, offs, lanes < BLOCK, sigma, sh, ep, q, DT, CT, QMODE, FSAM,
                                  ADAPTIVE, ALIGNED)
        else:
            terms, en = _k1_block(row, hrow, ntab, offs, offs < numel, sigma, sh, ep, q, DT, CT, QMODE, FSAM,
                                  ADAPTIVE, ALIGNED)
        if QMODE == 0:
            acc = acc * tl.exp2(q * (ep - en)) + terms
        else:
            acc = acc * _pow2(QMODE * (ep - en), CT) + terms
        ep = en
        if FSAM:
            # after the block's loads: a conditional store ahead of them stops triton 3.9 from
            # vectorizing the loads that follow it
            if start == 0:
                tl.store(snap + t, tl.load(tl.load(row + P_READY * ntab).to(tl.pointer_type(tl.float32))))
    tl.store(part + part_base + pid, tl.sum(acc, 0).to(PT))
    tl.store(part + part_stride + part_base + pid, ep.to(PT))


@triton.jit
def _k2_block(row, hrow, ntab, offs, inb, finite, r, sigma, sh, lam, one_m_lam, beta, q, denom, inv, e2, fi, c0,
              seed64, thr, DT: tl.constexpr, CT: tl.constexpr, QMODE: tl.constexpr, FSAM: tl.constexpr,
              ADAPTIVE: tl.constexpr, GSAM: tl.constexpr, SWP: tl.constexpr, RNE_BF16: tl.constexpr,
              ALIGNED: tl.constexpr):
    """K2 work of one block (``inb``: the lanes in bounds; ``r``: the tensor's F-SAM flag snapshot).
    ``e = rho * mag / denom * T`` with ``mag = u * inv`` (q = 2; with F-SAM / ASAM from the split
    u, ``sgn * mu * 2^(ku - e2)``), ``sign(u)`` (q = 1), ``sign(u) 2^((q-1) (log2(|u| 2^-fi) - c0))``
    (general q); see :func:`perturb_apply_kernel`."""
    inb_ok = tl.where(finite, inb, False)
    pw = _ptr(tl.load(row + P_W * ntab), DT, ALIGNED)
    w_raw = tl.load(pw + offs, mask=inb, other=0.0)
    g_raw = tl.load(_ptr(tl.load(row + P_G * ntab), DT, ALIGNED) + offs, mask=inb, other=0.0)
    w = w_raw.to(CT)
    g = g_raw.to(CT)
    u = g
    m = g
    m_raw = g_raw
    if FSAM:
        pm = _ptr(tl.load(row + P_EMA * ntab), DT, ALIGNED)
        # read where the EMA is ready, and everywhere when N is not finite (it is then copied to
        # ema_out as it is); a not-ready EMA is not read on a finite step: m = 0, d = g bit for bit
        m_raw = tl.load(pm + offs, mask=tl.where(tl.where(finite, r != 0, True), inb, False), other=0.0)
        m = m_raw.to(CT)
        u = g - sigma * m
    T = 1.0
    ad = False
    eta = 0.0
    if ADAPTIVE:
        ad = tl.load(hrow + P_ADAPTIVE) != 0
        eta = tl.load(hrow + P_ETA)
        T = tl.where(ad, tl.abs(w) + eta, 1.0)
    # the direction's m is m itself: on a finite step a not-ready EMA was not read (m = 0, as the
    # formula's r * m), and on a non-finite one e is never stored
    # the outputs that do not depend on e first: g_raw and m can then die before e is formed
    # (float64 F-SAM at p = 2 spilled 8 B at ptxas's 128-register cap with them stored last)
    tl.store(_ptr(tl.load(row + P_WOLD * ntab), DT, ALIGNED) + offs, w_raw, mask=inb)
    if GSAM:
        pgo = _ptr(tl.load(row + P_GOLD * ntab), DT, ALIGNED)
        tl.store(pgo + offs, tl.where(finite, g_raw, 0.0).to(DT), mask=inb)
    if FSAM:
        # m' when N is finite, else m itself (ema_out may be another buffer than ema: it must hold
        # the EMA either way; m is in registers already when ema_out is ema)
        m_new = tl.where(finite, tl.where(r != 0, lam * m + one_m_lam * g, g), m)
        pmo = _ptr(tl.load(row + P_EMA_OUT * ntab), DT, ALIGNED)
        if RNE_BF16:
            tl.store(pmo + offs, _bf16_rne(m_new), mask=inb)
        else:
            tl.store(pmo + offs, m_new.to(DT), mask=inb)
    if QMODE == 2:
        if FSAM or ADAPTIVE:
            dv, mt, k, eu = _direction(g, m, w, ad, eta, sigma, sh, CT, FSAM, ADAPTIVE)
            mag = mt * _times_pow2(dv, k - e2, CT)  # = u * inv in the normal range, bit for bit
            if CT == tl.float64 and ADAPTIVE:
                mag = tl.where(eu > -100000, mag, dv * 0.0)  # T = 0: u = +-0 (dv 2^(k - e2) may be inf)
        else:
            mag = u * inv  # a power of two: exact
    elif QMODE == 1:
        if ADAPTIVE:
            u = u * T
        mag = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0)).to(CT)
    else:
        if CT == tl.float64:
            if FSAM or ADAPTIVE:
                dv, mt, k, eu = _direction(g, m, w, ad, eta, sigma, sh, CT, FSAM, ADAPTIVE)
                sg = tl.where(dv > 0, 1.0, tl.where(dv < 0, -1.0, dv))
                x = tl.where(eu > -100000, mt * tl.abs(_times_pow2(dv, k - fi.to(tl.int32), CT)), 0.0)
            else:
                sg = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, u))
                x = _scale_f64(tl.abs(u), fi)
        else:
            u64 = _u64(g_raw, m_raw, w_raw, ad, eta, sigma, FSAM, ADAPTIVE)
            sg = tl.where(u64 > 0, 1.0, tl.where(u64 < 0, -1.0, u64))
            x = _scale_f64(tl.abs(u64), fi)
        mag = (sg * _q_term(x, q - 1.0, c0)).to(CT)  # |mag| <= 1
    if QMODE == 1:
        e = tl.load(hrow + P_RHO) * mag
        if CT == tl.float64:
            e = e * inv  # 1 / (1 + 1e-12), see perturb_apply_kernel (1 in float32)
    else:
        e = tl.load(hrow + P_RHO) * mag / denom
    if ADAPTIVE:
        e = e * T
    if SWP:
        gidx = tl.load(row + P_OFFSET * ntab) + offs
        zero = gidx.to(tl.uint32) * 0
        rnd, _r1, _r2, _r3 = tl.philox(seed64, gidx.to(tl.uint32), (gidx >> 32).to(tl.uint32), zero, zero)
        e = tl.where(rnd < thr, e / beta, 0.0)
    if RNE_BF16:
        tl.store(pw + offs, _bf16_rne(w + e), mask=inb_ok)
    else:
        tl.store(pw + offs, (w + e).to(DT), mask=inb_ok)


# seed/step keys change every step: no value specialization (a step of 1 or a multiple of 16
# would otherwise compile its own kernel variant).
@triton.jit(do_not_specialize=["seed_key", "step_key", "keep_thr"])
def perturb_apply_kernel(
    tab, ntab, hyp, scal, blocks, nblk, part, npart, part_stride, snap, ok, seed_key, step_key, keep_thr,
    DT: tl.constexpr, CT: tl.constexpr, PT: tl.constexpr, QMODE: tl.constexpr, FSAM: tl.constexpr,
    ADAPTIVE: tl.constexpr, GSAM: tl.constexpr, SWP: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr, PBLOCK: tl.constexpr, SPLIT: tl.constexpr, ALIGNED: tl.constexpr,
):
    """K2: reduce all partials to ``N``, then per element ``w_old = w``; if N is finite
    ``w += e`` with ``e = rho * T * sign(u)|u|^(q-1) / (N^(q-1) + 1e-12)`` (ESAM: times
    keep / beta), F-SAM EMA and flag into their out columns, GSAM ``g_old = g`` (zeros when N is
    not finite; then the EMA and flag outputs get the inputs' values).

    Scaled: ``e = rho * mag / denom * T``.
    q = 2: with ``N = 2^E2 * n_hat`` (``2^E2`` N's power of two, clamped to CT's range; with F-SAM
    or ASAM not clamped above: the split u may exceed CT), ``inv = 2^-E2``, ``mag = u * inv``
    (F-SAM / ASAM: ``sgn * mu * 2^(ku - E2)``, the same bits in the normal range),
    ``denom = n_hat + 1e-12 * inv`` (= (N + 1e-12) * inv exactly);
    q = 1: ``e = rho * sign(u) * T / (1 + 1e-12)``;
    general q: from the partials' (S, F), ``log2 N = F + log2(S) / q``, ``fi = floor(F)``,
    ``c0 = F - fi + log2(S) / q``: ``mag = sign(u) 2^((q-1) (log2(|u| 2^-fi) - c0))`` (<= 1, u in
    float64 / split as in K1), ``denom = 1 + 1e-12 * N^-(q-1)``. Finite for every finite u.

    Program 0 writes ``ok = isfinite(N)`` (uint8). ESAM keep bit of global element ``i``:
    ``philox(seed64 = step * 2^32 + seed, counter = (i mod 2^32, i div 2^32, 0, 0))[0] < keep_thr``,
    the function of :mod:`fastsam._philox` (bit-identical masks in every backend).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    pl = tl.arange(0, PBLOCK)
    q = tl.load(scal + 0).to(tl.float64) + tl.load(scal + 1).to(tl.float64)
    sigma = tl.load(scal + 2)
    lam = tl.load(scal + 3)
    beta = tl.load(scal + 4)
    one_m_lam = tl.load(scal + 5)
    sh = _frexp_raw(1.0 + tl.abs(sigma.to(tl.float64)), tl.float64)  # fsam_shift: 1 + |sigma| < 2^sh
    tot, emax = _sum_scaled(part, npart, part_stride, pl, q, QMODE, PT)
    e2 = 0
    fi = 0.0
    c0 = 0.0
    inv = 1.0
    if QMODE == 2:
        nh = _sqrt(tot.to(CT), CT)
        finite = nh * 0 == 0  # False for inf and NaN
        # N = nh * 2^emax; E2 = its exponent, clamped (above only without the split u);
        # n_hat = N * 2^-E2 (a power-of-two rescale)
        e2 = emax + _frexp_exp(nh.to(CT), CT)
        if FSAM or ADAPTIVE:
            e2 = tl.maximum(e2, _e_lo(CT))
        else:
            e2 = tl.minimum(tl.maximum(e2, _e_lo(CT)), _e_hi(CT))
        inv = _pow2(-tl.minimum(e2, _e_hi(CT) + 1), CT)  # 2^-E2 (0 beyond CT's normal range)
        n_hat = nh * _pow2(emax - e2, CT)
        denom = n_hat + 1e-12 * inv
    elif QMODE == 1:
        finite = tot * 0 == 0
        # N^(q-1) = N^0 = 1: e = rho * sign(u) * T * inv with inv = 1 / (1 + 1e-12), formed in float64
        # once (a Python constant 1.000000000001 would become a float32 constant, i.e. 1.0): a multiply
        # per element, not a float64 divide
        denom = 1.0
        inv = (1.0 / ((q * 0.0 + 1.0) + 1e-12)).to(CT)
    else:
        finite = (tot * 0 == 0) & (emax * 0 == 0)
        ok_n = tot > 0
        lq = tl.log2(tl.where(ok_n, tot, 1.0)) / q  # S >= 1 when some u != 0
        fi = tl.floor(emax)
        c0 = (emax - fi) + lq
        denom = tl.where(ok_n, 1.0 + 1e-12 * tl.exp2(-(q - 1.0) * (emax + lq)), float("inf")).to(CT)
    if pid == 0:
        tl.store(ok, finite.to(tl.uint8))
    seed64 = (step_key.to(tl.uint64) << 32) | seed_key.to(tl.uint64)
    thr = keep_thr.to(tl.uint32)
    for b in range(pid, nblk, nprog):
        ent = tl.load(blocks + b)
        t = ent >> 32
        start = tl.multiple_of((ent & 0xFFFFFFFF) * BLOCK, BLOCK)
        row = tab + t
        hrow = hyp + tl.load(row + P_HROW * ntab) * P_NHYP
        offs = start + lanes
        numel = tl.load(row + P_NUMEL * ntab)
        r = 0.0
        if FSAM:
            r = tl.load(snap + t)
        if SPLIT and start + BLOCK <= numel:  # full block: all-true mask, vectorizable (see K1)
            _k2_block(row, hrow, ntab, offs, lanes < BLOCK, finite, r, sigma, sh, lam, one_m_lam, beta, q, denom, inv,
                      e2, fi, c0, seed64, thr, DT, CT, QMODE, FSAM, ADAPTIVE, GSAM, SWP, RNE_BF16, ALIGNED)
        else:
            _k2_block(row, hrow, ntab, offs, offs < numel, finite, r, sigma, sh, lam, one_m_lam, beta, q, denom, inv,
                      e2, fi, c0, seed64, thr, DT, CT, QMODE, FSAM, ADAPTIVE, GSAM, SWP, RNE_BF16, ALIGNED)
        if FSAM:
            if start == 0:  # after the block's loads (see K1)
                # unmasked: the flag keeps its snapshot r when N is not finite (a scalar store
                # masked by a scalar is ignored by triton 3.0's interpreter)
                tl.store(tl.load(row + P_READY_OUT * ntab).to(tl.pointer_type(tl.float32)), tl.where(finite, 1.0, r))


@triton.jit
def _kg_block(a_g, a_go, offs, inb, DT: tl.constexpr, CT: tl.constexpr, ALIGNED: tl.constexpr):
    gs = tl.load(_ptr(a_g, DT, ALIGNED) + offs, mask=inb, other=0.0).to(CT)
    go = tl.load(_ptr(a_go, DT, ALIGNED) + offs, mask=inb, other=0.0).to(CT)
    return gs, go


@triton.jit
def gsam_partials_kernel(
    tab, ntab, blocks, nblk, part, part_base, part_stride,
    DT: tl.constexpr, CT: tl.constexpr, PT: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """GSAM reduction, scaled: partial ``<g_old, gs>``, ``|gs|^2``, ``|g_old|^2`` of this
    program's blocks (tensors with both a gradient and ``g_old``) with ``gs`` scaled by ``2^-es``
    and ``g_old`` by ``2^-eo`` (running maxima, see K1), into ``part[k * part_stride + part_base +
    pid]`` for k = 0..4: dot, |gs|^2, |g_old|^2, es, eo."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    a_dot = tl.zeros([BLOCK], dtype=CT)
    a_new = tl.zeros([BLOCK], dtype=CT)
    a_old = tl.zeros([BLOCK], dtype=CT)
    es = _e_lo(CT)
    eo = _e_lo(CT)
    for b in range(pid, nblk, nprog):
        ent = tl.load(blocks + b)
        t = ent >> 32
        start = tl.multiple_of((ent & 0xFFFFFFFF) * BLOCK, BLOCK)
        row = tab + t
        a_g = tl.load(row + S_G * ntab)
        a_go = tl.load(row + S_GOLD * ntab)
        if (a_g != 0) & (a_go != 0):
            offs = start + lanes
            numel = tl.load(row + S_NUMEL * ntab)
            if SPLIT and start + BLOCK <= numel:  # full block: all-true mask, vectorizable (see K1)
                gs, go = _kg_block(a_g, a_go, offs, lanes < BLOCK, DT, CT, ALIGNED)
            else:
                gs, go = _kg_block(a_g, a_go, offs, offs < numel, DT, CT, ALIGNED)
            ns = tl.maximum(es, _frexp_exp(tl.max(tl.abs(gs), 0), CT))
            no = tl.maximum(eo, _frexp_exp(tl.max(tl.abs(go), 0), CT))
            a_dot = a_dot * _pow2((es - ns) + (eo - no), CT)
            a_new = a_new * _pow2(2 * (es - ns), CT)
            a_old = a_old * _pow2(2 * (eo - no), CT)
            xs = gs * _pow2(-ns, CT)
            xo = go * _pow2(-no, CT)
            a_dot += xs * xo
            a_new += xs * xs
            a_old += xo * xo
            es = ns
            eo = no
    tl.store(part + part_base + pid, tl.sum(a_dot, 0).to(PT))
    tl.store(part + part_stride + part_base + pid, tl.sum(a_new, 0).to(PT))
    tl.store(part + 2 * part_stride + part_base + pid, tl.sum(a_old, 0).to(PT))
    tl.store(part + 3 * part_stride + part_base + pid, es.to(PT))
    tl.store(part + 4 * part_stride + part_base + pid, eo.to(PT))


@triton.jit
def _gsam_coef(part, npart, part_stride, alpha, PBLOCK: tl.constexpr, PT: tl.constexpr):
    """``1 + alpha * cos * |g_old| / (|gs| + 1e-12)``, ``cos = <g_old, gs> / (|gs| |g_old| +
    1e-12)``, from the scaled partials of :func:`gsam_partials_kernel` (float64 scalars; the same
    bits in every program)."""
    pl = tl.arange(0, PBLOCK)
    pm = pl < npart
    ep_s = tl.load(part + 3 * part_stride + pl, mask=pm, other=-2000.0).to(tl.int32)
    ep_o = tl.load(part + 4 * part_stride + pl, mask=pm, other=-2000.0).to(tl.int32)
    es = tl.max(ep_s, 0)
    eo = tl.max(ep_o, 0)
    fs = _pow2(ep_s - es, PT)
    fo = _pow2(ep_o - eo, PT)
    dot = tl.sum(tl.where(pm, tl.load(part + pl, mask=pm, other=0.0) * (fs * fo), 0.0), 0).to(tl.float64)
    ssn = tl.sum(tl.where(pm, tl.load(part + part_stride + pl, mask=pm, other=0.0) * _pow2(2 * (ep_s - es), PT),
                          0.0), 0).to(tl.float64)
    sso = tl.sum(tl.where(pm, tl.load(part + 2 * part_stride + pl, mask=pm, other=0.0) * _pow2(2 * (ep_o - eo), PT),
                          0.0), 0).to(tl.float64)
    n_new = tl.sqrt(ssn)  # |gs| = n_new 2^es, |g_old| = n_old 2^eo
    n_old = tl.sqrt(sso)
    es64 = es.to(tl.float64)
    eo64 = eo.to(tl.float64)
    cos = dot / (n_new * n_old + 1e-12 * tl.exp2(-(es64 + eo64)))
    ratio = n_old / (n_new * tl.exp2(es64 - eo64) + 1e-12 * tl.exp2(-eo64))
    return 1.0 + alpha.to(tl.float64) * (cos * ratio)


@triton.jit
def _st(p, x, mask, DT: tl.constexpr, RNE_BF16: tl.constexpr):
    """Store a CT value into a DT tensor (bf16 rounded to nearest even by hand under the
    interpreter, whose own conversion truncates)."""
    if RNE_BF16:
        tl.store(p, _bf16_rne(x), mask=mask)
    else:
        tl.store(p, x.to(DT), mask=mask)


@triton.jit
def _k3_block(row, hrow, ntab, offs, inb, coef, alpha, corr, DT: tl.constexpr, CT: tl.constexpr,
              MODE: tl.constexpr, GSAM: tl.constexpr, WRITEBACK: tl.constexpr, CORRECT: tl.constexpr,
              NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr,
              RNE_BF16: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """K3 work of one block (``inb``: the lanes in bounds); see :func:`second_step_kernel`.

    Branch-free on purpose: the per-tensor conditions (has a gradient / w_old / g_old / a momentum
    buffer, weight decay on) are folded into the masks and ``tl.where``s instead of ``if``
    regions. Triton (3.9, sm_90) keeps scalar 4-byte accesses for loads and stores inside or
    after a data-dependent ``if`` region, and vectorizes them otherwise (``_triton_aot`` counts
    the vector accesses). A masked-off load moves no data; an absent tensor's address is replaced
    by the parameter's own (valid, never touched under its false mask).
    """
    a_w = tl.load(row + S_W * ntab)
    a_g = tl.load(row + S_G * ntab)
    a_wo = tl.load(row + S_WOLD * ntab)
    has_g = a_g != 0
    has_wo = a_wo != 0
    pw = _ptr(a_w, DT, ALIGNED)
    src = _ptr(tl.where(has_wo, a_wo, a_w), DT, ALIGNED)
    pg = _ptr(tl.where(has_g, a_g, a_w), DT, ALIGNED)
    go = 0.0
    has_go = has_g & False
    if GSAM:
        a_go = tl.load(row + S_GOLD * ntab)
        has_go = has_g & (a_go != 0)
        go = tl.load(_ptr(tl.where(has_go, a_go, a_w), DT, ALIGNED) + offs, mask=tl.where(has_go, inb, False),
                     other=0.0).to(CT)
    if MODE == 0:
        w_old = tl.load(src + offs, mask=tl.where(has_wo, inb, False))
        tl.store(pw + offs, w_old, mask=tl.where(has_wo, inb, False))
        if GSAM:
            gs = tl.load(pg + offs, mask=tl.where(has_go, inb, False), other=0.0).to(CT)
            _st(pg + offs, coef * gs - alpha * go, tl.where(has_go, inb, False), DT, RNE_BF16)
    elif MODE == 3:
        w_old = tl.load(src + offs, mask=tl.where(has_wo, inb, False))
        tl.store(pw + offs, w_old, mask=tl.where(has_wo, inb, False))
        a_acc = tl.load(row + S_1 * ntab)
        a_in = tl.load(row + S_2 * ntab)
        has_acc = a_acc != 0
        weight = tl.load(hrow + 0)
        scale = tl.load(hrow + 1)
        keep = tl.load(hrow + 2) == 0  # reset == 0: add to the running sum
        pa = _ptr(tl.where(has_acc, a_acc, a_w), DT, ALIGNED)
        pin = _ptr(tl.where(a_in != 0, a_in, tl.where(has_acc, a_acc, a_w)), DT, ALIGNED)
        g = tl.load(pg + offs, mask=tl.where(has_acc & has_g, inb, False), other=0.0).to(CT)
        if GSAM:
            g = tl.where(has_go, coef * g - alpha * go, g)
        val = tl.where(has_g, weight * g, 0.0)
        old = tl.load(pin + offs, mask=tl.where(has_acc & keep, inb, False), other=0.0).to(CT)
        val = tl.where(keep, old + val, val)
        _st(pa + offs, scale * val, tl.where(has_acc, inb, False), DT, RNE_BF16)
    else:
        w_raw = tl.load(src + offs, mask=inb, other=0.0)
        w = w_raw.to(CT)
        ming = tl.where(has_g, inb, False)
        g = tl.load(pg + offs, mask=ming, other=0.0).to(CT)
        g_raw = g
        if GSAM:
            g = tl.where(has_go, coef * g - alpha * go, g)
            if WRITEBACK:  # .grad holds the combined gradient afterwards, as on the unfused path
                _st(pg + offs, g, tl.where(has_go, inb, False), DT, RNE_BF16)
        if MAXIMIZE:
            g = -g
        if MODE == 1:
            lr = tl.load(hrow + 0)
            wd = tl.load(hrow + 1)
            mom = tl.load(hrow + 2)
            one_m_damp = tl.load(hrow + 3)
            fresh = tl.load(hrow + 4) != 0
            g = tl.where(wd != 0, g + wd * w, g)
            has_mom = has_g & (mom != 0)
            pb = _ptr(tl.where(has_mom, tl.load(row + S_1 * ntab), a_w), DT, ALIGNED) + offs
            buf = tl.load(pb, mask=tl.where(has_mom & (fresh == 0), inb, False), other=0.0).to(CT)
            buf = tl.where(fresh, g, mom * buf + one_m_damp * g)
            _st(pb, buf, tl.where(has_mom, inb, False), DT, RNE_BF16)
            if NESTEROV:
                g = tl.where(has_mom, g + mom * buf, g)
            else:
                g = tl.where(has_mom, buf, g)
            w = w - lr * g
        else:
            wd = tl.load(hrow + 0)
            one_m_b1 = tl.load(hrow + 1)
            b2 = tl.load(hrow + 2)
            one_m_b2 = tl.load(hrow + 3)
            eps = tl.load(hrow + 4)
            step_size = tl.load(hrow + 5)
            bc2_sqrt = tl.load(hrow + 6)
            if DECOUPLED:
                w = tl.where(wd != 0, w * tl.load(hrow + 7), w)
            else:
                g = tl.where(wd != 0, g + wd * w, g)
            pm1 = _ptr(tl.where(has_g, tl.load(row + S_1 * ntab), a_w), DT, ALIGNED) + offs
            pm2 = _ptr(tl.where(has_g, tl.load(row + S_2 * ntab), a_w), DT, ALIGNED) + offs
            m = tl.load(pm1, mask=ming, other=0.0).to(CT)
            v = tl.load(pm2, mask=ming, other=0.0).to(CT)
            m = m + one_m_b1 * (g - m)
            v = b2 * v + one_m_b2 * (g * g)
            _st(pm1, m, ming, DT, RNE_BF16)
            _st(pm2, v, ming, DT, RNE_BF16)
            if AMSGRAD:
                pm3 = _ptr(tl.where(has_g, tl.load(row + S_3 * ntab), a_w), DT, ALIGNED) + offs
                v = tl.maximum(tl.load(pm3, mask=ming, other=0.0).to(CT), v)
                _st(pm3, v, ming, DT, RNE_BF16)
            if CT == tl.float64:
                sq = tl.sqrt(v)
            else:
                sq = tl.sqrt_rn(v)
            w = w - step_size * (m / (sq / bc2_sqrt + eps))
        if CORRECT:  # decoupled WSAM: w <- w - c3 (gs - g_old) after the update
            w = tl.where(has_go, w - corr * (g_raw - go), w)
        # no gradient: only the restore (w_old -> w, raw bits), and only where there is a w_old
        if RNE_BF16:
            w_new = tl.where(has_g, _bf16_rne(w), w_raw)
        else:
            w_new = tl.where(has_g, w.to(DT), w_raw)
        tl.store(pw + offs, w_new, mask=tl.where(has_g | has_wo, inb, False))


@triton.jit
def second_step_kernel(
    tab, ntab, hyp, scal, blocks, nblk, part, npart, part_stride,
    DT: tl.constexpr, CT: tl.constexpr, PT: tl.constexpr, MODE: tl.constexpr, GSAM: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr,
    RNE_BF16: tl.constexpr, BLOCK: tl.constexpr, PBLOCK: tl.constexpr, SPLIT: tl.constexpr,
    ALIGNED: tl.constexpr, MIX: tl.constexpr = False, WRITEBACK: tl.constexpr = True, CORRECT: tl.constexpr = False,
):
    """K3: restore ``w = w_old`` fused with the GSAM combine and the base optimizer update.

    Per tensor: ``w`` comes from ``w_old`` when it has one (perturbed), else from ``w``.
    GSAM (tensors with ``g_old`` and a gradient): ``g = (1 + a*c) * gs - a * g_old`` with
    ``c = cos * |g_old| / (|gs| + 1e-12)``, written back to the gradient.
    MODE 0: restore (+ GSAM) only. MODE 1: torch.optim.SGD step; MODE 2: Adam / AdamW step (see
    :mod:`fastsam.reference` ``sam_restore_sgd_`` / ``sam_restore_adam_`` for the formulas).
    Tensors without a gradient are only restored. MODE 3 (m-SAM micro-batch): restore, then
    ``acc = scale * ((0 if reset else acc) + weight * g)`` into column ``S_1`` with the combined
    gradient (not written back: the caller discards ``.grad``); ``g = 0`` without a gradient.
    MIX (MODE 1/2, with GSAM on: the combine reads ``g_old``): ``g = c1 * gs + c2 * g_old`` with
    ``(c1, c2)`` read from ``scal`` (float64, on the device: WSAM's constants or LookSAM's
    ``(1, alpha |g|)``), no partial sums; written back to the gradient only if WRITEBACK.
    CORRECT (with MIX, decoupled WSAM): then ``w <- w - c3 * (gs - g_old)``, ``c3 = scal[2]``.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    corr = 0.0
    if MIX:  # g = coef * gs - alpha * g_old with (coef, -alpha) = (c1, c2)
        coef = tl.load(scal + 0).to(CT)
        alpha = -tl.load(scal + 1).to(CT)
        if CORRECT:
            corr = tl.load(scal + 2).to(CT)
    else:
        alpha = tl.load(scal + 0)
        coef = 1.0
        if GSAM:
            coef = _gsam_coef(part, npart, part_stride, alpha, PBLOCK, PT).to(CT)
    for b in range(pid, nblk, nprog):
        ent = tl.load(blocks + b)
        t = ent >> 32
        start = tl.multiple_of((ent & 0xFFFFFFFF) * BLOCK, BLOCK)
        row = tab + t
        hrow = hyp + tl.load(row + S_HROW * ntab) * S_NHYP
        offs = start + lanes
        numel = tl.load(row + S_NUMEL * ntab)
        if SPLIT and start + BLOCK <= numel:  # full block: all-true mask, vectorizable (see K1)
            _k3_block(row, hrow, ntab, offs, lanes < BLOCK, coef, alpha, corr, DT, CT, MODE, GSAM, WRITEBACK,
                      CORRECT, NESTEROV, MAXIMIZE, AMSGRAD, DECOUPLED, RNE_BF16, BLOCK, ALIGNED)
        else:
            _k3_block(row, hrow, ntab, offs, offs < numel, coef, alpha, corr, DT, CT, MODE, GSAM, WRITEBACK,
                      CORRECT, NESTEROV, MAXIMIZE, AMSGRAD, DECOUPLED, RNE_BF16, BLOCK, ALIGNED)
