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

import torch
from torch import Tensor

from .._philox import keep_mask
from ..reference import PERTURB_EPS, check_accumulate_args, dual_exponent

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


def _select_(dst: list[Tensor], src: list[Tensor], ok: Tensor) -> None:
    """``dst <- src if ok else dst``, bit-exact, no host sync."""
    if not dst:
        return
    k = ok.to(torch.int64)
    di, si = _int_views(dst), _int_views(src)
    torch._foreach_mul_(di, 1 - k)
    torch._foreach_add_(di, torch._foreach_mul(si, k))


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
) -> Tensor:
    """Foreach twin of :func:`fastsam.reference.sam_perturb_` (same math, same contract)."""
    if not params:
        return torch.ones((), dtype=torch.bool)
    dev = params[0].device
    q = dual_exponent(p)
    acc = _acc_dtype(params)

    # 1. direction d (F-SAM: d = g - sigma * r * m, r the per-tensor "EMA ready" flag)
    if fsam_sigma is not None:
        assert ema is not None and ema_ready is not None
        d = torch._foreach_mul(ema, ema_ready)  # 0-dim flags broadcast per tensor
        torch._foreach_mul_(d, -fsam_sigma)
        torch._foreach_add_(d, grads)
    else:
        d = list(grads)

    # 2. geometry T = |w| + eta on adaptive tensors; u = T * d
    ia = [i for i, a in enumerate(adaptive) if a]
    T: list[Tensor] = []
    u = list(d)
    if ia:
        T = list(torch._foreach_abs([params[i] for i in ia]))
        torch._foreach_add_(T, [etas[i] for i in ia])
        for i, ui in zip(ia, torch._foreach_mul([d[i] for i in ia], T)):
            u[i] = ui

    # 3. dual norm and the perturbation e = rho * T * sign(u)|u|^(q-1) / (N^(q-1) + eps)
    N = _global_norm(u, q, acc, dev)
    ok = torch.isfinite(N)
    if q == 2.0:
        e = list(torch._foreach_div(u, N + PERTURB_EPS))
    else:
        inv = 1.0 / (N.pow(q - 1.0) + PERTURB_EPS)
        e = list(torch._foreach_sign(u))
        if q != 1.0:
            torch._foreach_mul_(e, torch._foreach_pow(torch._foreach_abs(u), q - 1.0))
        torch._foreach_mul_(e, inv)
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

    # 6. non-finite N: e = 0 (and no state change below)
    _zero_unless_(e, ok)

    # 5. keep w_old, perturb, keep g_old, update the F-SAM EMA
    torch._foreach_copy_(w_old, params)
    torch._foreach_add_(params, e)
    if g_old is not None:
        torch._foreach_copy_(g_old, grads)
        _zero_unless_(g_old, ok)
    if fsam_sigma is not None:
        assert ema is not None and ema_ready is not None
        # m_new = g + lam * r * (m - g): the EMA update when r = 1, m_new = g when r = 0 (first call)
        m_new = torch._foreach_sub(ema, grads)
        torch._foreach_mul_(m_new, ema_ready)  # exact: r is 0 or 1
        torch._foreach_mul_(m_new, fsam_lambda)  # Python scalar: lam in the tensors' own precision
        torch._foreach_add_(m_new, grads)
        _select_(ema, m_new, ok)
        torch._foreach_maximum_(ema_ready, [ok.to(ema_ready[0].dtype)] * len(ema_ready))
    return ok


@torch.no_grad()
def gsam_combine_(grads: list[Tensor], g_old: list[Tensor], alpha: float) -> None:
    """Foreach twin of :func:`fastsam.reference.gsam_combine_`.

    Uses ``gs - a*v = (1 + a*c) * gs - a * g_old`` with ``c = cos * |g_old| / (|gs| + eps)``.
    The dot product has no foreach form; it is the sum of the positive part minus the sum of
    the negative part of ``g_old * gs``, each an L1 norm (fp32-accumulated).
    """
    if not grads:
        return
    torch._foreach_mul_(grads, _gsam_coef(grads, g_old, alpha))
    torch._foreach_add_(grads, g_old, alpha=-alpha)


def _gsam_coef(grads: list[Tensor], g_old: list[Tensor], alpha: float) -> Tensor:
    """0-dim ``1 + alpha * cos * |g_old| / (|gs| + eps)`` (device tensor, no host sync)."""
    dev = grads[0].device
    acc = _acc_dtype(grads)
    n_new = _global_norm(grads, 2, acc, dev)
    n_old = _global_norm(g_old, 2, acc, dev)
    prod = torch._foreach_mul(g_old, grads)
    pos = _global_norm(torch._foreach_clamp_min(prod, 0.0), 1, acc, dev)
    neg = _global_norm(torch._foreach_clamp_max(prod, 0.0), 1, acc, dev)
    cos = (pos - neg) / (n_new * n_old + PERTURB_EPS)
    return 1.0 + alpha * (cos * n_old / (n_new + PERTURB_EPS))


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
) -> None:
    """Foreach twin of :func:`fastsam.reference.sam_restore_accumulate_` (math in the parameter
    dtype: ``weight * g`` and the sum are each rounded, then the product with ``scale``)."""
    check_accumulate_args(params, grads, w_old, acc, reset)
    n = len(params)
    rest = [i for i in range(n) if w_old[i] is not None]
    if rest:
        torch._foreach_copy_([params[i] for i in rest], [w_old[i] for i in rest])  # type: ignore[misc]
    gs: list[Tensor | None] = list(grads)
    if gsam_alpha > 0 and g_old is not None:
        pairs = [i for i in range(n) if grads[i] is not None and g_old[i] is not None]
        if pairs:
            gp = [grads[i] for i in pairs]
            gop = [g_old[i] for i in pairs]
            comb = torch._foreach_mul(gp, _gsam_coef(gp, gop, gsam_alpha))  # type: ignore[arg-type]
            torch._foreach_add_(comb, gop, alpha=-gsam_alpha)  # type: ignore[arg-type]
            for i, c in zip(pairs, comb):
                gs[i] = c
    first = [i for i in range(n) if acc[i] is not None and gs[i] is not None and reset[i]]
    more = [i for i in range(n) if acc[i] is not None and gs[i] is not None and not reset[i]]
    empty = [i for i in range(n) if acc[i] is not None and gs[i] is None and reset[i]]
    if first:
        torch._foreach_copy_([acc[i] for i in first], torch._foreach_mul([gs[i] for i in first], weight))  # type: ignore
    if more:
        torch._foreach_add_([acc[i] for i in more], [gs[i] for i in more], alpha=weight)  # type: ignore
    if empty:
        torch._foreach_zero_([acc[i] for i in empty])  # type: ignore[misc]
    if scale != 1.0:
        live = [a for a in acc if a is not None]
        if live:
            torch._foreach_mul_(live, scale)
