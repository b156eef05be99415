"""``fastsam.sam_step``: one whole SAM training step (both passes and the base update).

What it gets right so a training loop does not have to (docs/design.md section 5):

- m-sharpness (``micro_batch=m``): every micro-batch is perturbed with its own gradient, the
  gradients at the perturbed points are averaged weighted by micro-batch size.
- ascent loss: the first pass may use another loss (OBF, BiSAM) than the training loss.
- ESAM sharpness-sensitive data selection (``sds_keep``).
- BatchNorm running statistics are updated by the first pass only.
- AMP: ``torch.amp.GradScaler`` without "unscale_() has already been called"; an overflow in
  either pass skips the step with the weights and the base optimizer untouched.
- DDP: the first pass (forward included) runs under ``no_sync``; the second pass is synced.
- gradient clipping of the final gradient, gradient accumulation, exception safety.

The step runs in named stages (one function each): :func:`_plan` (check the arguments, split
the batch), per micro-batch :func:`_ascent_pass` (pass 1 at w), ``first_step``,
:func:`_select_examples` (ESAM SDS), :func:`_descent_pass` (pass 2 at w + e),
:func:`_collect_gradient` (restore, GSAM, accumulate); then :func:`_final_gradient` (load the
sums, DDP average, clip), :func:`_decide_skip` (the one host sync) and the update.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _amp, _grads
from . import _batch as B_
from ._validate import check_bool, check_int, check_real
from .integrations._wrappers import run_wrapped, unwrap_optimizer
from .optim._cheap import sq_norm as _cheap_sq_norm
from .optim.sam import SAM

LossFn = Callable[..., Tensor]


@dataclass
class SAMStepResult:
    """What :func:`sam_step` did. Tensors stay on the device; the float properties sync."""

    loss_tensor: Tensor  #: training loss at w + e (second pass), mean over the examples it used
    ascent_loss_tensor: Tensor  #: first-pass (ascent) loss at w, mean over the batch
    skipped: bool  #: non-finite gradient or GradScaler overflow in a pass: nothing was updated
    updated: bool  #: the base optimizer stepped (False when skipped or accumulating)
    #: model outputs of the first pass (at w), detached: one tensor for the whole batch, or a list
    #: per micro-batch when the model returns a container; None with keep_outputs=False
    outputs: Any
    n_second_pass: int  #: examples used by the second pass (fewer than the batch with SDS)

    @property
    def loss(self) -> float:
        """Training loss of the second pass, as a float."""
        return float(self.loss_tensor)

    @property
    def ascent_loss(self) -> float:
        return float(self.ascent_loss_tensor)


@dataclass
class _Plan:
    """What one call will do, decided before anything runs."""

    B: int  # batch size
    bounds: list[tuple[int, int]]  # micro-batch row ranges
    x_spec: Any  # per-example tensors of the inputs / targets (split by micro-batches and SDS)
    y_spec: Any
    ddp: bool
    sharded: bool  # FSDP2 / DTensor parameters: every pass synced (reduce-scattered), flags reduced here
    group: Any  # the process group of the skip flag: the default one (DDP), the shard group (FSDP2)
    manual_sync: bool  # DDP: every pass under no_sync, the final gradient averaged once
    fast: bool  # one micro-batch straight into second_step (fused restore + GSAM + update)
    keep_grad: bool  # one micro-batch, no accumulation: .grad already is the final gradient
    update: bool
    ref: float  # accumulation weights: n_k / ref, the last scaled by ref / samples
    samples: int
    bn: list[_BatchNorm]  # the model's BatchNorm layers that track running statistics
    #: "sam" (two passes), "plain" (one pass at w: interval SAM / LookSAM between their SAM steps),
    #: "adaptive" (AE-SAM: decided from the first micro-batch's gradient), "momentum" (MSAM: one
    #: pass at the point perturbed along the momentum)
    mode: str = "sam"


def _check_args(micro_batch: Any, sds_keep: Any, max_grad_norm: Any, amp_dtype: Any, update: Any,
                keep_outputs: Any, loss_fn: Any, ascent_loss_fn: Any) -> None:
    if micro_batch is not None:
        check_int("micro_batch", micro_batch, lo=1, what="None: the whole batch")
    check_real("sds_keep", sds_keep, lo=0.0, hi=1.0, lo_open=True, what="1 keeps every example")
    if max_grad_norm is not None:
        check_real("max_grad_norm", max_grad_norm, lo=0.0, lo_open=True, what="None: no clipping")
    if amp_dtype is not None and amp_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}")
    check_bool("update", update)
    check_bool("keep_outputs", keep_outputs)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(outputs, targets, reduction=...), got {loss_fn!r}")
    if ascent_loss_fn is not None and not callable(ascent_loss_fn):
        raise ValueError(f"ascent_loss_fn must be None or callable, got {ascent_loss_fn!r}")


def _plan(model: nn.Module, optimizer: SAM, inputs: Any, targets: Any, micro_batch: int | None,
          max_grad_norm: float | None, update: bool, accum: dict[str, Any] | None) -> _Plan:
    B = B_.batch_size(targets)
    if B == 0:
        raise ValueError("the batch is empty (targets has 0 rows)")
    m = B if micro_batch is None else min(micro_batch, B)
    bounds = [(lo, min(lo + m, B)) for lo in range(0, B, m)]
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    # DDP syncs the second pass itself only in the simple case; otherwise every pass runs under
    # no_sync and the final gradient is averaged once (per-rank GSAM / micro-batches stay local,
    # which makes N ranks equal to one process with micro_batch = per-rank batch).
    mode = _mode(optimizer)
    # DDP syncs the one pass of a plain or MSAM step itself in the simple case; AE-SAM decides
    # after a pass under no_sync, and the gradient combines of GSAM / LookSAM / WSAM are per rank
    manual_sync = ddp and (len(bounds) > 1 or optimizer._needs_g_old() or not update or accum is not None
                           or mode == "adaptive")
    one = len(bounds) == 1 and update and accum is None
    optimizer._check_params()  # finds the parameters' sharding (FSDP2 may have replaced them)
    sharding = optimizer._sharding
    if sharding is not None:
        _check_fsdp_sync(model)
    return _Plan(
        B=B, bounds=bounds, x_spec=B_.split_spec(inputs, B), y_spec=B_.split_spec(targets, B), ddp=ddp,
        sharded=sharding is not None, group=None if sharding is None else sharding.group,
        manual_sync=manual_sync, fast=one and max_grad_norm is None and not manual_sync, keep_grad=one,
        update=update, ref=float(accum["ref"]) if accum else float(B),
        samples=(accum["samples"] if accum else 0) + B,
        bn=[mod for mod in model.modules() if isinstance(mod, _BatchNorm) and mod.track_running_stats],
        mode=mode,
    )


def _check_fsdp_sync(model: nn.Module) -> None:
    """FSDP2 with gradient sync off (``set_requires_gradient_sync(False)``) leaves the sharded
    ``.grad`` without this pass's gradient: a first step would perturb with a stale or missing
    one. Both passes of a SAM step need the global gradient; accumulate with ``update=False``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # pragma: no cover - torch without FSDP2
        return
    for mod in model.modules():
        if not isinstance(mod, FSDPModule):
            continue
        try:
            groups = mod._get_fsdp_state()._fsdp_param_groups  # (FSDP2 keeps the flag only there)
        except Exception:  # pragma: no cover - another FSDP2 layout: nothing to check
            return
        if any(not getattr(g, "reduce_grads", True) for g in groups):
            raise ValueError(
                "FSDP2 gradient sync is off (set_requires_gradient_sync(False)): sam_step needs the synced "
                "(global) gradient in both passes, since first_step perturbs with it; call "
                "model.set_requires_gradient_sync(True) and accumulate over calls with update=False")


