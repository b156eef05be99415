"""Thin presets over :class:`fastsam.SAM`: each one only changes defaults."""

from __future__ import annotations

from typing import Any

from ._cheap import AESAMPolicy
from .sam import SAM


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., 2021): ``T = |w| + eta``, ``e = rho * T^2 g / ||T g||_2``.

    Scale-invariant neighbourhood, so rho is an order of magnitude larger than SAM's: Kwon et al.
    use rho = 0.5, eta = 0.01 (CIFAR-10, SGD); the F-SAM paper uses rho = 2 (CIFAR-10) and 4
    (CIFAR-100). ``eta = 0`` equals ``pytorch_optimizer.SAM(adaptive=True)``.
    """

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.5, *, eta: float = 0.01,
                 **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho, adaptive=True, eta=eta, **kwargs)


class GSAM(SAM):
    """Surrogate-gap guided SAM (Zhuang et al., 2022).

    The gradient at ``w + e`` is replaced by ``gs - alpha * v`` with
    ``v = g - cos(g, gs) |g| gs / |gs|`` (the part of the clean gradient orthogonal to ``gs``).
    GSAM pairs with a rho proportional to the learning rate: use
    :class:`fastsam.ProportionalRho`. ``alpha`` is tuned per task (0.4 by default here).
    """

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, *, gsam_alpha: float = 0.4,
                 **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho, gsam_alpha=gsam_alpha, **kwargs)


class ESAM(SAM):
    """Efficient SAM (Du et al., 2022), stochastic weight perturbation part.

    Each element of ``e`` is kept with probability ``swp_keep = beta`` and scaled by 1/beta
    (Philox mask, reproducible and identical in every backend). The data-selection half of ESAM
    (sharpness-sensitive data selection) lives in the training step: ``fastsam.sam_step(...,
    sds_keep=gamma)``.
    """

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, *, swp_keep: float = 0.5,
                 **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho, swp_keep=swp_keep, **kwargs)


class FriendlySAM(SAM):
    """Friendly SAM (F-SAM, Li et al., 2024): ``d = g - sigma * m``, ``m <- lam m + (1 - lam) g``.

    Removes the full-gradient component (estimated by the EMA ``m``) from the perturbation
    direction. Paper defaults: sigma = 1 in every experiment; lambda = 0.9 (WRN-28-10,
    PyramidNet), 0.6 (other CIFAR models), 0.95 (ImageNet); rho as for SAM.
    """

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, *, fsam_sigma: float = 1.0,
                 fsam_lambda: float = 0.9, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho, fsam_sigma=fsam_sigma, fsam_lambda=fsam_lambda,
                         **kwargs)


# ----------------------------------------------------------------------------- the cheaper family (#17)
class LookSAM(SAM):
    """LookSAM (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware
    Minimization"; made for ViTs): a SAM step every ``k`` steps (``step_count % k == 0``) that also
    keeps ``gv_hat = gv / |gv|``, ``gv = gs - (<gs, g> / |g|^2) g`` (the part of the perturbed
    gradient orthogonal to the clean one); the other steps take one pass and step with
    ``g + alpha |g| gv_hat``. ``k = 1`` is SAM exactly. Paper defaults: ``k = 5``, ``alpha = 0.7``.

    Loop: ``loss.backward()``; if ``opt.wants_perturbation()``: ``first_step``, second pass,
    ``second_step``; else ``opt.plain_step()`` (:func:`fastsam.sam_step` does this).
    """

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, *, k: int = 5, alpha: float = 0.7,
                 **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho, sam_every=k, looksam_alpha=alpha, **kwargs)


class AESAM(SAM):
    """AE-SAM (Jiang et al., ICLR 2023, "An Adaptive Policy to Employ Sharpness-Aware
    Minimization"): a SAM step only when the squared gradient norm ``q = |g|^2`` is large
    against its running statistics, ``q >= mu + c_t sqrt(var)`` (see
    :class:`fastsam.AESAMPolicy` for the EMAs, the linear ``c_t`` schedule from ``c_start`` to
    ``c_end`` over ``total_steps``, and why the defaults ``delta = 0.9``, ``c = -1 -> 1``); the
    other steps take one pass with ``g``. ``perturbing_steps / step_count`` reports the fraction
    of SAM steps taken.
    """

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, *, total_steps: int,
                 delta: float = 0.9, c_start: float = -1.0, c_end: float = 1.0, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho,
                         aesam=AESAMPolicy(total_steps=total_steps, delta=delta, c_start=c_start, c_end=c_end),
                         **kwargs)


class MSAM(SAM):
    """Momentum-SAM (Becker et al., 2024, "Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead"): ONE pass per step, at ``w~ = w - rho v / (|v| + 1e-12)`` with ``v``
    the base optimizer's momentum (SGD ``momentum_buffer``: SGD needs ``momentum > 0``;
    Adam/AdamW ``exp_avg``); ``w~ = w`` until ``v`` exists. The base optimizer then steps at
    ``w`` with ``G(w~)``. The parameters hold ``w`` between steps (the authors keep ``w~`` there,
    which breaks evaluation and checkpoints).

    Loop: ``opt.first_step(zero_grad=True)`` (no gradient needed), ``loss.backward()``,
    ``opt.second_step()``; :func:`fastsam.sam_step` runs one forward/backward per step. ``rho``
    scales the normalized momentum: Becker et al. use values several times SAM's.
    """

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.3, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho, perturb_from="momentum", **kwargs)


class WSAM(SAM):
    """Weighted SAM (Yue et al., KDD 2023, "Sharpness-Aware Minimization Revisited: Weighted
    Sharpness as a Regularization Term"): the objective ``L(w) + a (L(w + e) - L(w))`` with
    ``a = gamma / (1 - gamma)``. Decoupled (the official code's default): a base step with ``g``,
    then ``w -= lr a (gs - g)``; otherwise a base step with ``a gs + (1 - a) g``. Two passes per step.
    """

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, *, gamma: float = 0.9,
                 decouple: bool = True, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho, wsam_gamma=gamma, wsam_decouple=decouple, **kwargs)
