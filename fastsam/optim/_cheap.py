"""The cheaper SAM family as four orthogonal choices of :class:`fastsam.SAM` (issue #17).

A SAM step costs two forward/backward passes; these variants pay for the second one less often,
or never. Each is one choice along one axis, so they compose with each other and with every
other option (ASAM, p-norms, F-SAM, GSAM, ESAM masks, LSAM groups):

=====================  ======================================================  =====================
axis                   choices                                                 option
=====================  ======================================================  =====================
when to perturb        every step (SAM); every k-th step (interval SAM,        ``sam_every=k``,
                       LookSAM); adaptively (AE-SAM)                           ``aesam=AESAMPolicy``
non-perturbing step    the gradient g; LookSAM's ``g + alpha |g| gv_hat``      ``looksam_alpha``
where to perturb from  the gradient; the base optimizer's momentum (MSAM)      ``perturb_from``
how gradients combine  SAM (gs); GSAM; WSAM                                    ``gsam_alpha``,
                                                                               ``wsam_gamma``
=====================  ======================================================  =====================

Formulas (``g`` the minibatch gradient at w, ``gs`` at the perturbed point, norms and dot
products global over the perturbed parameters P, summed in float64):

- interval SAM (Composer; init2winit): a SAM step when ``t % k == 0`` (``t`` = completed steps),
  otherwise a base step with ``g``.
- LookSAM (Liu et al., CVPR 2022): on its SAM steps also ``gv = gs - (<gs, g> / |g|^2) g`` and
  ``gv_hat = gv / |gv|`` are kept; a non-perturbing step uses ``g + alpha |g| gv_hat``.
- AE-SAM (Jiang et al., ICLR 2023): ``q = |g|^2``; ``mu <- delta mu + (1 - delta) q``,
  ``var <- delta var + (1 - delta) (q - mu)^2`` (updated first, then compared); a SAM step iff
  ``q >= mu + c_t sqrt(var)``, ``c_t`` linear from ``c_start`` to ``c_end`` over ``total_steps``.
- MSAM (Becker et al., 2024): one pass per step at ``w~ = w - rho v / (|v| + 1e-12)``, ``v`` the
  base optimizer's momentum (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``; ``w~ = w`` while it
  does not exist); the base optimizer then steps at ``w`` with ``G(w~)``. ``w`` stays in the
  parameters between steps (the authors keep ``w~`` there, which breaks evaluation and
  checkpoints).
- WSAM (Yue et al., KDD 2023): ``a = gamma / (1 - gamma)``; decoupled: a base step with ``g``,
  then ``w -= lr a (gs - g)``; otherwise a base step with ``a gs + (1 - a) g``.

The ops here are torch foreach ops in the tensors' own dtype (per-tensor norms and dot products,
summed over tensors in float64; a float32 tensor whose own norm exceeds ~3.4e38 reads as inf, and
the step is then skipped as non-finite). The foreach and reference backends use them for every
combine; the fused backends (triton, cpp, cuda) fold LookSAM's reuse and both WSAM forms into
the fused update (its ``mix`` argument, :func:`fastsam.reference.sam_restore_adam_`) and use
:func:`sq_norm` / :func:`looksam_project` only for ``|g|`` and LookSAM's projection. MSAM's
perturbation is the fused first step with the momentum as its direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import _shard
from .._validate import check_int, check_real

PERTURB_FROM = ("gradient", "momentum")


@dataclass(frozen=True)
class AESAMPolicy:
    """AE-SAM's decision rule (Jiang et al., ICLR 2023, Alg. 1): a SAM step iff the squared
    gradient norm ``q = |g|^2`` is at least ``mu + c_t sqrt(var)``, with ``mu`` / ``var`` EMAs of
    ``q`` (forgetting rate ``delta``) and ``c_t`` linear from ``c_start`` (step 0) to ``c_end``
    (step ``total_steps`` and after).

    Defaults (no official code was found; these are our choices): ``delta = 0.9`` (the EMA spans
    ~10 steps: it follows the drift of ``|g|^2`` over training but not single noisy batches);
    ``c_start = -1``, ``c_end = 1``: for roughly normal ``q`` about 84 % of the early steps and 16 %
    of the late ones perturb, half on average, where SAM matters most (early, sharp regions) and
    costs least in accuracy to skip (late). The first observed ``q`` initialises ``mu`` (``var`` = 0),
    so the first step always perturbs (``q >= mu``).
    """

    total_steps: int
    delta: float = 0.9
    c_start: float = -1.0
    c_end: float = 1.0

    def __post_init__(self) -> None:
        check_int("AESAMPolicy total_steps", self.total_steps, lo=1, what="the training's number of steps")
        check_real("AESAMPolicy delta", self.delta, lo=0.0, hi=1.0, hi_open=True)
        check_real("AESAMPolicy c_start", self.c_start)
        check_real("AESAMPolicy c_end", self.c_end)

    def c(self, t: int) -> float:
        """The threshold factor at step ``t``."""
        frac = min(t, self.total_steps) / self.total_steps
        return self.c_start + (self.c_end - self.c_start) * frac

    def update(self, stats: tuple[float, float, int], q: float) -> tuple[float, float, int]:
        """``(mu, var, n)`` after observing ``q`` (``n`` = observations so far)."""
        mu, var, n = stats
        if n == 0:
            return q, 0.0, 1
        d = self.delta
        mu = d * mu + (1.0 - d) * q
        var = d * var + (1.0 - d) * (q - mu) ** 2
        return mu, var, n + 1

    def perturbs(self, stats: tuple[float, float, int], q: float, t: int) -> bool:
        """The decision with the updated ``stats`` (a non-finite ``q`` perturbs: the step then
        skips on its non-finite gradient, as SAM's would)."""
        mu, var, _ = stats
        if not math.isfinite(q):
            return True
        return q >= mu + self.c(t) * math.sqrt(max(var, 0.0))

    def as_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "delta": self.delta, "c_start": self.c_start, "c_end": self.c_end}


