"""Rho schedules."""

from __future__ import annotations

from typing import Any

import torch


class ProportionalRho:
    """rho proportional to the learning rate, clamped at 0 (GSAM / OBF recipes).

    Per param group: ``rho = min_rho + (max_rho - min_rho) * (lr - min_lr) / (max_lr - min_lr)``,
    then ``max(rho, 0)``. ``max_lr`` and ``max_rho`` default to each group's ``initial_lr`` (set
    by torch's LR schedulers; else ``lr``) and ``rho`` at construction; groups created with
    ``rho = 0`` (LSAM: not perturbed) stay at 0.
    Call :meth:`step` after the LR scheduler's ``step()``.

    ::

        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        rho_sched = fastsam.ProportionalRho(opt)       # rho follows lr down to 0
        for ...: ...; sched.step(); rho_sched.step()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_rho: float | None = None, min_rho: float = 0.0,
                 max_lr: float | None = None, min_lr: float = 0.0) -> None:
        if max_rho is not None and max_rho < 0:
            raise ValueError(f"max_rho must be >= 0, got {max_rho!r}")
        if min_rho < 0:
            raise ValueError(f"min_rho must be >= 0, got {min_rho!r}")
        self.optimizer = optimizer
        self.min_rho, self.min_lr = float(min_rho), float(min_lr)
        self._bounds: list[tuple[float, float]] = []
        for g in optimizer.param_groups:
            if "rho" not in g:
                raise ValueError("optimizer must be a fastsam.SAM (its param groups carry 'rho')")
            # torch's LR schedulers record the undecayed lr as "initial_lr": a scheduler with
            # warmup has already lowered "lr" by the time this is built
            hi_lr = float(g.get("initial_lr", g["lr"]) if max_lr is None else max_lr)
            if hi_lr <= self.min_lr:
                raise ValueError(f"max_lr must be > min_lr, got max_lr={hi_lr!r}, min_lr={self.min_lr!r}")
            hi_rho = float(g["rho"] if max_rho is None else max_rho) if g["rho"] > 0 else 0.0
            self._bounds.append((hi_lr, hi_rho))
        self.step()

    def step(self) -> list[float]:
        """Set every group's rho from its current lr; returns the new values."""
        out = []
        for g, (hi_lr, hi_rho) in zip(self.optimizer.param_groups, self._bounds):
            if hi_rho == 0.0:
                rho = 0.0
            else:
                frac = (float(g["lr"]) - self.min_lr) / (hi_lr - self.min_lr)
                rho = max(self.min_rho + (hi_rho - self.min_rho) * frac, 0.0)
            g["rho"] = rho
            out.append(rho)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"min_rho": self.min_rho, "min_lr": self.min_lr, "bounds": list(self._bounds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.min_rho, self.min_lr = state["min_rho"], state["min_lr"]
        self._bounds = [tuple(b) for b in state["bounds"]]
