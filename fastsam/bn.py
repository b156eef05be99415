"""BatchNorm running statistics: update them in SAM's first pass only.

The second pass runs at the perturbed weights ``w + e``; letting it update the running
mean/var (and ``num_batches_tracked``) would count every batch twice and mix in statistics of
weights the model never takes. These helpers turn tracking off for that pass: in training mode
with ``track_running_stats = False`` a BatchNorm layer normalizes with the batch statistics
(exactly as before) and updates no buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_FLAG = "_fastsam_saved_track_running_stats"


def disable_running_stats(model: nn.Module) -> None:
    """Stop every BatchNorm layer of ``model`` from updating its running statistics."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not hasattr(m, _FLAG):
            setattr(m, _FLAG, m.track_running_stats)
            m.track_running_stats = False


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats` (restores each layer's own setting)."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and hasattr(m, _FLAG):
            m.track_running_stats = getattr(m, _FLAG)
            delattr(m, _FLAG)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """``with frozen_running_stats(model): <second pass>``; restores on exit, even on error."""
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)
