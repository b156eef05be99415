"""Plain per-parameter PyTorch: the definition of correct for every fused SAM op.

All math is done in float64 (norms and dot products included) and rounded once to the parameter
dtype on write. Slow on purpose: one Python iteration and several ops per tensor. Every other
backend (foreach, Triton, C++/CUDA) exposes the same functions with the same signatures and is
tested against this module.

Notation (docs/design.md section 2): ``g`` gradient, ``w`` weight, ``P`` the tensors handed to the op
(parameters with a gradient in groups with rho > 0). Per tensor ``i``: ``rho_i``, ``adaptive_i``,
``eta_i`` (from its param group) and ``offset_i`` (global index of its first element, counting
the elements of every parameter of every group in order, with or without a gradient).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._philox import keep_mask

# The ascent losses' twins live in their own module (they share nothing with the optimizer ops);
# re-exported here so every fused op's definition of correct is reachable from fastsam.reference.
from ._reference_losses import (  # noqa: F401
    bisam_grad_reference,
    bisam_loss_reference,
    obf_grad_reference,
    obf_loss_reference,
)
from ._shard import Reduce, combine_gsam, combine_norms

SHARDED = True  # the ops that need a global sum take reduce= (sharded parameters: fastsam._shard)
PERTURB_EPS = 1e-12  # added to N^(q-1) and to gradient norms (docs/design.md section 2.2), as in the papers' code


def dual_exponent(p: float) -> float:
    """``q = p / (p - 1)`` (Hoelder conjugate); p = 2 gives 2, p = inf gives 1."""
    if math.isinf(p):
        return 1.0
    return p / (p - 1.0)


# Scaled norms (docs/design.md section 2.2). A sum of |u|^q overflows long before the norm does
# (fp32: |u| > 1.8e19 at q = 2; float64: |u|^21 > 1.8e308 at p = 1.05) and underflows for tiny
# gradients; and u = T * d itself overflows (ASAM: (|w| + eta) * g; F-SAM: g - sigma * m) for
# finite inputs. So the first step never forms u, |u|^q or N^(q-1) as plain numbers:
#
# - u is kept split, |u| = mu * 2^ku with mu in [0.5, 1) (:func:`_split_direction`): a product
#   of mantissas and a sum of exponents, finite for every finite w, g, m;
# - the sum is taken relative to the exact max M = max|u|: r = |u| / M in [0, 1] with max r = 1,
#   S = sum r^q in [1, n], N = M * S^(1/q). The largest term is 1 for every q (a power of two just
#   above M instead would leave it in [2^-q, 1), which underflows once q = p / (p - 1) is large:
#   p -> 1). q = 2 keeps that power of two (terms >= 1/4 there): N = 2^K ||u 2^-K||_2;
# - e = rho * T * sign(u) * r^(q-1) * S^(-(q-1)/q) / (1 + 1e-12 * N^-(q-1)), the last factor from
#   log2 N = log2 M + log2(S) / q:
#     e = rho * T * sign(u) (|u| / N)^(q-1) / (1 + 1e-12 * N^-(q-1))
#       = rho * T * sign(u) |u|^(q-1) / (N^(q-1) + 1e-12)            (Foret et al.)
#   finite for every finite gradient, every p in (1, inf].
E_MIN_F64 = -1000  # 2^-E must stay finite: exponents are clamped below at this (tiny gradients)


def exp2(x: float) -> float:
    """``2 ** x`` as a float, inf on overflow and 0 on underflow (math.ldexp raises instead)."""
    if x > 1100:
        return math.inf
    if x < -1100:
        return 0.0
    return 2.0 ** x


def scale_exponent(m: float, lo: int = E_MIN_F64) -> int:
    """``E`` with ``m / 2^E`` in [0.5, 1) for a finite ``m > 0`` (``frexp``), clamped below at
    ``lo``; 0 for ``m = 0``."""
    if m <= 0:
        return 0
    return max(math.frexp(m)[1], lo)


def perturb_factor(q: float, log2_n: float) -> float:
    """``1 / (1 + 1e-12 * N^-(q-1))`` from ``log2 N`` without forming ``N^(q-1)`` (0 when
    ``N^(q-1)`` is far below 1e-12)."""
    if q == 1.0:
        return 1.0 / (1.0 + PERTURB_EPS)
    return 1.0 / (1.0 + PERTURB_EPS * exp2(-(q - 1.0) * log2_n))


def fsam_shift(sigma: float) -> int:
    """``s`` with ``1 + |sigma| < 2^s``: ``g 2^-s - (sigma 2^-s) m`` is finite for every finite
    ``g``, ``m`` (the F-SAM direction ``d = g - sigma m`` itself may overflow)."""
    return math.frexp(1.0 + abs(sigma))[1]


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x = m * 2^k`` elementwise with ``|m|`` in [0.5, 1) (0, inf, NaN: ``m = x``), k int64."""
    m, k = torch.frexp(x)
    return m, k.to(torch.int64)


