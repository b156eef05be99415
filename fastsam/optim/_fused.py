"""Fused second step: restore ``w_old`` + GSAM combine + base optimizer update in one pass.

``fused_second_step(opt, params)`` is called by :meth:`fastsam.SAM.second_step` (and with
``params = []``, nothing to restore, by :meth:`fastsam.SAM.base_step`: the fused update alone,
e.g. after m-SAM micro-batches). It returns
True when it did the whole second step itself (restore, GSAM if enabled, and an update that
leaves the base optimizer's state exactly where torch keeps it), and False when the caller must
do it the plain way (restore, GSAM, ``base_optimizer.step()``).

Fused when all of these hold:

- the resolved backend has fused updates (``FUSED_UPDATES``: triton);
- the base optimizer is exactly ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (subclasses may
  override ``step``), with no step hooks, no ``step`` replaced on the instance (an LR
  scheduler's counting wrapper excepted), no ``grad_scale``/``found_inf`` (fused AMP) set;
- every group with parameters to update has float ``lr``/``weight_decay``/betas (no tensor
  hyperparameters), ``differentiable=False``, ``fused`` off, Adam ``capturable=False``, and
  the boolean options (nesterov, maximize, amsgrad, decoupled weight decay) agree across groups;
- parameters are real floating point of a dtype the backend supports, gradients dense, and the
  existing state tensors match their parameter (shape, dtype, device; Adam's ``step`` a CPU
  tensor, as torch keeps it when not capturable).

State is created exactly as torch creates it: SGD ``momentum_buffer`` from the first ``d_p``
(only when momentum != 0, as torch >= 2.2; older layouts are probed once), Adam ``step`` a 0-dim
CPU float tensor (``_get_scalar_dtype()``), ``exp_avg``/``exp_avg_sq`` (+ ``max_exp_avg_sq``)
zeros like the parameter. ``base_optimizer.state_dict()`` stays loadable by plain torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import functional as F

if TYPE_CHECKING:
    from .sam import SAM, _Txn

_SGD_BUFFER_WITHOUT_MOMENTUM: bool | None = None


def _sgd_stores_none_buffers() -> bool:
    """Whether this torch's SGD stores ``momentum_buffer = None`` for momentum == 0 (torch < 2.2
    did; 2.13 stores nothing). Probed once on a 1-element CPU tensor."""
    global _SGD_BUFFER_WITHOUT_MOMENTUM
    if _SGD_BUFFER_WITHOUT_MOMENTUM is None:
        p = torch.zeros(1, requires_grad=True)
        p.grad = torch.ones(1)
        o = torch.optim.SGD([p], lr=0.1)
        o.step()
        _SGD_BUFFER_WITHOUT_MOMENTUM = "momentum_buffer" in o.state.get(p, {})
    return _SGD_BUFFER_WITHOUT_MOMENTUM


def _adam_step_tensor() -> Tensor:
    """Adam's fresh ``state["step"]`` (non-capturable, non-fused): a 0-dim CPU float tensor."""
    try:
        from torch.optim.optimizer import _get_scalar_dtype

        dtype = _get_scalar_dtype()
    except Exception:  # pragma: no cover - older layouts
        dtype = torch.float32
    return torch.tensor(0.0, dtype=dtype)


def _has_hooks(base: torch.optim.Optimizer) -> bool:
    from torch.optim import optimizer as _o

    local = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
    glob = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
    return any(len(getattr(base, n, None) or {}) for n in local) or any(len(getattr(_o, n, None) or {}) for n in glob)