def _mode(optimizer: SAM) -> str:
    """How this step's passes run (see _Plan.mode), known before the first pass except for AE-SAM."""
    if optimizer.perturb_from == "momentum":
        return "momentum"
    if optimizer.aesam is not None:
        return "adaptive"
    return "sam" if optimizer.perturbs_next_step else "plain"


def _check_family(optimizer: SAM, plan: _Plan, ascent_loss_fn: Any, sds_keep: float, accum: Any) -> None:
    """What sam_step runs with each cheap-family choice (one pass has no ascent loss to use and
    no w / w + e pair to select examples from)."""
    if plan.mode == "momentum":
        if ascent_loss_fn is not None:
            raise ValueError("ascent_loss_fn with MSAM (perturb_from='momentum'): its one pass is at the perturbed "
                             "point, no first pass uses an ascent loss")
        if sds_keep < 1.0:
            raise ValueError("sds_keep < 1 with MSAM (perturb_from='momentum'): selecting examples by "
                             "l(w + e) - l(w) needs the pass at w that MSAM does not make")
    if plan.mode == "adaptive" and ascent_loss_fn is not None:
        raise ValueError("ascent_loss_fn with AE-SAM: its decision reads the training gradient at w, which the "
                         "first pass would not compute")


@contextlib.contextmanager
def _frozen(bn: list[_BatchNorm]):
    """BatchNorm statistics frozen for the pass at w + e (see :mod:`fastsam.bn`), on the layers
    found once per call."""
    for mod in bn:
        mod.track_running_stats = False
    try:
        yield
    finally:
        for mod in bn:
            mod.track_running_stats = True