def _split_direction(w64: Tensor, g64: Tensor, m64: Tensor | None, sigma: float, T: Tensor | None
                     ) -> tuple[Tensor, Tensor]:
    """``u = T * d`` (``d = g - sigma * m`` if ``m`` is given, else ``g``) as ``(mu, ku)``,
    ``u = mu * 2^ku``, ``|mu|`` in [0.5, 1) (0 for u = 0; inf/NaN for non-finite inputs), without
    overflow for finite inputs: where ``d`` overflows it is taken as ``(g 2^-s - (sigma 2^-s) m)
    2^s`` (:func:`fsam_shift`), and the product is one of mantissas, its exponents added."""
    if m64 is None:
        md, kd = _split(g64)
    else:
        d = g64 - sigma * m64
        s = fsam_shift(sigma)
        c = 2.0 ** -s
        md, kd = _split(d)
        md_s, kd_s = _split(g64 * c - (sigma * c) * m64)
        big = ~torch.isfinite(d) & torch.isfinite(md_s)
        md, kd = torch.where(big, md_s, md), torch.where(big, kd_s + s, kd)
    if T is None:
        return md, kd
    mt, kt = _split(T)
    mu, k2 = _split(mt * md)  # |mt * md| in [0.25, 1): exact renormalization
    return mu, kt + kd + k2


