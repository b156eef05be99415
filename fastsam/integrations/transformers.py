"""Hugging Face ``transformers``: :class:`SAMTrainer`, a drop-in ``transformers.Trainer`` for SAM.

::

    from fastsam.integrations.transformers import SAMTrainer

    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                         sam_kwargs={"rho": 0.05})
    trainer.train()

Importing this module imports transformers (and fails with an ImportError that says
``pip install transformers`` when it is missing); ``import fastsam`` does not.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..bn import frozen_running_stats
from ..optim.sam import SAM
from ._wrappers import require

transformers = require("transformers", "transformers", "fastsam.integrations.transformers")

__all__ = ["SAMTrainer", "SAMBaseStep"]


class SAMBaseStep(torch.optim.Optimizer):
    """The optimizer that ``transformers.Trainer`` and accelerate see: a SAM object whose
    ``step()`` is the base step on the gradient :meth:`SAMTrainer.training_step` left in
    ``.grad`` (both passes of every micro-batch are done by then).

    ``param_groups``, ``state``, ``defaults``, ``state_dict()`` / ``load_state_dict()`` and
    ``zero_grad()`` are the SAM object's, so the LR scheduler drives the SAM groups and Trainer
    checkpoints hold the whole SAM state (base optimizer + SAM step counter and F-SAM EMA).

    ``step()`` skips the update (weights and optimizer state untouched) when the gradient is not
    finite: a non-finite gradient in either pass, or a first pass that could not perturb, leaves
    NaN in the final gradient (see :meth:`SAMTrainer.training_step`). That costs one host sync.
    """

    def __init__(self, sam: SAM) -> None:
        # Optimizer.__init__ is not called: groups, state and defaults are the SAM object's
        if not isinstance(sam, SAM):
            raise ValueError(f"sam must be a fastsam.SAM, got {type(sam).__name__}")
        self.sam = sam
        self.skipped_steps = 0  #: updates skipped for a non-finite gradient

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.sam.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.sam.param_groups = groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.sam.state

    @state.setter
    def state(self, state: Any) -> None:
        self.sam.state = state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.sam.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.sam.defaults = defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.sam.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self.sam.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a SAM state dict; a plain torch optimizer's (a ``transformers.Trainer``
        checkpoint) goes to the base optimizer with a fresh SAM state, with a warning: a plain
        run continued with SAM."""
        if isinstance(state_dict, dict) and "sam" not in state_dict and "param_groups" in state_dict:
            warnings.warn("resuming from a checkpoint without SAM state (written by transformers.Trainer, not "
                          "SAMTrainer): its optimizer state goes to the base optimizer, SAM starts fresh", stacklevel=2)
            # a plain state's groups have no SAM options; torch's load replaces the group dicts
            # with the saved ones, so the current rho/adaptive/eta go into them first
            groups = [{**{k: v for k, v in cur.items() if k in ("rho", "adaptive", "eta", "initial_rho")}, **saved}
                      for cur, saved in zip(self.sam.param_groups, state_dict["param_groups"])]
            self.sam.load_state_dict({**state_dict, "param_groups": groups}, strict=False)
            return
        self.sam.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sam.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        """The base optimizer step on ``.grad``, or nothing when that gradient is not finite."""
        if closure is not None:
            raise ValueError("SAMTrainer's optimizer steps on the gradient its training_step computed; it takes no "
                             "closure")
        grads = [w.grad for g in self.param_groups for w in g["params"] if w.grad is not None]
        finite = True
        if grads:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            finite = bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())
        if finite:
            self.sam.base_step()
        else:
            self.skipped_steps += 1
            self.sam.restore()  # abandons the step (the weights are already at w)
            self.sam.zero_grad(set_to_none=True)


