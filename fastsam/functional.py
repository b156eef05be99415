"""One dispatcher per fused SAM op; every backend implements the same signature.

Backends are modules exposing ``sam_perturb_``, ``gsam_combine_``, ``sam_restore_`` and
``sam_restore_accumulate_`` (m-SAM micro-batches) with the signatures of :mod:`fastsam.reference`
(the definition of correct). Backends with ``FUSED_UPDATES = True`` (triton, cpp, cuda) also
implement the fused second step for torch's SGD and Adam/AdamW (``sam_restore_sgd_``,
``sam_restore_adam_``; the reference twins define them).
``resolve_backend`` turns a user's ``backend=`` choice into the name of an available
implementation; an explicitly requested backend that is not available is an error, never a
silent fallback.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch
from torch import Tensor

from ._compat import check_not_capturing
from ._sequences import PerGroup
from ._shard import Reduce
from .reference import check_mix

BACKENDS = ("auto", "triton", "cuda", "cpp", "foreach", "reference")

# backend name -> module implementing it; None: not implemented in this version of fastsam.
_MODULES: dict[str, str | None] = {
    "reference": "fastsam.reference",
    "foreach": "fastsam.kernels.foreach_sam",
    "triton": "fastsam.kernels.triton_sam",
    "cuda": "fastsam.kernels.cuda_sam",
    "cpp": "fastsam.kernels.cpp_sam",
}


def _ext_available(kind: str) -> bool:
    """The csrc extension of ``kind`` ("cpu" / "cuda") is usable: built (JIT on the first call
    of the process, then cached on disk) and not disabled by FASTSAM_DISABLE_EXT=1. A failed
    build warns once and returns False."""
    from .kernels import _ext

    return _ext.available(kind)


def _ext_runs_on(name: str, device: torch.device | str | None) -> bool:
    if name == "cpp":
        if device is not None and torch.device(device).type != "cpu":
            return False
        return _ext_available("cpu")
    if name == "cuda":
        if device is not None and torch.device(device).type != "cuda":
            return False
        return torch.cuda.is_available() and _ext_available("cuda")
    return True

_TRITON_OK: bool | None = None


def _triton_importable() -> bool:
    """True when triton imports (checked once; importing it costs about a second)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_OK = True
        except Exception:
            _TRITON_OK = False
    return _TRITON_OK


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_runs_on(device: torch.device | str | None) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors only under the interpreter."""
    if not _triton_importable():
        return False
    if device is None:
        return _interpreter_on() or torch.cuda.is_available()
    dev = torch.device(device)
    if dev.type == "cuda":
        # under the interpreter triton reads host memory: device addresses in our tables would crash
        return not _interpreter_on()
    return dev.type == "cpu" and _interpreter_on()


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (any device when None) here."""
    out = []
    for name, mod in _MODULES.items():
        if mod is None:
            continue
        if name == "triton" and not _triton_runs_on(device):
            continue
        if name in ("cpp", "cuda") and not _ext_runs_on(name, device):
            continue
        out.append(name)
    return out


_RESOLVED: dict[tuple, str] = {}  # (backend, device, TRITON_INTERPRET, FASTSAM_DISABLE_EXT) -> a resolved name


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """See :func:`_resolve_backend`; successful answers are remembered per (choice, device,
    environment) so that a step does not redo the checks (an error is never remembered)."""
    env = os.environ
    key = (backend, device, env.get("TRITON_INTERPRET"), env.get("FASTSAM_DISABLE_EXT"))
    name = _RESOLVED.get(key)
    if name is None:
        name = _resolve_backend(backend, device)
        if name != "foreach" or backend != "auto":  # auto may pick an extension once it is built
            _RESOLVED[key] = name
    return name