def _max_abs(ts: list[Tensor]) -> float:
    """max |t| over a list as a host float (NaN if any element is NaN)."""
    ms = [t.abs().max() for t in ts if t.numel()]
    if not ms:
        return 0.0
    return float(torch.stack([m.to(torch.float64) for m in ms]).max())


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
    """SAM first step over the tensors of P: direction, dual norm, perturbation, ``w_old``.

    For each tensor (shapes of ``w``; lists are aligned):

    1. ``d = g``; F-SAM (``fsam_sigma`` set): with ``r`` = ``ema_ready`` (0-dim float, 0 before
       the tensor's first finite step) ``d = g - sigma * r * m`` and
       ``m' = lam * m + (1 - lam) * g`` if r else ``m' = g``; ``r' = 1``.
    2. ``T = |w| + eta`` if adaptive else 1, ``u = T * d``.
    3. ``N = (sum_P |u|^q)^(1/q)``, ``q = p / (p - 1)``;
       ``e = rho * T * sign(u) * |u|^(q-1) / (N^(q-1) + 1e-12)``, computed from the split
       ``u`` and the sum relative to ``max|u|`` (see "Scaled norms" above): finite for every
       finite ``w``, ``g``, ``m`` and every p in (1, inf].
    4. ESAM (``swp_keep = beta < 1``): ``e <- e * keep / beta`` with the Philox keep-mask of
       the global element indices (see ``fastsam._philox``), key (seed, step).
    5. ``w_old <- w``; ``w <- w + e``; GSAM (``g_old`` given): ``g_old <- g``.
    6. ``m'`` and ``r'`` go to ``ema_out`` / ``ready_out`` (default: ``ema`` / ``ema_ready``,
       in place); out-of-place outputs let the caller keep ``m`` and ``r`` for a rollback.
    7. Non-finite N (a NaN or inf in some ``g``, ``m`` or ``T``): nothing is perturbed and no state changes
       (``w_old`` still gets ``w``, ``g_old`` gets zeros so a later GSAM combine is a no-op,
       ``ema_out``/``ready_out`` get copies of ``m``/``r``).

    Sharded parameters (``reduce`` given, see :mod:`fastsam._shard`): the lists are this rank's
    local shards, ``offsets`` their first elements' global indices, and N and the finite flag are
    global: this rank's (finite, log2 max|u|, partial norm relative to it) go through one call of
    ``reduce`` and are combined at the largest scale.

    On an exception ``params`` are left unchanged (outputs other than ``params`` unspecified).
    Returns a 0-dim bool tensor on the parameters' device: True iff N was finite.
    """
    dev = params[0].device if params else torch.device("cpu")
    q = dual_exponent(p)
    f64 = torch.float64
    fsam = fsam_sigma is not None
    if fsam:
        assert ema is not None and ema_ready is not None
        ema_out = ema if ema_out is None else ema_out
        ready_out = ema_ready if ready_out is None else ready_out

    splits: list[tuple[Tensor, Tensor]] = []  # u = mu * 2^ku per tensor (see _split_direction)
    geos: list[Tensor | None] = []
    new_ema: list[Tensor | None] = []
    for i, (w, g) in enumerate(zip(params, grads)):
        g64 = g.to(f64)
        m64 = None
        if fsam:
            r = float(ema_ready[i])  # type: ignore[index]
            m_old = ema[i].to(f64)  # type: ignore[index]
            if r:
                m64 = m_old
                new_ema.append(fsam_lambda * m_old + (1.0 - fsam_lambda) * g64)
            else:
                new_ema.append(g64.clone())
        T = (w.to(f64).abs() + etas[i]) if adaptive[i] else None
        splits.append(_split_direction(w.to(f64), g64, m64, fsam_sigma if fsam else 0.0, T))
        geos.append(T)

    finite = all(bool(torch.isfinite(mu).all()) for mu, _ in splits)
    nz = [(mu != 0) for mu, _ in splits]
    ks = [int(ku[z].max()) for (_, ku), z in zip(splits, nz) if bool(z.any())]
    new_w: list[Tensor | None] = [None] * len(params)
    local_ok = finite and bool(ks)
    rs: list[Tensor] = []
    if local_ok:
        K = max(ks)
        # v = |u| / 2^K in [0, 1) with 2^K just above max|u| (exact but where it underflows: terms
        # below 2^-1074 of the max); general q: r = |u| / M with M = Mh * 2^K the exact max, max r = 1
        vs = [torch.ldexp(mu.abs(), ku - K) for mu, ku in splits]
        if q == 2.0:
            n_hat = math.sqrt(sum(float(v.square().sum()) for v in vs))
            log2_n = K + math.log2(n_hat)
            rs, shrink, div = vs, 1.0, n_hat
        else:
            Mh = max(float(v.max()) for v in vs if v.numel())
            rs = [v / Mh for v in vs]
            S = sum(float(r.sum() if q == 1.0 else r.pow(q).sum()) for r in rs)  # in [1, n]
            log2_n = K + math.log2(Mh) + math.log2(S) / q
            shrink = 2.0 ** (-(q - 1.0) / q * math.log2(S))  # S^(-(q-1)/q), in (0, 1]
    if reduce is not None:
        # global N: this rank's x = y 2^L (q = 2: y = v, L = K; else y = r, L = log2 M) with
        # ||y||_q; every rank combines the same gathered table (fastsam._shard.combine_norms)
        if not local_ok:
            L, part = 0.0, 0.0
        elif q == 2.0:
            L, part = float(K), n_hat
        else:
            L, part = K + math.log2(Mh), S ** (1.0 / q)
        t = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
        ok_t, div_t, log2_t = combine_norms(reduce, t(finite), t(L), t(part), q)
        finite = bool(ok_t)  # every rank's u finite (else no rank perturbs)
        if finite and local_ok:  # (a rank whose u is 0 or whose shards are empty: e = 0 below)
            log2_n = float(log2_t)
            # this rank's y / div = x / N: q = 2 divides v by it; general q scales r^(q-1) by
            # (1 / div)^(q-1) (shrink = S^(-(q-1)/q) in the single-process formula)
            div = float(div_t)
            shrink = exp2(-(q - 1.0) * math.log2(div)) if q != 2.0 else 1.0
    if finite and ks:
        fac = perturb_factor(q, log2_n)
        for i, (w, r) in enumerate(zip(params, rs)):
            sgn = torch.sign(splits[i][0])
            if q == 1.0:
                mag = sgn
            elif q == 2.0:
                mag = (sgn * r) / div  # = (u 2^-K) / n_hat: the bits of the unsplit formula
            else:
                mag = sgn * r.pow(q - 1.0) * shrink
            e = rhos[i] * fac * mag
            if geos[i] is not None:
                e = e * geos[i]
            if swp_keep < 1.0:
                keep = keep_mask(offsets[i], w.numel(), seed, step, swp_keep, device=w.device)
                e = e * keep.view(w.shape).to(f64) / swp_keep
            new_w[i] = w.to(f64) + e
    elif finite:  # every u is 0: e = 0
        new_w = [w.to(f64) for w in params]

    result = torch.tensor(finite, device=dev)  # made before the writes: nothing can fail after them
    # writes: scratch outputs first, the parameters last (undone if a write fails)
    for i, w in enumerate(params):
        w_old[i].copy_(w)
        if g_old is not None:
            if finite:
                g_old[i].copy_(grads[i])
            else:
                g_old[i].zero_()
        if fsam:
            if finite:
                ema_out[i].copy_(new_ema[i])  # type: ignore[index,arg-type]
                ready_out[i].fill_(1.0)  # type: ignore[index]
            else:
                if ema_out[i] is not ema[i]:  # type: ignore[index]
                    ema_out[i].copy_(ema[i])  # type: ignore[index]
                if ready_out[i] is not ema_ready[i]:  # type: ignore[index]
                    ready_out[i].copy_(ema_ready[i])  # type: ignore[index]
    if finite:
        done = 0
        try:
            for i, w in enumerate(params):
                w.copy_(new_w[i])  # type: ignore[arg-type]
                done = i + 1
        except BaseException:
            for k in range(done):
                params[k].copy_(w_old[k])
            raise
    return result


