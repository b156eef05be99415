"""Sharded parameters (FSDP2 / DTensor): local shards, global element offsets, one collective.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter and gradient is a DTensor
whose local tensor is a slice of rows (``Shard(0)``) of the full tensor, and the first-pass
gradient is reduce-scattered: the SAM step is SAM over the global batch, and its norms (the dual
norm N of the perturbation, GSAM's dot product and norms) are sums over every rank's shard.

The backends work on local tensors only. A norm is made global by a ``reduce`` hook handed to
the ops that need one (``sam_perturb_``, ``gsam_combine_``, ``sam_restore_accumulate_`` with
GSAM): the op computes a few per-rank statistics in float64 (a finite flag, the log2 scale of its
local maximum, its scaled partial norm), the hook all-gathers them (ONE collective of ``world * k``
float64 numbers over the shard group), and every rank combines the same gathered table in the same
order, so the global result is identical on every rank. Combining relative to the largest scale
(:func:`combine_norms`) keeps the "Scaled norms" robustness of :mod:`fastsam.reference`: no rank's
partial sum is ever formed in absolute units, so nothing finite overflows or underflows.

This module holds only tensor / process-group helpers (no optimizer import): the kernels import
:func:`combine_norms`, the optimizer :class:`Sharding`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# reduce(stats) -> table: a 1-D float64 tensor of k statistics in, the [world, k] table of every
# rank's statistics out (rows in rank order), identical on every rank
Reduce = Callable[[Tensor], Tensor]

_DTensor: type | None = None


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` when it imports (torch >= 2.4), else None."""
    global _DTensor
    if _DTensor is None:
        try:
            from torch.distributed.tensor import DTensor
        except Exception:  # pragma: no cover - torch without distributed tensors
            return None
        _DTensor = DTensor
    return _DTensor


def is_dtensor(t: object) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor | None) -> Tensor | None:
    """The local shard of a DTensor (the tensor itself, aliasing the DTensor's storage: in-place
    writes are the DTensor's), any other tensor (or None) as it is."""
    if t is None:
        return None
    lt = getattr(t, "_local_tensor", None)
    if lt is not None and is_dtensor(t):
        return lt
    return t


def locals_(ts: Sequence[Tensor | None] | None) -> list | None:
    """:func:`local` over a list (None stays None)."""
    if ts is None:
        return None
    return [local(t) for t in ts]


def like(ref: Tensor, t: Tensor) -> Tensor:
    """``t`` (a local tensor shaped as ``ref``'s local shard) as a DTensor with ``ref``'s mesh,
    placements, global shape and stride; no collective (``run_check=False``): ``t`` is this
    rank's shard by construction. ``t`` itself when ``ref`` is not a DTensor."""
    if not is_dtensor(ref):
        return t
    return dtensor_type().from_local(t, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape,
                                     stride=ref.stride())


class GatherReduce:
    """The ``reduce`` hook: ``all_gather_into_tensor`` of a small float64 vector over ``group``.

    One collective per call; ``calls`` and ``bytes`` count what this hook sent (the benchmark and
    the tests read them). On CUDA the statistics stay on the device: no host sync is added."""

    def __init__(self, group: dist.ProcessGroup | None, world: int) -> None:
        self.group = group
        self.world = world
        self.calls = 0
        self.bytes = 0

    def __call__(self, stats: Tensor) -> Tensor:
        stats = stats.reshape(-1).to(torch.float64).contiguous()
        out = torch.empty(self.world * stats.numel(), dtype=stats.dtype, device=stats.device)
        dist.all_gather_into_tensor(out, stats, group=self.group)
        self.calls += 1
        self.bytes += stats.numel() * stats.element_size()
        return out.view(self.world, stats.numel())


class Sharding:
    """What the optimizer needs to know about a list of DTensor parameters.

    Supported: every parameter a DTensor on one device mesh, with the same placements, each
    placement ``Shard(dim)`` or ``Replicate()``, and at most one mesh dimension sharded (FSDP2:
    ``(Shard(0),)``; HSDP: ``(Replicate(), Shard(0))``). Replicated mesh dimensions hold identical
    copies (FSDP2/HSDP all-reduce the gradients over them), so the norms are reduced over the
    sharded mesh dimension only; with no sharded dimension there is nothing to reduce.
    ESAM masks (keyed by the global element index) further need the shards to be contiguous
    ranges of that index: ``Shard(0)`` (or no sharding).
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        from torch.distributed.tensor import Replicate, Shard

        kinds = [is_dtensor(p) for p in params]
        if not all(kinds):
            i = kinds.index(False)
            raise ValueError(
                f"params mixes DTensor (sharded: FSDP2 / torch.distributed.tensor) and plain tensors (params[{i}], "
                f"shape {tuple(params[i].shape)}): a SAM step's norm would be global over some and per-rank over the "
                "others. Shard every parameter (fully_shard the whole model), or use one SAM per kind")
        p0 = params[0]
        self.mesh = p0.device_mesh
        self.placements = tuple(p0.placements)
        for i, p in enumerate(params):
            if p.device_mesh != self.mesh or tuple(p.placements) != self.placements:
                raise NotImplementedError(
                    f"params[{i}] is a DTensor on {p.device_mesh} with placements {tuple(p.placements)}, params[0] on "
                    f"{self.mesh} with {self.placements}: fastsam reduces a SAM step's norms in one collective over "
                    "one process group, so every parameter must have the same mesh and placements")
        shard_dims = []
        for d, pl in enumerate(self.placements):
            if type(pl) is Shard:
                shard_dims.append(d)
            elif type(pl) is not Replicate:
                raise NotImplementedError(
                    f"DTensor placement {pl!r} (mesh dim {d}) is not supported by fastsam.SAM: parameters must be "
                    "Shard(dim) or Replicate() (FSDP2 / HSDP layouts); a Partial or strided placement has no "
                    "well-defined local perturbation")
        if len(shard_dims) > 1:
            raise NotImplementedError(
                f"placements {self.placements}: more than one sharded mesh dimension (e.g. FSDP x tensor "
                "parallel) is not supported yet; fastsam supports FSDP2 (Shard(0)) and HSDP (Replicate, Shard(0))")
        self.shard_dim = shard_dims[0] if shard_dims else None
        self.tensor_dim = self.placements[self.shard_dim].dim if shard_dims else None
        if self.shard_dim is None:
            self.group = None
            self.world = 1
            self.reduce: Reduce | None = None
        else:
            self.group = self.mesh.get_group(self.shard_dim)
            self.world = dist.get_world_size(self.group)
            self.reduce = GatherReduce(self.group, self.world)

    def contiguous_shards(self) -> bool:
        """Each local shard is one contiguous range of its parameter's flat index."""
        return self.tensor_dim in (None, 0)

    def start(self, p: Tensor) -> int:
        """Flat index, in the unsharded parameter, of this rank's first local element (0 for
        an empty shard). Meaningful with :meth:`contiguous_shards` (the ESAM mask is the only
        user of the offsets, and the optimizer refuses ESAM otherwise)."""
        if self.tensor_dim != 0 or p.dim() == 0 or p.numel() == 0:
            return 0
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, self.mesh, self.placements)
        if math.prod(shape) == 0:
            return 0
        return int(offset[0]) * math.prod(p.shape[1:])


