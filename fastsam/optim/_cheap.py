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

The ops here are plain PyTorch (float64 sums; float32 element math for 16-bit tensors), run on
every backend; the existing fused ops do the rest of each step (MSAM's perturbation is the fused
first step with the momentum as its direction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

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


def _f(t: Tensor) -> Tensor:
    """Element math in float32 for 16-bit tensors, else in the tensor's dtype."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def sq_norm(ts: Sequence[Tensor]) -> Tensor:
    """``sum |t|^2`` over the tensors as a float64 0-dim tensor (no host sync). Each tensor's sum
    is scaled by its max-abs power of two first, so no finite tensor overflows the float64 sum."""
    if not ts:
        return torch.zeros((), dtype=torch.float64)
    dev = ts[0].device
    parts = []
    for t in ts:
        x = t.detach().to(torch.float64)
        m = x.abs().amax() if x.numel() else torch.zeros((), dtype=torch.float64, device=x.device)
        e = torch.where(m > 0, torch.floor(torch.log2(m)), torch.zeros_like(m))
        s = torch.ldexp(torch.ones((), dtype=torch.float64, device=x.device), -e)
        parts.append((((x * s) ** 2).sum() * torch.ldexp(torch.ones_like(e), 2 * e)).to(dev))
    return torch.stack(parts).sum()


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``sum <a_i, b_i>`` as a float64 0-dim tensor."""
    if not a:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([(x.detach().double() * y.detach().double()).sum() for x, y in zip(a, b)]).sum()


@torch.no_grad()
def looksam_project(gs: Sequence[Tensor], g: Sequence[Tensor], out: Sequence[Tensor]) -> None:
    """LookSAM's stored direction: ``out = gv / |gv|`` with ``gv = gs - (<gs, g> / |g|^2) g``
    (zeros when ``|g|`` or ``|gv|`` is 0). ``|gv|^2`` is computed from gv itself (not as
    ``|gs|^2 - <gs, g>^2 / |g|^2``, which cancels catastrophically when gs is nearly parallel to g)."""
    if not gs:
        return
    gg = sq_norm(g)
    coef = torch.where(gg > 0, dot(gs, g) / gg, torch.zeros_like(gg))
    gv = [x.double() - coef.to(x.device) * y.double() for x, y in zip(gs, g)]
    n = sq_norm(gv).sqrt()
    inv = torch.where(n > 0, 1.0 / n, torch.zeros_like(n))
    for o, v in zip(out, gv):
        o.copy_(v * inv.to(v.device))


@torch.no_grad()
def looksam_reuse(g: Sequence[Tensor], gv_hat: Sequence[Tensor | None], alpha: float,
                  out: Sequence[Tensor]) -> None:
    """LookSAM's non-perturbing gradient: ``out = g + alpha |g| gv_hat`` (``|g|`` over all of
    ``g``; ``out = g`` where no direction is stored)."""
    if not g:
        return
    n = sq_norm(g).sqrt()
    for o, x, v in zip(out, g, gv_hat):
        if v is None:
            o.copy_(x)
        else:
            o.copy_((_f(x).double() + (alpha * n).to(x.device) * v.double()).to(o.dtype))


@torch.no_grad()
def wsam_mix(gs: Sequence[Tensor], g: Sequence[Tensor], a: float, out: Sequence[Tensor]) -> None:
    """WSAM's gradient: ``out = a gs + (1 - a) g`` (element math in float32 / float64)."""
    for o, x, y in zip(out, gs, g):
        o.copy_((a * _f(x) + (1.0 - a) * _f(y)).to(o.dtype))


@torch.no_grad()
def wsam_decoupled(params: Sequence[Tensor], gs: Sequence[Tensor], g: Sequence[Tensor], scales: Sequence[float]
                   ) -> None:
    """WSAM's decoupled correction after the base step: ``w -= lr a (gs - g)`` (``scales`` =
    ``lr a`` per tensor)."""
    for w, x, y, s in zip(params, gs, g, scales):
        w.copy_((_f(w) - s * (_f(x) - _f(y))).to(w.dtype))