def gsam_coefficients(grads: list[Tensor], g_old: list[Tensor], reduce: Reduce | None = None
                      ) -> tuple[float, float]:
    """``(cos, ratio)`` of GSAM over the lists, in float64 with scaled sums:
    ``cos = <g_old, gs> / (|gs| |g_old| + 1e-12)``, ``ratio = |g_old| / (|gs| + 1e-12)``
    (``gs`` = ``grads``). Finite for every finite input. Host floats (syncs). ``reduce``: the
    lists are local shards and the sums global (:func:`fastsam._shard.combine_gsam`)."""
    f64 = torch.float64
    gs = [g.to(f64) for g in grads]
    go = [g.to(f64) for g in g_old]
    ms, mo = _max_abs(gs), _max_abs(go)
    finite = math.isfinite(ms) and math.isfinite(mo)
    if not finite and reduce is None:
        return math.nan, math.nan
    es, eo = (scale_exponent(ms), scale_exponent(mo)) if finite else (0, 0)
    i_s, i_o = exp2(-es), exp2(-eo)
    dot = sum(float(((a * i_s) * (b * i_o)).sum()) for a, b in zip(gs, go))
    ss_new = sum(float((a * i_s).square().sum()) for a in gs)
    ss_old = sum(float((b * i_o).square().sum()) for b in go)
    if reduce is not None:  # every rank's scaled sums in one collective, combined at the largest scale
        t = lambda x: torch.tensor(float(x), dtype=f64)  # noqa: E731
        ok, es_t, eo_t, dot_t, ssn_t, sso_t = combine_gsam(
            reduce, t(finite), t(es if ms > 0 else -math.inf), t(eo if mo > 0 else -math.inf), t(dot),
            t(ss_new), t(ss_old))
        if not bool(ok):
            return math.nan, math.nan
        es, eo, dot, ss_new, ss_old = int(es_t), int(eo_t), float(dot_t), float(ssn_t), float(sso_t)
    n_new, n_old = math.sqrt(ss_new), math.sqrt(ss_old)  # |gs| = n_new 2^es, |g_old| = n_old 2^eo
    cos = dot / (n_new * n_old + PERTURB_EPS * exp2(-(es + eo)))
    ratio = n_old / (n_new * exp2(es - eo) + PERTURB_EPS * exp2(-eo))
    return cos, ratio


@torch.no_grad()
def gsam_combine_(grads: list[Tensor], g_old: list[Tensor], alpha: float, *, reduce: Reduce | None = None) -> None:
    """GSAM surrogate-gap combine (Zhuang et al., 2022), in place on ``grads`` (= ``gs``).

    ``cos = <g_old, gs> / (|gs| |g_old| + 1e-12)``,
    ``v = g_old - cos * |g_old| * gs / (|gs| + 1e-12)``, ``gs <- gs - alpha * v``;
    norms and the dot product are global over the lists (scaled sums, see
    :func:`gsam_coefficients`; with ``reduce``, over every rank's shards).
    """
    if not grads:
        return
    f64 = torch.float64
    cos, ratio = gsam_coefficients(grads, g_old, reduce)
    new = [gs.to(f64) - alpha * (go.to(f64) - cos * ratio * gs.to(f64)) for gs, go in zip(grads, g_old)]
    for gs, v in zip(grads, new):
        gs.copy_(v)