# ---------------------------------------------------------------------------- combine (kernels)
def combine_norms(reduce: Reduce, ok: Tensor, log2_scale: Tensor, part: Tensor, q: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``N = ||x||_q`` from per-rank scaled partial norms, in one collective.

    Each rank holds ``x_r = y_r * 2^L_r`` (``L_r = log2_scale``, its local scale) with
    ``part = ||y_r||_q`` (0 when its shard is empty or zero) and ``ok`` (its values finite). With
    ``L = max_r L_r`` over the ranks with ``part > 0``:
    ``N = 2^L * || (part_r * 2^(L_r - L))_r ||_q`` (each term <= part_r: nothing overflows).

    Returns (0-dim tensors on ``part``'s device, the same on every rank): ``ok`` (every rank
    finite), ``div`` (float64: divide this rank's ``y`` by it to get ``x / N``; 1 where ``N = 0``
    or the local part is 0) and ``log2_n`` (float64 ``log2 N``, 0 for ``N = 0``).
    Only the finite flag is exchanged for ``q = 1`` (p = inf: ``e = rho * T * sign(u)``, no norm).
    """
    f64 = torch.float64
    dev = part.device
    stats = torch.stack([ok.to(f64).reshape(()), log2_scale.to(f64).reshape(()), part.to(f64).reshape(())])
    table = reduce(stats).to(dev)
    ok_all = table[:, 0].min() > 0
    ls, ps = table[:, 1], table[:, 2]
    live = ps > 0
    neg_inf = torch.full_like(ls, -math.inf)
    top = torch.where(live, ls, neg_inf).max()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    scaled = torch.where(live, ps * torch.exp2(torch.where(live, ls, top) - top), torch.zeros_like(ps))
    n = torch.linalg.vector_norm(scaled, q if q != 1.0 else 2.0)
    has = n > 0
    n = torch.where(has, n, torch.ones_like(n))
    mine_live = part.to(f64) > 0
    div = torch.where(mine_live, n * torch.exp2(top - torch.where(mine_live, log2_scale.to(f64), top)),
                      torch.ones_like(n))
    log2_n = torch.where(has, top + torch.log2(n), torch.zeros_like(n))
    return ok_all, div, log2_n


def combine_gsam(reduce: Reduce, ok: Tensor, es: Tensor, eo: Tensor, dot: Tensor, ss_new: Tensor,
                 ss_old: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """GSAM's global sums from per-rank scaled ones, in one collective.

    Each rank holds ``gs = a * 2^es_r`` and ``g_old = b * 2^eo_r`` (``es``, ``eo``: its scale
    exponents, ``-inf`` for an all-zero or empty shard) with ``dot = <a, b>``, ``ss_new = |a|^2``,
    ``ss_old = |b|^2``, and ``ok`` (its values finite). Returns float64 0-dim tensors
    ``(ok, es, eo, dot, ss_new, ss_old)``: ``ok`` of every rank, the global exponents (max over
    ranks, 0 when all are -inf) and the global sums in the units ``2^(es + eo)``, ``4^es``,
    ``4^eo`` (each rank's terms rescaled by powers of two <= 1: nothing overflows)."""
    f64 = torch.float64
    stats = torch.stack([t.to(f64).reshape(()) for t in (ok, es, eo, dot, ss_new, ss_old)])
    table = reduce(stats).to(dot.device)
    ok_all = table[:, 0].min() > 0
    tops = []
    for c in (1, 2):
        t = table[:, c].max()
        tops.append(torch.where(torch.isfinite(t), t, torch.zeros_like(t)))
    ts, to = tops
    fs = torch.exp2(table[:, 1] - ts)  # 0 for an empty rank (-inf exponent)
    fo = torch.exp2(table[:, 2] - to)
    zero = torch.zeros_like(fs)
    dot_g = torch.where(fs * fo > 0, table[:, 3] * fs * fo, zero).sum()
    ssn = torch.where(fs > 0, table[:, 4] * fs * fs, zero).sum()
    sso = torch.where(fo > 0, table[:, 5] * fo * fo, zero).sum()
    return ok_all, ts, to, dot_g, ssn, sso
