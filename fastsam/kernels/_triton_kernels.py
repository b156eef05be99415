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


@triton.jit
def _abs_pow(a, q):
    """``a ** q`` for ``a >= 0`` (NaN and inf propagate, 0 gives 0) in float64: exp2/log2 of
    float32 would cost ~5e-6 relative error."""
    a64 = a.to(tl.float64)
    nz = a64 != 0
    return tl.where(nz, tl.exp2(q * tl.log2(tl.where(nz, a64, 1.0))), 0.0)


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
def _sum_scaled(part, npart, part_stride, pl, q, QMODE: tl.constexpr, PT: tl.constexpr):
    """(S, E) of all scaled partials (S in ``part[k]``, E in ``part[part_stride + k]``): the sum
    ``S * 2^(qE)`` of |u|^q, with E the largest exponent (a fixed order: the same bits in every
    program)."""
    pm = pl < npart
    sp = tl.load(part + pl, mask=pm, other=0.0)
    ep = tl.load(part + part_stride + pl, mask=pm, other=-2000.0).to(tl.int32)
    emax = tl.max(ep, 0)
    if QMODE == 0:
        f = tl.exp2(q * (ep - emax).to(tl.float64)).to(PT)
    else:
        f = _pow2(QMODE * (ep - emax), PT)
    return tl.sum(tl.where(pm, sp * f, 0.0), 0), emax


@triton.jit
def _k1_block(row, hrow, ntab, offs, inb, sigma, DT: tl.constexpr, CT: tl.constexpr,
              QMODE: tl.constexpr, FSAM: tl.constexpr, ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr):
    """K1 work of one block: the block's ``|u|`` (a BLOCK vector, in float64 for general q).
    ``inb``: the lanes in bounds (the others are 0)."""
    u = tl.load(_ptr(tl.load(row + P_G * ntab), DT, ALIGNED) + offs, mask=inb, other=0.0).to(CT)
    if FSAM:
        r = tl.load(tl.load(row + P_READY * ntab).to(tl.pointer_type(tl.float32)))
        pm = _ptr(tl.load(row + P_EMA * ntab), DT, ALIGNED)
        m = tl.load(pm + offs, mask=tl.where(r != 0, inb, False), other=0.0).to(CT)
        u = u - sigma * m  # m = 0 exactly when not ready: d = g bit for bit
    if ADAPTIVE:
        ad = tl.load(hrow + P_ADAPTIVE) != 0
        pw = _ptr(tl.load(row + P_W * ntab), DT, ALIGNED)
        w = tl.load(pw + offs, mask=tl.where(ad, inb, False), other=0.0).to(CT)
        u = tl.where(ad, u * (tl.abs(w) + tl.load(hrow + P_ETA)), u)
    if QMODE == 0:
        return tl.abs(u).to(tl.float64)
    else:
        return tl.abs(u)


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
    QMODE 2: q = 2; 1: q = 1 (p = inf); 0: general q (float64 pow). Every block's ``|u|`` is
    scaled by ``2^-E`` with E the running max's exponent (:func:`_frexp_exp`), the lanes rescaled
    when E grows. F-SAM: also snapshots each tensor's ``fsam_ready`` flag into ``snap[t]`` (K2
    writes the flags, possibly in place: it reads the snapshot).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    q = tl.load(scal + 0).to(tl.float64) + tl.load(scal + 1).to(tl.float64)
    sigma = tl.load(scal + 2)
    if QMODE == 0:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        ep = _e_lo(tl.float64)
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
            a = _k1_block(row, hrow, ntab, offs, lanes < BLOCK, sigma, DT, CT, QMODE, FSAM, ADAPTIVE, ALIGNED)
        else:
            a = _k1_block(row, hrow, ntab, offs, offs < numel, sigma, DT, CT, QMODE, FSAM, ADAPTIVE, ALIGNED)
        if QMODE == 0:
            en = tl.maximum(ep, _frexp_exp(tl.max(a, 0), tl.float64))
            acc = acc * tl.exp2(q * (ep - en).to(tl.float64))
            acc += _abs_pow(a * _pow2(-en, tl.float64), q)
        else:
            en = tl.maximum(ep, _frexp_exp(tl.max(a, 0), CT))
            acc = acc * _pow2(QMODE * (ep - en), CT)
            x = a * _pow2(-en, CT)
            if QMODE == 2:
                acc += x * x
            else:
                acc += x
        ep = en
        if FSAM:
            # after the block's loads: a conditional store ahead of them stops triton 3.9 from
            # vectorizing the loads that follow it
            if start == 0:
                tl.store(snap + t, tl.load(tl.load(row + P_READY * ntab).to(tl.pointer_type(tl.float32))))
    tl.store(part + part_base + pid, tl.sum(acc, 0).to(PT))
    tl.store(part + part_stride + part_base + pid, ep.to(PT))


