"""``backend="foreach"``: the SAM ops as torch._foreach_* calls over whole tensor lists.

Same functions and signatures as ``fastsam.reference``. Each op is one multi-tensor call over
the list (no tensor op per parameter) and nothing here reads a device value on the host (no
``.item()``, no ``bool(tensor)``), so a CUDA step never waits on the device.

Math runs in the parameter dtype, as plain PyTorch in that dtype would; norms and dot products
accumulate in float32 (float64 for float64 tensors).

Non-finite norms without a host sync: ``torch.where`` has no foreach form, so a select between
two float tensors is done on their bit patterns viewed as integers,
``bits(out) = bits(a) * ok + bits(b) * (1 - ok)`` with ``ok`` in {0, 1}: integer math, exact,
and immune to the NaN * 0 = NaN that a float blend would give.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._philox import keep_mask
from .._shard import Reduce, combine_gsam, combine_norms
from ..reference import PERTURB_EPS, check_accumulate_args, dual_exponent, fsam_shift

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _acc_dtype(tensors: list[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _global_norm(tensors: list[Tensor], ord: float, acc: torch.dtype, dev: torch.device) -> Tensor:
    """``(sum_i |t_i|_ord^ord)^(1/ord)`` over a list, accumulated in ``acc``."""
    if not tensors:
        return torch.zeros((), dtype=acc, device=dev)
    norms = torch._foreach_norm(tensors, ord, dtype=acc)
    if any(n.device != dev for n in norms):  # model split over devices: gather the partials
        norms = [n.to(dev) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms), ord)


def _int_views(tensors: list[Tensor]) -> list[Tensor]:
    return [t.view(_INT_VIEW[t.dtype]) for t in tensors]


def _zero_unless_(tensors: list[Tensor], ok: Tensor) -> None:
    """``t <- t if ok else +0`` for every tensor, exactly, with no host sync (``ok`` 0-dim bool)."""
    if tensors:
        torch._foreach_mul_(_int_views(tensors), ok.to(torch.int64))


def _select_(dst: list[Tensor], src: list[Tensor], ok: Tensor, per_tensor: bool = False) -> None:
    """``dst <- src if ok else dst``, bit-exact, no host sync. ``ok``: a 0-dim bool/int tensor,
    or with ``per_tensor`` a 1-D one with one flag per tensor."""
    if not dst:
        return
    k = ok.to(torch.int64)
    ks = list(k.unbind()) if per_tensor else k
    nk = [1 - x for x in ks] if per_tensor else 1 - k
    di, si = _int_views(dst), _int_views(src)
    torch._foreach_mul_(di, nk)
    torch._foreach_add_(di, torch._foreach_mul(si, ks))


class _MaskCache:
    """Per-layout flat bool buffer and its per-tensor views for the ESAM keep-mask.

    The mask itself is regenerated every step from (seed, step, index), never stored across
    steps; only the buffer that receives it is reused (1 byte per element).
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.flat: Tensor | None = None
        self.views: list[Tensor] = []
        self.runs: list[tuple[int, int, int]] = []  # (global start, flat start, count)

    def get(self, params: list[Tensor], offsets: list[int], seed: int, step: int,
            beta: float) -> list[Tensor]:
        key = (tuple(offsets), tuple(t.numel() for t in params), params[0].device)
        if key != self.key:
            total = sum(t.numel() for t in params)
            self.flat = torch.empty(total, dtype=torch.bool, device=params[0].device)
            self.views, self.runs, pos = [], [], 0
            for t, off in zip(params, offsets):
                n = t.numel()
                self.views.append(self.flat[pos:pos + n].view(t.shape))
                # Merge index ranges that touch (the usual case: every parameter has a grad),
                # so the mask is built in a few long runs rather than one call per tensor.
                if self.runs and self.runs[-1][0] + self.runs[-1][2] == off:
                    g0, f0, c = self.runs[-1]
                    self.runs[-1] = (g0, f0, c + n)
                elif n:
                    self.runs.append((off, pos, n))
                pos += n
            self.key = key
        assert self.flat is not None
        for g0, f0, c in self.runs:
            keep_mask(g0, c, seed, step, beta, out=self.flat[f0:f0 + c])
        return self.views


