"""Thin presets over :class:`fastsam.SAM`: each one only changes defaults."""

from __future__ import annotations

from typing import Any

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
