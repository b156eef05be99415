"""Framework objects that reach fastsam, recognized without importing the frameworks.

:func:`fastsam.sam_step` is handed the optimizer wrappers of Lightning (``self.optimizers()``),
Lightning Fabric (``fabric.setup``) and accelerate (``accelerator.prepare``), and Hugging Face
models return ``ModelOutput`` objects. A wrapper can only exist once its framework is imported,
so every check looks the class up in ``sys.modules``: importing this module (and ``fastsam``)
never imports lightning, transformers or accelerate.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor


def require(module: str, pip_name: str, what: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs the '{pip_name}' package, which is not installed: pip install {pip_name}"
        ) from e


def _loaded(*places: tuple[str, str]) -> tuple[type, ...]:
    """The classes ``module.name`` among ``places`` whose module is already imported."""
    out = []
    for module, name in places:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type):
            out.append(cls)
    return tuple(out)


_LIGHTNING_OPTIMIZER = (("lightning.pytorch.core.optimizer", "LightningOptimizer"),
                        ("pytorch_lightning.core.optimizer", "LightningOptimizer"))
_FABRIC_OPTIMIZER = (("lightning.fabric.wrappers", "_FabricOptimizer"),
                     ("lightning_fabric.wrappers", "_FabricOptimizer"))
_ACCELERATED_OPTIMIZER = (("accelerate.optimizer", "AcceleratedOptimizer"),)
_LIGHTNING_PRECISION = (("lightning.pytorch.plugins.precision.precision", "Precision"),
                        ("pytorch_lightning.plugins.precision.precision", "Precision"))


def _grad_scaler(obj: Any) -> torch.amp.GradScaler | None:
    return obj if isinstance(obj, torch.amp.GradScaler) and obj.is_enabled() else None


class Wrapper:
    """One framework wrapper around the SAM optimizer, and the bookkeeping it expects per step.

    Lightning and Fabric wrappers are dynamic subclasses of the wrapped optimizer's class that
    forward attribute reads to it: a SAM method called on them would write its state (the step
    counter, the perturbed flag) on the wrapper, where no checkpoint sees it. So the SAM object
    itself is always the one that steps, and the wrapper only gets its accounting.
    """

    kind = "wrapper"

    def __init__(self, outer: Any) -> None:
        self.outer = outer
        self.inner = outer.optimizer  # every supported wrapper exposes the wrapped object so

    def scaler(self) -> torch.amp.GradScaler | None:
        """The framework's GradScaler (fp16 mixed precision), if it has one."""
        return None

    def update(self, update: bool) -> bool:
        """Whether this call may run the base step (a framework accumulating says no)."""
        return update

    def before(self, update: bool) -> None:
        """Called before the SAM step."""

    def after(self, update: bool, skipped: bool) -> None:
        """Called after a SAM step that returned (``skipped``: nothing was updated)."""


class LightningWrapper(Wrapper):
    """``LightningOptimizer`` (manual optimization): the step is counted as ``opt.step()`` would
    count it, through the hooks the manual-optimization loop installs on the wrapper (they move
    ``global_step``, which drives ``max_steps``, checkpoint callbacks and the logging step)."""

    kind = "Lightning's LightningOptimizer (self.optimizers())"

    def scaler(self) -> torch.amp.GradScaler | None:
        strategy = getattr(self.outer, "_strategy", None)
        return _grad_scaler(getattr(getattr(strategy, "precision_plugin", None), "scaler", None))

    def before(self, update: bool) -> None:
        if update:
            self.outer._on_before_step()

    def after(self, update: bool, skipped: bool) -> None:
        # Lightning counts an AMP step skipped by its GradScaler too: the same here
        if update:
            self.outer._on_after_step()


class FabricWrapper(Wrapper):
    """Lightning Fabric's optimizer from ``fabric.setup``: no step counter to keep."""

    kind = "Lightning Fabric's optimizer (fabric.setup)"

    def scaler(self) -> torch.amp.GradScaler | None:
        strategy = getattr(self.outer, "_strategy", None)
        return _grad_scaler(getattr(getattr(strategy, "precision", None), "scaler", None))


class AcceleratedWrapper(Wrapper):
    """accelerate's ``AcceleratedOptimizer``: its GradScaler, its gradient-accumulation state
    (inside ``accelerator.accumulate(model)`` only the batch that syncs gradients steps; the
    others accumulate, as ``sam_step(update=False)``) and ``step_was_skipped``, which
    ``AcceleratedScheduler`` reads to skip the LR step of a skipped optimizer step."""

    kind = "accelerate's AcceleratedOptimizer (accelerator.prepare)"

    def __init__(self, outer: Any) -> None:
        super().__init__(outer)
        dist_type = getattr(getattr(outer, "accelerator_state", None), "distributed_type", None)
        name = str(getattr(dist_type, "value", dist_type or "")).upper()
        if name in ("DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM"):
            raise ValueError(
                f"fastsam.sam_step supports accelerate on one device and with DDP (MULTI_GPU / MULTI_CPU), "
                f"not {name}: that engine shards or owns the gradients and the optimizer step"
            )

    def scaler(self) -> torch.amp.GradScaler | None:
        return _grad_scaler(getattr(self.outer, "scaler", None))

    def update(self, update: bool) -> bool:
        state = getattr(self.outer, "gradient_state", None)
        return update and bool(getattr(state, "sync_gradients", True))

    def after(self, update: bool, skipped: bool) -> None:
        if update:
            self.outer._is_overflow = skipped


