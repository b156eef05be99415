"""Rho schedules."""

from __future__ import annotations

import math
from typing import Any

import torch


def _finite(name: str, value: Any, *, allow_none: bool = False, positive: bool = False) -> float | None:
    """``value`` as a float, or a ValueError naming ``name`` (NaN, inf, negative, not a number)."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        want = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite float {want}{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


class ProportionalRho:
    """rho proportional to the learning rate, never above ``max_rho`` (GSAM / OBF recipes).

    Per param group, from its current ``lr``::

        rho = min_rho + (max_rho - min_rho) * (lr - min_lr) / (max_lr - min_lr),   clamped to [0, max_rho]

    Defaults, per group: ``max_rho`` is the group's rho when the schedule is built (kept in the
    group as ``"initial_rho"``, so a schedule rebuilt after loading a checkpoint gets the
    configured value back, as torch's schedulers do with ``"initial_lr"``); ``max_lr`` is the
    peak of the LR schedule: ``"max_lr"`` when the group has it (OneCycleLR), else
    ``"initial_lr"`` (set by every torch LR scheduler to the undecayed lr, so a warmup that has
    already lowered ``lr`` is no problem), else ``lr``. Groups created with ``rho = 0`` (LSAM:
    not perturbed) stay at 0. A scheduler that raises lr above ``max_lr`` (CyclicLR, a warmup
    factor above 1) leaves rho at ``max_rho``; pass ``max_lr`` to follow it there. lr below
    ``min_lr`` gives rho below ``min_rho``, down to 0.

    Call :meth:`step` after the LR scheduler's ``step()``. It never writes a NaN, infinite or
    negative rho: a NaN lr raises ValueError.

    ::

        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        rho_sched = fastsam.ProportionalRho(opt)       # rho follows lr down to 0
        for ...: ...; sched.step(); rho_sched.step()

    Args:
        optimizer: a :class:`fastsam.SAM` (its param groups carry ``rho``).
        max_rho: rho at ``max_lr`` (finite, >= 0), the same for every perturbed group; None: each
            group's own rho.
        min_rho: rho at ``min_lr`` (finite, >= 0, at most ``max_rho``).
        max_lr: lr at which rho reaches ``max_rho`` (finite, > ``min_lr``); None: see above.
        min_lr: lr at which rho is ``min_rho`` (finite, >= 0).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_rho: float | None = None, min_rho: float = 0.0,
                 max_lr: float | None = None, min_lr: float = 0.0) -> None:
        max_rho = _finite("max_rho", max_rho, allow_none=True)
        self.min_rho: float = _finite("min_rho", min_rho)  # type: ignore[assignment]
        max_lr = _finite("max_lr", max_lr, allow_none=True, positive=True)
        self.min_lr: float = _finite("min_lr", min_lr)  # type: ignore[assignment]
        self.optimizer = optimizer
        self._bounds: list[tuple[float, float]] = []
        for i, g in enumerate(optimizer.param_groups):
            if "rho" not in g:
                raise ValueError("optimizer must be a fastsam.SAM (its param groups carry 'rho')")
            g.setdefault("initial_rho", g["rho"])
            if max_lr is not None:
                hi_lr, src = max_lr, "max_lr"
            else:
                key = next(k for k in ("max_lr", "initial_lr", "lr") if k in g)
                hi_lr, src = float(g[key]), f"max_lr (param group {i}'s {key!r})"
            if not math.isfinite(hi_lr) or hi_lr <= self.min_lr:
                raise ValueError(f"{src} must be a finite float > min_lr, got max_lr={hi_lr!r}, min_lr={self.min_lr!r}")
            initial = float(g["initial_rho"])
            hi_rho = (initial if max_rho is None else max_rho) if initial > 0 else 0.0
            if not math.isfinite(hi_rho) or hi_rho < 0:
                raise ValueError(f"max_rho (param group {i}'s 'initial_rho') must be a finite float >= 0, "
                                 f"got {hi_rho!r}")
            if hi_rho > 0 and self.min_rho > hi_rho:
                raise ValueError(f"min_rho must be <= max_rho, got min_rho={self.min_rho!r} > max_rho={hi_rho!r}"
                                 f" (param group {i})")
            self._bounds.append((hi_lr, hi_rho))
        self.step()

    def _rho(self, lr: float, hi_lr: float, hi_rho: float) -> float:
        if hi_rho == 0.0 or hi_rho == self.min_rho:
            return hi_rho
        # frac above 1 only pushes rho past max_rho, which the clamp removes anyway; capping it
        # first keeps lr = inf from becoming inf * 0 = NaN
        frac = min((lr - self.min_lr) / (hi_lr - self.min_lr), 1.0)
        rho = self.min_rho + (hi_rho - self.min_rho) * frac
        return min(max(rho, 0.0), hi_rho)

    def step(self) -> list[float]:
        """Set every group's rho from its current lr; returns the new values."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self._bounds):
            raise ValueError(f"the optimizer has {len(groups)} param groups, this schedule was built for "
                             f"{len(self._bounds)}: build a new ProportionalRho after add_param_group")
        out = []
        for i, (g, (hi_lr, hi_rho)) in enumerate(zip(groups, self._bounds)):
            lr = float(g["lr"])
            if math.isnan(lr):
                raise ValueError(f"param group {i} has lr=nan: ProportionalRho cannot derive rho from it")
            rho = self._rho(lr, hi_lr, hi_rho)
            g["rho"] = rho
            out.append(rho)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"min_rho", "min_lr", "bounds": [(max_lr, max_rho) per group]}``."""
        return {"min_rho": self.min_rho, "min_lr": self.min_lr, "bounds": list(self._bounds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (validated like the constructor's arguments)."""
        min_rho: float = _finite("min_rho", state["min_rho"])  # type: ignore[assignment]
        min_lr: float = _finite("min_lr", state["min_lr"])  # type: ignore[assignment]
        bounds: list[tuple[float, float]] = []
        for b in state["bounds"]:
            hi_lr: float = _finite("max_lr", b[0], positive=True)  # type: ignore[assignment]
            hi_rho: float = _finite("max_rho", b[1])  # type: ignore[assignment]
            if hi_lr <= min_lr or (hi_rho > 0 and min_rho > hi_rho):
                raise ValueError(f"state: bounds (max_lr={hi_lr!r}, max_rho={hi_rho!r}) do not fit min_lr={min_lr!r}, "
                                 f"min_rho={min_rho!r}")
            bounds.append((hi_lr, hi_rho))
        self.min_rho, self.min_lr, self._bounds = min_rho, min_lr, bounds
