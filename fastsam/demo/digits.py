"""Part (b)'s data and one training run: scikit-learn's 8x8 digits, label noise, a TinyViT.

The 1,797 images are split once (stratified, fixed): a test set that is never trained on and
never noised, and a training set; for the held-out choice of rho, a fixed stratified part of
the training set is held out and the rest ("fit") is trained on. Label noise replaces exactly
``round(rate * n)`` training labels by another class drawn uniformly (symmetric noise); the
held-out labels stay clean, as in Foret et al. (2021, appendix: rho chosen on a non-noisy
validation subset of the training set).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import fastsam

from ..models import TinyViT
from .variants import BaseRecipe, Variant

__all__ = ["DigitsConfig", "DigitsData", "PassCounter", "corrupt_labels", "load_digits_data", "train_digits"]

NUM_CLASSES = 10
NOISE_SEED_OFFSET = 7919  # the noise draw of seed s uses generator seed s + this (not the init's stream)


@dataclass(frozen=True)
class DigitsConfig:
    """Training recipe of part (b): one recipe for every variant (only the SAM parts differ)."""

    epochs: int = 15  # 315 steps of batch 64: AdamW has converged on clean labels, and memorizes noisy ones
    batch_size: int = 64
    lr: float = 3e-3  # AdamW, peak of warmup + cosine
    weight_decay: float = 0.05  # AdamW's ViT default (DeiT)
    warmup_frac: float = 0.1  # linear warmup over the first 10% of steps, then cosine to 0
    optimizer: str = "adamw"  # base optimizer of every variant: "adamw" or "sgd"
    sgd_lr: float = 0.1  # with momentum 0.9 and weight decay 5e-4 (the CIFAR recipe)
    test_size: int = 397  # of the 1,797 images: 1,400 training images remain
    held_out: int = 280  # 20% of the training images, held out (clean) for the choice of rho
    max_steps: int | None = None  # cap on the steps of one run (None: epochs * steps per epoch)
    timing_warmup_steps: int = 3  # not timed: first-call allocations and lazy imports

    def base(self) -> BaseRecipe:
        """The base optimizer of every variant."""
        if self.optimizer == "adamw":
            return BaseRecipe("AdamW", {"lr": self.lr, "weight_decay": self.weight_decay})
        return BaseRecipe("SGD", {"lr": self.sgd_lr, "momentum": 0.9, "weight_decay": 5e-4})


@dataclass(frozen=True)
class DigitsData:
    """The splits, on one device: ``train`` (fit + held_out), ``fit``, ``held_out``, ``test``; each ``(x, y)``."""

    train: tuple[Tensor, Tensor]
    fit: tuple[Tensor, Tensor]
    held_out: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]

    def sizes(self) -> dict[str, int]:
        """Number of images per split."""
        return {k: int(getattr(self, k)[1].numel()) for k in ("train", "fit", "held_out", "test")}


def load_digits_data(cfg: DigitsConfig = DigitsConfig(), device: torch.device | str = "cpu") -> DigitsData:
    """scikit-learn's digits split as described in the module docstring, pixels standardized with
    the training set's mean and std (one scalar each)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("the digits part of the demo needs scikit-learn: pip install 'fastsam[demo]'") from e
    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=cfg.test_size, stratify=d.target,
                                          random_state=0)
    fit_idx, held_idx = train_test_split(list(range(len(ytr))), test_size=cfg.held_out, stratify=ytr,
                                         random_state=0)
    x_train, x_test = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    mu, sd = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    y_train, y_test = torch.tensor(ytr), torch.tensor(yte)
    fit, held = torch.tensor(sorted(fit_idx)), torch.tensor(sorted(held_idx))
    dev = torch.device(device)
    pair = lambda x, y: (x.to(dev), y.to(dev))
    return DigitsData(train=pair(x_train, y_train), fit=pair(x_train[fit], y_train[fit]),
                      held_out=pair(x_train[held], y_train[held]), test=pair(x_test, y_test))