@torch.no_grad()
def sam_restore_(params: list[Tensor], w_old: list[Tensor]) -> None:
    """``w <- w_old`` exactly (in-place copy, parameter storage unchanged); nothing changes on
    an exception."""
    undo = _Undo()
    try:
        for w, wo in zip(params, w_old):
            undo.write(w, wo)
    except BaseException:
        undo.undo()
        raise


# ---------------------------------------------------------------------------------------------
# Fused second step: restore + GSAM combine + base optimizer update (torch.optim.SGD / Adam / AdamW)
#
# These twins define what a fused backend must compute when it replaces "restore, GSAM combine,
# base_optimizer.step()" by one pass. The math is torch's single-tensor update (torch/optim/sgd.py,
# adam.py; AdamW is Adam with decoupled weight decay) done in float64 and rounded once on write.
# List conventions (all lists aligned with ``params``):
#
# - ``w_old[i] is None``: the tensor was not perturbed (not in P), nothing to restore.
# - ``grads[i] is None``: the base optimizer does not update the tensor (torch skips params
#   without a gradient); it is only restored. Its state entries are ignored (may be None).
# - ``g_old`` (GSAM, ``gsam_alpha > 0``): ``g_old[i]`` is the first-step gradient of a tensor of
#   P; the combine of :func:`gsam_combine_` runs over the tensors that have both ``g_old[i]`` and
#   ``grads[i]``, writes the combined gradient back into ``grads[i]`` (as the unfused path does),
#   and the update uses it.
# - ``mix`` (instead of GSAM; the cheaper family, issue #17): a float64 tensor ``(c1, c2)`` or
#   ``(c1, c2, c3)`` on the parameters' device; the update uses ``c1 * grads[i] + c2 * g_old[i]``
#   where both exist (``grads[i]`` elsewhere), written back into ``grads[i]`` only when
#   ``mix_writeback``, and with ``c3`` the updated weight is then corrected by
#   ``w <- w - c3 * (grads[i] - g_old[i])`` (the gradients as given). WSAM: ``(a, 1 - a)`` with
#   ``g_old`` the gradient at w, written back; decoupled WSAM: ``(0, 1, lr a)`` written back (the
#   base step with g, then ``w -= lr a (gs - g)``); LookSAM's non-perturbing step:
#   ``(1, alpha |g|)`` with ``g_old`` its stored ``gv_hat``, not written back. The coefficients
#   stay on the device (LookSAM's ``|g|`` is never read by the host).
# - Float hyperparameters are a float (all tensors) or a sequence with one value per tensor
#   (param groups with different lr / weight_decay share one call).
# ---------------------------------------------------------------------------------------------


def _per_tensor(x: float | list[float] | tuple[float, ...], n: int, name: str) -> list[float]:
    if isinstance(x, (int, float)):
        return [float(x)] * n
    vals = [float(v) for v in x]
    if len(vals) != n:
        raise ValueError(f"{name}: expected a float or {n} values, got {len(vals)}")
    return vals


def check_mix(mix: Tensor | None, gsam_alpha: float, g_old: list[Tensor | None] | None,
              device: torch.device | None) -> None:
    """The rules of the fused updates' ``mix`` argument, shared by every backend: a 2-element
    floating tensor on the parameters' device, with a ``g_old`` list and without GSAM."""
    if mix is None:
        return
    if not isinstance(mix, Tensor) or mix.numel() not in (2, 3) or not mix.is_floating_point():
        raise ValueError(f"mix: expected a floating tensor (c1, c2) or (c1, c2, c3) (2 or 3 elements), got {mix!r}")
    if gsam_alpha > 0:
        raise ValueError(f"mix and gsam_alpha > 0 ({gsam_alpha}) exclude each other: one combine per update")
    if g_old is None:
        raise ValueError("mix needs the g_old list (the second gradient of c1 * g + c2 * g_old)")
    if device is not None and mix.device != device:
        raise ValueError(f"mix: expected a tensor on {device} (the parameters' device), got one on {mix.device}")


def mix_coefficients(mix: Tensor) -> tuple[float, float, float]:
    """``(c1, c2, c3)`` of a ``mix`` tensor as host floats, ``c3 = 0`` for a 2-element one (the
    reference reads them; the fused backends read the device tensor in their kernels)."""
    vals = mix.detach().reshape(-1).to(torch.float64).cpu().tolist() + [0.0]
    return float(vals[0]), float(vals[1]), float(vals[2])