def _resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """Concrete backend for a user's choice.

    ``"auto"``: on CUDA tensors triton when it imports, else the csrc CUDA extension when it
    builds, else foreach; on CPU tensors the csrc C++ extension when it builds (JIT on first
    use, cached), else foreach (the Triton interpreter is a debugging tool, never picked
    automatically). An explicit
    choice that cannot run on ``device`` (e.g. ``"triton"`` on CPU tensors without
    ``TRITON_INTERPRET=1``) is a ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        dev_type = torch.device(device).type if device is not None else None
        if dev_type == "cuda":
            if _triton_runs_on(device):
                return "triton"
            if _ext_runs_on("cuda", device):
                return "cuda"
        elif dev_type == "cpu" and _ext_runs_on("cpp", device):
            return "cpp"
        return "foreach"
    if _MODULES[backend] is None:
        raise ValueError(
            f"backend={backend!r} is not available in this installation "
            f"(available: {available_backends(device)}); use backend='auto' to pick the fastest one"
        )
    if backend in ("cpp", "cuda") and not _ext_runs_on(backend, device):
        from .kernels import _ext

        kind = "cpu" if backend == "cpp" else "cuda"
        why = _ext.status(kind).reason if not _ext.disabled() else "FASTSAM_DISABLE_EXT=1 is set"
        if device is not None and (torch.device(device).type == "cpu") != (backend == "cpp"):
            why = f"backend={backend!r} runs on {'CPU' if backend == 'cpp' else 'CUDA'} tensors, not on {device}"
        raise ValueError(f"backend={backend!r} is not available here: {why}")
    if backend == "triton" and not _triton_runs_on(device):
        if not _triton_importable():
            why = "triton is not installed (pip install 'fastsam[triton]')"
        elif device is None or torch.device(device).type == "cpu":
            why = ("it runs on CUDA tensors; CPU tensors need the Triton interpreter (set "
                   "TRITON_INTERPRET=1 before triton is imported), or use backend='foreach' / 'auto' on CPU")
        elif torch.device(device).type == "cuda":
            why = "TRITON_INTERPRET=1 is set: the interpreter cannot run on CUDA tensors"
        else:
            why = f"it runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), not on {device}"
        raise ValueError(f"backend='triton' is not available here: {why}")
    return backend


def backend_module(backend: str, device: torch.device | str | None = None) -> ModuleType:
    """The module implementing ``resolve_backend(backend, device)``."""
    return _impl(resolve_backend(backend, device))


def supports_fused_updates(backend: str, device: torch.device | str | None = None) -> bool:
    """True if the resolved backend fuses restore + GSAM + the SGD/Adam/AdamW update."""
    return bool(getattr(backend_module(backend, device), "FUSED_UPDATES", False))


_LOADED: dict[str, ModuleType] = {}


def _impl(backend: str) -> ModuleType:
    """The backend's module. Imported modules are cached in a dict: a compiled training step
    (torch.compile) then traces a dict lookup instead of breaking the graph at import_module."""
    mod = _LOADED.get(backend)
    if mod is not None:
        return mod
    name = _MODULES.get(backend)
    if name is None:
        raise ValueError(f"backend must be one of {available_backends()}, got {backend!r}")
    mod = _LOADED[backend] = importlib.import_module(name)
    return mod


SHARDED_BACKENDS = ("triton", "cuda", "cpp", "foreach", "reference")  # ops that take reduce= (fastsam._shard)


def _sharded_impl(backend: str, dev: torch.device | None, reduce: object) -> ModuleType:
    """The module of ``backend`` for an op that may get a ``reduce`` hook (sharded parameters:
    their norms are global, see :mod:`fastsam._shard`). With a hook, ``"auto"`` keeps its choice
    when that backend supports sharding (``SHARDED``: every backend now) and otherwise picks
    foreach; an explicit backend without it is a NotImplementedError, never a silent fallback."""
    name = resolve_backend(backend, dev)
    mod = _impl(name)
    if reduce is None or getattr(mod, "SHARDED", False):
        return mod
    if backend == "auto":
        return _impl("foreach")
    raise NotImplementedError(
        f"backend={name!r} does not support sharded (DTensor / FSDP2) parameters yet: their norms are reduced "
        f"across ranks, which backends {SHARDED_BACKENDS} implement; use one of them (or 'auto', which picks "
        "one for sharded parameters)")


def _cols(mod: ModuleType, *cols: object) -> tuple:
    """Per-tensor hyper-parameter columns for ``mod``: a :class:`~fastsam._sequences.PerGroup`
    as it is for a backend that reads the group structure (``PER_GROUP = True``: triton), a list
    for the others."""
    if getattr(mod, "PER_GROUP", False):
        return cols
    return tuple(list(c) if isinstance(c, PerGroup) else c for c in cols)


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
    ema_out: list[Tensor] | None = None,
    ready_out: list[Tensor] | None = None,
    backend: str = "auto",
    reduce: Reduce | None = None,
) -> Tensor:
    """SAM first step (direction, dual norm, ESAM mask, ``w_old``, ``w += e``); see
    :func:`fastsam.reference.sam_perturb_` for the formulas. Returns the 0-dim bool tensor
    "N was finite" without synchronizing. F-SAM: the new EMA and flags go to ``ema_out`` /
    ``ready_out`` (default: ``ema`` / ``ema_ready``, in place). On an exception the parameters
    are unchanged (every backend).

    ``reduce`` (sharded parameters, :mod:`fastsam._shard`): the lists are this rank's local
    shards (``offsets``: their global element indices) and the norm is global through one call
    of the hook; backends foreach and reference (``"auto"`` picks foreach)."""
    dev = params[0].device if params else None
    check_not_capturing(dev)
    mod = _sharded_impl(backend, dev, reduce)
    rhos, etas, adaptive = _cols(mod, rhos, etas, adaptive)
    extra = {} if reduce is None else {"reduce": reduce}
    return mod.sam_perturb_(
        params, grads, w_old, ema, ema_ready, g_old, rhos, etas, adaptive, offsets,
        p=p, fsam_sigma=fsam_sigma, fsam_lambda=fsam_lambda, swp_keep=swp_keep, seed=seed, step=step,
        ema_out=ema_out, ready_out=ready_out, **extra,
    )


def gsam_combine_(grads: list[Tensor], g_old: list[Tensor], alpha: float, *, backend: str = "auto",
                  reduce: Reduce | None = None) -> None:
    """GSAM: ``gs <- gs - alpha * (g_old - cos * |g_old| * gs / |gs|)``; see
    :func:`fastsam.reference.gsam_combine_` (``reduce``: sharded lists, see :func:`sam_perturb_`)."""
    dev = grads[0].device if grads else None
    check_not_capturing(dev)
    extra = {} if reduce is None else {"reduce": reduce}
    _sharded_impl(backend, dev, reduce).gsam_combine_(grads, g_old, alpha, **extra)


def sam_restore_(params: list[Tensor], w_old: list[Tensor], *, backend: str = "auto") -> None:
    """``w <- w_old`` exactly."""
    dev = params[0].device if params else None
    check_not_capturing(dev)
    _impl(resolve_backend(backend, dev)).sam_restore_(params, w_old)


def sam_restore_accumulate_(
    params: list[Tensor],
    grads: list[Tensor | None],
    w_old: list[Tensor | None],
    g_old: list[Tensor | None] | None,
    acc: list[Tensor | None],
    reset: list[bool],
    *,
    weight: float,
    scale: float = 1.0,
    gsam_alpha: float = 0.0,
    acc_in: list[Tensor | None] | None = None,
    backend: str = "auto",
    reduce: Reduce | None = None,
) -> None:
    """m-SAM per micro-batch in one pass: ``w <- w_old``, GSAM combine (``grads`` only read),
    ``acc <- scale * ((0 if reset else acc_in) + weight * g)`` (``acc_in`` default ``acc``: in
    place); see :func:`fastsam.reference.sam_restore_accumulate_`. An exception changes nothing.
    ``reduce``: sharded lists, GSAM's sums global (see :func:`sam_perturb_`)."""
    dev = params[0].device if params else None
    check_not_capturing(dev)
    extra = {} if reduce is None or gsam_alpha <= 0 else {"reduce": reduce}
    _sharded_impl(backend, dev, extra.get("reduce")).sam_restore_accumulate_(
        params, grads, w_old, g_old, acc, reset, weight=weight, scale=scale, gsam_alpha=gsam_alpha, acc_in=acc_in,
        **extra,
    )