def corrupt_labels(y: Tensor, rate: float, generator: torch.Generator, num_classes: int = NUM_CLASSES) -> Tensor:
    """Symmetric label noise: exactly ``round(rate * n)`` labels, chosen at random, replaced by a
    different class drawn uniformly from the other ``num_classes - 1`` (a copy; ``y`` is untouched)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    n = y.numel()
    k = round(rate * n)
    out = y.clone()
    if k == 0:
        return out
    idx = torch.randperm(n, generator=generator)[:k].to(y.device)
    shift = torch.randint(1, num_classes, (k,), generator=generator).to(y.device)
    out[idx] = (y[idx] + shift) % num_classes
    return out


class PassCounter:
    """Counts the examples that go through ``model`` forward, and those whose output is then
    backpropagated, while it is attached (a forward hook; a gradient hook on the output).

    ``sam_step`` runs extra passes inside one call (the ascent pass, ESAM's no-grad scoring pass,
    one pair per micro-batch); counting them is how the demo reports what a step really costs.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.forward = 0
        self.backward = 0
        self.forward_calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: Tensor) -> None:
        n = int(output.shape[0])
        self.forward += n
        self.forward_calls += 1
        if output.requires_grad:
            output.register_hook(lambda g, n=n: self._count_backward(n))

    def _count_backward(self, n: int) -> None:
        self.backward += n

    def remove(self) -> None:
        """Detach the hook."""
        self._handle.remove()


def _lr_factor(step: int, total: int, warm: int) -> float:
    """Linear warmup over ``warm`` steps, then a cosine from 1 to 0 at ``total``."""
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_digits(
    variant: Variant,
    rho: float | None,
    seed: int,
    noise: float,
    train: tuple[Tensor, Tensor],
    evaluate: tuple[Tensor, Tensor],
    cfg: DigitsConfig = DigitsConfig(),
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train a :class:`TinyViT` on ``train`` (its labels noised at rate ``noise``) with one variant
    at one rho, and evaluate it on ``evaluate`` (labels as given: clean).

    ``seed`` sets the initialization, the batch order and the noise draw. Every SAM step is
    :func:`fastsam.sam_step`; the base optimizer runs the plain ``zero_grad / backward / step``.
    Returned: accuracy and mean cross-entropy on ``evaluate``, ms per training step (steps after
    ``cfg.timing_warmup_steps``, device synchronized), examples forwarded and backpropagated per
    step in units of the batch size, skipped steps.
    """
    x, y_clean = train
    device = x.device
    y = corrupt_labels(y_clean, noise, torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET))
    torch.manual_seed(seed)
    model = TinyViT().to(device)
    opt = variant.build(list(model.parameters()), rho, cfg.base())
    step_kw = variant.step_kwargs()
    n = x.shape[0]
    per_epoch = n // cfg.batch_size  # the last partial batch is dropped: every step has the same shape
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(per_epoch * cfg.epochs, cfg.max_steps)
    warm = max(1, int(cfg.warmup_frac * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warm))
    # rho follows the lr from (peak lr, rho) down to 0. max_lr is given: by default ProportionalRho
    # takes the lr at construction, which LambdaLR has already set to the first warmup value.
    rho_sched = fastsam.ProportionalRho(opt, max_lr=sched.base_lrs[0]) if variant.rho_follows_lr else None
    g = torch.Generator().manual_seed(seed)
    counter = PassCounter(model)
    timed, elapsed, skipped, step, loss = 0, 0.0, 0, 0, float("nan")
    t_start = time.perf_counter()
    model.train()
    try:
        while step < total:
            perm = torch.randperm(n, generator=g).to(device)
            for b in range(min(per_epoch, total - step)):
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                xb, yb = x[idx], y[idx]
                _sync(device)
                t0 = time.perf_counter()
                if variant.is_base:
                    opt.zero_grad(set_to_none=True)
                    loss_t = F.cross_entropy(model(xb), yb)
                    loss_t.backward()
                    opt.step()
                else:
                    res = fastsam.sam_step(model, opt, xb, yb, F.cross_entropy, **step_kw)
                    skipped += int(res.skipped)
                    loss_t = res.loss_tensor
                sched.step()
                if rho_sched is not None:
                    rho_sched.step()
                _sync(device)
                if step >= cfg.timing_warmup_steps:
                    elapsed += time.perf_counter() - t0
                    timed += 1
                step += 1
                if on_step is not None:
                    on_step()
            loss = float(loss_t.detach())
    finally:
        counter.remove()
    model.eval()
    xe, ye = evaluate
    with torch.no_grad():
        logits = model(xe)
        acc = float((logits.argmax(1) == ye).float().mean())
        eval_loss = float(F.cross_entropy(logits, ye))
    per_step = max(1, step) * cfg.batch_size
    return {"seed": seed, "noise": noise, "rho": rho, "acc": acc, "eval_loss": eval_loss,
            "final_train_loss": loss, "steps": step, "skipped_steps": skipped,
            "ms_per_step": 1e3 * elapsed / max(1, timed),
            "forward_per_step": counter.forward / per_step, "backward_per_step": counter.backward / per_step,
            "forward_calls_per_step": counter.forward_calls / max(1, step),
            "train_s": time.perf_counter() - t_start}