def _gsam_combined64(
    grads: list[Tensor | None], g_old: list[Tensor | None] | None, alpha: float, reduce: Reduce | None = None,
    mix: Tensor | None = None,
) -> list[Tensor | None]:
    """float64 combined gradients (None where the tensor has no gradient); GSAM when alpha > 0.

    ``gs' = gs - alpha * (g_old - cos * |g_old| * gs / (|gs| + 1e-12))`` over the tensors with
    both ``g_old`` and ``grads`` (:func:`gsam_coefficients`); the others keep ``gs``. With
    ``mix = (c1, c2)`` instead: ``c1 * gs + c2 * g_old`` over the same tensors.
    """
    f64 = torch.float64
    out: list[Tensor | None] = [None if g is None else g.to(f64) for g in grads]
    if mix is not None and g_old is not None:
        c1, c2, _ = mix_coefficients(mix)
        for i, (g, go) in enumerate(zip(grads, g_old)):
            if g is not None and go is not None:
                out[i] = c1 * out[i] + c2 * go.to(f64)  # type: ignore[operator]
        return out
    if alpha <= 0 or g_old is None:
        return out
    pairs = [i for i, (g, go) in enumerate(zip(grads, g_old)) if g is not None and go is not None]
    if not pairs:
        return out
    cos, ratio = gsam_coefficients([grads[i] for i in pairs], [g_old[i] for i in pairs], reduce)  # type: ignore[misc]
    for i in pairs:
        gs64, go64 = out[i], g_old[i].to(f64)  # type: ignore[union-attr]
        out[i] = gs64 - alpha * (go64 - cos * ratio * gs64)  # type: ignore[operator]
    return out


def _corrected(w64: Tensor, g: Tensor | None, g_old: list[Tensor | None] | None, i: int, corr: float) -> Tensor:
    """``w - c3 (g - g_old)`` (decoupled WSAM's correction after the update) where ``c3 != 0``
    and the tensor has both gradients, else ``w``."""
    if corr == 0.0 or g is None or g_old is None or g_old[i] is None:
        return w64
    return w64 - corr * (g.to(torch.float64) - g_old[i].to(torch.float64))  # type: ignore[union-attr]


class _Undo:
    """Copies of the tensors an op is about to write, put back if a write fails: the reference
    twins change nothing when they raise (what the fused backends guarantee by validating first
    and writing in one launch)."""

    def __init__(self) -> None:
        self.saved: list[tuple[Tensor, Tensor]] = []

    def write(self, dst: Tensor, value: Tensor) -> None:
        self.saved.append((dst, dst.clone()))
        dst.copy_(value)

    def undo(self) -> None:
        for dst, old in reversed(self.saved):
            dst.copy_(old)


def check_accumulate_args(params: list[Tensor], grads: list[Tensor | None], w_old: list[Tensor | None],
                          acc: list[Tensor | None], reset: list[bool],
                          acc_in: list[Tensor | None] | None = None) -> None:
    """The list rules of :func:`sam_restore_accumulate_`, shared by every backend."""
    n = len(params)
    if len(grads) != n or len(w_old) != n or len(acc) != n or len(reset) != n:
        raise ValueError("sam_restore_accumulate_: grads, w_old, acc and reset need one entry per parameter")
    if acc_in is not None and len(acc_in) != n:
        raise ValueError("sam_restore_accumulate_: acc_in needs one entry per parameter")
    for i in range(n):
        if grads[i] is not None and acc[i] is None:
            raise ValueError(f"sam_restore_accumulate_: params[{i}] has a gradient but no acc buffer")
        if acc_in is not None and acc[i] is not None and not reset[i] and acc_in[i] is None:
            raise ValueError(f"sam_restore_accumulate_: params[{i}] adds to a running sum but has no acc_in entry")


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
    """m-SAM, once per micro-batch: restore + GSAM combine + gradient accumulation, in float64.

    Per tensor ``i`` (lists aligned with ``params``; ``g_i`` the GSAM-combined gradient of
    :func:`_gsam_combined64`, or 0 where ``grads[i] is None``)::

        w_i   <- w_old_i                                            (if w_old[i] is not None)
        acc_i <- scale * ((0 if reset[i] else acc_i) + weight * g_i)   (if acc[i] is not None)

    ``grads`` are only read (the combined gradient goes into ``acc``, not back into ``.grad``).
    Every tensor with a gradient needs an ``acc`` entry (same shape and dtype as the parameter).
    ``acc_in`` (default: ``acc``, in place) is where the running sum is read from when not
    ``reset``: an out-of-place sum lets the caller keep the old one for a rollback.
    A training step calls it with ``weight = n_k / n_ref`` per micro-batch ``k`` and, on the last
    micro-batch before the base update, ``scale = n_ref / sum(n_k)``, so ``acc`` ends as the
    size-weighted mean of the micro-batch gradients with one rounding per micro-batch.
    ``reduce``: sharded lists, GSAM's sums global (see :func:`gsam_coefficients`).
    On an exception nothing is changed.
    """
    check_accumulate_args(params, grads, w_old, acc, reset, acc_in)
    f64 = torch.float64
    src = acc if acc_in is None else acc_in
    gs = _gsam_combined64(grads, g_old, gsam_alpha, reduce)
    vals: list[Tensor | None] = []
    for i in range(len(params)):
        a = acc[i]
        if a is None:
            vals.append(None)
            continue
        g = gs[i]
        v = torch.zeros(a.shape, dtype=f64, device=a.device) if g is None else weight * g
        if not reset[i]:
            v = src[i].to(f64) + v  # type: ignore[union-attr]
        vals.append(scale * v)
    undo = _Undo()
    try:
        for i in range(len(params)):
            if vals[i] is not None:
                undo.write(acc[i], vals[i])  # type: ignore[arg-type]
        for i, w in enumerate(params):
            if w_old[i] is not None:
                undo.write(w, w_old[i])  # type: ignore[arg-type]
    except BaseException:
        undo.undo()
        raise