def sq_norm(ts: Sequence[Tensor]) -> Tensor:
    """``sum |t|^2`` over the tensors as a float64 0-dim tensor (no host sync): per-tensor norms
    (one foreach op, in the tensors' dtype), squared and summed in float64."""
    if not ts:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm([t.detach() for t in ts], 2)
    return (torch.stack([n.to(torch.float64) for n in norms]) ** 2).sum()


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``sum <a_i, b_i>`` as a float64 0-dim tensor (per-tensor sums of the products, then float64)."""
    if not a:
        return torch.zeros((), dtype=torch.float64)
    prods = torch._foreach_mul([x.detach() for x in a], [y.detach() for y in b])
    return torch.stack([p.sum(dtype=torch.float64) for p in prods]).sum()


@torch.no_grad()
def looksam_project(gs: Sequence[Tensor], g: Sequence[Tensor]) -> list[Tensor]:
    """LookSAM's stored direction, new tensors: ``gv / |gv|`` with ``gv = gs - (<gs, g> / |g|^2) g``
    (zeros when ``|g|`` or ``|gv|`` is 0). ``|gv|`` is computed from gv itself (not as
    ``|gs|^2 - <gs, g>^2 / |g|^2``, which cancels catastrophically when gs is nearly parallel to g).
    Runs on LookSAM's SAM steps only (every k-th); 11 parameter-sized passes (two norms and a dot,
    a scale, a subtraction, the normalization)."""
    if not gs:
        return []
    gs, g = list(gs), list(g)
    gg = sq_norm(g)
    coef = torch.where(gg > 0, dot(gs, g) / gg, torch.zeros_like(gg))
    out = torch._foreach_sub(gs, torch._foreach_mul(g, coef.to(torch.float32).to(g[0].device)))
    n = sq_norm(out).sqrt()
    inv = torch.where(n > 0, 1.0 / n, torch.zeros_like(n))
    torch._foreach_mul_(out, inv.to(torch.float32).to(out[0].device))
    return out


@torch.no_grad()
def looksam_project_sharded(gs: Sequence[Tensor], g: Sequence[Tensor], reduce: _shard.Reduce) -> list[Tensor]:
    """:func:`looksam_project` on sharded (DTensor) tensors with ONE collective: the result is
    DTensors like ``gs``, computed on the local shards.

    The sequential form needs two global sums one after the other (``<gs, g>, |g|^2`` for the
    coefficient, then ``|gv|^2`` of the projected shards): two collectives. Instead each rank sends
    ``A = |gs_r|^2``, ``B = <gs_r, g_r>``, ``C = |g_r|^2`` and every rank forms, from the same table,
    ``c = B / C`` and ``|gv|^2 = A - 2 c B + c^2 C`` (the expansion of ``|gs - c g|^2``). Its
    cancellation is why :func:`looksam_project` does not use it; here the three sums are float64
    sums of products formed in float64 (exact for float32 / bf16 / fp16 inputs), so the expansion
    loses accuracy only where ``|gv| / |gs|`` is below ~1e-8, where the float32 ``gv`` itself is
    rounding noise. Costs a float64 copy of one parameter's shard at a time (LookSAM's SAM steps
    only)."""
    if not gs:
        return []
    gs, g = list(gs), list(g)
    lgs, lg = _shard.locals_(gs), _shard.locals_(g)
    f64 = torch.float64
    dev = lgs[0].device
    a = b = c = torch.zeros((), dtype=f64, device=dev)
    for x, y in zip(lgs, lg):
        if x.numel() == 0:
            continue
        x64, y64 = x.detach().reshape(-1).to(f64), y.detach().reshape(-1).to(f64)
        a = a + torch.dot(x64, x64)
        b = b + torch.dot(x64, y64)
        c = c + torch.dot(y64, y64)
    table = reduce(torch.stack([a, b, c])).to(dev)
    a, b, c = table[:, 0].sum(), table[:, 1].sum(), table[:, 2].sum()  # the same rank order everywhere
    coef = torch.where(c > 0, b / torch.where(c > 0, c, torch.ones_like(c)), torch.zeros_like(c))
    n = (a - 2 * coef * b + coef * coef * c).clamp_min(0).sqrt()
    out = torch._foreach_sub(lgs, torch._foreach_mul(lg, coef.to(torch.float32)))
    inv = torch.where(n > 0, 1.0 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))
    torch._foreach_mul_(out, inv.to(torch.float32))
    return [_shard.like(ref, t) for ref, t in zip(gs, out)]


@torch.no_grad()
def looksam_reuse(g: Sequence[Tensor], gv_hat: Sequence[Tensor | None], alpha: float,
                  reduce: _shard.Reduce | None = None) -> list[Tensor]:
    """LookSAM's non-perturbing gradient: ``g + alpha |g| gv_hat`` (``|g|`` over all of ``g``; ``g``
    itself, not a copy, where no direction is stored). One norm, a scale and an add (6 passes where
    every tensor has a direction), no host sync.

    ``reduce`` (sharded DTensor tensors, :mod:`fastsam._shard`): the work is on the local shards,
    ``|g|^2`` is the sum of every rank's partial sum (one collective of one float64 per rank; the
    partial squares are float64, so no scaling is needed), and the new tensors are DTensors."""
    g = list(g)
    has = [i for i, v in enumerate(gv_hat) if v is not None]
    if not has:
        return g
    if reduce is None:
        scale = (alpha * sq_norm(g).sqrt()).to(torch.float32).to(g[0].device)
        sums = torch._foreach_add([g[i] for i in has], torch._foreach_mul([gv_hat[i] for i in has], scale))
    else:
        lg = _shard.locals_(g)
        part = sq_norm(lg).to(lg[0].device)
        scale = (alpha * reduce(part.reshape(1))[:, 0].sum().sqrt()).to(torch.float32).to(lg[0].device)
        lsum = torch._foreach_add([lg[i] for i in has],
                                  torch._foreach_mul(_shard.locals_([gv_hat[i] for i in has]), scale))
        sums = [_shard.like(g[i], t) for i, t in zip(has, lsum)]
    out = list(g)
    for i, x in zip(has, sums):
        out[i] = x
    return out


@torch.no_grad()
def wsam_mix(gs: Sequence[Tensor], g: Sequence[Tensor], a: float, out: Sequence[Tensor]) -> None:
    """WSAM's gradient: ``out = a gs + (1 - a) g`` (``out`` may be ``gs``), as one lerp
    ``gs + (1 - a)(g - gs)``: reads gs and g, writes out (3 passes, not 5 for a scale and an
    add; computed in float32 for bf16/fp16 and rounded once)."""
    if not gs:
        return
    out = list(out)
    if out[0] is not gs[0]:
        torch._foreach_copy_(out, list(gs))
    torch._foreach_lerp_(out, list(g), 1.0 - a)


@torch.no_grad()
def wsam_decoupled(params: Sequence[Tensor], d: Sequence[Tensor], scales: Sequence[float]) -> None:
    """WSAM's decoupled correction after the base step: ``w -= lr a d`` with ``d = gs - g``
    (``scales`` = ``lr a`` per tensor): one multi-tensor add per distinct scale (one per param
    group), reading w and d and writing w."""
    if not params:
        return
    by_scale: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    for w, x, c in zip(params, d, scales):
        ws, ds = by_scale.setdefault(float(c), ([], []))
        ws.append(w)
        ds.append(x)
    for c, (ws, ds) in by_scale.items():
        torch._foreach_add_(ws, ds, alpha=-c)