class _Undo:
    """What a failed call puts back that the optimizer's transaction does not cover: the model's
    BatchNorm buffers (pass 1 updated them), the RNG states (dropout drew from them), the
    GradScaler's scale and the cross-call accumulation record."""

    def __init__(self, optimizer: SAM, plan: _Plan, devices: set[torch.device], scaler: Any) -> None:
        self.accum = optimizer.__dict__.get("_fastsam_accum")
        # the scaler's scale and growth tracker (update() runs before the optimizer's update);
        # device tensors, cloned without a host sync (GradScaler.state_dict() would sync)
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.scale = [t.clone() for t in (getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None))
                      if t is not None] if self.scaler is not None else []
        self.bn = [(t, t.clone()) for mod in plan.bn for t in (mod.running_mean, mod.running_var,
                                                               mod.num_batches_tracked) if t is not None]
        self.rng = torch.get_rng_state()
        self.cuda_rng = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}

    def __call__(self, optimizer: SAM) -> None:
        if self.accum is None:
            optimizer.__dict__.pop("_fastsam_accum", None)
        else:
            optimizer._fastsam_accum = self.accum  # type: ignore[attr-defined]
        with torch.no_grad():
            for t, old in self.bn:
                t.copy_(old)
        torch.set_rng_state(self.rng)
        for d, st in self.cuda_rng.items():
            torch.cuda.set_rng_state(st, d)
        if self.scaler is not None:
            live = [t for t in (self.scaler._scale, self.scaler._growth_tracker) if t is not None]
            if len(live) == len(self.scale):
                with torch.no_grad():
                    for t, old in zip(live, self.scale):
                        t.copy_(old)


def _devices(optimizer: SAM) -> set[torch.device]:
    return {w.device for g in optimizer.param_groups for w in g["params"]}


def _ascent_pass(model: nn.Module, optimizer: SAM, plan: _Plan, x: Any, y: Any, n_k: int, ascent: Any,
                 loss_fn: Any, sds: bool, scaler: Any, keys: list, amp_dtype: Any) -> tuple[Tensor, Tensor | None, Any]:
    """Pass 1 at w: this rank's / micro-batch's own gradient of the ascent loss (DDP: no_sync);
    returns (loss, per-example training loss for SDS, detached outputs)."""
    optimizer.zero_grad(set_to_none=True)
    with model.no_sync() if plan.ddp else contextlib.nullcontext():
        with B_.autocast(amp_dtype, x):
            out = B_.call(model, x)
            l1 = ascent(out, y, reduction="mean")
            l0 = loss_fn(B_.detach(out), y, reduction="none").detach() if sds else None
        if l0 is not None and l0.numel() != n_k:
            raise ValueError(
                f"sds_keep < 1 needs loss_fn(..., reduction='none') to return one value per example "
                f"({n_k} values), got shape {tuple(l0.shape)}; e.g. for a language model, reduce "
                "the per-token losses per sequence inside loss_fn"
            )
        _backward(l1, scaler)
    _unscale(scaler, optimizer, keys)
    return l1, l0, B_.detach(out)


