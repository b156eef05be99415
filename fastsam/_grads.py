"""Final-gradient checks of a training step: finiteness, clipping, DDP averaging.

A finite gradient must never look non-finite: ``torch.nn.utils.clip_grad_norm_`` and a plain
``_foreach_norm`` sum squares in the gradient's float type, so fp32 gradients of 1e20 (squares
1e40) give an infinite norm, which would skip the step, and float64 models would fail on a
float32 ``dtype=`` argument. Here:

- finiteness comes from ``max |g|`` (the inf-norm: exact in any dtype, NaN-propagating, never
  overflows; on the CPU each tensor's min and max, as torch's CPU inf-norm is not vectorized);
- the 2-norm for clipping sums float32/bf16/fp16 squares in float64 (no finite value overflows
  them) and scales float64 gradients by a power of two before squaring; it stays scaled
  (``n * 2^E``) up to the clipping factor, which is formed from ``n`` and ``E`` (a float64 norm
  above 1.3e154 would overflow its square, and one above 1.8e308 float64 itself).

Both stay on the device: the training step reads one flag per step (its one host sync).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

_INF = float("inf")
_AMINMAX_MIN = 1 << 14  # CPU: tensors from 16K elements get their own aminmax (see nonfinite)


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
    if all(g.device.type == "cpu" for g in gs):
        # torch's CPU inf-norm is not vectorized (~3-5 ns an element: 28 ms a step for a 5.3M-
        # parameter MLP, more than its optimizer step); a per-tensor aminmax is (~0.15 ns an
        # element, ~2 us a call). Its extremes are finite iff every element is (NaN propagates,
        # +-inf are extremes). Small tensors stay in one foreach call: 2 us buys ~500 elements.
        big = [g for g in gs if g.numel() >= _AMINMAX_MIN]
        parts = [torch.stack(torch.aminmax(g)).to(torch.float64) for g in big]
        small = [g for g in gs if g.numel() < _AMINMAX_MIN]
        for grp in _by_dtype(small):
            parts.append(torch.stack(torch._foreach_norm(grp, _INF)).to(torch.float64))
        return ~torch.isfinite(torch.cat(parts)).all()
    norms: list[Tensor] = []
    for grp in _by_dtype(gs):
        norms += torch._foreach_norm(grp, _INF, dtype=torch.float64)
    return ~torch.isfinite(torch.stack(_on(dev, norms)).max())


def _scaled_norm(grads: list[Tensor]) -> tuple[Tensor, Tensor, torch.device]:
    """``(n, E)`` with ``||g||_2 = n * 2^E`` over the non-empty gradients (``n`` float64, NaN/inf
    when some gradient is; ``E`` int32), never forming a square or a norm that could overflow:
    float32/bf16/fp16 norms are summed in float64 (no finite value overflows their squares),
    float64 gradients are scaled by ``2^-e``, ``2^e`` just above their max (exact), and the groups
    are combined at the largest exponent."""
    gs = [g for g in grads if g.numel()]
    dev = gs[0].device if gs else torch.device("cpu")
    f64 = torch.float64
    parts: list[tuple[Tensor, Tensor]] = []  # (n_k, e_k): the group's norm is n_k * 2^e_k
    for grp in _by_dtype(gs):
        if grp[0].dtype != f64:
            n = torch.linalg.vector_norm(torch.stack(_on(dev, torch._foreach_norm(grp, 2, dtype=f64))))
            parts.append((n, torch.zeros((), dtype=torch.int32, device=dev)))
            continue
        mx = torch.stack(_on(dev, torch._foreach_norm(grp, _INF))).max()
        e = torch.frexp(torch.where(torch.isfinite(mx) & (mx > 0), mx, torch.ones_like(mx)))[1].clamp(-1000, 1000)
        scaled = torch._foreach_mul(grp, torch.ldexp(torch.ones((), dtype=f64, device=dev), -e).to(grp[0].device))
        n = torch.linalg.vector_norm(torch.stack(_on(dev, torch._foreach_norm(scaled, 2))))
        parts.append((torch.where(torch.isfinite(mx), n, mx), e))  # NaN / inf: the max says so
    if not parts:
        return torch.zeros((), dtype=f64), torch.zeros((), dtype=torch.int32), dev
    e_max = torch.stack([e for _, e in parts]).max()
    n = torch.stack([x * torch.ldexp(torch.ones((), dtype=f64, device=dev), e - e_max) for x, e in parts])
    return torch.linalg.vector_norm(n), e_max, dev


def _value(n: Tensor, e: Tensor) -> Tensor:
    """``n * 2^e`` clamped to float64's largest number (NaN and inf stay)."""
    v = (n * torch.ldexp(torch.ones_like(n), e)).clamp(max=torch.finfo(torch.float64).max)
    return torch.where(torch.isfinite(n), v, n)


def total_norm(grads: list[Tensor]) -> Tensor:
    """0-dim float64 ``||g||_2`` over the list, finite for every finite gradient (a norm beyond
    float64's range, from float64 gradients near its largest value, is reported as that value)."""
    n, e, _ = _scaled_norm(grads)
    return _value(n, e)


def _global_scaled_norm(n: Tensor, e: Tensor, reduce: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``(n, E)`` of the norm over every rank's shards from this rank's ``(n, E)``: one
    collective of two float64 numbers (:mod:`fastsam._shard`), combined at the largest exponent
    of a non-zero part (a NaN / inf part stays NaN / inf)."""
    f64 = torch.float64
    table = reduce(torch.stack([n.to(f64), e.to(f64)])).to(n.device)
    ns, es = table[:, 0], table[:, 1]
    live = ns != 0  # NaN != 0: a NaN part is kept
    top = torch.where(live, es, torch.full_like(es, -1e9)).max()
    top = torch.where(top > -1e9, top, torch.zeros_like(top))
    scaled = torch.where(live, ns * torch.exp2(torch.where(live, es, top) - top), torch.zeros_like(ns))
    return torch.linalg.vector_norm(scaled), top.to(torch.int32)


def clip_(grads: list[Tensor], max_norm: float, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Scale the gradients in place so that their 2-norm is at most ``max_norm`` (torch's rule:
    ``g *= min(1, max_norm / (||g|| + 1e-6))``); returns the norm before clipping (float64, see
    :func:`total_norm`). The factor comes from the scaled norm ``||g|| = n 2^E`` as
    ``max_norm 2^-E / (n + 1e-6 2^-E)``: no norm or square is formed, so float64 gradients of any
    finite size are clipped, never reported non-finite. ``reduce`` (sharded gradients: the local
    shards of FSDP2's DTensors): the norm is global over every rank's shards, one collective
    (every rank then clips with the same factor)."""
    n, e, _ = _scaled_norm(grads)
    if reduce is not None:
        n, e = _global_scaled_norm(n, e, reduce)
    total = _value(n, e)
    if not grads:
        return total
    inv = torch.ldexp(torch.ones_like(n), -e)  # e in [-1000, 1000]: a normal float64
    coef = torch.clamp((max_norm * inv) / (n + 1e-6 * inv), max=1.0)
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