@torch.no_grad()
def sam_restore_sgd_(
    params: list[Tensor],
    grads: list[Tensor | None],
    w_old: list[Tensor | None],
    g_old: list[Tensor | None] | None,
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | list[float],
    weight_decay: float | list[float] = 0.0,
    momentum: float | list[float] = 0.0,
    dampening: float | list[float] = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    gsam_alpha: float = 0.0,
    mix: Tensor | None = None,
    mix_writeback: bool = False,
) -> None:
    """Restore + GSAM combine (or ``mix``) + ``torch.optim.SGD`` step, in float64.

    Per tensor with a gradient (``w = w_old`` if perturbed, else ``w``; ``g`` the combined
    gradient, negated when ``maximize``)::

        d = g + weight_decay * w
        momentum != 0:  buf = d                                  (first step: buffer is None)
                        buf = momentum * buf + (1 - dampening) * d   (afterwards)
                        d = d + momentum * buf if nesterov else buf
        w = w - lr * d

    A ``None`` entry of ``momentum_buffers`` (with momentum != 0) is replaced in the list by a
    new tensor (``empty_like(w)`` then filled), as torch creates ``state["momentum_buffer"]``.
    """
    n = len(params)
    lrs = _per_tensor(lr, n, "lr")
    wds = _per_tensor(weight_decay, n, "weight_decay")
    moms = _per_tensor(momentum, n, "momentum")
    damps = _per_tensor(dampening, n, "dampening")
    f64 = torch.float64
    check_mix(mix, gsam_alpha, g_old, params[0].device if params else None)
    gs = _gsam_combined64(grads, g_old, gsam_alpha, mix=mix)
    back = (gsam_alpha > 0 or (mix is not None and mix_writeback)) and g_old is not None
    corr = mix_coefficients(mix)[2] if mix is not None else 0.0
    writes: list[tuple[Tensor, Tensor]] = []  # computed first, written last (nothing changes on an error)
    fresh: list[tuple[int, Tensor]] = []
    for i, w in enumerate(params):
        src = w_old[i] if w_old[i] is not None else w
        g = gs[i]
        if g is None:
            if w_old[i] is not None:
                writes.append((w, src))
            continue
        if back and g_old[i] is not None:  # type: ignore[index]
            writes.append((grads[i], g))  # type: ignore[arg-type]  # .grad holds the combined gradient
        w64 = src.to(f64)
        d = -g if maximize else g
        if wds[i] != 0:
            d = d + wds[i] * w64
        if moms[i] != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = torch.empty_like(w, memory_format=torch.preserve_format)
                fresh.append((i, buf))
                b64 = d
            else:
                b64 = moms[i] * buf.to(f64) + (1.0 - damps[i]) * d
            writes.append((buf, b64))
            d = d + moms[i] * b64 if nesterov else b64
        writes.append((w, _corrected(w64 - lrs[i] * d, grads[i], g_old, i, corr)))
    undo = _Undo()
    try:
        for dst, val in writes:
            undo.write(dst, val)
    except BaseException:
        undo.undo()
        raise
    for i, buf in fresh:  # created as torch creates state["momentum_buffer"], once every write succeeded
        momentum_buffers[i] = buf