def _backward(loss: Tensor, scaler: Any) -> None:
    """``loss.backward()``, through the GradScaler's scale when there is one (every pass)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _unscale(scaler: Any, optimizer: SAM, keys: list) -> None:
    """After a pass's backward: unscale the gradients (fastsam._amp) and keep the overflow key."""
    if scaler is not None:
        k = _amp.unscale(scaler, optimizer.param_groups)
        if k is not None:
            keys.append(k)


def _select_examples(model: nn.Module, plan: _Plan, x: Any, y: Any, lo: int, hi: int, l0: Tensor | None,
                     loss_fn: Any, sds_keep: float, amp_dtype: Any) -> tuple[Any, Any, int]:
    """ESAM sharpness-sensitive data selection: the examples with the largest l(w + e) - l(w).

    Cumulative rounding: the micro-batches keep round(gamma * B) examples in total, each within
    one of gamma * n_k, and at least one (its second pass needs a mean loss)."""
    n_k = hi - lo
    if sds_keep >= 1.0:
        return x, y, n_k
    n2 = max(1, min(n_k, int(round(sds_keep * hi)) - int(round(sds_keep * lo))))
    if n2 == n_k:
        return x, y, n_k
    with torch.no_grad(), _frozen(plan.bn), B_.autocast(amp_dtype, x):
        lp = loss_fn(B_.call(model, x), y, reduction="none")
    assert l0 is not None
    idx = torch.topk((lp.float() - l0.float()).reshape(n_k), n2, sorted=False).indices
    return B_.take(x, idx, plan.x_spec), B_.take(y, idx, plan.y_spec), n2


def _descent_pass(model: nn.Module, optimizer: SAM, plan: _Plan, x: Any, y: Any, loss_fn: Any, scaler: Any,
                  keys: list, amp_dtype: Any, with_outputs: bool = False) -> Any:
    """Pass 2 at w + e with BatchNorm statistics frozen (DDP: synced in the simple case)."""
    sync = plan.ddp and not plan.manual_sync
    # MSAM's one pass updates the BatchNorm statistics (there is no pass at w to do it)
    frozen = _frozen(plan.bn) if plan.mode != "momentum" else contextlib.nullcontext()
    with (contextlib.nullcontext() if sync or not plan.ddp else model.no_sync()), frozen:
        with B_.autocast(amp_dtype, x):
            out = B_.call(model, x)
            l2 = loss_fn(out, y, reduction="mean")
        _backward(l2, scaler)
    _unscale(scaler, optimizer, keys)
    return (l2, B_.detach(out)) if with_outputs else l2


def _plain_pass(model: nn.Module, optimizer: SAM, plan: _Plan, x: Any, y: Any, loss_fn: Any, scaler: Any,
                keys: list, amp_dtype: Any) -> tuple[Tensor, Any]:
    """The one pass at w of a non-perturbing step: training loss, BatchNorm statistics updated,
    DDP synced in the simple case."""
    optimizer.zero_grad(set_to_none=True)
    sync = plan.ddp and not plan.manual_sync
    with contextlib.nullcontext() if sync or not plan.ddp else model.no_sync():
        with B_.autocast(amp_dtype, x):
            out = B_.call(model, x)
            loss = loss_fn(out, y, reduction="mean")
        _backward(loss, scaler)
    _unscale(scaler, optimizer, keys)
    return loss, B_.detach(out)


def _decide(optimizer: SAM, plan: _Plan) -> bool:
    """AE-SAM's decision from the first micro-batch's gradient (its |g|^2 averaged over DDP ranks,
    so that every rank decides alike)."""
    gs = [w.grad for g in optimizer.param_groups if g["rho"] > 0 for w in g["params"] if w.grad is not None]
    q = _cheap_sq_norm(gs)
    if plan.ddp:
        q = q.clone()
        dist.all_reduce(q)
        q = q / dist.get_world_size()
    return optimizer.wants_perturbation(q)