_MASKS = _MaskCache()


_LOW = (torch.bfloat16, torch.float16)
SHARDED = True  # the ops that need a global sum take reduce= (sharded parameters: fastsam._shard)


def _math_dtype(t: Tensor) -> torch.dtype:
    """float32 for bf16/fp16 tensors (their range and precision cannot hold |u|^(q-1) or the
    scaled sums), the tensor's own dtype otherwise."""
    return torch.float32 if t.dtype in _LOW else t.dtype


def _in_math_dtype(ts: list[Tensor]) -> list[Tensor]:
    if not any(t.dtype in _LOW for t in ts):
        return list(ts)
    return [t.float() if t.dtype in _LOW else t for t in ts]


def _max_abs(tensors: list[Tensor], acc: torch.dtype, dev: torch.device) -> Tensor:
    """0-dim ``max |t|`` over a list, exact, NaN if any element is NaN (no host sync)."""
    tensors = [t for t in tensors if t.numel()]  # the inf-norm of an empty tensor is an error
    if not tensors:
        return torch.zeros((), dtype=acc, device=dev)
    norms = torch._foreach_norm(tensors, float("inf"), dtype=acc)
    if any(n.device != dev for n in norms):
        norms = [n.to(dev) for n in norms]
    return torch.stack(norms).max()


def _scale_exponent(m: Tensor) -> Tensor:
    """0-dim int ``E`` with ``m / 2^E`` in [0.5, 1) (frexp), clamped so that ``2^-E`` is a
    normal number of ``m``'s dtype (tiny and zero ``m``: the lower clamp; inf/NaN: garbage,
    masked by the caller's finite flag)."""
    lo, hi = (-100, 126) if m.dtype != torch.float64 else (-1000, 1022)
    return torch.frexp(m)[1].clamp(lo, hi)


