"""One dispatcher per fused SAM op; every backend implements the same signature.

Backends are modules exposing ``sam_perturb_``, ``gsam_combine_`` and ``sam_restore_`` with the
signatures of :mod:`fastsam.reference` (the definition of correct). ``resolve_backend`` turns a
user's ``backend=`` choice into the name of an available implementation; an explicitly requested
backend that is not available is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "cuda", "cpp", "foreach", "reference")

# backend name -> module implementing it; None: not implemented in this version of fastsam.
_MODULES: dict[str, str | None] = {
    "reference": "fastsam.reference",
    "foreach": "fastsam.kernels.foreach_sam",
    "triton": None,
    "cuda": None,
    "cpp": None,
}


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` in this installation."""
    return [name for name, mod in _MODULES.items() if mod is not None]


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """Concrete backend for a user's choice.

    ``"auto"``: triton for CUDA tensors (else the CUDA extension, else foreach), the C++
    extension for CPU tensors when built (else foreach). Only foreach and reference exist in
    this version, so ``"auto"`` is foreach.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "foreach"
    if _MODULES[backend] is None:
        raise ValueError(
            f"backend={backend!r} is not available in this installation "
            f"(available: {available_backends(device)}); use backend='auto' to pick the fastest one"
        )
    return backend


def _impl(backend: str) -> ModuleType:
    mod = _MODULES.get(backend)
    if mod is None:
        raise ValueError(f"backend must be one of {available_backends()}, got {backend!r}")
    return importlib.import_module(mod)


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
    backend: str = "auto",
) -> Tensor:
    """SAM first step (direction, dual norm, ESAM mask, ``w_old``, ``w += e``); see
    :func:`fastsam.reference.sam_perturb_` for the formulas. Returns the 0-dim bool tensor
    "N was finite" without synchronizing."""
    dev = params[0].device if params else None
    return _impl(resolve_backend(backend, dev)).sam_perturb_(
        params, grads, w_old, ema, ema_ready, g_old, rhos, etas, adaptive, offsets,
        p=p, fsam_sigma=fsam_sigma, fsam_lambda=fsam_lambda, swp_keep=swp_keep, seed=seed, step=step,
    )


def gsam_combine_(grads: list[Tensor], g_old: list[Tensor], alpha: float, *, backend: str = "auto") -> None:
    """GSAM: ``gs <- gs - alpha * (g_old - cos * |g_old| * gs / |gs|)``; see
    :func:`fastsam.reference.gsam_combine_`."""
    dev = grads[0].device if grads else None
    _impl(resolve_backend(backend, dev)).gsam_combine_(grads, g_old, alpha)


def sam_restore_(params: list[Tensor], w_old: list[Tensor], *, backend: str = "auto") -> None:
    """``w <- w_old`` exactly."""
    dev = params[0].device if params else None
    _impl(resolve_backend(backend, dev)).sam_restore_(params, w_old)