@triton.jit
def _k2_block(row, hrow, ntab, offs, inb, finite, r, sigma, lam, one_m_lam, beta, q, denom, inv, n_hat, seed64,
              thr, DT: tl.constexpr, CT: tl.constexpr, QMODE: tl.constexpr, FSAM: tl.constexpr,
              ADAPTIVE: tl.constexpr, GSAM: tl.constexpr, SWP: tl.constexpr, RNE_BF16: tl.constexpr,
              ALIGNED: tl.constexpr):
    """K2 work of one block (``inb``: the lanes in bounds; ``r``: the tensor's F-SAM flag snapshot).
    ``e = rho * mag / denom * T`` with ``mag = u * inv`` (q = 2), ``sign(u)`` (q = 1),
    ``sign(u) (|u| inv / n_hat)^(q-1)`` (general q); see :func:`perturb_apply_kernel`."""
    inb_ok = tl.where(finite, inb, False)
    pw = _ptr(tl.load(row + P_W * ntab), DT, ALIGNED)
    w_raw = tl.load(pw + offs, mask=inb, other=0.0)
    g_raw = tl.load(_ptr(tl.load(row + P_G * ntab), DT, ALIGNED) + offs, mask=inb, other=0.0)
    w = w_raw.to(CT)
    g = g_raw.to(CT)
    u = g
    m = g
    if FSAM:
        pm = _ptr(tl.load(row + P_EMA * ntab), DT, ALIGNED)
        # read where the EMA is ready, and everywhere when N is not finite (it is then copied to
        # ema_out as it is); a not-ready EMA is not read on a finite step: m = 0, d = g bit for bit
        m = tl.load(pm + offs, mask=tl.where(tl.where(finite, r != 0, True), inb, False), other=0.0).to(CT)
        u = g - sigma * m
    T = 1.0
    if ADAPTIVE:
        ad = tl.load(hrow + P_ADAPTIVE) != 0
        T = tl.where(ad, tl.abs(w) + tl.load(hrow + P_ETA), 1.0)
        u = u * T
    if QMODE == 2:
        mag = u * inv  # a power of two: exact
    elif QMODE == 1:
        mag = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0)).to(CT)
    else:
        mag = tl.where(u < 0, -1.0, 1.0).to(CT) * _abs_pow(tl.abs(u).to(tl.float64) * inv / n_hat, q - 1.0).to(CT)
    e = tl.load(hrow + P_RHO) * mag / denom
    if ADAPTIVE:
        e = e * T
    if SWP:
        gidx = tl.load(row + P_OFFSET * ntab) + offs
        zero = gidx.to(tl.uint32) * 0
        rnd, _r1, _r2, _r3 = tl.philox(seed64, gidx.to(tl.uint32), (gidx >> 32).to(tl.uint32), zero, zero)
        e = tl.where(rnd < thr, e / beta, 0.0)
    tl.store(_ptr(tl.load(row + P_WOLD * ntab), DT, ALIGNED) + offs, w_raw, mask=inb)
    if RNE_BF16:
        tl.store(pw + offs, _bf16_rne(w + e), mask=inb_ok)
    else:
        tl.store(pw + offs, (w + e).to(DT), mask=inb_ok)
    if GSAM:
        pgo = _ptr(tl.load(row + P_GOLD * ntab), DT, ALIGNED)
        tl.store(pgo + offs, tl.where(finite, g_raw, 0.0).to(DT), mask=inb)
    if FSAM:
        # m' when N is finite, else m itself (ema_out may be another buffer than ema: it must hold
        # the EMA either way)
        m_new = tl.where(finite, tl.where(r != 0, lam * m + one_m_lam * g, g), m)
        pmo = _ptr(tl.load(row + P_EMA_OUT * ntab), DT, ALIGNED)
        if RNE_BF16:
            tl.store(pmo + offs, _bf16_rne(m_new), mask=inb)
        else:
            tl.store(pmo + offs, m_new.to(DT), mask=inb)


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

    Scaled: with ``N = 2^E2 * n_hat`` (``2^E2`` N's power of two, clamped to CT's range),
    ``inv = 2^-E2`` and ``e = rho * mag / denom * T``: q = 2 ``mag = u * inv``,
    ``denom = n_hat + 1e-12 * inv`` (= (N + 1e-12) * inv exactly); q = 1 ``mag = sign(u)``,
    ``denom = 1 + 1e-12``; general q ``mag = sign(u) (|u| inv / n_hat)^(q-1)`` (<= 1),
    ``denom = 1 + 1e-12 * N^-(q-1)``. Finite for every finite u.

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
    tot, emax = _sum_scaled(part, npart, part_stride, pl, q, QMODE, PT)
    if QMODE == 2:
        nh = _sqrt(tot.to(CT), CT)
    elif QMODE == 1:
        nh = tot.to(CT)
    else:
        nh = _abs_pow(tot.to(tl.float64), 1.0 / q)
    finite = nh * 0 == 0  # False for inf and NaN
    # N = nh * 2^emax; E2 = its exponent, clamped; n_hat = N * 2^-E2 (a power-of-two rescale)
    e2 = tl.minimum(tl.maximum(emax + _frexp_exp(nh.to(CT), CT), _e_lo(CT)), _e_hi(CT))
    inv = _pow2(-e2, CT)
    if QMODE == 2:
        n_hat = nh * _pow2(emax - e2, CT)
        denom = n_hat + 1e-12 * inv
    elif QMODE == 1:
        n_hat = nh
        denom = 1.0 + 1e-12  # N^(q-1) = N^0 = 1
    else:
        n_hat = nh * tl.exp2((emax - e2).to(tl.float64))
        ok_n = n_hat > 0
        lg = tl.log2(tl.where(ok_n, n_hat, 1.0))
        denom = tl.where(ok_n, 1.0 + 1e-12 * tl.exp2(-(q - 1.0) * (e2.to(tl.float64) + lg)), float("inf")).to(CT)
        n_hat = tl.where(ok_n, n_hat, 1.0)  # every u = 0: mag = 0 / 1, e = 0 / inf
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
            _k2_block(row, hrow, ntab, offs, lanes < BLOCK, finite, r, sigma, lam, one_m_lam, beta, q, denom, inv,
                      n_hat, seed64, thr, DT, CT, QMODE, FSAM, ADAPTIVE, GSAM, SWP, RNE_BF16, ALIGNED)
        else:
            _k2_block(row, hrow, ntab, offs, offs < numel, finite, r, sigma, lam, one_m_lam, beta, q, denom, inv,
                      n_hat, seed64, thr, DT, CT, QMODE, FSAM, ADAPTIVE, GSAM, SWP, RNE_BF16, ALIGNED)
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
def _k3_block(row, hrow, ntab, offs, inb, coef, alpha, DT: tl.constexpr, CT: tl.constexpr, MODE: tl.constexpr,
              GSAM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, AMSGRAD: tl.constexpr,
              DECOUPLED: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
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
        if GSAM:
            g = tl.where(has_go, coef * g - alpha * go, g)
            # .grad holds the combined gradient afterwards, as on the unfused path
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
    ALIGNED: tl.constexpr,
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
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
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
            _k3_block(row, hrow, ntab, offs, lanes < BLOCK, coef, alpha, DT, CT, MODE, GSAM, NESTEROV, MAXIMIZE,
                      AMSGRAD, DECOUPLED, RNE_BF16, BLOCK, ALIGNED)
        else:
            _k3_block(row, hrow, ntab, offs, offs < numel, coef, alpha, DT, CT, MODE, GSAM, NESTEROV, MAXIMIZE,
                      AMSGRAD, DECOUPLED, RNE_BF16, BLOCK, ALIGNED)