def _neg_zero_unless_(tensors: list[Tensor], ok: Tensor) -> None:
    """``t <- t if ok else -0.0`` elementwise, exactly, with no host sync: ``w + (-0.0)`` leaves
    every bit of ``w`` as it is (``w + 0.0`` would turn a -0.0 weight into +0.0)."""
    if not tensors:
        return
    k = ok.to(torch.int64)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dt, ts in by_dtype.items():
        iv = _int_views(ts)
        torch._foreach_mul_(iv, k)
        torch._foreach_add_(iv, (1 - k) * torch.iinfo(_INT_VIEW[dt]).min)  # the sign bit alone: -0.0


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
    reduce: Reduce | None = None,
) -> Tensor:
    """Foreach twin of :func:`fastsam.reference.sam_perturb_` (same math, same contract).

    Math in the parameter dtype for fp32/fp64 and in float32 for bf16/fp16 parameters, rounded
    once into the parameter; the sums are scaled by ``2^-E`` (``2^E`` just above ``max|u|``,
    exact), so no finite gradient overflows them, and for p != 2, inf taken relative to ``max|u|``
    itself (the largest term is 1 however large q is). ``u = T * d`` never overflows: F-SAM's
    ``d`` is kept as ``d 2^-s`` and ASAM's ``d`` scaled by ``2^-a`` where ``T * d`` could overflow
    (steps 1, 2 below); both are exact shifts, so in the normal range the bits are those of the
    unscaled formula. The parameters are written by one multi-tensor add, last: an exception
    before it leaves them unchanged.

    ``reduce`` (sharded parameters, see :mod:`fastsam._shard`): the lists are this rank's local
    shards; the finite flag and the dual norm become global through one call of ``reduce``
    (:func:`fastsam._shard.combine_norms` of this rank's scale and partial norm).
    """
    if not params:
        return torch.ones((), dtype=torch.bool)
    dev = params[0].device
    q = dual_exponent(p)
    fsam = fsam_sigma is not None
    g_c = _in_math_dtype(grads)
    acc = _acc_dtype(g_c)

    # 1. direction d (F-SAM: d = g - sigma * r * m, r the per-tensor "EMA ready" flag), kept as
    #    d * 2^-s (s = fsam_shift(sigma)): g 2^-s - (sigma 2^-s) m cannot overflow, and in the normal
    #    range it is the unscaled value's bits shifted (powers of two commute with rounding)
    s = 0
    if fsam:
        assert ema is not None and ema_ready is not None
        ema_out = ema if ema_out is None else ema_out
        ready_out = ema_ready if ready_out is None else ready_out
        m_c = _in_math_dtype(ema)
        s = fsam_shift(fsam_sigma)  # type: ignore[arg-type]
        d = torch._foreach_mul(m_c, ema_ready)  # 0-dim flags broadcast per tensor
        torch._foreach_mul_(d, -fsam_sigma * 2.0 ** -s)  # type: ignore[operator]
        torch._foreach_add_(d, g_c, alpha=2.0 ** -s)
    else:
        d = list(g_c)

    # 2. geometry T = |w| + eta on adaptive tensors; u = T * d. Where the product could overflow
    #    (max T * max |d| >= 2^emax of the math dtype: a bound from the two maxima, no host sync), d is
    #    first scaled by 2^-a, 2^a just above max T (|T 2^-a| < 1: no overflow); a = 0 otherwise, so
    #    in the normal range u has today's bits. Units: u holds u_true * 2^-(s + a) on adaptive
    #    tensors, u_true * 2^-s on the others.
    ia = [i for i, a in enumerate(adaptive) if a]
    T: list[Tensor] = []
    u = list(d)
    one = torch.ones((), dtype=acc, device=dev)
    a_exp = torch.zeros((), dtype=torch.int32, device=dev)
    if ia:
        T = list(torch._foreach_abs(_in_math_dtype([params[i] for i in ia])))
        torch._foreach_add_(T, [etas[i] for i in ia])
        d_ia = [d[i] for i in ia]
        k_t = torch.frexp(_max_abs(T, acc, dev))[1]
        k_d = torch.frexp(_max_abs(d_ia, acc, dev))[1]
        big = k_t + k_d >= (1024 if acc == torch.float64 else 128)
        a_exp = torch.where(big, k_t, torch.zeros_like(k_t))
        d_ia = torch._foreach_mul(d_ia, torch.ldexp(one, -a_exp))
        for i, ui in zip(ia, torch._foreach_mul(d_ia, T)):
            u[i] = ui

    # 3. scaled dual norm: e = u * 2^-E in the units of the adaptive tensors (E from the max over
    #    both kinds, clamped: see _scale_exponent), so max |e| = M_hat in [0.5, 1); then
    #    q = 2: N_hat = ||e||_2, e / N_hat;  q = 1: sign(e);
    #    general q: r = e / M_hat (max |r| = 1 exactly, so sum |r|^q in [1, n] cannot underflow
    #    however large q = p / (p - 1) is), N_hat = ||r||_q, sign(r) (|r| / N_hat)^(q-1);
    #    fac = 1 / (1 + 1e-12 * N^-(q-1)) from log2 N = s + a + E + log2(M_hat) + log2(N_hat).
    na = [i for i in range(len(u)) if not adaptive[i]]
    m_a = _max_abs([u[i] for i in ia], acc, dev)
    m_n = _max_abs([u[i] for i in na], acc, dev)
    M = torch.maximum(m_a, m_n * torch.ldexp(one, -a_exp)) if ia else m_n
    ok = torch.isfinite(M)
    E = _scale_exponent(M)
    if ia:
        f_a, f_n = torch.ldexp(one, -E), torch.ldexp(torch.ldexp(one, -E), -a_exp)
        e = list(torch._foreach_mul(u, [f_a if adaptive[i] else f_n for i in range(len(u))]))
    else:
        e = list(torch._foreach_mul(u, torch.ldexp(one, -E)))
    # log2 N and the factor in float64 (0-dim): in float32, 2^((q-1) |log2 N|) overflows once it
    # passes 2^128 (p -> 1 with a small N), which made fac 0 where the exact one (~1e-29 for
    # q = 19, |g| ~ 1e-2) is a float32 number
    log_n = (E + a_exp).to(torch.float64) + float(s)
    if q == 1.0:
        torch._foreach_sign_(e)
        fac = torch.full((), 1.0 / (1.0 + PERTURB_EPS), dtype=acc, device=dev)
        if reduce is not None:  # no norm at p = inf: only the finite flag is global
            ok = combine_norms(reduce, ok, torch.zeros((), device=dev), torch.zeros((), device=dev), q)[0]
    else:
        log_scale = (E + a_exp).to(torch.float64)  # this rank's e holds x_r * 2^-log_scale (x = u 2^-s)
        if q != 2.0:
            m_hat = M * torch.ldexp(one, -E)
            m_hat = torch.where(m_hat > 0, m_hat, one)  # every u = 0: r = 0
            torch._foreach_div_(e, m_hat)
            log_n = log_n + torch.log2(m_hat.to(torch.float64))
            log_scale = log_scale + torch.log2(m_hat.to(torch.float64))
        n_hat = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(e, q, dtype=acc)), q)
        log_global = None
        if reduce is not None:
            # the divisor that turns this rank's e into x_r / N, and log2 N, from every rank's
            # (scale, partial norm) in one collective (float64 scales: 2^(L - L_r) stays exact)
            ok, div, log_global = combine_norms(reduce, ok, log_scale, n_hat, q)
            n_hat = div.to(acc)
        n_hat = torch.where(n_hat > 0, n_hat, torch.ones_like(n_hat))  # every u = 0: e = 0 / 1
        if q == 2.0:
            torch._foreach_div_(e, n_hat)
        else:
            mag = torch._foreach_abs(e)
            torch._foreach_div_(mag, n_hat)
            torch._foreach_pow_(mag, q - 1.0)
            torch._foreach_sign_(e)
            torch._foreach_mul_(e, mag)
        if log_global is None:
            log_n = log_n + torch.log2(n_hat.to(torch.float64))
        else:
            log_n = (log_global + float(s)).to(torch.float64)
        fac = (1.0 / (1.0 + PERTURB_EPS * torch.exp2(-(q - 1.0) * log_n))).to(acc)  # 0 when N^(q-1) << 1e-12
    torch._foreach_mul_(e, fac)
    if ia:
        et = torch._foreach_mul([e[i] for i in ia], T)
        for i, ei in zip(ia, et):
            e[i] = ei
    if len(set(rhos)) == 1:
        torch._foreach_mul_(e, rhos[0])
    else:
        torch._foreach_mul_(e, rhos)

    # 4. ESAM stochastic weight perturbation, mask regenerated from Philox(seed, step, index)
    if swp_keep < 1.0:
        torch._foreach_mul_(e, _MASKS.get(params, offsets, seed, step, swp_keep))
        torch._foreach_div_(e, swp_keep)

    # 6. non-finite N: e = -0.0 (w + e keeps every bit of w), and no state change below
    _neg_zero_unless_(e, ok)

    # 5. scratch outputs (w_old, g_old, the EMA's and flags' new values), then w += e last
    torch._foreach_copy_(w_old, params)
    if g_old is not None:
        torch._foreach_copy_(g_old, grads)
        _zero_unless_(g_old, ok)
    if fsam:
        assert ema is not None and ema_ready is not None and ema_out is not None and ready_out is not None
        # m' = lam * m + (1 - lam) * g if r else g, in the math dtype, rounded once; kept only when
        # N is finite (a bit select: no host sync, NaN-proof)
        m_new = torch._foreach_mul(m_c, fsam_lambda)
        torch._foreach_add_(m_new, torch._foreach_mul(g_c, 1.0 - fsam_lambda))
        m_new = _cast_like(m_new, ema)
        _select_(m_new, _cast_like(g_c, ema), 1 - torch.stack(ema_ready).to(torch.int64), per_tensor=True)
        _select_(m_new, ema, 1 - ok.to(torch.int64))
        r_new = torch._foreach_maximum(ema_ready, [ok.to(ema_ready[0].dtype)] * len(ema_ready))
        torch._foreach_copy_(ready_out, r_new)
        torch._foreach_copy_(ema_out, m_new)
    torch._foreach_add_(params, e)
    return ok