class _ScalerKey:
    """Stands in for the optimizer in ``GradScaler.unscale_``, which allows one unscale per
    optimizer (by ``id``) per update: SAMTrainer unscales each pass of each micro-batch on its
    own key. The overflow flags recorded under these keys count in ``GradScaler.update()``."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self.param_groups = param_groups


def _all_reduce_mean_(grads: list[Tensor]) -> None:
    """Average gradients over the ranks: one flat buffer per (device, dtype), one all_reduce each."""
    world = dist.get_world_size()
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        buckets.setdefault((g.device, g.dtype), []).append(g)
    for ts in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        torch._foreach_copy_(ts, [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in ts]), ts)])


class SAMTrainer(transformers.Trainer):
    r"""``transformers.Trainer`` that trains with SAM (two forward/backward passes per micro-batch).

    Drop-in: the same arguments as ``Trainer`` plus the keyword-only ones below. The optimizer
    ``Trainer`` would use (its own AdamW with its no-weight-decay groups, ``optim=...``,
    ``optimizer_cls_and_kwargs``, or ``optimizers=(opt, scheduler)``) becomes the base optimizer
    of a :class:`fastsam.SAM` built with ``sam_kwargs``; ``optimizers=(fastsam.SAM(...), sched)``
    is used as it is. The LR schedule, logging, evaluation, callbacks and checkpoints are
    Trainer's own.

    Per micro-batch (``training_step``), with ``k = gradient_accumulation_steps``:

    1. pass 1 at ``w``: the training loss (``compute_loss``), or ``ascent_loss_fn`` on the logits,
       scaled for accumulation as Trainer scales its loss; backward through the accelerator (its
       GradScaler under fp16, no gradient sync under DDP: each rank perturbs with its own
       gradient); the gradient unscaled;
    2. ``first_step``: ``w -> w + e`` (BatchNorm statistics are frozen for pass 2);
    3. pass 2 at ``w + e``: ``compute_loss`` and backward, gradient unscaled;
    4. ``accumulate``: restore ``w`` bit-exactly, GSAM combination, add the gradient to a running
       sum.

    After the k-th micro-batch the sum goes into ``.grad`` (multiplied back by the GradScaler's
    scale, so that Trainer's own unscale returns it; NaN if a pass overflowed or could not
    perturb), averaged over DDP ranks. Trainer then clips it (``max_grad_norm``), logs its norm and
    calls ``optimizer.step()``: :class:`SAMBaseStep`, the base optimizer's update, skipped for a
    non-finite gradient (with fp16 the GradScaler skips it first and lowers the scale, and the LR
    scheduler does not step). The ``loss`` Trainer logs is the pass-2 loss (at ``w + e``).

    Args:
        sam_kwargs: options of :class:`fastsam.SAM` (``rho``, ``adaptive``, ``eta``, ``p``,
            ``fsam_sigma``, ``gsam_alpha``, ``swp_keep``, ``seed``, ``backend``, ...); must be empty
            when ``optimizers=`` already holds a ``fastsam.SAM``.
        ascent_loss_fn: loss of pass 1 instead of the training loss, e.g.
            ``fastsam.losses.obf_loss`` or ``fastsam.losses.bisam_loss``: called as
            ``fn(logits, labels, reduction="mean"|"sum")`` with logits ``[N, C]`` and labels
            ``[N]`` (all tokens of the micro-batch, -100 = ignored), from the model's ``logits``
            and the batch's ``labels``.
        ascent_shift_labels: for ``ascent_loss_fn``: predict ``labels[..., 1:]`` from
            ``logits[..., :-1, :]`` (causal language models). None: as Trainer decides for the
            model (its causal-LM loss shifts, other heads do not).

    Supported: one device, DDP (``torchrun``; also on CPU with gloo), fp32 / fp16 / bf16 mixed
    precision, gradient accumulation, gradient clipping. Not supported (a ValueError at
    construction): DeepSpeed, FSDP, TPU, DataParallel (``n_gpu > 1``: launch with torchrun).
    """

    def __init__(self, *args: Any, sam_kwargs: dict[str, Any] | None = None,
                 ascent_loss_fn: Callable[..., Tensor] | None = None, ascent_shift_labels: bool | None = None,
                 **kwargs: Any) -> None:
        self.sam_kwargs = dict(sam_kwargs or {})
        self.ascent_loss_fn = ascent_loss_fn
        self.ascent_shift_labels = ascent_shift_labels
        self._sam_flags: list[Tensor] = []
        self._sam_keys: list[_ScalerKey] = []
        super().__init__(*args, **kwargs)
        engines = [name for name, on in (
            ("DeepSpeed", getattr(self, "is_deepspeed_enabled", False)),
            ("FSDP", getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_fsdp_xla_enabled", False)),
            ("DataParallel (n_gpu > 1; launch one process per GPU with torchrun instead)", self.args.n_gpu > 1),
        ) if on]
        dist_type = str(getattr(self.accelerator.distributed_type, "value", self.accelerator.distributed_type))
        if dist_type.upper() in ("XLA", "MEGATRON_LM"):
            engines.append(dist_type)
        if engines:
            raise ValueError(f"SAMTrainer supports one device and DDP, not {engines[0]}: SAM needs the whole "
                             "per-rank gradient of both passes")

    # ------------------------------------------------------------------ the optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer (or the one given in ``optimizers=``) inside a :class:`fastsam.SAM`,
        presented to Trainer as a :class:`SAMBaseStep`."""
        if self._find_stepper(self.optimizer) is not None:
            return self.optimizer
        base = self.optimizer if self.optimizer is not None else super().create_optimizer(model)
        if isinstance(base, SAM):
            if self.sam_kwargs:
                raise ValueError(f"sam_kwargs {sorted(self.sam_kwargs)} cannot be combined with an optimizer that is "
                                 "already a fastsam.SAM; configure that SAM instead")
            sam = base
        elif isinstance(base, torch.optim.Optimizer):
            sam = SAM(None, base, **self.sam_kwargs)
        else:
            raise ValueError(f"SAMTrainer needs a torch.optim.Optimizer to wrap in fastsam.SAM, got "
                             f"{type(base).__name__}")
        self.optimizer = SAMBaseStep(sam)
        return self.optimizer

    @staticmethod
    def _find_stepper(opt: Any) -> SAMBaseStep | None:
        for _ in range(8):  # through accelerate's (and any other) .optimizer wrappers
            if isinstance(opt, SAMBaseStep) or opt is None:
                return opt
            opt = getattr(opt, "optimizer", None)
        return None

    @property
    def sam(self) -> SAM:
        """The :class:`fastsam.SAM` optimizer (after ``create_optimizer`` / ``train()``)."""
        stepper = self._find_stepper(self.optimizer)
        if stepper is None:
            raise RuntimeError("SAMTrainer has no SAM optimizer yet: it is built by create_optimizer() / train()")
        return stepper.sam

    # ------------------------------------------------------------------ losses
    def _ga_steps(self) -> int:
        return int(getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps)

    def _token_normalized(self, num_items_in_batch: Any) -> bool:
        """Trainer normalizes the loss by the accumulated batch's token count (no k division)."""
        custom = getattr(self, "compute_loss_func", None) is not None
        return num_items_in_batch is not None and (bool(getattr(self, "model_accepts_loss_kwargs", False)) or custom)

    def _training_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> Tensor:
        """``compute_loss`` scaled for gradient accumulation exactly as ``Trainer.training_step`` does."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = self._token_normalized(num_items_in_batch)
        return loss if scaled else loss / self._ga_steps()

    def _shift_labels(self, model: nn.Module) -> bool:
        if self.ascent_shift_labels is not None:
            return self.ascent_shift_labels
        # the test compute_loss uses for label smoothing: a causal-LM head class shifts. (Trainer's
        # _loss_shifts_labels reads model.loss_type, which is None until the first forward.)
        try:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names
        except ImportError:  # pragma: no cover - moved in some release
            names = {}
        if self.accelerator.unwrap_model(model)._get_name() in names.values():
            return True
        return bool(getattr(self, "_loss_shifts_labels", False))

    def _ascent_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> Tensor:
        """``ascent_loss_fn`` on the logits, normalized like the training loss (per token of the
        accumulated batch when Trainer does that, else the micro-batch mean divided by k)."""
        assert self.ascent_loss_fn is not None
        fwd = dict(inputs)
        labels = fwd.pop("labels", None)
        if labels is None:
            raise ValueError("ascent_loss_fn needs the batch's 'labels' (the dataset / collator provides none)")
        with self.compute_loss_context_manager():
            out = model(**fwd)
            logits = out["logits"] if isinstance(out, dict) else out[0]
            if self._shift_labels(model):
                logits, labels = logits[..., :-1, :], labels[..., 1:]
            logits = logits.reshape(-1, logits.shape[-1])
            labels = labels.reshape(-1).to(logits.device)
            if self._token_normalized(num_items_in_batch):
                loss = self.ascent_loss_fn(logits, labels, reduction="sum") / num_items_in_batch
                if getattr(self.args, "average_tokens_across_devices", False):
                    loss = loss * self.accelerator.num_processes  # what compute_loss does for this count
            else:
                loss = self.ascent_loss_fn(logits, labels, reduction="mean") / self._ga_steps()
        return loss

    # ------------------------------------------------------------------ the step
    def _unscale(self, scaler: torch.amp.GradScaler | None, sam: SAM) -> None:
        if scaler is not None:
            key = _ScalerKey(sam.param_groups)
            scaler.unscale_(key)  # type: ignore[arg-type]
            self._sam_keys.append(key)  # alive until GradScaler.update(): its states are keyed by id()

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> Tensor:
        """Both SAM passes on one micro-batch (see the class doc); returns the pass-2 loss,
        detached and scaled for accumulation, which Trainer logs as ``loss``."""
        sam = self.sam
        if sam.is_perturbed:
            raise RuntimeError("SAMTrainer.training_step: the SAM optimizer is still perturbed (an earlier pass "
                               "failed); call trainer.sam.restore() first")
        model.train()
        inputs = self._prepare_inputs(inputs)
        scaler = self.accelerator.scaler
        scaler = scaler if scaler is not None and scaler.is_enabled() else None
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        # every pass runs without DDP's gradient sync: pass 1 so that each rank perturbs with its
        # own gradient, pass 2 because its gradient goes into SAM's running sum rather than .grad;
        # the finished sum is averaged once below
        no_sync = model.no_sync if ddp else contextlib.nullcontext
        if not sam.has_accumulated:  # first micro-batch of an optimizer step
            self._sam_flags, self._sam_keys = [], []
            # a step that GradScaler.step skipped (fp16 overflow) never reached SAMBaseStep.step:
            # abandon it, so that it changes no SAM state (no-op after a completed step)
            sam.restore()

        sam.zero_grad(set_to_none=True)
        with no_sync():
            if self.ascent_loss_fn is None:
                loss1 = self._training_loss(model, inputs, num_items_in_batch)
            else:
                loss1 = self._ascent_loss(model, inputs, num_items_in_batch)
            self.accelerator.backward(loss1)
        del loss1
        self._unscale(scaler, sam)
        sam.first_step(zero_grad=True)
        assert sam.perturbation_ok is not None
        self._sam_flags.append(sam.perturbation_ok)
        try:
            with no_sync(), frozen_running_stats(model):
                loss2 = self._training_loss(model, inputs, num_items_in_batch)
                self.accelerator.backward(loss2)
        except BaseException:
            sam.restore()
            sam.zero_grad(set_to_none=True)
            sam.clear_accumulated()
            raise
        self._unscale(scaler, sam)
        sam.accumulate(1.0)  # Trainer's loss scaling already weights the micro-batches

        if self.accelerator.gradient_state.sync_gradients:  # the last micro-batch of the step
            sam.zero_grad(set_to_none=True)
            sam.load_accumulated()
            self._finish_gradient(sam, scaler, ddp)
        return loss2.detach()

    @torch.no_grad()
    def _finish_gradient(self, sam: SAM, scaler: torch.amp.GradScaler | None, ddp: bool) -> None:
        """``.grad <- factor * .grad`` with factor = the GradScaler's scale (1 without one), or
        NaN when a first pass could not perturb (its gradient was not finite); then the DDP average.

        Multiplying back by the scale (a power of two: exact) lets Trainer's own unscale, in its
        clipping or in ``GradScaler.step``, return the unscaled sum. The NaN reaches every
        consumer without a host sync: GradScaler skips the step and lowers the scale, Trainer
        logs a NaN gradient norm, :meth:`SAMBaseStep.step` skips the update, and under DDP the
        average carries it to every rank, so all ranks skip together.
        """
        grads = [w.grad for g in sam.param_groups for w in g["params"] if w.grad is not None]
        if not grads:
            return
        dev = grads[0].device
        ok = torch.stack([f.to(dev) for f in self._sam_flags]).all()
        scale = scaler._scale if scaler is not None and getattr(scaler, "_scale", None) is not None else None
        one = torch.ones((), dtype=torch.float32, device=dev)
        good = scale.to(dev).reshape(()) if scale is not None else one
        factor = torch.where(ok, good, torch.full_like(one, math.nan))
        by_device: dict[torch.device, list[Tensor]] = {}
        for t in grads:
            by_device.setdefault(t.device, []).append(t)
        for d, ts in by_device.items():
            torch._foreach_mul_(ts, factor.to(d))
        if ddp and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            _all_reduce_mean_(grads)