def _is_float(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _uniform(groups: list[dict[str, Any]], key: str, default: Any = False) -> tuple[bool, Any]:
    vals = {bool(g.get(key, default)) for g in groups}
    return len(vals) <= 1, (vals.pop() if vals else default)


def _check_finite_hyper(g: dict[str, Any], gi: int, keys: tuple[str, ...]) -> None:
    """The fused update reads these as numbers: a NaN / inf one (a scheduler's output, user code)
    would turn every weight of the group into NaN; refuse before anything is written."""
    for k in keys:
        v = g.get(k)
        vals = v if isinstance(v, (tuple, list)) else (v,)
        for x in vals:
            if x is not None and _is_float(x) and not math.isfinite(x):
                raise ValueError(f"param group {gi}: {k} must be finite, got {v!r}")


def fused_second_step(opt: SAM, params: list[Tensor], txn: _Txn | None = None) -> bool:
    base = opt.base_optimizer
    kind = type(base)
    if kind is not torch.optim.SGD and kind is not torch.optim.Adam and kind is not torch.optim.AdamW:
        return False
    if _has_hooks(base) or getattr(base, "grad_scale", None) is not None:
        return False  # hooks must run around base.step(); grad_scale: torch's fused-AMP protocol
    own_step = vars(base).get("step")
    if own_step is not None and not (getattr(own_step, "_wrapped_by_lr_sched", False)
                                     or getattr(own_step, "_with_counter", False)):
        return False  # the user replaced this instance's step(): it must run (LR-scheduler wrappers only count)
    if getattr(base, "found_inf", None) is not None:
        return False
    perturbed = {id(w) for w in params}
    # every tensor to restore (in P) or to update (has a gradient), in group order; one pass, the
    # cheap per-tensor checks only (the backend validates dtype, device and sizes of every list)
    ws: list[Tensor] = []
    grads: list[Tensor | None] = []
    owner: list[dict[str, Any]] = []
    groups: dict[int, dict[str, Any]] = {}
    strided = torch.strided
    for g in base.param_groups:
        for w in g["params"]:
            gr = w.grad
            if gr is None:
                if id(w) not in perturbed:
                    continue
            else:
                if gr.layout is not strided:
                    return False  # sparse gradients: torch's own step reports them
                groups[id(g)] = g
            ws.append(w)
            grads.append(gr)
            owner.append(g)
    if not ws:
        return False
    try:
        mod = F.backend_module(opt.backend, ws[0].device)
    except ValueError:
        return False  # the plain path reports the problem
    if not getattr(mod, "FUSED_UPDATES", False):
        return False
    supported = getattr(mod, "SUPPORTED_DTYPES", ())
    if any(w.dtype not in supported for w in ws):
        return False  # complex or integer parameters, ...
    glist = list(groups.values())
    for g in glist:
        if g.get("differentiable", False) or g.get("fused", False):
            return False
        if not _is_float(g["lr"]) or not _is_float(g.get("weight_decay", 0.0)):
            return False
    for gi, g in enumerate(base.param_groups):
        if id(g) in groups:
            _check_finite_hyper(g, gi, ("lr", "weight_decay", "momentum", "dampening", "betas", "eps"))
    w_old = [opt._scratch[w]["w_old"] if id(w) in perturbed else None for w in ws]
    g_old = None
    if opt.gsam_alpha > 0:
        g_old = [opt._scratch[w]["g_old"] if id(w) in perturbed else None for w in ws]
    if kind is torch.optim.SGD:
        return _fused_sgd(opt, base, ws, grads, owner, glist, w_old, g_old, txn)
    return _fused_adam(opt, base, ws, grads, owner, glist, w_old, g_old, adamw=kind is torch.optim.AdamW, txn=txn)


def _per_tensor(owner: list[dict[str, Any]], grads: list[Tensor | None], get: Any) -> list[float]:
    """Per-tensor value of a group option (0 for restore-only tensors: their groups are unchecked)."""
    vals: dict[int, float] = {}
    out = []
    for g, gr in zip(owner, grads):
        if gr is None:
            out.append(0.0)
            continue
        v = vals.get(id(g))
        if v is None:
            v = vals[id(g)] = float(get(g))
        out.append(v)
    return out


def _fused_sgd(opt: SAM, base: torch.optim.Optimizer, ws, grads, owner, glist, w_old, g_old,
               txn: _Txn | None = None) -> bool:
    ok_n, nesterov = _uniform(glist, "nesterov")
    ok_m, maximize = _uniform(glist, "maximize")
    if not (ok_n and ok_m):
        return False
    for g in glist:
        if not all(_is_float(g.get(k, 0.0)) for k in ("momentum", "dampening")):
            return False
    state = base.state
    bufs: list[Tensor | None] = []
    for w, gr, g in zip(ws, grads, owner):
        st = state.get(w) if gr is not None and g["momentum"] != 0 else None
        bufs.append(None if st is None else st.get("momentum_buffer"))
    fresh = [i for i, (b, gr, g) in enumerate(zip(bufs, grads, owner))
             if b is None and gr is not None and g["momentum"] != 0]
    F.sam_restore_sgd_(
        ws, grads, w_old, g_old, bufs,
        lr=_per_tensor(owner, grads, lambda g: g["lr"]),
        weight_decay=_per_tensor(owner, grads, lambda g: g.get("weight_decay", 0.0)),
        momentum=_per_tensor(owner, grads, lambda g: g.get("momentum", 0.0)),
        dampening=_per_tensor(owner, grads, lambda g: g.get("dampening", 0.0)),
        nesterov=nesterov, maximize=maximize, gsam_alpha=opt.gsam_alpha, backend=opt.backend,
    )
    for i in fresh:  # created by the op from the first d_p, as torch creates them
        state[ws[i]]["momentum_buffer"] = bufs[i]
        if txn is not None:
            txn.created.append(ws[i])
    if any(g.get("momentum", 0.0) == 0 for g in glist) and _sgd_stores_none_buffers():
        for w, gr, g in zip(ws, grads, owner):
            if gr is not None and g["momentum"] == 0:
                state[w]["momentum_buffer"] = None
    base._opt_called = True  # type: ignore[attr-defined]  # what an LR scheduler's step wrapper records
    return True


def _fused_adam(opt: SAM, base: torch.optim.Optimizer, ws, grads, owner, glist, w_old, g_old, *,
                adamw: bool, txn: _Txn | None = None) -> bool:
    ok_a, amsgrad = _uniform(glist, "amsgrad")
    ok_m, maximize = _uniform(glist, "maximize")
    ok_d, decoupled = _uniform(glist, "decoupled_weight_decay", adamw)
    if not (ok_a and ok_m and ok_d):
        return False
    if adamw:
        decoupled = True  # torch < 2.5 AdamW has no such group key: it is always decoupled
    for g in glist:
        if g.get("capturable", False):
            return False
        b1, b2 = g["betas"]
        if not (_is_float(b1) and _is_float(b2) and _is_float(g["eps"])):
            return False
    keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    state = base.state
    # check every existing state before creating any (the op checks the tensors' sizes/dtypes)
    for w, gr in zip(ws, grads):
        if gr is None:
            continue
        st = state.get(w)
        if st:
            if any(k not in st for k in keys):
                return False  # e.g. amsgrad switched on mid-training: torch's step reports it
            step = st["step"]
            if not isinstance(step, Tensor) or step.device.type != "cpu":
                return False  # a device-side step (capturable layout)
    m: list[Tensor | None] = []
    v: list[Tensor | None] = []
    vmax: list[Tensor | None] = []
    steps: list[Tensor | None] = []
    new_state: list[tuple[Tensor, dict[str, Tensor]]] = []  # created as torch would; stored once the op ran
    for w, gr in zip(ws, grads):
        if gr is None:
            m.append(None)
            v.append(None)
            vmax.append(None)
            steps.append(None)
            continue
        st = state.get(w)
        if not st:
            st = {"step": _adam_step_tensor(), "exp_avg": torch.zeros_like(w, memory_format=torch.preserve_format),
                  "exp_avg_sq": torch.zeros_like(w, memory_format=torch.preserve_format)}
            if amsgrad:
                st["max_exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            new_state.append((w, st))
        m.append(st["exp_avg"])
        v.append(st["exp_avg_sq"])
        vmax.append(st["max_exp_avg_sq"] if amsgrad else None)
        steps.append(st["step"])
    F.sam_restore_adam_(
        ws, grads, w_old, g_old, m, v, vmax if amsgrad else None, steps,
        lr=_per_tensor(owner, grads, lambda g: g["lr"]),
        beta1=_per_tensor(owner, grads, lambda g: g["betas"][0]),
        beta2=_per_tensor(owner, grads, lambda g: g["betas"][1]),
        eps=_per_tensor(owner, grads, lambda g: g["eps"]),
        weight_decay=_per_tensor(owner, grads, lambda g: g.get("weight_decay", 0.0)),
        amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled,
        gsam_alpha=opt.gsam_alpha, backend=opt.backend,
    )
    for w, st in new_state:
        state[w] = st
        if txn is not None:
            txn.created.append(w)
    base._opt_called = True  # type: ignore[attr-defined]
    return True