def _cast_like(src: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    """``src`` in the dtypes of ``like`` (a new tensor only where they differ)."""
    return [s if s.dtype == t.dtype else s.to(t.dtype) for s, t in zip(src, like)]


@torch.no_grad()
def gsam_combine_(grads: list[Tensor], g_old: list[Tensor], alpha: float, *, reduce: Reduce | None = None) -> None:
    """Foreach twin of :func:`fastsam.reference.gsam_combine_`.

    Uses ``gs - a*v = (1 + a*c) * gs - a * g_old`` with ``c = cos * |g_old| / (|gs| + eps)``.
    The dot product has no foreach form; it is the sum of the positive part minus the sum of
    the negative part of ``g_old * gs``, each an L1 norm (fp32-accumulated).
    """
    if not grads:
        return
    coef = _gsam_coef(grads, g_old, alpha, reduce)
    if any(g.dtype in _LOW for g in grads):  # float32 math, rounded once into the gradient
        comb = torch._foreach_mul(_in_math_dtype(grads), coef.float())
        torch._foreach_add_(comb, _in_math_dtype(g_old), alpha=-alpha)
        torch._foreach_copy_(grads, comb)
        return
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    torch._foreach_add_(grads, g_old, alpha=-alpha)


def _gsam_coef(grads: list[Tensor], g_old: list[Tensor], alpha: float, reduce: Reduce | None = None) -> Tensor:
    """0-dim ``1 + alpha * cos * |g_old| / (|gs| + eps)`` (device tensor, no host sync), from
    sums of ``gs * 2^-Es`` and ``g_old * 2^-Eo`` (``2^E`` just above each list's max: exact
    scalings, no overflow for any finite gradient), combined in float64. ``reduce``: the sums are
    global over the ranks' shards (:func:`fastsam._shard.combine_gsam`, one collective)."""
    dev = grads[0].device
    f64 = torch.float64
    gc, oc = _in_math_dtype(grads), _in_math_dtype(g_old)
    acc = _acc_dtype(gc)
    one = torch.ones((), dtype=acc, device=dev)
    es, eo = _scale_exponent(_max_abs(gc, acc, dev)), _scale_exponent(_max_abs(oc, acc, dev))
    gs_h = torch._foreach_mul(gc, torch.ldexp(one, -es))
    go_h = torch._foreach_mul(oc, torch.ldexp(one, -eo))
    n_new = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs_h, 2, dtype=f64)))
    n_old = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(go_h, 2, dtype=f64)))
    # the dot product has no foreach form: the L1 norms of its positive and negative parts
    prod = torch._foreach_mul(gs_h, go_h)
    pos = torch.stack(torch._foreach_norm(torch._foreach_clamp_min(prod, 0.0), 1, dtype=f64)).sum()
    neg = torch.stack(torch._foreach_norm(torch._foreach_clamp_max(prod, 0.0), 1, dtype=f64)).sum()
    es64, eo64 = es.to(f64), eo.to(f64)
    if reduce is not None:  # global sums: every rank's scaled partials in one collective
        ms, mo = _max_abs(gc, acc, dev), _max_abs(oc, acc, dev)
        ok = torch.isfinite(ms) & torch.isfinite(mo)
        ninf = torch.full((), -math.inf, dtype=f64, device=dev)
        _, es64, eo64, dot, ssn, sso = combine_gsam(
            reduce, ok, torch.where(ms > 0, es64, ninf), torch.where(mo > 0, eo64, ninf), pos - neg,
            n_new.square(), n_old.square())
        n_new, n_old, pos, neg = ssn.sqrt(), sso.sqrt(), dot, torch.zeros_like(dot)
    cos = (pos - neg) / (n_new * n_old + PERTURB_EPS * torch.exp2(-(es64 + eo64)))
    ratio = n_old / (n_new * torch.exp2(es64 - eo64) + PERTURB_EPS * torch.exp2(-eo64))
    return 1.0 + alpha * (cos * ratio)


