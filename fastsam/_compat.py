"""Small shims that keep fastsam working across the supported torch range (>= 2.4).

Nothing here changes numbers; each shim only smooths an API difference between torch versions.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable

import torch


def _normalize(annotation: typing.Any) -> typing.Any:
    """``list[X]`` -> ``typing.List[X]``, ``X | None`` -> ``typing.Optional[X]`` (recursively).

    torch 2.4's ``infer_schema`` looks annotations up in a table keyed by the ``typing`` spellings;
    newer releases accept both. ``tuple[...]`` (return types) is understood by every release.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list:
        return typing.List[_normalize(args[0])]  # noqa: UP006 - the spelling torch 2.4 knows
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return typing.Optional[_normalize(rest[0])]  # noqa: UP045 - the spelling torch 2.4 knows
    return annotation


def custom_op(name: str, *, mutates_args: Iterable[str]) -> Callable[[Callable], typing.Any]:
    """``torch.library.custom_op`` that also works on torch 2.4.

    torch 2.4 infers the schema from ``inspect.signature`` and neither evaluates string
    annotations (``from __future__ import annotations``) nor knows the builtin generics
    (``list[Tensor]``): it raises ``ValueError: unsupported type``. The annotations are resolved
    here and given to torch through ``__signature__``; the schema torch infers is the same on every
    release (checked by tests/test_compat.py against the schemas torch >= 2.5 infers itself).
    """

    def wrap(fn: Callable) -> typing.Any:
        hints = typing.get_type_hints(fn)
        sig = inspect.signature(fn)
        params = [p.replace(annotation=_normalize(hints[p.name])) for p in sig.parameters.values()]
        ret = hints.get("return", inspect.Signature.empty)
        ret = None if ret is type(None) else _normalize(ret)  # "-> None": torch expects None itself
        fn.__signature__ = sig.replace(parameters=params, return_annotation=ret)  # type: ignore[attr-defined]
        return torch.library.custom_op(name, mutates_args=tuple(mutates_args))(fn)

    return wrap


TORCH_VERSION: tuple[int, int] = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])  # type: ignore[assignment]

# torch 2.4's auto_functionalize handles custom ops that mutate ``Tensor`` / ``Tensor?`` arguments
# only; the triton ops mutate ``Tensor[]`` lists (supported from 2.5). On 2.4 such an op inside a
# compiled graph fails ("custom operator whose output has alias annotations").
CUSTOM_OP_LISTS_TRACEABLE = TORCH_VERSION >= (2, 5)


def eager_under_compile_on_old_torch(fn: Callable) -> Callable:
    """On torch < 2.5, run ``fn`` eagerly when ``torch.compile`` meets it (a graph break, same
    numbers); on newer torch return ``fn`` unchanged (its custom ops go into the graph)."""
    if CUSTOM_OP_LISTS_TRACEABLE:
        return fn
    return torch.compiler.disable(fn)


def may_be_traced(probe: torch.Tensor) -> bool:
    """True when something may trace a call on ``probe``: torch.compile, a dispatch mode
    (FakeTensorMode, opcheck, ...) or a tensor subclass. The fused ops take their custom-op form
    then, and call their kernels directly otherwise (the custom-op dispatcher costs host time)."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or type(probe) not in (torch.Tensor, torch.nn.Parameter))


def no_grad(fn: Callable) -> Callable:
    """``@torch.no_grad()`` that costs one check when gradients are already off (a SAM step's
    inner calls: the context manager itself costs ~1.3 us a call, a few per step)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_grad_enabled():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def check_not_capturing(device: torch.device | None) -> None:
    """Refuse to run inside CUDA graph capture, with the reason (an error at capture, instead of a
    graph that replays stale values).

    A SAM step is not capturable: it reads host-side state every step (Adam's step counters live
    on the CPU, as torch keeps them when ``capturable=False``), and its launchers upload a table
    when a value changes (hyper-parameters, gradient addresses), which a replay would skip."""
    if device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fastsam's SAM ops cannot be captured in a CUDA graph: a step reads host-side state (Adam's step "
            "counters, on the CPU as torch keeps them) and uploads its launch tables when a value changes, which "
            "a replay would not redo. Capture the forward and backward passes only, and call first_step() / "
            "second_step() (or fastsam.sam_step) outside the graph"
        )
