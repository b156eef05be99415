"""``fastsam.sam_step``: one whole SAM training step (both passes and the base update).

What it gets right so a training loop does not have to (DESIGN.md s3, "Training step"):

- m-sharpness (``micro_batch=m``): every micro-batch is perturbed with its own gradient, the
  gradients at the perturbed points are averaged weighted by micro-batch size.
- ascent loss: the first pass may use another loss (OBF, BiSAM) than the training loss.
- ESAM sharpness-sensitive data selection (``sds_keep``).
- BatchNorm running statistics are updated by the first pass only.
- AMP: ``torch.amp.GradScaler`` without "unscale_() has already been called"; an overflow in
  either pass skips the step with the weights and the base optimizer untouched.
- DDP: the first pass (forward included) runs under ``no_sync``; the second pass is synced.
- gradient clipping of the final gradient, gradient accumulation, exception safety.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .bn import frozen_running_stats
from .integrations._wrappers import model_output_logits, run_wrapped, unwrap_optimizer
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


class _ScalerKey:
    """Stands in for the optimizer in ``GradScaler.unscale_``: the scaler allows one unscale per
    optimizer per update and keys that by ``id(optimizer)``; SAM unscales twice per step (once
    per pass, more with micro-batches), so every pass gets its own key over the same groups."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self.param_groups = param_groups


def _unscale(scaler: torch.amp.GradScaler, opt: SAM) -> _ScalerKey | None:
    if not scaler.is_enabled():
        return None
    key = _ScalerKey(opt.param_groups)
    scaler.unscale_(key)  # type: ignore[arg-type]
    return key


def _found_inf(scaler: torch.amp.GradScaler, keys: list[_ScalerKey]) -> list[Tensor]:
    # GradScaler keeps the per-device overflow flags of each unscale_ call in
    # _per_optimizer_states[id(optimizer)]["found_inf_per_device"] (stable since torch 1.6).
    out: list[Tensor] = []
    for k in keys:
        st = scaler._per_optimizer_states.get(id(k), {})
        out.extend(st.get("found_inf_per_device", {}).values())
    return out


def _drop_keys(scaler: torch.amp.GradScaler | None, keys: list[_ScalerKey]) -> None:
    if scaler is not None:
        for k in keys:
            scaler._per_optimizer_states.pop(id(k), None)


def _batch_size(targets: Any) -> int:
    if isinstance(targets, Tensor):
        return int(targets.shape[0])
    if isinstance(targets, (list, tuple)) and targets:
        return _batch_size(targets[0])
    if isinstance(targets, dict) and targets:
        return _batch_size(next(iter(targets.values())))
    raise ValueError("targets must be a tensor (or a tuple/list/dict of tensors) with the batch in dim 0")


def _split_spec(x: Any, batch: int) -> Any:
    """Which tensors of the batch's inputs/targets are per-example (first dimension = batch size):
    True/False per tensor, in the same tuple/list/dict structure. Decided once on the whole batch,
    so micro-batches and SDS split the same tensors."""
    if isinstance(x, Tensor):
        return x.dim() > 0 and x.shape[0] == batch
    if isinstance(x, (list, tuple)):
        return [_split_spec(v, batch) for v in x]
    if isinstance(x, dict):
        return {k: _split_spec(v, batch) for k, v in x.items()}
    return False


def _take(x: Any, idx: slice | Tensor, spec: Any) -> Any:
    """Rows ``idx`` of the per-example tensors of ``spec``; anything else (a 0-dim tensor, a
    broadcast ``[1, T]`` mask, non-tensors) passes unchanged."""
    if isinstance(x, Tensor):
        return x[idx] if spec else x
    if isinstance(x, (list, tuple)):
        items = [_take(v, idx, s) for v, s in zip(x, spec)]
        return type(x)(*items) if hasattr(type(x), "_fields") else type(x)(items)
    if isinstance(x, dict):
        return {k: _take(v, idx, spec[k]) for k, v in x.items()}
    return x


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        out = model(**inputs)
    elif isinstance(inputs, (list, tuple)):
        out = model(*inputs)
    else:
        out = model(inputs)
    # issue #14: a Hugging Face ModelOutput with logits reaches the loss functions as its logits
    return model_output_logits(out)


def _detach(x: Any) -> Any:
    """Tensors detached, also inside tuples/lists/dicts (the container type kept when it can be
    rebuilt from its items, e.g. a Hugging Face ``ModelOutput``; else a plain dict/list)."""
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        items = [_detach(v) for v in x]
        if hasattr(type(x), "_fields"):  # a namedtuple: positional fields
            return type(x)(*items)
        try:
            return type(x)(items)
        except TypeError:
            return items
    if isinstance(x, dict):
        items = {k: _detach(v) for k, v in x.items()}
        try:
            return type(x)(**items) if type(x) is not dict else items
        except TypeError:
            return items
    return x


def _cat(outs: list[Any]) -> Any:
    if not outs:
        return None
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], Tensor):
        return torch.cat(outs)
    return outs