def _collect_gradient(optimizer: SAM, plan: _Plan, mb: int, n_k: int) -> None:
    """Restore w, GSAM-combine and (several micro-batches / accumulation) add ``(n_k / ref) *
    grad`` to the running sum in one fused pass; the last one of an update scales the sum by
    ``ref / samples`` so that ``.grad`` ends as the size-weighted mean."""
    if plan.keep_grad:
        optimizer.restore(apply_gsam=True)
        return
    last = plan.update and mb == len(plan.bounds) - 1
    optimizer.accumulate(n_k / plan.ref, scale=plan.ref / plan.samples if last else 1.0)


def _final_gradient(optimizer: SAM, plan: _Plan, max_grad_norm: float | None) -> Tensor | None:
    """The update's gradient in ``.grad``: the accumulated sums loaded, DDP-averaged, clipped.
    Returns the device flag "some gradient is not finite" (None: decided by second_step's
    inputs, the fast path)."""
    if not plan.keep_grad:
        optimizer.zero_grad(set_to_none=True)
        optimizer.load_accumulated()
    gs = [w.grad for g in optimizer.param_groups for w in g["params"] if w.grad is not None]
    if plan.manual_sync and gs:
        _grads.all_reduce_mean_(gs)
    if plan.sharded:  # FSDP2: this rank's shards; the clipping norm is global (one collective)
        gs = optimizer._loc(gs)
    if max_grad_norm is not None and not plan.fast:
        return ~torch.isfinite(_grads.clip_(gs, max_grad_norm, optimizer._reduce if plan.sharded else None))
    return _grads.nonfinite(gs)


def _decide_skip(plan: _Plan, bad: Tensor, scaler: Any, keys: list) -> bool:
    """The step's one host sync: a non-finite gradient, a first pass that could not perturb or a
    scaler overflow in any pass (on any DDP rank) skips the update."""
    dev = bad.device
    flags = _amp.found_inf(scaler, keys) if scaler is not None else []
    for fi in flags:
        bad = bad | (fi.to(dev) > 0)
    if (plan.sharded or plan.ddp) and flags:
        # FSDP2 + GradScaler: each rank unscaled only its own gradient shards, and scaler.update()
        # (next) reads this rank's flags. torch >= 2.5 max-reduces them inside the unscale (DTensor's
        # found_inf handler), an older torch or another scaler may not. DDP with the passes under
        # no_sync (micro-batches, accumulation) unscales each rank's own unsynced gradients. So the
        # group's overflow flag rides along in the same collective and is written back: every rank's
        # scale and growth tracker move alike (an overflow on one rank backs the scale off everywhere).
        inf = torch.stack([(fi.to(dev) > 0).reshape(()) for fi in flags]).any()
        b = torch.stack([bad.reshape(()), inf]).to(torch.int32)
        dist.all_reduce(b, op=dist.ReduceOp.MAX, group=plan.group)
        for fi in flags:
            fi.copy_(torch.maximum(fi, b[1].to(fi)))
        return bool(b[0])
    if plan.ddp or plan.sharded:  # (FSDP2: the shard group; this rank's shards / scaler saw their part)
        b = bad.to(torch.int32)
        dist.all_reduce(b, op=dist.ReduceOp.MAX, group=plan.group)
        bad = b.bool()
    return bool(bad)


