"""``torch.amp.GradScaler`` across SAM's several backward passes per update.

The scaler allows one ``unscale_`` per optimizer (keyed by ``id``) per ``update()``; SAM unscales
after every pass (two per micro-batch, more with micro-batches and accumulation), so each pass
unscales under its own stand-in key. GradScaler keeps the overflow flags of each ``unscale_``
call in ``_per_optimizer_states[id(key)]["found_inf_per_device"]`` (stable since torch 1.6) and
``update()`` reads all of them, which is how an overflow in any pass reduces the scale.

A call of :func:`fastsam.sam_step` unscales under keys of its own; when it ends without an
update (``update=False``) its overflow flags are merged into one key per accumulation that
waits for the updating call, so nothing grows with the number of accumulated batches; when it
fails, its keys are dropped (an earlier call's flags stay).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ScalerKey:
    """Stands in for the optimizer in ``GradScaler.unscale_`` (same param groups)."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self.param_groups = param_groups


def unscale(scaler: torch.amp.GradScaler, param_groups: list[dict[str, Any]]) -> ScalerKey | None:
    """``scaler.unscale_`` of the current gradients under a new key (None when disabled)."""
    if not scaler.is_enabled():
        return None
    key = ScalerKey(param_groups)
    scaler.unscale_(key)  # type: ignore[arg-type]
    return key


def _flags(scaler: torch.amp.GradScaler, key: ScalerKey) -> dict[torch.device, Tensor]:
    return scaler._per_optimizer_states.get(id(key), {}).get("found_inf_per_device", {})


def found_inf(scaler: torch.amp.GradScaler, keys: list[ScalerKey]) -> list[Tensor]:
    """The overflow flags (float tensors, > 0: overflow) of the given keys."""
    out: list[Tensor] = []
    for k in keys:
        out.extend(_flags(scaler, k).values())
    return out


def drop(scaler: torch.amp.GradScaler | None, keys: list[ScalerKey]) -> None:
    if scaler is not None:
        for k in keys:
            scaler._per_optimizer_states.pop(id(k), None)


def merge(scaler: torch.amp.GradScaler, keys: list[ScalerKey]) -> ScalerKey | None:
    """Fold the flags of ``keys`` into the first one (per device: the max) and drop the others."""
    if not keys:
        return None
    first = keys[0]
    acc = _flags(scaler, first)
    for k in keys[1:]:
        for dev, f in _flags(scaler, k).items():
            acc[dev] = torch.maximum(acc[dev], f) if dev in acc else f
    drop(scaler, keys[1:])
    return first
