"""Final-gradient checks of a training step: finiteness, clipping, DDP averaging.

A finite gradient must never look non-finite: ``torch.nn.utils.clip_grad_norm_`` and a plain
``_foreach_norm`` sum squares in the gradient's float type, so fp32 gradients of 1e20 (squares
1e40) give an infinite norm, which would skip the step, and float64 models would fail on a
float32 ``dtype=`` argument. Here:

- finiteness comes from ``max |g|`` (the inf-norm: exact in any dtype, NaN-propagating, never
  overflows);
- the 2-norm for clipping sums float32/bf16/fp16 squares in float64 (no finite value overflows
  them) and scales float64 gradients by a power of two before squaring.

Both stay on the device: the training step reads one flag per step (its one host sync).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

_INF = float("inf")


def _by_dtype(grads: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        groups.setdefault(g.dtype, []).append(g)
    return list(groups.values())


def _on(dev: torch.device, ts: list[Tensor]) -> list[Tensor]:
    return [t if t.device == dev else t.to(dev) for t in ts]


def nonfinite(grads: list[Tensor]) -> Tensor:
    """0-dim bool on the first gradient's device: some gradient element is NaN or inf."""
    gs = [g for g in grads if g.numel()]  # the inf-norm of an empty tensor is an error
    if not gs:
        return torch.zeros((), dtype=torch.bool)
    dev = gs[0].device
    norms: list[Tensor] = []
    for grp in _by_dtype(gs):
        norms += torch._foreach_norm(grp, _INF, dtype=torch.float64)
    return ~torch.isfinite(torch.stack(_on(dev, norms)).max())


def total_norm(grads: list[Tensor]) -> Tensor:
    """0-dim float64 ``||g||_2`` over the list, finite for every finite gradient."""
    gs = [g for g in grads if g.numel()]
    if not gs:
        return torch.zeros((), dtype=torch.float64)
    dev = gs[0].device
    sq: list[Tensor] = []
    for grp in _by_dtype(gs):
        if grp[0].dtype != torch.float64:
            sq += [n.square() for n in _on(dev, torch._foreach_norm(grp, 2, dtype=torch.float64))]
            continue
        # float64 squares overflow at |g| > 1.3e154: scale by 2^-E, 2^E just above max |g| (exact)
        mx = torch.stack(_on(dev, torch._foreach_norm(grp, _INF))).max()
        e = torch.frexp(torch.where(torch.isfinite(mx) & (mx > 0), mx, torch.ones_like(mx)))[1].clamp(-1000, 1000)
        scaled = torch._foreach_mul(grp, torch.ldexp(torch.ones((), dtype=torch.float64, device=dev), -e).to(
            grp[0].device))
        n = torch.linalg.vector_norm(torch.stack(_on(dev, torch._foreach_norm(scaled, 2))))
        sq.append(torch.where(torch.isfinite(mx), (n * torch.ldexp(torch.ones_like(n), e)).square(), mx))
    return torch.stack(sq).sum().sqrt()


def clip_(grads: list[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients in place so that their 2-norm is at most ``max_norm`` (torch's rule:
    ``g *= min(1, max_norm / (||g|| + 1e-6))``); returns the norm before clipping (float64)."""
    total = total_norm(grads)
    if not grads:
        return total
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grp in _by_dtype(grads):
        torch._foreach_mul_(grp, coef.to(device=grp[0].device, dtype=torch.float32 if grp[0].dtype != torch.float64
                                          else torch.float64))
    return total


def all_reduce_mean_(grads: list[Tensor]) -> None:
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
