"""Lightning helpers. :func:`fastsam.sam_step` needs none of them: it accepts ``self.optimizers()``.

- :func:`is_second_pass`: in automatic optimization ``training_step`` runs twice per step (at
  ``w``, then at ``w + e``); this tells the calls apart, e.g. to log or update metrics once.
- :class:`ProportionalRhoCallback`: :class:`fastsam.ProportionalRho` stepped where Lightning has
  no hook of its own for it (after the LR scheduler, before the next step).

Importing this module imports Lightning (``lightning.pytorch``, else the older
``pytorch_lightning``) and fails with an ImportError that says ``pip install lightning`` when
neither is installed; ``import fastsam`` imports neither.
"""

from __future__ import annotations

from typing import Any

from ..optim.sam import SAM
from ..schedulers import ProportionalRho
from ._wrappers import require

try:
    import lightning.pytorch as pl
except ImportError:
    pl = require("pytorch_lightning", "lightning", "fastsam.integrations.lightning")

__all__ = ["ProportionalRhoCallback", "is_second_pass", "sam_optimizers"]


def sam_optimizers(trainer: Any) -> list[SAM]:
    """The :class:`fastsam.SAM` optimizers of a Lightning ``Trainer`` (unwrapped)."""
    out = []
    for opt in trainer.optimizers:
        opt = getattr(opt, "optimizer", opt)  # a LightningOptimizer
        if isinstance(opt, SAM):
            out.append(opt)
    return out


def is_second_pass(module: Any) -> bool:
    """True while a SAM optimizer of ``module``'s trainer is perturbed: in automatic
    optimization, inside the second ``training_step`` call of a step (the one at ``w + e``).

    ::

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self.net(batch[0]), batch[1])
            if not fastsam.integrations.lightning.is_second_pass(self):
                self.log("train_loss", loss)     # once per step, the loss at w
            return loss
    """
    return any(opt.is_perturbed for opt in sam_optimizers(module.trainer))


class ProportionalRhoCallback(pl.Callback):
    """Keeps rho proportional to the learning rate (:class:`fastsam.ProportionalRho`) for every
    SAM optimizer of the run.

    The schedule is built when training starts (after ``configure_optimizers`` and its LR
    schedulers, so ``initial_lr`` / OneCycleLR's ``max_lr`` are there), and stepped at the start of
    every batch: after the previous step's LR scheduler update, so each SAM step perturbs with the
    rho of the lr it updates with. ``kwargs`` go to :class:`fastsam.ProportionalRho`
    (``max_rho``, ``min_rho``, ``max_lr``, ``min_lr``). Nothing needs saving: the configured rho
    travels in the optimizer's param groups (``"initial_rho"``).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = kwargs
        self.schedules: list[ProportionalRho] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.schedules = [ProportionalRho(opt, **self.kwargs) for opt in sam_optimizers(trainer)]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        for schedule in self.schedules:
            schedule.step()