def _run(model: nn.Module, optimizer: SAM, inputs: Any, targets: Any, loss_fn: LossFn, ascent: LossFn,
         plan: _Plan, accum: dict[str, Any] | None, keys: list, *, sds_keep: float, scaler: Any,
         max_grad_norm: float | None, amp_dtype: Any, keep_outputs: bool) -> SAMStepResult:
    outs: list[Any] = []
    loss1: Tensor | None = None
    loss2: Tensor | None = None
    n2_total = 0
    bad: Tensor | None = None  # device flag: a first step saw a non-finite norm (this call)
    plain = plan.mode == "plain"  # a one-pass step at w (AE-SAM: decided after the first pass)
    for mb, (lo, hi) in enumerate(plan.bounds):
        n_k = hi - lo
        x, y = inputs, targets
        if len(plan.bounds) > 1:
            x, y = B_.take(inputs, slice(lo, hi), plan.x_spec), B_.take(targets, slice(lo, hi), plan.y_spec)
        if plain or plan.mode == "momentum":
            if plain:  # one pass at w
                l2, out = _plain_pass(model, optimizer, plan, x, y, loss_fn, scaler, keys, amp_dtype)
            else:  # MSAM: one pass at the point perturbed along the momentum
                optimizer.first_step(zero_grad=True)
                ok = optimizer.perturbation_ok
                assert ok is not None
                bad = ~ok if bad is None else bad | ~ok.to(bad.device)
                l2, out = _descent_pass(model, optimizer, plan, x, y, loss_fn, scaler, keys, amp_dtype, True)
            if keep_outputs:
                outs.append(out)
            del out
            w = l2.detach().float() * (n_k / plan.B)
            loss1, loss2 = w + (0 if loss1 is None else loss1), w + (0 if loss2 is None else loss2)
            n2_total += n_k
            if plan.fast:
                break
            _collect_gradient(optimizer, plan, mb, n_k)
            continue
        l1, l0, out = _ascent_pass(model, optimizer, plan, x, y, n_k, ascent, loss_fn, sds_keep < 1.0, scaler, keys,
                                   amp_dtype)
        if keep_outputs:
            outs.append(out)
        del out
        loss1 = l1.detach().float() * (n_k / plan.B) + (0 if loss1 is None else loss1)
        if plan.mode == "adaptive" and mb == 0 and not _decide(optimizer, plan):
            plain = True  # this pass's gradient is the first micro-batch's plain gradient
            loss2 = l1.detach().float() * (n_k / plan.B)
            n2_total += n_k
            if plan.fast:
                break
            _collect_gradient(optimizer, plan, mb, n_k)
            continue
        optimizer.first_step(zero_grad=True)
        ok = optimizer.perturbation_ok
        assert ok is not None
        bad = ~ok if bad is None else bad | ~ok.to(bad.device)
        x2, y2, n2 = _select_examples(model, plan, x, y, lo, hi, l0, loss_fn, sds_keep, amp_dtype)
        n2_total += n2
        l2 = _descent_pass(model, optimizer, plan, x2, y2, loss_fn, scaler, keys, amp_dtype)
        loss2 = l2.detach().float() * (n_k / plan.B) + (0 if loss2 is None else loss2)
        if plan.fast:
            break
        _collect_gradient(optimizer, plan, mb, n_k)
    assert loss1 is not None and loss2 is not None
    if bad is None:  # no first step ran (a plain step)
        bad = torch.zeros((), dtype=torch.bool, device=loss2.device)
    if accum is not None:
        bad = bad | accum["bad"].to(bad.device)

    if not plan.update:  # accumulate: the record the updating call continues from (bounded size)
        if accum is not None and accum["key"] is not None:
            keys.insert(0, accum["key"])
        optimizer.zero_grad(set_to_none=True)
        optimizer._fastsam_accum = {"ref": plan.ref, "samples": plan.samples, "bad": bad,  # type: ignore
                                    "key": _amp.merge(scaler, keys) if scaler is not None else None}
        return SAMStepResult(loss2, loss1, False, False, B_.cat(outs), n2_total)
    if accum is not None:
        del optimizer._fastsam_accum  # type: ignore[attr-defined]
        if accum["key"] is not None:
            keys.insert(0, accum["key"])

    grad_bad = _final_gradient(optimizer, plan, max_grad_norm)
    skipped = _decide_skip(plan, bad | grad_bad.to(bad.device), scaler, keys)
    outputs = B_.cat(outs)
    if scaler is not None and scaler.is_enabled():
        scaler.update()  # before the update: the update must be the call's last step that can fail
    if skipped:
        optimizer.restore()  # abandons the step: weights at w, the step's state undone
        optimizer.clear_accumulated()  # a skipped update drops its accumulated batches (AMP's rule)
        optimizer.zero_grad(set_to_none=True)
    elif plain:
        optimizer.plain_step()  # LookSAM: its reuse combine, then the base update
    elif plan.fast:
        optimizer.second_step()
    else:
        optimizer.base_step()
    return SAMStepResult(loss2, loss1, skipped, not skipped, outputs, n2_total)


