"""Distributed checkpoints of a sharded SAM (FSDP2): ``torch.distributed.checkpoint`` (DCP).

:meth:`fastsam.SAM.state_dict` already is what DCP saves: under FSDP2 the per-parameter tensors
in it (the base optimizer's ``exp_avg`` / ``momentum_buffer``, F-SAM's EMA) are DTensors, which
DCP writes shard by shard, and the rest (step counters, options, seed) are replicated values.
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` does not apply: it expects a
flat torch optimizer state (``state`` / ``param_groups``), and SAM's is nested
(``base_optimizer`` / ``sam``).

Loading is in place: DCP needs a target state dict with every entry already allocated, which a
fresh optimizer does not have (torch creates the state at the first step).
:func:`load_target` creates it (a base step with zero gradients and ``lr = 0``, F-SAM's EMA at
zero) and returns the state dict to load into::

    # save (every rank)
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)

    # resume (every rank): a fresh model and optimizer, built as before
    sd = {"model": model.state_dict(), "optim": fastsam.checkpoint.load_target(opt)}
    dcp.load(sd, checkpoint_id=path)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optim"])

The resumed run is bit-identical to the uninterrupted one (step counter, ESAM seed, F-SAM EMA and
the base optimizer's state all come back). The world size may change between save and load: the
target's DTensors are sharded over the loading mesh and DCP reshards the saved shards into them
(tests/test_fsdp.py resumes 2 -> 3 and 3 -> 2 ranks; equal to one process within float rounding).
The target has an entry for every parameter that will have one: a checkpoint saved before some
parameter ever had a gradient (so without its state) cannot be loaded into it; save after the
first step.
"""

from __future__ import annotations

from typing import Any

import torch

from .optim.sam import SAM

__all__ = ["load_target"]


@torch.no_grad()
def load_target(optimizer: SAM) -> dict[str, Any]:
    """Allocate every state entry of ``optimizer`` the way its first step would (base optimizer:
    one ``step()`` with zero gradients and every group's ``lr`` at 0, so no weight moves; F-SAM:
    a zero EMA, not ready, for the parameters of groups with ``rho > 0``) and return
    ``optimizer.state_dict()``: the in-place target of ``torch.distributed.checkpoint.load``,
    then given to ``optimizer.load_state_dict``. Parameters and ``.grad`` are left as they were.

    Args:
        optimizer: a :class:`fastsam.SAM` with no open step (parameters plain or DTensor).
    Returns:
        The state dict (its tensors alias the optimizer's new state: DCP loads into them).
    """
    if not isinstance(optimizer, SAM):
        raise ValueError(f"load_target needs a fastsam.SAM, got {type(optimizer).__name__}")
    optimizer._check_no_open_step("load_target()")
    base = optimizer.base_optimizer
    params = optimizer._all_params()
    grads0 = [w.grad for w in params]
    lrs0 = [g["lr"] for g in base.param_groups]
    try:
        for w in params:
            w.grad = torch.zeros_like(w)
        for g in base.param_groups:
            g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        base.step()
    finally:
        for g, lr in zip(base.param_groups, lrs0):
            g["lr"] = lr
        for w, gr in zip(params, grads0):
            w.grad = gr
    if optimizer.fsam_sigma is not None:
        for g in optimizer.param_groups:
            if g["rho"] <= 0:
                continue
            for w in g["params"]:
                st = optimizer.state[w]
                if "fsam_ema" not in st:
                    st["fsam_ema"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                    st["fsam_ready"] = torch.zeros((), dtype=torch.float32, device=w.device)
    return optimizer.state_dict()
