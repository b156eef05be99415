"""Fused second step: restore ``w_old`` + GSAM combine + base optimizer update in one pass.

``fused_second_step(opt, layout, txn)`` is called by :meth:`fastsam.SAM.second_step` (``layout``:
the perturbed tensors and their saved ``w``) and, with ``layout`` None (nothing to restore), by
:meth:`fastsam.SAM.base_step`: the fused update alone, e.g. after m-SAM micro-batches. It returns
True when it did the whole second step itself (restore, GSAM if enabled, and an update that
leaves the base optimizer's state exactly where torch keeps it), and False when the caller must
do it the plain way (restore, GSAM, ``base_optimizer.step()``).

Fused when all of these hold:

- the resolved backend has fused updates (``FUSED_UPDATES``: triton, cpp, cuda);
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

Host cost. Everything that depends only on which tensors take part (the tensor tuples, the state
tensors, the param group of each tensor) is kept in a plan per (layout, gradient pattern, base
state); a step reads the gradients (one C-level pass), checks that every state dict is still the
one the plan saw, and passes the groups' hyper-parameters as :class:`~fastsam._sequences.PerGroup`
columns (a value per group). Adam's ``step`` tensors are kept as 0-dim views of one CPU buffer
(each still its own tensor in ``state[p]["step"]``, values unchanged), so the backend moves them
all with one op.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import optimizer as _optimizer_module  # its global step hooks

from .. import _host
from .. import functional as F
from .._sequences import TRUSTED_PTRS, PerGroup, Tensors

if TYPE_CHECKING:
    from .sam import SAM, _Layout, _Txn

_SGD_BUFFER_WITHOUT_MOMENTUM: bool | None = None
_grad_of = operator.attrgetter("grad")
_is = operator.is_
_is_none = functools.partial(operator.is_, None)


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


def _scalar_dtype() -> torch.dtype:
    try:
        from torch.optim.optimizer import _get_scalar_dtype

        return _get_scalar_dtype()
    except Exception:  # pragma: no cover - older layouts
        return torch.float32


def _has_hooks(base: torch.optim.Optimizer) -> bool:
    _o = _optimizer_module
    local = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
    glob = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
    return any(len(getattr(base, n, None) or {}) for n in local) or any(len(getattr(_o, n, None) or {}) for n in glob)


def _is_float(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _uniform(groups: list[dict[str, Any]], key: str, default: Any = False) -> tuple[bool, Any]:
    vals = {bool(g.get(key, default)) for g in groups}
    return len(vals) <= 1, (vals.pop() if vals else default)


def _values(dicts: tuple) -> tuple | None:
    """Every value of every state dict in ``dicts``, in order; None when one is not a dict."""
    try:
        return tuple(itertools.chain.from_iterable(map(dict.values, dicts)))
    except TypeError:
        return None


class _Plan:
    """What a fused update over one set of tensors keeps from step to step (see the module doc)."""

    __slots__ = ("key", "refs", "ws", "w_old", "g_old", "group_of", "groups", "gidx", "states", "skeys",
                 "svals", "entries", "pick", "everyone", "upd", "m", "v", "vmax", "steps", "bufs", "fresh", "kind",
                 "flags")


# a combine of the cheaper family: (the second gradient per updated tensor, None: layout.g_old;
# (c1, c2) as a float64 device tensor; whether .grad receives c1 * g + c2 * other)
Mix = tuple["Callable[[Sequence[Tensor]], Sequence[Tensor | None]] | None", Tensor, bool]

_MAX_PLANS = 8  # per optimizer: a few layouts (P varies with frozen parts) x base_step / second_step


def fused_second_step(opt: SAM, layout: _Layout | None, txn: _Txn | None = None,
                      params: list[Tensor] | None = None, grads: list[Tensor | None] | None = None,
                      ptrs: tuple[int, ...] | None = None, mix: Mix | None = None) -> bool:
    """The fused second step (see the module doc); ``params`` / ``grads``: every parameter of the
    optimizer and its gradient now (read here when not given); ``ptrs``: the addresses of
    ``layout.params`` just read by the caller. ``mix = (others, coef, writeback)``: the update
    uses ``c1 * g + c2 * other`` (the cheaper family's combines, issue #17) with ``coef`` the
    device tensor ``(c1, c2)`` and ``others(ws)`` the second gradient of each updated tensor (None:
    ``layout.g_old``, WSAM); nothing is combined when False is returned."""
    if getattr(opt, "_sharding", None) is not None:
        return False  # DTensor parameters: torch's optimizers update them (their state is DTensors too)
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
    groups = base.param_groups
    if params is None:
        params = opt._all_params()
    if grads is None:
        grads = _host.grads(params)
    # which parameters have no gradient (part of the plan's key): "none missing" on the usual step
    nones = () if not _host.count_none(grads) else tuple(map(_is_none, grads))
    state = base.state
    key = (kind, id(layout), nones, id(state), len(state), tuple(map(id, groups)), opt.backend,
           None if mix is None else mix[0] is None)
    plans = opt._fused_plans  # on the optimizer: the plans die with it (they hold its tensors)
    plan = plans.get(key)
    if plan is not None:
        # the base state as the plan saw it: the same parameters mapping to the same state dicts
        # holding the same objects (identity passes in the dicts' order, no tensor hashing; one C
        # loop each with the host helpers, fastsam._host)
        if plan.refs[0] is not layout or plan.refs[1] is not state or not _host.same(params, plan.everyone) or (
                plan.entries is None or not _host.state_same(state, plan.skeys, plan.svals, plan.entries)):
            plan = None  # a state dict, or a tensor in one, was replaced (load_state_dict, user code)
    if plan is None:
        plan = _build(opt, base, kind, layout, params, grads, groups, txn, mix is not None and mix[0] is None)
        if plan is None:
            return False
        if plan.key is not None:
            plan.key = key
            plan.refs = (layout, state)
            plans[key] = plan
            while len(plans) > _MAX_PLANS:
                plans.popitem(last=False)
    else:
        plans.move_to_end(key)
    trusted = ptrs if layout is not None and plan.ws is layout.params else None
    return _run(opt, base, plan, txn, plan.pick(grads), trusted, mix)


def _build(opt: SAM, base: torch.optim.Optimizer, kind: type, layout: _Layout | None, params: list[Tensor],
           grads: list[Tensor | None], groups: list[dict[str, Any]], txn: _Txn | None,
           mix_g_old: bool = False) -> _Plan | None:
    """The plan of a fused update, or None when this update cannot be fused (the caller then
    runs restore + GSAM + base_optimizer.step()). ``mix_g_old``: the update mixes in
    ``layout.g_old`` (WSAM), which the plan keeps as GSAM's."""
    in_p: dict[int, int] = {} if layout is None else {id(w): i for i, w in enumerate(layout.params)}
    ws: list[Tensor] = []
    wgrads: list[Tensor | None] = []
    owner: list[int] = []
    sel: list[int] = []  # index of each tensor of the update in ``params``
    used: dict[int, int] = {}  # base group index -> position among the groups with updates
    k = 0
    for gi, g in enumerate(groups):
        for w in g["params"]:
            gr = grads[k]
            k += 1
            if gr is None:
                if id(w) not in in_p:
                    continue
            elif gr.layout is not torch.strided:
                return None  # sparse gradients: torch's own step reports them
            else:
                used.setdefault(gi, len(used))
            ws.append(w)
            wgrads.append(gr)
            owner.append(gi)
            sel.append(k - 1)
    if not ws:
        return None
    try:
        mod = F.backend_module(opt.backend, ws[0].device)
    except ValueError:
        return None  # the plain path reports the problem
    if not getattr(mod, "FUSED_UPDATES", False):
        return None
    supported = getattr(mod, "SUPPORTED_DTYPES", ())
    if any(w.dtype not in supported for w in ws):
        return None  # complex or integer parameters, ...
    glist = [groups[gi] for gi in used]
    for g in glist:
        if g.get("differentiable", False) or g.get("fused", False):
            return None
        if not _is_float(g["lr"]) or not _is_float(g.get("weight_decay", 0.0)):
            return None
    plan = _Plan()
    plan.key = ()  # cacheable unless a branch below says otherwise
    plan.kind = kind
    # the layout's own Tensors when the update covers exactly P (the usual step): the Triton
    # launcher then finds its plans on it and takes the addresses the caller read
    same = layout is not None and len(ws) == len(layout.params) and all(map(_is, ws, layout.params))
    plan.ws = layout.params if same else Tensors(ws)  # type: ignore[union-attr]
    if len(sel) == len(params):
        plan.pick = tuple
    elif len(sel) == 1:
        plan.pick = lambda gs, _i=sel[0]: (gs[_i],)
    else:
        plan.pick = operator.itemgetter(*sel)
    plan.w_old = tuple(layout.w_old[in_p[id(w)]] if id(w) in in_p else None for w in ws)  # type: ignore[union-attr]
    plan.g_old = None
    if (opt.gsam_alpha > 0 or mix_g_old) and layout is not None and layout.g_old is not None:
        plan.g_old = tuple(layout.g_old[in_p[id(w)]] if id(w) in in_p else None for w in ws)
    # group index per tensor among the groups with updates (restore-only tensors: group 0, unused)
    plan.gidx = tuple(used)
    plan.group_of = tuple(used.get(gi, 0) for gi in owner)
    plan.upd = tuple(g is not None for g in wgrads)
    state = base.state
    if kind is torch.optim.SGD:
        ok_n, nesterov = _uniform(glist, "nesterov")
        ok_m, maximize = _uniform(glist, "maximize")
        if not (ok_n and ok_m):
            return None
        for g in glist:
            if not all(_is_float(g.get(k2, 0.0)) for k2 in ("momentum", "dampening")):
                return None
        plan.flags = (nesterov, maximize)
        bufs: list[Tensor | None] = []
        for w, up, gi in zip(ws, plan.upd, owner):
            st = state.get(w) if up and groups[gi]["momentum"] != 0 else None
            bufs.append(None if st is None else st.get("momentum_buffer"))
        plan.bufs = tuple(bufs)
        plan.fresh = any(b is None and up and groups[gi]["momentum"] != 0
                         for b, up, gi in zip(bufs, plan.upd, owner))
        if plan.fresh or any(groups[gi].get("momentum", 0.0) == 0 for gi in used):
            plan.key = None  # the first step creates the buffers; momentum 0 may store None: plain bookkeeping
    else:
        ok_a, amsgrad = _uniform(glist, "amsgrad")
        ok_m, maximize = _uniform(glist, "maximize")
        ok_d, decoupled = _uniform(glist, "decoupled_weight_decay", kind is torch.optim.AdamW)
        if not (ok_a and ok_m and ok_d):
            return None
        if kind is torch.optim.AdamW:
            decoupled = True  # torch < 2.5 AdamW has no such group key: it is always decoupled
        for g in glist:
            if g.get("capturable", False):
                return None
            b1, b2 = g["betas"]
            if not (_is_float(b1) and _is_float(b2) and _is_float(g["eps"])):
                return None
        plan.flags = (amsgrad, maximize, decoupled)
        keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        for w, up in zip(ws, plan.upd):  # every existing state checked before any is created
            if not up:
                continue
            st = state.get(w)
            if st:
                if any(k2 not in st for k2 in keys):
                    return None  # e.g. amsgrad switched on mid-training: torch's step reports it
                step = st["step"]
                if not isinstance(step, Tensor) or step.device.type != "cpu":
                    return None  # a device-side step (capturable layout)
        if _adopt_adam_state(state, ws, plan.upd, amsgrad, txn):
            plan.key = None  # created this step: the next one sees the new state dicts
        m, v, vmax, steps = [], [], [], []
        for w, up in zip(ws, plan.upd):
            st = state[w] if up else None
            m.append(st["exp_avg"] if st else None)
            v.append(st["exp_avg_sq"] if st else None)
            vmax.append(st["max_exp_avg_sq"] if st and amsgrad else None)
            steps.append(st["step"] if st else None)
        plan.m, plan.v, plan.vmax, plan.steps = tuple(m), tuple(v), (tuple(vmax) if amsgrad else None), tuple(steps)
    plan.states = tuple(map(state.get, plan.ws))
    if any(st is None for st, up in zip(plan.states, plan.upd) if up):
        plan.key = None
    plan.skeys, plan.svals = tuple(state), tuple(state.values())
    plan.entries = _values(plan.svals)
    if plan.entries is None:
        plan.key = None  # a state that is not a dict: not cached
    plan.everyone = tuple(params)
    plan.refs = (layout, state)
    return plan


def _adopt_adam_state(state: Any, ws: list[Tensor], upd: tuple[bool, ...], amsgrad: bool, txn: _Txn | None) -> bool:
    """Create the missing Adam state (as torch would) and make every ``step`` a 0-dim view of one
    CPU buffer (values unchanged) so that a step moves them with one op. Returns True when state
    was created (its first use is this step)."""
    created = False
    present = [w for w, up in zip(ws, upd) if up]
    steps = [state[w]["step"] if state.get(w) else None for w in present]
    for w, s in zip(present, steps):
        if s is None:
            state[w] = {"exp_avg": torch.zeros_like(w, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(w, memory_format=torch.preserve_format)}
            if amsgrad:
                state[w]["max_exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            created = True
            if txn is not None:
                txn.created.append(w)
    bases = {id(s._base) for s in steps if s is not None}
    if len(bases) == 1 and None not in steps and next(iter(steps))._base is not None:  # type: ignore[union-attr]
        base = steps[0]._base  # type: ignore[union-attr]
        if base.numel() == len(steps) and all(s.storage_offset() - base.storage_offset() == i  # type: ignore
                                              for i, s in enumerate(steps)):
            return created  # already views of one buffer, in order
    dt = _scalar_dtype()
    buf = torch.tensor([0.0 if s is None else float(s) for s in steps], dtype=dt)
    buf._fastsam_host_counter = True  # type: ignore[attr-defined]  # a host-side op (bench/traffic.py)
    for i, w in enumerate(present):
        state[w]["step"] = buf[i]
    return created


def _run(opt: SAM, base: torch.optim.Optimizer, plan: _Plan, txn: _Txn | None, grads: tuple,
         ptrs: tuple[int, ...] | None, mix: Mix | None = None) -> bool:
    groups = base.param_groups
    glist = [groups[gi] for gi in plan.gidx]
    go = plan.group_of
    if ptrs is not None:
        plan.ws.__dict__[TRUSTED_PTRS] = ptrs
    try:
        _update(opt, base, plan, txn, grads, glist, go, mix)
    finally:
        if ptrs is not None:
            plan.ws.__dict__.pop(TRUSTED_PTRS, None)
    base._opt_called = True  # type: ignore[attr-defined]  # what an LR scheduler's step wrapper records
    return True


def _update(opt: SAM, base: torch.optim.Optimizer, plan: _Plan, txn: _Txn | None, grads: tuple,
            glist: list[dict[str, Any]], go: tuple[int, ...], mix: Mix | None = None) -> None:

    def col(get: Any) -> PerGroup:
        return PerGroup(tuple(float(get(g)) for g in glist), go)

    g_old, gsam_alpha, kw = plan.g_old, opt.gsam_alpha, {}
    if mix is not None:
        others, coef, writeback = mix
        g_old = plan.g_old if others is None else others(plan.ws)
        gsam_alpha, kw = 0.0, {"mix": coef, "mix_writeback": writeback}
    if plan.kind is torch.optim.SGD:
        nesterov, maximize = plan.flags
        # the plan's tuple as it is when every buffer exists (the Triton launcher caches its tables
        # per tuple); a list the op can fill when some are created now
        bufs = list(plan.bufs) if plan.fresh else plan.bufs
        F.sam_restore_sgd_(
            plan.ws, grads, plan.w_old, g_old, bufs,
            lr=col(lambda g: g["lr"]), weight_decay=col(lambda g: g.get("weight_decay", 0.0)),
            momentum=col(lambda g: g.get("momentum", 0.0)), dampening=col(lambda g: g.get("dampening", 0.0)),
            nesterov=nesterov, maximize=maximize, gsam_alpha=gsam_alpha, backend=opt.backend, **kw,
        )
        state = base.state
        for w, b, old in zip(plan.ws, bufs, plan.bufs) if plan.fresh else ():
            if b is not None and old is None:  # created by the op from the first d_p, as torch creates them
                state[w]["momentum_buffer"] = b
                if txn is not None:
                    txn.created.append(w)
        if any(g.get("momentum", 0.0) == 0 for g in glist) and _sgd_stores_none_buffers():
            for w, up, gi in zip(plan.ws, plan.upd, plan.group_of):
                if up and glist[gi]["momentum"] == 0:
                    state[w]["momentum_buffer"] = None
    else:
        amsgrad, maximize, decoupled = plan.flags
        F.sam_restore_adam_(
            plan.ws, grads, plan.w_old, g_old, plan.m, plan.v, plan.vmax, plan.steps,
            lr=col(lambda g: g["lr"]), beta1=col(lambda g: g["betas"][0]), beta2=col(lambda g: g["betas"][1]),
            eps=col(lambda g: g["eps"]), weight_decay=col(lambda g: g.get("weight_decay", 0.0)),
            amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled,
            gsam_alpha=gsam_alpha, backend=opt.backend, **kw,
        )
