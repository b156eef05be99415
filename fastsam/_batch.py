"""Batches as :func:`fastsam.sam_step` receives them: tensors, tuples, dicts, model outputs.

A batch's inputs and targets may be a tensor or a (nested) tuple / list / dict of tensors with
the batch in dim 0. Micro-batches and ESAM's data selection take rows of the *per-example*
tensors only: the ones whose first dimension is the batch size, decided once on the whole batch
(a 0-dim tensor or a broadcast ``[1, T]`` mask passes whole).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from .integrations._wrappers import model_output_logits


def batch_size(targets: Any) -> int:
    if isinstance(targets, Tensor):
        if targets.dim() == 0:
            raise ValueError("targets must have the batch in dim 0, got a 0-dim tensor")
        return int(targets.shape[0])
    if isinstance(targets, (list, tuple)) and targets:
        return batch_size(targets[0])
    if isinstance(targets, dict) and targets:
        return batch_size(next(iter(targets.values())))
    raise ValueError(f"targets must be a tensor (or a tuple/list/dict of tensors) with the batch in dim 0, got "
                     f"{type(targets).__name__}")


def split_spec(x: Any, batch: int) -> Any:
    """Which tensors of the batch's inputs/targets are per-example (first dimension = batch size):
    True/False per tensor, in the same tuple/list/dict structure."""
    if isinstance(x, Tensor):
        return x.dim() > 0 and x.shape[0] == batch
    if isinstance(x, (list, tuple)):
        return [split_spec(v, batch) for v in x]
    if isinstance(x, dict):
        return {k: split_spec(v, batch) for k, v in x.items()}
    return False


def take(x: Any, idx: slice | Tensor, spec: Any) -> Any:
    """Rows ``idx`` of the per-example tensors of ``spec``; anything else (a 0-dim tensor, a
    broadcast ``[1, T]`` mask, non-tensors) passes unchanged."""
    if isinstance(x, Tensor):
        return x[idx] if spec else x
    if isinstance(x, (list, tuple)):
        items = [take(v, idx, s) for v, s in zip(x, spec)]
        return type(x)(*items) if hasattr(type(x), "_fields") else type(x)(items)
    if isinstance(x, dict):
        return {k: take(v, idx, spec[k]) for k, v in x.items()}
    return x


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` (``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict); a
    Hugging Face ``ModelOutput`` with ``logits`` is returned as its logits (what the loss takes)."""
    if isinstance(inputs, dict):
        out = model(**inputs)
    elif isinstance(inputs, (list, tuple)):
        out = model(*inputs)
    else:
        out = model(inputs)
    return model_output_logits(out)


def detach(x: Any) -> Any:
    """Tensors detached, also inside tuples/lists/dicts (the container type kept when it can be
    rebuilt from its items, e.g. a Hugging Face ``ModelOutput``; else a plain dict/list)."""
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        items = [detach(v) for v in x]
        if hasattr(type(x), "_fields"):  # a namedtuple: positional fields
            return type(x)(*items)
        try:
            return type(x)(items)
        except TypeError:
            return items
    if isinstance(x, dict):
        items = {k: detach(v) for k, v in x.items()}
        try:
            return type(x)(**items) if type(x) is not dict else items
        except TypeError:
            return items
    return x


def cat(outs: list[Any]) -> Any:
    """The micro-batches' outputs as one: concatenated tensors, else the list."""
    if not outs:
        return None
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], Tensor):
        return torch.cat(outs)
    return outs


def autocast(dtype: torch.dtype | None, inputs: Any) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on the inputs' device type with ``dtype``; nothing when None."""
    if dtype is None:
        return contextlib.nullcontext()
    dev = "cpu"
    for t in (inputs if isinstance(inputs, (list, tuple)) else [inputs]):
        if isinstance(t, Tensor):
            dev = t.device.type
            break
    return torch.autocast(device_type=dev, dtype=dtype)