@torch.no_grad()
def sam_restore_(params: list[Tensor], w_old: list[Tensor]) -> None:
    """``w <- w_old`` exactly, one multi-tensor copy."""
    if params:
        torch._foreach_copy_(params, w_old)


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
    reduce: Reduce | None = None,
) -> None:
    """Foreach twin of :func:`fastsam.reference.sam_restore_accumulate_` (math in the parameter
    dtype: ``weight * g`` and the sum are each rounded, then the product with ``scale``).
    The new sums are computed out of place and written, then the weights restored: an exception
    before the writes changes nothing."""
    check_accumulate_args(params, grads, w_old, acc, reset, acc_in)
    src = acc if acc_in is None else acc_in
    n = len(params)
    gs: list[Tensor | None] = list(grads)
    if gsam_alpha > 0 and g_old is not None:
        pairs = [i for i in range(n) if grads[i] is not None and g_old[i] is not None]
        if pairs:  # the same on every rank (which tensors have a gradient is global)
            gp = [grads[i] for i in pairs]
            gop = [g_old[i] for i in pairs]
            coef = _gsam_coef(gp, gop, gsam_alpha, reduce)  # type: ignore[arg-type]
            comb = torch._foreach_mul(gp, coef.to(gp[0].dtype))  # type: ignore[arg-type,union-attr]
            torch._foreach_add_(comb, gop, alpha=-gsam_alpha)  # type: ignore[arg-type]
            for i, c in zip(pairs, comb):
                gs[i] = c
    outs: list[Tensor] = []
    vals: list[Tensor] = []
    first = [i for i in range(n) if acc[i] is not None and gs[i] is not None and reset[i]]
    more = [i for i in range(n) if acc[i] is not None and gs[i] is not None and not reset[i]]
    keep = [i for i in range(n) if acc[i] is not None and gs[i] is None and not reset[i]]
    empty = [i for i in range(n) if acc[i] is not None and gs[i] is None and reset[i]]
    if first:
        outs += [acc[i] for i in first]  # type: ignore[misc]
        vals += torch._foreach_mul([gs[i] for i in first], weight)  # type: ignore[arg-type]
    if more:
        s_ = torch._foreach_mul([gs[i] for i in more], weight)  # type: ignore[arg-type]
        outs += [acc[i] for i in more]  # type: ignore[misc]
        vals += torch._foreach_add([src[i] for i in more], s_)  # type: ignore[arg-type]
    if keep:
        outs += [acc[i] for i in keep]  # type: ignore[misc]
        vals += [src[i] for i in keep]  # type: ignore[misc]
    if empty:
        outs += [acc[i] for i in empty]  # type: ignore[misc]
        vals += [torch.zeros_like(acc[i]) for i in empty]  # type: ignore[arg-type]
    if scale != 1.0 and vals:
        vals = list(torch._foreach_mul(vals, scale))
    if outs:
        torch._foreach_copy_(outs, vals)
    rest = [i for i in range(n) if w_old[i] is not None]
    if rest:
        torch._foreach_copy_([params[i] for i in rest], [w_old[i] for i in rest])  # type: ignore[misc]