@torch.no_grad()
def sam_restore_adam_(
    params: list[Tensor],
    grads: list[Tensor | None],
    w_old: list[Tensor | None],
    g_old: list[Tensor | None] | None,
    exp_avgs: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    max_exp_avg_sqs: list[Tensor | None] | None,
    steps: list[Tensor | None],
    *,
    lr: float | list[float],
    beta1: float | list[float] = 0.9,
    beta2: float | list[float] = 0.999,
    eps: float | list[float] = 1e-8,
    weight_decay: float | list[float] = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    gsam_alpha: float = 0.0,
    mix: Tensor | None = None,
    mix_writeback: bool = False,
) -> None:
    """Restore + GSAM combine (or ``mix``) + ``torch.optim.Adam`` / ``AdamW`` step, in float64.

    Per tensor with a gradient (state tensors exist, ``steps[i]`` a 0-dim tensor incremented
    in place first, ``t`` its new value; ``w = w_old`` if perturbed, else ``w``)::

        g = -g if maximize
        weight_decay != 0:  w = w * (1 - lr * wd)    if decoupled (AdamW)
                            g = g + wd * w           otherwise
        m = m + (1 - beta1) * (g - m)                (torch: exp_avg.lerp_(g, 1 - beta1))
        v = beta2 * v + (1 - beta2) * g^2
        vmax = max(vmax, v)                          (amsgrad; the denominator then uses vmax)
        w = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """
    n = len(params)
    lrs = _per_tensor(lr, n, "lr")
    b1s = _per_tensor(beta1, n, "beta1")
    b2s = _per_tensor(beta2, n, "beta2")
    epss = _per_tensor(eps, n, "eps")
    wds = _per_tensor(weight_decay, n, "weight_decay")
    f64 = torch.float64
    check_mix(mix, gsam_alpha, g_old, params[0].device if params else None)
    gs = _gsam_combined64(grads, g_old, gsam_alpha, mix=mix)
    back = (gsam_alpha > 0 or (mix is not None and mix_writeback)) and g_old is not None
    corr = mix_coefficients(mix)[2] if mix is not None else 0.0
    writes: list[tuple[Tensor, Tensor]] = []  # computed first, written last (nothing changes on an error)
    for i, w in enumerate(params):
        src = w_old[i] if w_old[i] is not None else w
        g = gs[i]
        if g is None:
            if w_old[i] is not None:
                writes.append((w, src))
            continue
        if back and g_old[i] is not None:  # type: ignore[index]
            writes.append((grads[i], g))  # type: ignore[arg-type]  # .grad holds the combined gradient
        m_t, v_t, s_t = exp_avgs[i], exp_avg_sqs[i], steps[i]
        assert m_t is not None and v_t is not None and s_t is not None
        t = float(s_t) + 1.0
        writes.append((s_t, s_t + 1))
        w64 = src.to(f64)
        if maximize:
            g = -g
        if wds[i] != 0:
            if decoupled_weight_decay:
                w64 = w64 * (1.0 - lrs[i] * wds[i])
            else:
                g = g + wds[i] * w64
        m64 = m_t.to(f64)
        m64 = m64 + (1.0 - b1s[i]) * (g - m64)
        v64 = b2s[i] * v_t.to(f64) + (1.0 - b2s[i]) * g * g
        writes += [(m_t, m64), (v_t, v64)]
        if amsgrad:
            assert max_exp_avg_sqs is not None and max_exp_avg_sqs[i] is not None
            vmax_t = max_exp_avg_sqs[i]
            v64 = torch.maximum(vmax_t.to(f64), v64)  # type: ignore[union-attr]
            writes.append((vmax_t, v64))  # type: ignore[arg-type]
        bc1 = 1.0 - b1s[i] ** t
        bc2 = 1.0 - b2s[i] ** t
        denom = v64.sqrt() / math.sqrt(bc2) + epss[i]
        writes.append((w, _corrected(w64 - (lrs[i] / bc1) * m64 / denom, grads[i], g_old, i, corr)))
    undo = _Undo()
    try:
        for dst, val in writes:
            undo.write(dst, val)
    except BaseException:
        undo.undo()
        raise