def _mix_kw(mix: Tensor | None, writeback: bool) -> dict[str, object]:
    """The ``mix`` keywords, only when a mix is given (a backend without them still takes the
    plain GSAM / no-combine calls)."""
    return {} if mix is None else {"mix": mix, "mix_writeback": bool(writeback)}


def _fused_impl(backend: str, dev: torch.device | None, op: str) -> ModuleType:
    mod = backend_module(backend, dev)
    if not hasattr(mod, op) or (mod.__name__ != "fastsam.reference" and not getattr(mod, "FUSED_UPDATES", False)):
        raise ValueError(
            f"backend={resolve_backend(backend, dev)!r} has no fused {op}: restore with sam_restore_, "
            "then run the base optimizer's step()"
        )
    return mod


def sam_restore_sgd_(
    params: list[Tensor],
    grads: list[Tensor | None],
    w_old: list[Tensor | None],
    g_old: list[Tensor | None] | None,
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | list[float],
    weight_decay: float | list[float] = 0.0,
    momentum: float | list[float] = 0.0,
    dampening: float | list[float] = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    gsam_alpha: float = 0.0,
    mix: Tensor | None = None,
    mix_writeback: bool = False,
    backend: str = "auto",
) -> None:
    """Fused second step with a ``torch.optim.SGD`` update: restore ``w_old``, GSAM combine,
    SGD step (weight decay, momentum, dampening, nesterov, maximize); see
    :func:`fastsam.reference.sam_restore_sgd_`. ``None`` momentum buffers are created and stored
    into ``momentum_buffers``. ``mix = (c1, c2)`` (a 2-element float64 tensor on the parameters'
    device, instead of GSAM): the update uses ``c1 * g + c2 * g_old`` (WSAM, LookSAM's reuse),
    written back into ``grads`` when ``mix_writeback``."""
    dev = params[0].device if params else None
    check_not_capturing(dev)
    check_mix(mix, gsam_alpha, g_old, dev)
    mod = _fused_impl(backend, dev, "sam_restore_sgd_")
    lr, weight_decay, momentum, dampening = _cols(mod, lr, weight_decay, momentum, dampening)
    mod.sam_restore_sgd_(
        params, grads, w_old, g_old, momentum_buffers, lr=lr, weight_decay=weight_decay, momentum=momentum,
        dampening=dampening, nesterov=nesterov, maximize=maximize, gsam_alpha=gsam_alpha,
        **_mix_kw(mix, mix_writeback),
    )