def unwrap_optimizer(optimizer: Any, sam_cls: type) -> tuple[Any, list[Wrapper]]:
    """``(the SAM optimizer, the framework wrappers around it, outermost first)``.

    Raises ValueError when what is inside the wrappers is not a ``sam_cls`` instance, saying
    how to build one.
    """
    wrappers: list[Wrapper] = []
    obj = optimizer
    for _ in range(8):  # wrappers nest at most a few deep; a cycle would otherwise never end
        for kind, places in ((LightningWrapper, _LIGHTNING_OPTIMIZER), (FabricWrapper, _FABRIC_OPTIMIZER),
                             (AcceleratedWrapper, _ACCELERATED_OPTIMIZER)):
            classes = _loaded(*places)
            if classes and isinstance(obj, classes):
                wrappers.append(kind(obj))
                obj = wrappers[-1].inner
                break
        else:
            break
    if not isinstance(obj, sam_cls):
        chain = " wrapping ".join([type(w.outer).__name__ for w in wrappers] + [type(obj).__name__])
        hint = ""
        if wrappers or isinstance(obj, torch.optim.Optimizer):
            base = type(obj).__name__
            hint = (f": build fastsam.SAM(model.parameters(), torch.optim.{base}, rho=0.05, <{base} options>) "
                    "(or wrap the built optimizer: fastsam.SAM(None, optimizer, rho=0.05)) and hand that to the "
                    "framework (configure_optimizers, accelerator.prepare, fabric.setup) instead")
        raise ValueError(f"optimizer must be a fastsam.SAM (or preset), got {chain}{hint}")
    return obj, wrappers


def run_wrapped(wrappers: list[Wrapper], step: Callable[..., Any], *, scaler: torch.amp.GradScaler | None,
                update: bool) -> Any:
    """Run ``step(scaler=..., update=...)`` (a ``sam_step`` on the unwrapped optimizer) with the
    wrappers' GradScaler (when the caller gave none), accumulation state and step accounting."""
    for w in wrappers:
        if scaler is None:
            scaler = w.scaler()
        update = w.update(update)
    for w in wrappers:
        w.before(update)
    result = step(scaler=scaler, update=update)
    for w in reversed(wrappers):
        w.after(update, bool(result.skipped))
    return result


def model_output_logits(out: Any) -> Any:
    """A Hugging Face ``ModelOutput`` that has ``logits`` -> that tensor; anything else unchanged.

    Checked by class name along the MRO (``transformers.utils.generic.ModelOutput``), so nothing
    is imported and the check follows transformers if the class moves between its modules.
    """
    if isinstance(out, Tensor):
        return out
    for cls in type(out).__mro__:
        if cls.__name__ == "ModelOutput" and cls.__module__.startswith("transformers."):
            logits = out.get("logits")
            return out if logits is None else logits
    return out


def lightning_closure_problem(closure: Any) -> str | None:
    """What is wrong with running ``SAM.step(closure)`` on this closure, or None.

    Lightning's automatic optimization calls ``optimizer.step(closure)`` with
    ``functools.partial(Precision._wrap_closure, lightning_module, optimizer, closure)``. With
    ``accumulate_grad_batches = k > 1`` it runs ``training_step`` + backward alone on the first
    k - 1 batches and calls ``step`` on the k-th only: SAM would perturb with the other batches'
    summed gradient and update with the k-th batch's gradient alone, which is neither SAM on the
    combined batch nor accumulated SAM, and nothing could be recomputed (their data is gone).
    """
    if not isinstance(closure, functools.partial) or not closure.args:
        return None
    precision_classes = _loaded(*_LIGHTNING_PRECISION)
    if not precision_classes or not isinstance(getattr(closure.func, "__self__", None), precision_classes):
        return None
    trainer = getattr(closure.args[0], "_trainer", None)
    k = getattr(trainer, "accumulate_grad_batches", 1)
    if not isinstance(k, int) or k <= 1:
        return None
    return (
        f"fastsam.SAM in Lightning's automatic optimization with accumulate_grad_batches={k}: Lightning calls "
        f"SAM.step only on the last of every {k} batches, so SAM would perturb with the other batches' gradient "
        "and update with the last batch's alone. Accumulate with manual optimization instead: "
        "Trainer(accumulate_grad_batches=1), self.automatic_optimization = False, and in training_step "
        f"fastsam.sam_step(self.net, self.optimizers(), x, y, loss_fn, update=(batch_idx + 1) % {k} == 0) "
        "(each batch gets its own perturbation; the update is the size-weighted mean; Lightning counts one step "
        "per update). See docs/integrations.md"
    )