def _grads(opt: SAM) -> tuple[list[Tensor], list[Tensor]]:
    ps = [w for g in opt.param_groups for w in g["params"] if w.grad is not None]
    return ps, [w.grad for w in ps]


def _all_reduce_mean_(grads: list[Tensor]) -> None:
    """Average gradients over ranks: one flat buffer per (device, dtype), one all_reduce each."""
    world = dist.get_world_size()
    groups: dict[tuple, list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for ts in groups.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        torch._foreach_copy_(ts, [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in ts]), ts)])


def _autocast(dtype: torch.dtype | None, inputs: Any) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    dev = "cpu"
    for t in (inputs if isinstance(inputs, (list, tuple)) else [inputs]):
        if isinstance(t, Tensor):
            dev = t.device.type
            break
    return torch.autocast(device_type=dev, dtype=dtype)


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

    Every micro-batch's perturbation is a full ``first_step``: F-SAM's EMA is updated and the
    ESAM mask counter advances once per micro-batch. Under DDP each rank runs its own
    ``first_step`` (its own EMA, no communication), so N ranks equal one process with
    ``micro_batch`` = per-rank batch for SAM / ASAM / GSAM / p-norm, and differ only in those
    two per-optimizer counters. A skipped step rolls the ESAM counter back; F-SAM's EMA keeps
    the (finite) first-pass gradient it saw when only the second pass overflowed.

    Args:
        model: the model (``DistributedDataParallel`` is handled).
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
            the second pass (ESAM's own code keeps one fewer; we keep exactly ``round(gamma * B)``
            as DESIGN.md specifies). With micro-batches each selects from its own examples,
            ``round(gamma * hi) - round(gamma * lo)`` of rows ``lo:hi`` (at least 1), so the total
            is still ``round(gamma * B)`` unless a micro-batch had to be raised to 1.
        scaler: ``torch.amp.GradScaler`` for fp16 AMP (its ``update()`` is called here).
        max_grad_norm: clip the final gradient (after GSAM and averaging) to this L2 norm.
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
    if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch < 1):
        raise ValueError(f"micro_batch must be None or an int >= 1, got {micro_batch!r}")
    if not (0.0 < sds_keep <= 1.0):
        raise ValueError(f"sds_keep must be in (0, 1], got {sds_keep!r}")
    if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be None or a finite float > 0, got {max_grad_norm!r}")
    ascent = loss_fn if ascent_loss_fn is None else ascent_loss_fn
    B = _batch_size(targets)
    if B == 0:
        raise ValueError("the batch is empty (targets has 0 rows)")
    m = B if micro_batch is None else min(micro_batch, B)
    bounds = [(lo, min(lo + m, B)) for lo in range(0, B, m)]
    x_spec, y_spec = _split_spec(inputs, B), _split_spec(targets, B)

    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    accum: dict[str, Any] | None = getattr(optimizer, "_fastsam_accum", None)
    if accum is None and optimizer.has_accumulated:
        raise RuntimeError(
            "the optimizer holds partial sums from SAM.accumulate() that sam_step did not make; call "
            "optimizer.load_accumulated() (and step) or optimizer.clear_accumulated() first"
        )
    # DDP syncs the second pass itself only in the simple case; otherwise every pass runs under
    # no_sync and the final gradient is averaged once (per-rank GSAM / micro-batches stay local,
    # which makes N ranks equal to one process with micro_batch = per-rank batch).
    manual_sync = ddp and (len(bounds) > 1 or optimizer.gsam_alpha > 0 or not update or accum is not None)
    # Single micro-batch, nothing between GSAM and the base step: leave the weights perturbed
    # and let second_step() restore + combine + update (one fused pass on fused backends).
    fast = len(bounds) == 1 and max_grad_norm is None and update and accum is None and not manual_sync

    step0 = optimizer._sam_step
    keys: list[_ScalerKey] = list(accum["keys"]) if accum else []
    flags: list[Tensor] = list(accum["flags"]) if accum else []
    # Micro-batch gradients are summed by optimizer.accumulate() (restore + GSAM + acc in one
    # pass on fused backends) with weight n_k / ref; the last one of an update scales the sum by
    # ref / (all samples since the accumulation began), so .grad ends as the size-weighted mean.
    ref = float(accum["ref"]) if accum else float(B)
    samples = (accum["samples"] if accum else 0) + B
    # one micro-batch, no accumulation: .grad already is the final gradient (no copy)
    keep_grad = len(bounds) == 1 and update and accum is None
    outs: list[Any] = []
    loss2_sum: Tensor | None = None
    loss1_sum: Tensor | None = None
    n2_total = 0
    try:
        for mb, (lo, hi) in enumerate(bounds):
            n_k = hi - lo
            x, y = inputs, targets
            if len(bounds) > 1:
                x, y = _take(inputs, slice(lo, hi), x_spec), _take(targets, slice(lo, hi), y_spec)
            # -- pass 1 at w: this rank's / micro-batch's own gradient
            optimizer.zero_grad(set_to_none=True)
            with model.no_sync() if ddp else contextlib.nullcontext():
                with _autocast(amp_dtype, x):
                    out = _call(model, x)
                    l1 = ascent(out, y, reduction="mean")
                    l0 = loss_fn(_detach(out), y, reduction="none").detach() if sds_keep < 1.0 else None
                if l0 is not None and l0.numel() != n_k:
                    raise ValueError(
                        f"sds_keep < 1 needs loss_fn(..., reduction='none') to return one value per example "
                        f"({n_k} values), got shape {tuple(l0.shape)}; e.g. for a language model, reduce "
                        "the per-token losses per sequence inside loss_fn"
                    )
                (scaler.scale(l1) if scaler is not None else l1).backward()
            if keep_outputs:
                outs.append(_detach(out))
            del out
            loss1_sum = l1.detach().float() * (n_k / B) + (0 if loss1_sum is None else loss1_sum)
            if scaler is not None:
                k = _unscale(scaler, optimizer)
                if k is not None:
                    keys.append(k)
            optimizer.first_step(zero_grad=True)
            assert optimizer.perturbation_ok is not None
            flags.append(optimizer.perturbation_ok)

            # -- ESAM sharpness-sensitive data selection
            x2, y2, n2 = x, y, n_k
            if sds_keep < 1.0:
                # cumulative rounding: the micro-batches keep round(gamma * B) examples in total
                # (DESIGN.md), each within one of gamma * n_k, and at least one (its second pass
                # needs a mean loss)
                n2 = max(1, min(n_k, int(round(sds_keep * hi)) - int(round(sds_keep * lo))))
                if n2 < n_k:
                    with torch.no_grad(), frozen_running_stats(model), _autocast(amp_dtype, x):
                        lp = loss_fn(_call(model, x), y, reduction="none")
                    assert l0 is not None
                    idx = torch.topk((lp.float() - l0.float()).reshape(n_k), n2, sorted=False).indices
                    x2, y2 = _take(x, idx, x_spec), _take(y, idx, y_spec)
            n2_total += n2

            # -- pass 2 at w + e (BatchNorm statistics frozen)
            sync = ddp and not manual_sync
            with (contextlib.nullcontext() if sync or not ddp else model.no_sync()), frozen_running_stats(model):
                with _autocast(amp_dtype, x2):
                    l2 = loss_fn(_call(model, x2), y2, reduction="mean")
                (scaler.scale(l2) if scaler is not None else l2).backward()
            loss2_sum = l2.detach().float() * (n_k / B) + (0 if loss2_sum is None else loss2_sum)
            if scaler is not None:
                k = _unscale(scaler, optimizer)
                if k is not None:
                    keys.append(k)
            if fast:
                break
            if keep_grad:
                optimizer.restore(apply_gsam=True)
            else:
                last = update and mb == len(bounds) - 1
                optimizer.accumulate(n_k / ref, scale=ref / samples if last else 1.0)

        if not fast and not keep_grad:
            optimizer.zero_grad(set_to_none=True)
            if update:
                optimizer.load_accumulated()

        assert loss1_sum is not None and loss2_sum is not None
        if not update:
            optimizer._fastsam_accum = {"ref": ref, "samples": samples, "keys": keys, "flags": flags}  # type: ignore
            return SAMStepResult(loss2_sum, loss1_sum, False, False, _cat(outs), n2_total)
        if accum is not None:
            del optimizer._fastsam_accum  # type: ignore[attr-defined]

        ps, gs = _grads(optimizer)
        if manual_sync and gs:
            _all_reduce_mean_(gs)
        # -- the step's one host sync: any non-finite gradient or scaler overflow skips it
        if max_grad_norm is not None and not fast:
            total = torch.nn.utils.clip_grad_norm_(ps, max_grad_norm, foreach=None) if ps else torch.zeros(())
        else:
            total = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs, 2, dtype=torch.float32)))
                     if gs else torch.zeros(()))
        dev = total.device
        bad = ~torch.isfinite(total)
        for f in flags:
            bad = bad | ~f.to(dev)
        if scaler is not None:
            for fi in _found_inf(scaler, keys):
                bad = bad | (fi.to(dev) > 0)
        if ddp:
            b = bad.to(torch.int32)
            dist.all_reduce(b, op=dist.ReduceOp.MAX)
            bad = b.bool()
        skipped = bool(bad)
        if skipped:
            optimizer.restore()
            optimizer.zero_grad(set_to_none=True)
            optimizer._sam_step = step0  # the step did not happen
        elif fast:
            optimizer.second_step()
        else:
            optimizer.base_step()
        if scaler is not None and scaler.is_enabled():
            scaler.update()
        return SAMStepResult(loss2_sum, loss1_sum, skipped, not skipped, _cat(outs), n2_total)
    except BaseException:
        optimizer.restore()
        optimizer.zero_grad(set_to_none=True)
        optimizer.clear_accumulated()
        _drop_keys(scaler, keys)
        if hasattr(optimizer, "_fastsam_accum"):
            del optimizer._fastsam_accum
        raise