def sam_restore_adam_(
    params: list[Tensor],
    grads: list[Tensor | None],
    w_old: list[Tensor | None],
    g_old: list[Tensor | None] | None,
    exp_avgs: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    max_exp_avg_sqs: list[Tensor | None] | None,
    steps: list[Tensor | None],
    *,
    lr: float | list[float],
    beta1: float | list[float] = 0.9,
    beta2: float | list[float] = 0.999,
    eps: float | list[float] = 1e-8,
    weight_decay: float | list[float] = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    gsam_alpha: float = 0.0,
    mix: Tensor | None = None,
    mix_writeback: bool = False,
    backend: str = "auto",
) -> None:
    """Fused second step with a ``torch.optim.Adam`` / ``AdamW`` update (AdamW:
    ``decoupled_weight_decay=True``); see :func:`fastsam.reference.sam_restore_adam_`.
    ``mix`` / ``mix_writeback``: as in :func:`sam_restore_sgd_`."""
    dev = params[0].device if params else None
    check_not_capturing(dev)
    check_mix(mix, gsam_alpha, g_old, dev)
    mod = _fused_impl(backend, dev, "sam_restore_adam_")
    lr, beta1, beta2, eps, weight_decay = _cols(mod, lr, beta1, beta2, eps, weight_decay)
    mod.sam_restore_adam_(
        params, grads, w_old, g_old, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr, beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay, gsam_alpha=gsam_alpha, **_mix_kw(mix, mix_writeback),
    )
