"""Plain per-parameter PyTorch: the definition of correct for every fused SAM op.

All math is done in float64 (norms and dot products included) and rounded once to the parameter
dtype on write. Slow on purpose: one Python iteration and several ops per tensor. Every other
backend (foreach, Triton, C++/CUDA) exposes the same functions with the same signatures and is
tested against this module.

Notation (DESIGN.md section 3): ``g`` gradient, ``w`` weight, ``P`` the tensors handed to the op
(parameters with a gradient in groups with rho > 0). Per tensor ``i``: ``rho_i``, ``adaptive_i``,
``eta_i`` (from its param group) and ``offset_i`` (global index of its first element, counting
the elements of every parameter of every group in order, with or without a gradient).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._philox import keep_mask

PERTURB_EPS = 1e-12  # added to N^(q-1) and to gradient norms (DESIGN.md s3), as in the papers' code


def dual_exponent(p: float) -> float:
    """``q = p / (p - 1)`` (Hoelder conjugate); p = 2 gives 2, p = inf gives 1."""
    if math.isinf(p):
        return 1.0
    return p / (p - 1.0)


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
    """SAM first step over the tensors of P: direction, dual norm, perturbation, ``w_old``.

    For each tensor (shapes of ``w``; lists are aligned):

    1. ``d = g``; F-SAM (``fsam_sigma`` set): with ``r`` = ``ema_ready`` (0-dim float, 0 before
       the tensor's first finite step) ``d = g - sigma * r * m`` and
       ``m <- lam * m + (1 - lam) * g`` if r else ``m <- g``; then ``r <- 1``.
    2. ``T = |w| + eta`` if adaptive else 1, ``u = T * d``.
    3. ``N = (sum_P |u|^q)^(1/q)``, ``q = p / (p - 1)``;
       ``e = rho * T * sign(u) * |u|^(q-1) / (N^(q-1) + 1e-12)``.
    4. ESAM (``swp_keep = beta < 1``): ``e <- e * keep / beta`` with the Philox keep-mask of
       the global element indices (see ``fastsam._philox``), key (seed, step).
    5. ``w_old <- w``; ``w <- w + e``; GSAM (``g_old`` given): ``g_old <- g``.
    6. Non-finite N: nothing is perturbed and no state changes (``w_old`` still gets ``w``,
       ``g_old`` gets zeros so a later GSAM combine is a no-op).

    Returns a 0-dim bool tensor on the parameters' device: True iff N was finite.
    """
    dev = params[0].device if params else torch.device("cpu")
    q = dual_exponent(p)
    f64 = torch.float64

    dirs: list[Tensor] = []
    geos: list[Tensor | None] = []
    new_ema: list[Tensor | None] = []
    acc = torch.zeros((), dtype=f64, device=dev)
    for i, (w, g) in enumerate(zip(params, grads)):
        g64 = g.to(f64)
        d = g64
        if fsam_sigma is not None:
            assert ema is not None and ema_ready is not None
            r = float(ema_ready[i])
            m64 = ema[i].to(f64)
            if r:
                d = g64 - fsam_sigma * m64
                new_ema.append(fsam_lambda * m64 + (1.0 - fsam_lambda) * g64)
            else:
                new_ema.append(g64.clone())
        T = (w.to(f64).abs() + etas[i]) if adaptive[i] else None
        u = d * T if T is not None else d
        acc = acc + (u.abs().sum() if q == 1.0 else u.abs().pow(q).sum())
        dirs.append(u)
        geos.append(T)

    N = acc if q == 1.0 else acc.pow(1.0 / q)
    finite = bool(torch.isfinite(N))
    denom = N.pow(q - 1.0) + PERTURB_EPS

    for i, (w, g) in enumerate(zip(params, grads)):
        w_old[i].copy_(w)
        if g_old is not None:
            if finite:
                g_old[i].copy_(g)
            else:
                g_old[i].zero_()
        if not finite:
            continue
        u, T = dirs[i], geos[i]
        if q == 2.0:
            mag = u
        elif q == 1.0:
            mag = torch.sign(u)
        else:
            mag = torch.sign(u) * u.abs().pow(q - 1.0)
        e = rhos[i] * mag / denom
        if T is not None:
            e = e * T
        if swp_keep < 1.0:
            keep = keep_mask(offsets[i], w.numel(), seed, step, swp_keep, device=w.device)
            e = e * keep.view(w.shape).to(f64) / swp_keep
        w.copy_(w.to(f64) + e)
        if fsam_sigma is not None:
            assert ema is not None and ema_ready is not None
            ema[i].copy_(new_ema[i])
            ema_ready[i].fill_(1.0)
    return torch.tensor(finite, device=dev)


@torch.no_grad()
def gsam_combine_(grads: list[Tensor], g_old: list[Tensor], alpha: float) -> None:
    """GSAM surrogate-gap combine (Zhuang et al., 2022), in place on ``grads`` (= ``gs``).

    ``cos = <g_old, gs> / (|gs| |g_old| + 1e-12)``,
    ``v = g_old - cos * |g_old| * gs / (|gs| + 1e-12)``, ``gs <- gs - alpha * v``;
    norms and the dot product are global over the lists.
    """
    if not grads:
        return
    f64 = torch.float64
    dev = grads[0].device
    dot = torch.zeros((), dtype=f64, device=dev)
    ss_new = torch.zeros((), dtype=f64, device=dev)
    ss_old = torch.zeros((), dtype=f64, device=dev)
    for gs, go in zip(grads, g_old):
        gs64, go64 = gs.to(f64), go.to(f64)
        dot = dot + (gs64 * go64).sum()
        ss_new = ss_new + (gs64 * gs64).sum()
        ss_old = ss_old + (go64 * go64).sum()
    n_new, n_old = ss_new.sqrt(), ss_old.sqrt()
    cos = dot / (n_new * n_old + PERTURB_EPS)
    for gs, go in zip(grads, g_old):
        gs64, go64 = gs.to(f64), go.to(f64)
        v = go64 - cos * n_old * gs64 / (n_new + PERTURB_EPS)
        gs.copy_(gs64 - alpha * v)


@torch.no_grad()
def sam_restore_(params: list[Tensor], w_old: list[Tensor]) -> None:
    """``w <- w_old`` exactly (in-place copy, parameter storage unchanged)."""
    for w, wo in zip(params, w_old):
        w.copy_(wo)