def sam_step(
    model: nn.Module,
    optimizer: SAM | torch.optim.Optimizer,
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    *,
    ascent_loss_fn: LossFn | None = None,
    micro_batch: int | None = None,
    sds_keep: float = 1.0,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
    amp_dtype: torch.dtype | None = None,
    update: bool = True,
    keep_outputs: bool = True,
) -> SAMStepResult:
    r"""One SAM training step on a batch: both forward/backward passes and the base update.

    For each micro-batch ``k`` (the whole batch when ``micro_batch`` is None), of size ``n_k``:

    1. at ``w``: ``ascent_loss_fn(model(x_k), y_k).backward()`` (DDP: under ``no_sync``);
    2. ``optimizer.first_step()``: ``w -> w + e_k`` from that gradient;
    3. ESAM SDS (``sds_keep = gamma < 1``): a no-grad forward at ``w + e_k`` scores each example
       by ``l(w + e_k) - l(w)`` (training loss) and keeps the largest (``round(gamma * B)`` in total);
    4. at ``w + e_k``: ``loss_fn(model(x'), y').backward()`` with BatchNorm statistics frozen;
    5. restore ``w`` exactly, GSAM combine, accumulate ``(n_k / B) * grad``: one fused pass per
       (device, dtype) group, :meth:`fastsam.SAM.accumulate` (``.grad`` kept as is when there is
       one micro-batch and no accumulation).

    Then: DDP average, clipping of the final gradient to ``max_grad_norm``, one check for
    non-finite gradients / GradScaler overflow (the step's only host sync), and the base step.

    Every micro-batch's perturbation is a full ``first_step``: F-SAM's EMA is updated once per
    micro-batch; the ESAM mask is one per step (keyed by the completed steps), the same for every
    micro-batch. Under DDP each rank runs its own ``first_step`` (its own EMA, no
    communication), so N ranks equal one process with ``micro_batch`` = per-rank batch for SAM /
    ASAM / GSAM / p-norm / ESAM masks, and differ only in F-SAM's per-optimizer EMA.
    Under FSDP2 (``fully_shard``: DTensor parameters) both passes keep gradient sync on (the
    gradient is reduce-scattered, i.e. global): every ``first_step`` is SAM over the global
    micro-batch (rank r's k-th micro-batch for every r), with the norm reduced in one collective,
    clipping uses the global norm, and the skip decision is reduced over the shard group, so N
    ranks equal one process on the global batch, F-SAM included.

    A call is a transaction: a skipped step (non-finite gradient or scaler overflow in any
    pass) updates nothing and drops the accumulated batches (as AMP skips a whole accumulated
    step); an exception anywhere leaves the weights at ``w`` bit for bit, the optimizer state
    (F-SAM EMA, step counter, partial sums of earlier ``update=False`` calls, base state) and the
    model's BatchNorm buffers and the RNG state as they were before the call, so retrying the
    batch gives what an uninterrupted run gives.

    Args:
        model: the model (``DistributedDataParallel`` and FSDP2's ``fully_shard`` are handled).
        optimizer: a :class:`fastsam.SAM` (or preset) over ``model``'s parameters, or a framework's
            wrapper around one (issue #14): Lightning's ``self.optimizers()`` (the step is counted
            as Lightning's ``opt.step()`` counts it), Fabric's, or accelerate's ``AcceleratedOptimizer``
            (its GradScaler when ``scaler`` is None; inside ``accelerator.accumulate`` only the
            batch that syncs gradients updates; ``step_was_skipped`` set for its scheduler).
        inputs: tensor, tuple/list (``model(*inputs)``) or dict (``model(**inputs)``), batch in dim 0;
            micro-batches and SDS split the tensors whose first dimension is the batch size and
            pass the others (scalars, broadcast masks) unchanged.
        targets: tensor (or tuple/list/dict of tensors), batch in dim 0.
        loss_fn: ``fn(outputs, targets, reduction="mean"|"none")``, the ``F.cross_entropy`` signature.
            A Hugging Face ``ModelOutput`` with ``logits`` is passed as its ``logits`` (issue #14).
        ascent_loss_fn: loss of the first pass (default ``loss_fn``), e.g.
            ``fastsam.losses.obf_loss`` or ``fastsam.losses.bisam_loss``.
        micro_batch: m-sharpness micro-batch size ``m`` (the last one may be smaller).
        sds_keep: ESAM data-selection ratio gamma in (0, 1]. ``round(gamma * B)`` examples go to
            the second pass (ESAM's own code keeps one fewer; we keep exactly ``round(gamma * B)``,
            docs/design.md section 6). With micro-batches each selects from its own examples,
            ``round(gamma * hi) - round(gamma * lo)`` of rows ``lo:hi`` (at least 1), so the total
            is still ``round(gamma * B)`` unless a micro-batch had to be raised to 1.
        scaler: ``torch.amp.GradScaler`` for fp16 AMP (its ``update()`` is called here).
        max_grad_norm: clip the final gradient (after GSAM and averaging) to this L2 norm (torch's
            rule, with the norm summed in float64: no finite gradient reads as infinite).
        amp_dtype: run the forward passes under ``torch.autocast`` with this dtype.
        update: False accumulates this batch's final gradient (weighted by batch size) and
            skips the base step; the next call with ``update=True`` steps on the weighted mean
            of all accumulated batches. Gradient accumulation without a per-call base step.
            The partial sums are transient: ``optimizer.load_state_dict`` drops them.
        keep_outputs: return the first pass's outputs (detached) in ``.outputs``. False frees
            each micro-batch's outputs after its backward: for a language model the logits
            (batch x tokens x vocabulary) would otherwise stay alive through the second pass.

    Returns:
        :class:`SAMStepResult` (``.loss``, ``.skipped``, ...).
    """
    # --- issue #14 (fastsam.integrations): framework optimizer wrappers ----------------------------
    # Lightning's self.optimizers(), Fabric's and accelerate's wrappers: the SAM object inside them
    # steps (state written on a wrapper reaches no checkpoint) and each framework keeps its own
    # accounting (Lightning's step counter, accelerate's accumulation and skipped-step flags, their
    # GradScaler). Raises the "must be a fastsam.SAM" error, with a how-to, for anything else.
    optimizer, wrappers = unwrap_optimizer(optimizer, SAM)
    if wrappers:
        return run_wrapped(wrappers, functools.partial(
            sam_step, model, optimizer, inputs, targets, loss_fn, ascent_loss_fn=ascent_loss_fn,
            micro_batch=micro_batch, sds_keep=sds_keep, max_grad_norm=max_grad_norm, amp_dtype=amp_dtype,
            keep_outputs=keep_outputs), scaler=scaler, update=update)
    # ------------------------------------------------------------------------------------------------
    if optimizer.is_perturbed:
        raise RuntimeError("sam_step() called while the optimizer's weights are perturbed; call restore() first")
    _check_args(micro_batch, sds_keep, max_grad_norm, amp_dtype, update, keep_outputs, loss_fn, ascent_loss_fn)
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise ValueError(f"scaler must be None or a torch.amp.GradScaler, got {type(scaler).__name__}")
    accum: dict[str, Any] | None = getattr(optimizer, "_fastsam_accum", None)
    if accum is None and optimizer.has_accumulated:
        raise RuntimeError(
            "the optimizer holds partial sums from SAM.accumulate() that sam_step did not make; call "
            "optimizer.load_accumulated() (and step) or optimizer.clear_accumulated() first"
        )
    plan = _plan(model, optimizer, inputs, targets, micro_batch, max_grad_norm, update, accum)
    _check_family(optimizer, plan, ascent_loss_fn, sds_keep, accum)
    ascent = loss_fn if ascent_loss_fn is None else ascent_loss_fn
    undo = _Undo(optimizer, plan, _devices(optimizer), scaler)
    keys: list[_amp.ScalerKey] = []  # this call's scaler keys (+ the accumulation's, once inserted)
    try:
        with optimizer._step_scope():
            return _run(model, optimizer, inputs, targets, loss_fn, ascent, plan, accum, keys, sds_keep=sds_keep,
                        scaler=scaler, max_grad_norm=max_grad_norm, amp_dtype=amp_dtype, keep_outputs=keep_outputs)
    except BaseException:
        undo(optimizer)
        kept = accum["key"] if accum is not None else None  # earlier calls' overflow flags stay
        _amp.drop(scaler, [k for k in keys if k is not kept])
        optimizer.zero_grad(set_to_none=True)
        raise
