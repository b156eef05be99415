"""Argument checks shared by the optimizer, the training step and the schedulers.

Every check raises a ``ValueError`` that names the argument, says what is allowed and shows what
was given, before anything is changed. Hyperparameters must be plain Python (or numpy) numbers:
a tensor, a string or ``None`` where a number is expected is an error, not a silent conversion
(a tensor ``swp_keep`` would otherwise reach the kernels as a tensor; ``'0.5'`` would compare as
a string).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

SUPPORTED_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def is_number(v: Any) -> bool:
    """A real number that is not a bool (Python or numpy scalar; not a tensor)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not isinstance(v, Tensor)


def check_real(name: str, v: Any, *, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
               hi_open: bool = False, allow_inf: bool = False, what: str = "") -> float:
    """``v`` as a float if it is a real number in the interval, else a ValueError naming ``name``."""
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    rng = f"{lb}{lo:g}, {hi:g}{rb}" if (math.isfinite(lo) or math.isfinite(hi)) else "a finite number"
    desc = f"a {'finite ' if not allow_inf else ''}float in {rng}" + (f" ({what})" if what else "")
    if not is_number(v):
        raise ValueError(f"{name} must be {desc}, got {v!r} of type {type(v).__name__}")
    x = float(v)
    if math.isnan(x) or (not allow_inf and math.isinf(x)):
        raise ValueError(f"{name} must be {desc}, got {v!r}")
    if x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi):
        raise ValueError(f"{name} must be {desc}, got {v!r}")
    return x


def check_bool(name: str, v: Any, what: str = "") -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False{' (' + what + ')' if what else ''}, got {v!r}")
    return v


def check_int(name: str, v: Any, *, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
    """``v`` if it is an int (not a bool) within [lo, hi], else a ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or isinstance(v, Tensor):
        bounds = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
        raise ValueError(f"{name} must be an int{bounds}{' (' + what + ')' if what else ''}, got {v!r}")
    x = int(v)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        if lo is not None and hi is not None:
            bounds = f"in [{lo}, {hi}]"
        else:
            bounds = f">= {lo}" if lo is not None else f"<= {hi}"
        raise ValueError(f"{name} must be an int {bounds}{' (' + what + ')' if what else ''}, got {v!r}")
    return x


def check_param_tensor(p: Any, where: str) -> None:
    """A parameter fastsam can perturb: a real floating-point tensor with storage (not meta)."""
    if not isinstance(p, Tensor):
        raise ValueError(f"{where}: parameters must be tensors, got {type(p).__name__}")
    if p.dtype not in SUPPORTED_PARAM_DTYPES:
        raise ValueError(
            f"{where}: parameters must be float32, float64, bfloat16 or float16 tensors (SAM perturbs real "
            f"floating-point weights), got {p.dtype} with shape {tuple(p.shape)}"
        )
    if p.device.type == "meta":
        raise ValueError(f"{where}: a parameter is on the meta device (no storage to perturb); materialize the "
                         "model (e.g. model.to_empty(device=...)) before building the optimizer")
    if p.numel() > 1 and any(st == 0 and n > 1 for n, st in zip(p.shape, p.stride())):
        raise ValueError(f"{where}: a parameter of shape {tuple(p.shape)} has stride {tuple(p.stride())}: several of "
                         "its elements share one memory location (an expand()ed tensor), so it cannot be perturbed "
                         "element by element; make it a tensor of its own (.clone() or .contiguous())")


# Hyper-parameters of torch's optimizers that must be finite numbers when present: a NaN or inf
# one (a scheduler's output, user code, a checkpoint) turns every weight of the group into NaN.
FINITE_HYPER = ("lr", "weight_decay", "momentum", "dampening", "eps", "alpha", "lr_decay",
                "initial_accumulator_value", "rho")


def check_group_hyper(group: dict[str, Any], where: str, keys: tuple[str, ...] = FINITE_HYPER) -> None:
    """The base optimizer's numbers in a param group: finite where present (Python / numpy
    numbers, or tensors on the CPU; a CUDA tensor is not read: that would sync), ``betas`` a pair
    of them."""
    for k in (*keys, "betas"):
        if k not in group:
            continue
        v = group[k]
        vals = v if k == "betas" else (v,)
        if k == "betas" and (not isinstance(v, (tuple, list)) or len(v) != 2):
            raise ValueError(f"{where}: betas must be a pair of floats in [0, 1), got {v!r}")
        for x in vals:
            if isinstance(x, Tensor):
                if x.numel() != 1 or x.is_complex():
                    raise ValueError(f"{where}: {k} must be a real number or a one-element tensor, got a tensor of "
                                     f"shape {tuple(x.shape)} and dtype {x.dtype}")
                if x.device.type == "cpu" and not math.isfinite(float(x)):
                    raise ValueError(f"{where}: {k} must be finite, got {v!r}")
            elif not is_number(x) or not math.isfinite(float(x)):
                raise ValueError(f"{where}: {k} must be a finite number, got {v!r}"
                                 + ("" if is_number(x) else f" of type {type(x).__name__}"))


def overlapping_pair(params: list[Tensor]) -> tuple[int, int] | None:
    """Indices of two parameters whose memory overlaps (hand-made weight tying, views of one
    tensor), or None. Address ranges are conservative for strided views (first to last element)."""
    spans = []
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0 or p.device.type == "meta":
            continue
        last = sum((s - 1) * abs(st) for s, st in zip(p.shape, p.stride()))
        start = p.data_ptr()
        spans.append((p.device, start, start + (last + 1) * p.element_size(), i))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            return (min(a[3], b[3]), max(a[3], b[3]))
    return None
