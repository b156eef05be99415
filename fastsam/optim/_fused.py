"""Fused second step: restore ``w_old`` + GSAM combine + base optimizer update in one pass.

``fused_second_step(opt, params)`` is called by :meth:`fastsam.SAM.second_step`. It returns
True when it did the whole second step itself (restore, GSAM if enabled, and an update that
leaves the base optimizer's state exactly where torch keeps it), and False when the caller must
do it the plain way (restore, GSAM, ``base_optimizer.step()``): unsupported base optimizer or
options, or a backend without fused updates.

This version has no fused backend yet: it always returns False.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .sam import SAM


def fused_second_step(opt: SAM, params: list[Tensor]) -> bool:
    return False
