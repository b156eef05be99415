"""``backend="triton"``: the SAM step as a few multi-tensor Triton launches (docs/design.md, kernels).

Same functions and signatures as :mod:`fastsam.reference` (``sam_perturb_``, ``gsam_combine_``,
``sam_restore_``, ``sam_restore_sgd_``, ``sam_restore_adam_``, ``sam_restore_accumulate_``). Per
(device, dtype) group of tensors, whatever the number of tensors:

=============================  =======  ==================================================
op                             kernels  passes over parameter-sized memory (fp32, AdamW)
=============================  =======  ==================================================
first step (K1 + K2)           2        K1 reads g (1); K2 reads w, g, writes w, w_old (4)
second step, SGD/Adam (K3)     1        reads w_old, g, m, v; writes w, m, v (7 for Adam)
GSAM (extra reduction)         +1       reads gs, g_old (2); K3 also reads g_old, writes g
restore only / GSAM combine    1 / 2
=============================  =======  ==================================================

No host sync anywhere: the global norm is reduced on the device (K1 writes one partial per
program into its slice of a buffer shared by every group; every K2 program re-reduces the whole
buffer), "N finite" is a device flag, and tables are uploaded with pinned, non-blocking copies
only when they change.

Host work per call is a few C-level passes over the tensor list: the tables are kept per layout
(:mod:`fastsam.kernels.triton_plan`; a layout is the tuple of tensors fastsam.SAM passes), a
step refills only the gradients' addresses and the hyper-parameter rows (one per param group).
Launch geometry lives in :mod:`fastsam.kernels.triton_launch`.

Every op is a ``torch.library.custom_op`` (``fastsam::sam_*``) with fake kernels, so graphs that
contain them compile (``torch.compile``; the CPU interpreter rules out ``triton_op``). Custom ops
cannot mutate lists with ``None`` entries under compile (torch 2.13), so optional per-tensor
entries travel as dense lists plus index lists. In plain eager mode the public functions call the
implementation directly (the dispatcher costs more than the kernels on a ViT-sized list) and bump
the version counters of the mutated parameters / gradients themselves.

CPU tensors run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported); :func:`fastsam.functional.resolve_backend` refuses them otherwise.
"""

import contextlib
import functools
import math
import operator
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Optional

import torch
from torch import Tensor

from .. import _host
from .._compat import custom_op, eager_under_compile_on_old_torch, may_be_traced, no_grad
from .._sequences import PerGroup
from .._shard import Reduce
from ..reference import check_accumulate_args, check_mix, dual_exponent
from . import _tables as T
from . import _triton_kernels as K
from . import triton_launch as L
from . import triton_plan as P
from .triton_launch import IN_LAUNCH, LAUNCHES, LaunchConfig, configure, get_config  # noqa: F401  (public names)
from .triton_plan import _BUMP_LIST  # noqa: F401  (tests switch the form)
from .triton_plan import bump_versions as _bump_versions

FUSED_UPDATES = True  # this backend implements sam_restore_sgd_ / sam_restore_adam_
SHARDED = True  # sam_perturb_ / gsam_combine_ / sam_restore_accumulate_ take reduce= (fastsam._shard)
PER_GROUP = True  # hyper-parameter columns may be fastsam._sequences.PerGroup (rows per group, no per-tensor work)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_data_ptr = Tensor.data_ptr
_contig = Tensor.is_contiguous
_is_none = functools.partial(operator.is_, None)


def _ptrs(ts: Sequence[Tensor | None], dense: bool | None = None) -> list[int]:
    """Addresses, 0 for a missing entry (one C loop with the host helpers, fastsam._host; else one
    C-level pass when nothing is missing; ``dense``: whether the caller knows that nothing is).
    A list: the launch plans compare it with the last call's at C speed."""
    if _host.active():
        return list(_host.addresses(ts))
    if dense if dense is not None else not any(map(_is_none, ts)):
        return list(map(_data_ptr, ts))
    return [0 if t is None else t.data_ptr() for t in ts]


def _all_contiguous(ts: Sequence[Tensor | None], dense: bool | None = None) -> bool:
    """Every present tensor is contiguous (a sparse one is a ValueError)."""
    if _host.active() and _host.all_contiguous(ts):  # one C loop; otherwise the checks below say why
        return True
    try:
        if dense if dense is not None else not any(map(_is_none, ts)):
            return all(map(_contig, ts))
        return all(t is None or t.is_contiguous() for t in ts)
    except (RuntimeError, TypeError):  # "Sparse CPU tensors do not have is_contiguous"; a None where none may be
        if any(t is None for t in ts):
            raise ValueError("a gradient is missing (None) where the op needs one per tensor") from None
        if any(t.layout != torch.strided for t in ts):
            raise ValueError("backend='triton' does not support sparse gradients (grads: a tensor is sparse)") from None
        raise


def _plan(key: tuple | None, refs: tuple, op: str, mode: object, params: Sequence[Tensor], cols: list[P.Col],
          dyn: list[int], offsets: Sequence[int] | None, fit: tuple, skip: tuple[int, ...] = (),
          dense: bool | None = None) -> tuple[P.Plan, P.Staging | None]:
    """The cached plan of a call (dynamic columns: ``dyn``), or one built for this call alone
    (every column filled, non-contiguous tensors staged) when the tensors are not tuples or need
    staging."""
    dyn_ok = all(_all_contiguous(cols[c][0] or (), dense) for c in dyn)
    plan = P.lookup(key if dyn_ok else None, params)
    if plan is not None:
        return plan, None
    if key is not None and dyn_ok:
        try:
            plan = P.build(op, mode, params, cols, dyn, offsets, None, fit, len(cols), skip)
            P.store(key, plan, params, refs)
            return plan, None
        except P._NotCacheable:
            pass
    st = P.Staging()
    plan = P.build(op, mode, params, cols, [], offsets, st, fit, len(cols), skip)
    plan.cacheable = False
    return plan, st


def _pblock(plan: P.Plan) -> int:
    """PBLOCK (the reduction's power-of-two width over the programs' partials) from the configured
    grid, not the one the register fit shrinks it to: the first launch on a GPU learns the fit and
    makes later grids smaller, which must not change this constexpr (a recompile of every kernel
    that takes it)."""
    if plan.pblock == 0:
        plan.pblock = T.next_pow2(sum(max(1, min(gp.nblk, L._geometry(gp.group.device)[1])) for gp in plan.groups))
    return plan.pblock


def _gather_partials(bufs: dict[torch.device, Tensor], slices: list[tuple[torch.device, int, int]],
                     rows: int, stride: int) -> None:
    """Model split over devices: copy every group's partial slice into every other device's buffer
    (device-to-device copies in stream order, no host sync)."""
    if len(bufs) < 2:
        return
    for dev, base, cnt in slices:
        for other, buf in bufs.items():
            if other != dev:
                for k in range(rows):
                    lo = k * stride + base
                    buf[lo:lo + cnt].copy_(bufs[dev][lo:lo + cnt], non_blocking=True)


def _globalize_partials(bufs: dict[torch.device, Tensor], total: int, q: float, qmode: int,
                        reduce: Reduce) -> None:
    """Sharded parameters: replace this rank's K1 partials (``S_k`` in ``part[k]``, ``E_k`` in
    ``part[total + k]``, the sum ``S_k 2^(w E_k)``, ``w`` = q for general q, else QMODE) by one
    partial holding the global sum over every rank, combined as K2 combines partials (E the max,
    S rescaled by ``2^(w (E_k - E))``): this rank's sum in float64, one ``reduce`` call, the same
    combine over the gathered table. The other slots get S = 0 at the same E (terms of 0). Device
    ops only (no host sync); a non-finite sum on any rank stays non-finite (K2: nothing perturbed)."""
    f64 = torch.float64
    buf = next(iter(bufs.values()))
    w = q if qmode == 0 else float(qmode)
    s_k, e_k = buf[:total].to(f64), buf[total:2 * total].to(f64)
    e_loc = e_k.max()
    s_loc = (s_k * torch.exp2(w * (e_k - e_loc))).sum()
    table = reduce(torch.stack([s_loc, e_loc])).to(buf.device)
    s_r, e_r = table[:, 0], table[:, 1]
    e_g = e_r.max()
    s_g = (s_r * torch.exp2(w * (e_r - e_g))).sum()
    for b in bufs.values():
        b[:total].zero_()
        b[0:1].copy_(s_g.reshape(1))
        b[total:2 * total].copy_(e_g.to(b.dtype).expand(total))


# ------------------------------------------------------------------------------ first step
def _perturb_impl(
    params: Sequence[Tensor], grads: Sequence[Tensor], w_old: Sequence[Tensor], ema: Sequence[Tensor],
    ema_ready: Sequence[Tensor], g_old: Sequence[Tensor], rhos: Sequence[float], etas: Sequence[float],
    adaptive: Sequence[bool], offsets: Sequence[int], p: float, fsam_sigma: float | None, fsam_lambda: float,
    swp_keep: float, seed: int, step: int, ema_out: Sequence[Tensor] | None = None,
    ready_out: Sequence[Tensor] | None = None, reduce: Reduce | None = None,
) -> Tensor:
    """K1 over every group, then K2 over every group (so every K2 sees every partial).

    ``reduce`` (sharded parameters): between K1 and K2 the partials become the global sum
    (:func:`_globalize_partials`, one collective), so every K2 reduces to the global N.

    Every table is built and checked before the first launch, and K1 writes only its partials
    and flag snapshots: an error up to the K2 launches changes nothing. K2 writes a group's
    parameters, ``w_old``, ``g_old`` and the F-SAM outputs in one launch; if a later group's K2
    launch fails, the groups already perturbed are restored from their ``w_old`` before the error
    propagates (the parameters are unchanged on an exception)."""
    if not params:
        return torch.ones((), dtype=torch.bool)
    fsam = fsam_sigma is not None
    if fsam and (len(ema) != len(params) or len(ema_ready) != len(params)):
        raise ValueError("fsam_sigma is set: ema and ema_ready need one tensor per parameter")
    ema_out = ema if (not fsam or ema_out is None) else ema_out
    ready_out = ema_ready if (not fsam or ready_out is None) else ready_out
    if fsam and (len(ema_out) != len(params) or len(ready_out) != len(params)):
        raise ValueError("ema_out and ready_out need one tensor per parameter")
    if len(grads) != len(params) or len(w_old) != len(params):
        raise ValueError("grads and w_old need one tensor per parameter")
    gsam = len(g_old) > 0
    swp = swp_keep < 1.0
    q = dual_exponent(p)
    qmode = 2 if q == 2.0 else (1 if q == 1.0 else 0)
    any_adaptive = any(adaptive.values if isinstance(adaptive, PerGroup) else adaptive)
    cols: list[P.Col] = [(params, True, "param"), (grads, False, "grad"), (w_old, True, "like"),
                         (ema if fsam else None, False, "like"), (ema_ready if fsam else None, False, "flag"),
                         (g_old if gsam else None, True, "like"), (ema_out if fsam else None, True, "like"),
                         (ready_out if fsam else None, True, "flag")]
    fit = (qmode, fsam, any_adaptive, gsam, swp, L._CONFIG)
    statics = (params, w_old, ema if fsam else None, ema_ready if fsam else None, g_old if gsam else None,
               ema_out if fsam else None, ready_out if fsam else None, offsets)
    key = P.plan_key(("perturb",) + fit, *statics)
    # a gradient per tensor (the op's contract): no None scan (a None fails the contiguity check)
    plan, st = _plan(key, statics[1:], "perturb", fit, params, cols, [K.P_G.value], offsets, fit,
                     (K.P_READY.value, K.P_READY_OUT.value), dense=True)
    # hyper-parameter rows: one per distinct (rho, eta, adaptive), a param group's
    hrow, rows = _hyper_groups(plan, (rhos, etas, adaptive), len(params))
    gptrs = _ptrs(grads, True) if st is None else None
    q_hi = struct.unpack("f", struct.pack("f", q))[0] if qmode == 0 else q  # q = q_hi + q_lo exactly
    scal_vals = (q_hi, q - q_hi, fsam_sigma if fsam else 0.0, fsam_lambda, swp_keep, 1.0 - fsam_lambda)
    thr = int(swp_keep * 4294967296.0) if swp else 0
    launches = []
    for gp in plan.groups:
        g = gp.group
        ct = g.compute_dtype
        dyn = [] if gptrs is None else [gptrs if gp.idx is None else [gptrs[i] for i in gp.idx]]
        tab = gp.table(dyn, hrow if gp.idx is None else [hrow[i] for i in gp.idx], len(cols), K.P_HROW.value,
                       (K.P_READY.value, K.P_READY_OUT.value))
        hyp_t = P.row_table("perturb", fit, g.device, ct, rows)
        scal = P.CACHE.mirror(("perturb", g.device, g.dtype, "scal"), ct).get(scal_vals, g.device)
        fit_key = gp.fit_base + (gp.vec.get("ALIGNED", False),)
        nprog, warps = P.fit_geometry(gp, fit_key)
        snap = plan.snap.get(id(gp))
        if fsam and (snap is None or snap.device != g.device):
            snap = plan.snap[id(gp)] = torch.empty(gp.n, dtype=torch.float32, device=g.device)
        launches.append((gp, tab, hyp_t, scal, nprog, warps, fit_key, snap if fsam else tab))
    total = sum(x[4] for x in launches)
    bases, b = [], 0
    for x in launches:
        bases.append(b)
        b += x[4]
    bufs: dict[torch.device, Tensor] = {}
    oks: dict[torch.device, Tensor] = {}
    for gp in plan.groups:
        dev = gp.group.device
        if dev not in bufs:
            bufs[dev] = plan.buffer(dev, 2 * total)  # (S, E) per program
            oks[dev] = torch.empty((), dtype=torch.uint8, device=dev)
    pt = L._TL_DTYPE[plan.acc]
    for (gp, tab, hyp_t, scal, nprog, warps, fit_key, snap), base in zip(launches, bases):
        g = gp.group
        L._launch(
            K.perturb_partials_kernel, (nprog,), tab, gp.n, hyp_t, scal, gp.blocks, gp.nblk, bufs[g.device], base,
            total, snap,
            DT=L._TL_DTYPE[g.dtype], CT=L._TL_DTYPE[g.compute_dtype], PT=pt, QMODE=qmode, FSAM=fsam,
            ADAPTIVE=any_adaptive, BLOCK=gp.block, num_warps=warps, fit_key=fit_key, **gp.vec,
        )
    _gather_partials(bufs, [(x[0].group.device, bb, x[4]) for x, bb in zip(launches, bases)], 2, total)
    if reduce is not None:
        _globalize_partials(bufs, total, q, qmode, reduce)
    pblock = _pblock(plan)
    result = oks[params[0].device].view(torch.bool)  # made before the writes: nothing can fail after them
    done: list[P.GroupPlan] = []
    try:
        for gp, tab, hyp_t, scal, nprog, warps, fit_key, snap in launches:
            g = gp.group
            L._launch(
                K.perturb_apply_kernel, (nprog,), tab, gp.n, hyp_t, scal, gp.blocks, gp.nblk, bufs[g.device], total,
                total, snap, oks[g.device], seed & 0xFFFFFFFF, step & 0xFFFFFFFF, thr,
                DT=L._TL_DTYPE[g.dtype], CT=L._TL_DTYPE[g.compute_dtype], PT=pt, QMODE=qmode, FSAM=fsam,
                ADAPTIVE=any_adaptive, GSAM=gsam, SWP=swp, RNE_BF16=L._rne_bf16(g), BLOCK=gp.block, PBLOCK=pblock,
                num_warps=warps, fit_key=fit_key, **gp.vec,
            )
            done.append(gp)
        if st is not None:
            st.finish()
    except BaseException:
        # groups already perturbed (and the staged copies of those not yet written back) go back
        # to w: their w_old holds it bit for bit
        for gp in done:
            gi = gp.group.idx
            idx = [i for i in gi if st is None or id(params[i]) not in st.copies]
            if idx:
                cur = (lambda t: t) if st is None else st.current
                torch._foreach_copy_([params[i] for i in idx], [cur(w_old[i]) for i in idx])
        raise
    return result


# ------------------------------------------------------------------------------ second step
_NHYP = 8  # K.S_NHYP
_ZERO_ROW = (0.0,) * _NHYP
_NO_ADAM_ROW = (0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0)  # eps = sqrt(bc2) = 1: the discarded lanes stay NaN-free

# rows_fn(plan, grads, undo, dense) -> (per-tensor row index, rows): the hyper-parameter rows of a
# call (dense: no gradient is None)
RowsFn = Callable[[P.Plan, Sequence[Tensor | None], list, bool], tuple[Sequence[int], list[tuple]]]


def _hyper_groups(plan: P.Plan, cols: tuple, n: int) -> tuple[Sequence[int], list[tuple]]:
    """Per-tensor index into the distinct tuples of the per-tensor hyper-parameter ``cols`` (each a
    float for every tensor, a :class:`~fastsam._sequences.PerGroup`, or one value per tensor),
    with those tuples as floats. PerGroup columns over one ``group_of`` give a row per group with
    no per-tensor work; the plan keeps the result while the same groups and values come again."""
    groups = {id(c.group_of): c.group_of for c in cols if isinstance(c, PerGroup)}
    if len(groups) == 1 and all(isinstance(c, (PerGroup, int, float)) for c in cols):
        (group_of,) = groups.values()
        vals = tuple(c.values if isinstance(c, PerGroup) else (c,) for c in cols)
        old = plan.hkey
        if old is not None and old[0] is group_of and old[1] == vals:
            return plan.hrow, plan.hrows  # type: ignore[return-value]
        ng = max(len(v) for v in vals)
        rows = [tuple(float(v[g] if len(v) > 1 else v[0]) for v in vals) for g in range(ng)]
        plan.hkey, plan.hrow, plan.hrows = (group_of, vals), group_of, rows  # type: ignore[assignment]
        return group_of, rows
    old = plan.hkey
    if old is not None and len(old) == len(cols) and all(
            (a is b and type(b) is tuple) or (type(b) is float and type(a) is float and a == b)
            for a, b in zip(old, cols)):
        return plan.hrow, plan.hrows  # type: ignore[return-value]
    seqs = [c if not isinstance(c, (int, float)) else None for c in cols]
    if all(sq is None for sq in seqs):
        hg, hv = [0] * n, [tuple(float(c) for c in cols)]
    else:
        for sq in seqs:
            if sq is not None and len(sq) != n:
                raise ValueError(f"a per-tensor hyper-parameter has {len(sq)} values for {n} tensors")
        per = [list(map(float, sq)) if sq is not None else [float(c)] * n for sq, c in zip(seqs, cols)]
        hg, hv = P.rows_index(list(zip(*per)))
    plan.hkey, plan.hrow, plan.hrows = cols, hg, hv  # type: ignore[assignment]
    return hg, hv


def _sgd_rows_fn(cols: tuple, fresh: Sequence[bool]) -> RowsFn:
    """torch.optim.SGD rows: lr, weight_decay, momentum, 1 - dampening, fresh (the momentum buffer
    starts as d)."""
    def rows_fn(plan: P.Plan, grads: Sequence[Tensor | None], undo: list, dense: bool
                ) -> tuple[Sequence[int], list[tuple]]:
        n = len(grads)
        hg, hv = _hyper_groups(plan, cols, n)
        any_fresh = any(fresh)
        if not any_fresh and dense:
            return hg, [(lr, wd, mom, 1.0 - damp, 0.0, 0.0, 0.0, 0.0) for lr, wd, mom, damp in hv]
        keys = [None if g is None else (hg[i], bool(fresh[i])) for i, g in enumerate(grads)]
        idx, uniq = P.rows_index([(-1, False) if k is None else k for k in keys])
        rows = [_ZERO_ROW if h < 0 else (*(lambda v: (v[0], v[1], v[2], 1.0 - v[3]))(hv[h]), 1.0 if f else 0.0,
                                          0.0, 0.0, 0.0) for h, f in uniq]
        return idx, rows
    return rows_fn


def _adam_row(h: tuple, t: float) -> tuple[float, ...]:
    """Adam/AdamW row from torch's scalars, computed in float64 as torch does on the host:
    weight_decay, 1 - beta1, beta2, 1 - beta2, eps, lr / bc1, sqrt(bc2), 1 - lr * wd with
    ``bc = 1 - beta^t``."""
    lr, b1, b2, eps, wd = h
    bc1 = 1.0 - b1 ** t
    bc2 = 1.0 - b2 ** t
    return (wd, 1.0 - b1, b2, 1.0 - b2, eps, lr / bc1, math.sqrt(bc2), 1.0 - lr * wd)


def _adam_rows_fn(cols: tuple, steps: Sequence[Tensor | None]) -> RowsFn:
    """torch.optim.Adam / AdamW rows; torch increments the step first, then computes the bias
    corrections from it (one row per param group while every tensor has the same step)."""
    def rows_fn(plan: P.Plan, grads: Sequence[Tensor | None], undo: list, dense: bool
                ) -> tuple[Sequence[int], list[tuple]]:
        n = len(grads)
        hg, hv = _hyper_groups(plan, cols, n)
        none = not dense
        ts = P.increment_steps(plan if plan.cacheable else None,
                               [s if g is not None else None for s, g in zip(steps, grads)] if none else steps, undo)
        if type(ts) is P.Uniform:
            return hg, [_adam_row(h, ts.value) for h in hv]
        present = [t for t in ts if t is not None]
        if not none and present and min(present) == max(present):
            return hg, [_adam_row(h, present[0]) for h in hv]
        keys = [(-1, 0.0) if t is None else (hg[i], t) for i, t in enumerate(ts)]
        idx, uniq = P.rows_index(keys)
        return idx, [_NO_ADAM_ROW if h < 0 else _adam_row(hv[h], t) for h, t in uniq]
    return rows_fn


def _fixed_rows_fn(hrow: list[int], rows: list[tuple]) -> RowsFn:
    return lambda plan, grads, undo, dense: (hrow, rows)


def _second_step_impl(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    w_old: Sequence[Tensor | None],
    g_old: Sequence[Tensor | None] | None,
    s1: Sequence[Tensor | None] | None,
    s2: Sequence[Tensor | None] | None,
    s3: Sequence[Tensor | None] | None,
    rows_fn: RowsFn | None,
    *,
    mode: int,
    gsam_alpha: float,
    nesterov: bool = False,
    maximize: bool = False,
    amsgrad: bool = False,
    decoupled: bool = False,
    params_mutated: bool = True,
    mix: Tensor | None = None,
    mix_writeback: bool = True,
) -> None:
    """Shared launcher of restore / GSAM combine / SGD / Adam / accumulate (aligned sequences,
    None = no entry).

    ``rows_fn`` gives the hyper-parameter rows; it runs after the tables are built and checked,
    and appends to its ``undo`` list what reverses its own side effects (Adam's step counters).

    On an exception in a launch the optimizer state (momentum buffers, Adam moments, step
    counters) is put back as it was, and every parameter is either unchanged or restored from its
    ``w_old``, then the error propagates. With several dtype groups the update modes launch the
    largest group last and keep copies of what the smaller groups' launches write to state and
    to parameters that have no ``w_old``; the accumulators of MODE_ACCUM and gradients are not
    kept (the caller's buffers: fastsam.SAM writes new sums out of place and recomputes .grad).
    ``mix`` (MODE_SGD / MODE_ADAM): ``c1 * g + c2 * g_old`` from the device tensor instead of
    GSAM (no partial sums), written back only with ``mix_writeback``."""
    n = len(params)
    if n == 0:
        return
    gsam = (gsam_alpha > 0 or mix is not None) and g_old is not None and any(
        go is not None and g is not None for go, g in zip(g_old, grads))
    use_mix = gsam and mix is not None
    writeback = gsam and (mix_writeback if use_mix else True)
    updates = mode != K.MODE_RESTORE
    accum = mode == K.MODE_ACCUM
    cols: list[P.Col] = [(params, params_mutated, "param"), (grads, writeback and not accum, "like"),
                         (w_old, False, "like"), (g_old if gsam else None, False, "like"), (s1, updates, "like"),
                         (s2, updates and not accum, "like"), (s3, updates, "like")]
    fit = (mode, gsam, nesterov, maximize, amsgrad, decoupled, params_mutated, L._CONFIG) + (
        (use_mix, writeback, mix.numel()) if use_mix else ())  # type: ignore[union-attr]
    statics = (params, w_old, g_old if gsam else None, s1, s2, s3)
    key = P.plan_key(("second",) + fit, *statics)
    dense = not _host.count_none(grads)
    plan, st = _plan(key, statics[1:], "second", fit, params, cols, [K.S_G.value], None, fit, dense=dense)
    order = sorted(plan.groups, key=lambda gp: gp.total_numel) if len(plan.groups) > 1 else plan.groups
    saved: list[tuple[Tensor, Tensor]] = []
    if len(order) > 1 and mode in (K.MODE_SGD, K.MODE_ADAM):
        # launched in size order; the state (and the parameters with no w_old to restore from)
        # that every group but the last (largest) writes is kept
        state = [lst for lst in (s1, s2, s3) if lst is not None]
        for gp in order[:-1]:
            for i in gp.group.idx:
                if grads[i] is None:
                    continue
                keep = [lst[i] for lst in state] + ([params[i]] if w_old[i] is None else [])
                for t in keep:
                    if t is not None:
                        t = t if st is None else st.current(t)
                        saved.append((t, t.clone()))
    undo: list[Callable[[], None]] = []
    hrow, rows = rows_fn(plan, grads, undo, dense) if rows_fn is not None else ([0] * n, [_ZERO_ROW])
    try:
        gptrs = _ptrs(grads, dense) if st is None else None
        launches = []
        for gp in order:
            g = gp.group
            ct = g.compute_dtype
            dyn = [] if gptrs is None else [gptrs if gp.idx is None else [gptrs[i] for i in gp.idx]]
            tab = gp.table(dyn, hrow if gp.idx is None else [hrow[i] for i in gp.idx], len(cols),
                           K.S_HROW.value, ())
            hyp_t = P.row_table("second", fit, g.device, ct, rows)
            if use_mix:
                scal = mix.to(device=g.device, dtype=torch.float64)  # type: ignore[union-attr]  # (c1, c2), read by K3
            else:
                scal = P.CACHE.mirror(("second", g.device, g.dtype, "scal"), ct).get((float(gsam_alpha),), g.device)
            fit_key = gp.fit_base + (gp.vec.get("ALIGNED", False),)
            nprog, warps = P.fit_geometry(gp, fit_key)
            launches.append((gp, tab, hyp_t, scal, nprog, warps, fit_key))
        total = sum(x[4] for x in launches)
        bufs: dict[torch.device, Tensor] = {}
        pt = L._TL_DTYPE[plan.acc]
        if gsam and not use_mix:
            bases, b = [], 0
            for x in launches:
                bases.append(b)
                b += x[4]
            for gp in plan.groups:
                if gp.group.device not in bufs:
                    bufs[gp.group.device] = plan.buffer(gp.group.device, 5 * total)
            for (gp, tab, _h, _s, nprog, warps, fit_key), base in zip(launches, bases):
                g = gp.group
                L._launch(K.gsam_partials_kernel, (nprog,), tab, gp.n, gp.blocks, gp.nblk, bufs[g.device], base,
                          total, DT=L._TL_DTYPE[g.dtype], CT=L._TL_DTYPE[g.compute_dtype], PT=pt, BLOCK=gp.block,
                          num_warps=warps, fit_key=fit_key, **gp.vec)
            _gather_partials(bufs, [(x[0].group.device, bb, x[4]) for x, bb in zip(launches, bases)], 5, total)
        # read only by GSAM's combine: constant otherwise (no recompile)
        pblock = _pblock(plan) if gsam and not use_mix else 1
        extra = {"MIX": True, "WRITEBACK": writeback, "CORRECT": mix.numel() == 3} if use_mix else {}  # type: ignore
        for gp, tab, hyp_t, scal, nprog, warps, fit_key in launches:
            g = gp.group
            part = bufs[g.device] if gsam and not use_mix else tab
            L._launch(
                K.second_step_kernel, (nprog,), tab, gp.n, hyp_t, scal, gp.blocks, gp.nblk, part, total, total,
                DT=L._TL_DTYPE[g.dtype], CT=L._TL_DTYPE[g.compute_dtype], PT=pt, MODE=mode, GSAM=gsam,
                NESTEROV=nesterov, MAXIMIZE=maximize, AMSGRAD=amsgrad, DECOUPLED=decoupled, RNE_BF16=L._rne_bf16(g),
                BLOCK=gp.block, PBLOCK=pblock, num_warps=warps, fit_key=fit_key, **gp.vec, **extra,
            )
        if st is not None:
            st.finish()
    except BaseException:
        for t, old in saved:
            t.copy_(old)
        for fn in reversed(undo):
            fn()
        rest = [i for i in range(n) if w_old[i] is not None and (st is None or id(params[i]) not in st.copies)]
        if rest and params_mutated:
            cur = (lambda t: t) if st is None else st.current
            torch._foreach_copy_([params[i] for i in rest], [cur(w_old[i]) for i in rest])  # type: ignore[misc]
        raise


def _scatter(n: int, dense: Sequence[Tensor], idx: Sequence[int]) -> list[Tensor | None]:
    out: list[Tensor | None] = [None] * n
    for t, i in zip(dense, idx):
        out[i] = t
    return out


def _dense(xs: Sequence[Tensor | None] | None) -> tuple[list[Tensor], list[int]]:
    if xs is None:
        return [], []
    idx = [i for i, t in enumerate(xs) if t is not None]
    return [xs[i] for i in idx], idx  # type: ignore[misc]


# ------------------------------------------------------------------------------ custom ops
# The ops are registered with torch.library.custom_op so that torch.compile graphs contain them as
# opaque nodes. In plain eager mode the public functions call the same implementation directly:
# the dispatcher costs 1-3 ms per call on a ViT-sized list (argument checks, one version bump per
# mutated tensor), more than the kernels. The direct path bumps the version counters of the
# user-visible mutated tensors (parameters; gradients for GSAM) itself, so autograd still sees
# the in-place writes.
_DIRECT = [False]


def _traced(probe: Tensor) -> bool:
    """True when something may trace the call (see :func:`fastsam._compat.may_be_traced`), unless
    inside :func:`direct`."""
    return not _DIRECT[0] and may_be_traced(probe)


@contextlib.contextmanager
def call_directly() -> Iterator[None]:
    """Always take the direct path (tests count every torch op the implementation issues; a
    TorchDispatchMode cannot look inside a custom op)."""
    _DIRECT[0] = True
    try:
        yield
    finally:
        _DIRECT[0] = False


@custom_op("fastsam::sam_perturb", mutates_args=("params", "w_old", "ema", "ema_ready", "g_old", "ema_out",
                                                 "ready_out"))
def _op_perturb(
    params: list[Tensor], grads: list[Tensor], w_old: list[Tensor], ema: list[Tensor], ema_ready: list[Tensor],
    g_old: list[Tensor], rhos: list[float], etas: list[float], adaptive: list[bool], offsets: list[int],
    p: float, fsam_sigma: Optional[float], fsam_lambda: float, swp_keep: float, seed: int, step: int,  # noqa: UP045
    ema_out: list[Tensor], ready_out: list[Tensor],
) -> Tensor:
    """``ema_out`` / ``ready_out`` empty: the F-SAM state is updated in place (``ema`` and
    ``ema_ready`` are declared mutated for that case)."""
    return _perturb_impl(params, grads, w_old, ema, ema_ready, g_old, rhos, etas, adaptive, offsets,
                         p, fsam_sigma, fsam_lambda, swp_keep, seed, step, ema_out or None, ready_out or None)


@_op_perturb.register_fake
def _(params, grads, w_old, ema, ema_ready, g_old, rhos, etas, adaptive, offsets, p, fsam_sigma,
      fsam_lambda, swp_keep, seed, step, ema_out, ready_out):
    dev = params[0].device if params else torch.device("cpu")
    return torch.empty((), dtype=torch.bool, device=dev)


def _second_step_body(
    params: Sequence[Tensor], grads: Sequence[Tensor | None], w_old: Sequence[Tensor | None],
    g_old: Sequence[Tensor | None] | None, s1: Sequence[Tensor | None], s2: Sequence[Tensor | None],
    s3: Sequence[Tensor | None], steps: Sequence[Tensor | None], hyper: tuple, fresh: Sequence[bool],
    mode: int, gsam_alpha: float, nesterov: bool, maximize: bool, amsgrad: bool, decoupled: bool,
    mix: Tensor | None = None, mix_writeback: bool = False,
) -> None:
    """Aligned sequences (None = no entry). ``hyper``: the optimizer's raw values as per-tensor
    columns, each a float for every tensor or one value per tensor (SGD: lr, weight_decay,
    momentum, dampening; Adam: lr, beta1, beta2, eps, weight_decay)."""
    if mode == K.MODE_SGD:
        rows_fn = _sgd_rows_fn(hyper[:4], fresh)
    else:
        rows_fn = _adam_rows_fn(hyper[:5], steps)
    _second_step_impl(params, grads, w_old, g_old, s1, s2, s3, rows_fn, mode=mode, gsam_alpha=gsam_alpha,
                      nesterov=nesterov, maximize=maximize, amsgrad=amsgrad, decoupled=decoupled, mix=mix,
                      mix_writeback=mix_writeback)


def _flat_hyper(hyper: Sequence[float], n: int) -> tuple:
    """The custom ops' flat hyper list (5 values per tensor) as per-tensor columns."""
    return tuple(tuple(hyper[5 * i + k] for i in range(n)) for k in range(5))


def _second_step_dense(
    params: list[Tensor], grads: list[Tensor], grad_idx: list[int], w_old: list[Tensor], w_old_idx: list[int],
    g_old: list[Tensor], g_old_idx: list[int], state1: list[Tensor], state1_idx: list[int],
    state2: list[Tensor], state2_idx: list[int], state3: list[Tensor], state3_idx: list[int],
    steps: list[Tensor], steps_idx: list[int], hyper: list[float], fresh: list[bool], mode: int,
    gsam_alpha: float, nesterov: bool, maximize: bool, amsgrad: bool, decoupled: bool,
    mix: Tensor | None = None, mix_writeback: bool = False,
) -> None:
    """Custom-op form: optional entries as dense lists plus index lists (torch.compile cannot
    functionalize a mutated ``Tensor?[]`` holding None)."""
    n = len(params)
    _second_step_body(params, _scatter(n, grads, grad_idx), _scatter(n, w_old, w_old_idx),
                      _scatter(n, g_old, g_old_idx), _scatter(n, state1, state1_idx),
                      _scatter(n, state2, state2_idx), _scatter(n, state3, state3_idx),
                      _scatter(n, steps, steps_idx), _flat_hyper(hyper, n), fresh, mode, gsam_alpha, nesterov,
                      maximize, amsgrad, decoupled, mix, mix_writeback)


@custom_op("fastsam::sam_second_step", mutates_args=("params", "state1", "state2", "state3", "steps"))
def _op_second_step(
    params: list[Tensor], grads: list[Tensor], grad_idx: list[int], w_old: list[Tensor], w_old_idx: list[int],
    g_old: list[Tensor], g_old_idx: list[int], state1: list[Tensor], state1_idx: list[int],
    state2: list[Tensor], state2_idx: list[int], state3: list[Tensor], state3_idx: list[int],
    steps: list[Tensor], steps_idx: list[int], hyper: list[float], fresh: list[bool], mode: int,
    gsam_alpha: float, nesterov: bool, maximize: bool, amsgrad: bool, decoupled: bool,
    mix: Optional[Tensor] = None,  # noqa: UP045
) -> None:
    """Restore (+ SGD / Adam update); ``grads`` are only read (no GSAM; a ``mix`` not written back)."""
    _second_step_dense(params, grads, grad_idx, w_old, w_old_idx, g_old, g_old_idx, state1, state1_idx, state2,
                       state2_idx, state3, state3_idx, steps, steps_idx, hyper, fresh, mode, 0.0, nesterov,
                       maximize, amsgrad, decoupled, mix, False)


@custom_op("fastsam::sam_second_step_gsam",
                         mutates_args=("params", "grads", "state1", "state2", "state3", "steps"))
def _op_second_step_gsam(
    params: list[Tensor], grads: list[Tensor], grad_idx: list[int], w_old: list[Tensor], w_old_idx: list[int],
    g_old: list[Tensor], g_old_idx: list[int], state1: list[Tensor], state1_idx: list[int],
    state2: list[Tensor], state2_idx: list[int], state3: list[Tensor], state3_idx: list[int],
    steps: list[Tensor], steps_idx: list[int], hyper: list[float], fresh: list[bool], mode: int,
    gsam_alpha: float, nesterov: bool, maximize: bool, amsgrad: bool, decoupled: bool,
    mix: Optional[Tensor] = None,  # noqa: UP045
) -> None:
    """GSAM (or written-back ``mix``) variant: the combined gradient is written back into ``grads``."""
    _second_step_dense(params, grads, grad_idx, w_old, w_old_idx, g_old, g_old_idx, state1, state1_idx, state2,
                       state2_idx, state3, state3_idx, steps, steps_idx, hyper, fresh, mode, gsam_alpha, nesterov,
                       maximize, amsgrad, decoupled, mix, True)


@_op_second_step.register_fake
def _(*args, **kwargs):
    return None


@_op_second_step_gsam.register_fake
def _(*args, **kwargs):
    return None


def _restore_body(params: Sequence[Tensor], w_old: Sequence[Tensor]) -> None:
    n = len(params)
    _second_step_impl(params, (None,) * n, w_old, None, None, None, None, None, mode=K.MODE_RESTORE,
                      gsam_alpha=0.0)


def _gsam_body(grads: Sequence[Tensor], g_old: Sequence[Tensor], alpha: float) -> None:
    # the gradients stand in for the table's "parameters"; nothing is restored (no w_old)
    _second_step_impl(grads, grads, [None] * len(grads), g_old, None, None, None, None, mode=K.MODE_RESTORE,
                      gsam_alpha=alpha, params_mutated=False)


def _accumulate_body(params: Sequence[Tensor], grads: Sequence[Tensor | None], w_old: Sequence[Tensor | None],
                     g_old: Sequence[Tensor | None] | None, acc: Sequence[Tensor | None], reset: Sequence[bool],
                     weight: float, scale: float, gsam_alpha: float,
                     acc_in: Sequence[Tensor | None] | None = None) -> None:
    n = len(params)
    row = (float(weight), float(scale))
    rows = [row + (0.0,) + _ZERO_ROW[3:], row + (1.0,) + _ZERO_ROW[3:], _ZERO_ROW]  # add / reset / no acc
    hrow = [2 if acc[i] is None else (1 if reset[i] else 0) for i in range(n)]
    src = None  # column S_2: the running sums when they are read from other tensors than acc
    if acc_in is not None:
        src = [None if (acc[i] is None or reset[i] or acc_in[i] is acc[i]) else acc_in[i] for i in range(n)]
        if all(t is None for t in src):
            src = None
    _second_step_impl(params, grads, w_old, g_old, acc, src, None, _fixed_rows_fn(hrow, rows), mode=K.MODE_ACCUM,
                      gsam_alpha=gsam_alpha)


@custom_op("fastsam::sam_restore_accumulate", mutates_args=("params", "acc"))
def _op_restore_accumulate(
    params: list[Tensor], grads: list[Tensor], grad_idx: list[int], w_old: list[Tensor], w_old_idx: list[int],
    g_old: list[Tensor], g_old_idx: list[int], acc: list[Tensor], acc_idx: list[int], acc_in: list[Tensor],
    acc_in_idx: list[int], reset: list[bool], weight: float, scale: float, gsam_alpha: float,
) -> None:
    """m-SAM micro-batch: restore + GSAM combine + accumulate (dense lists + index lists)."""
    n = len(params)
    _accumulate_body(params, _scatter(n, grads, grad_idx), _scatter(n, w_old, w_old_idx),
                     _scatter(n, g_old, g_old_idx), _scatter(n, acc, acc_idx), reset, weight, scale, gsam_alpha,
                     _scatter(n, acc_in, acc_in_idx) if acc_in_idx else None)


@_op_restore_accumulate.register_fake
def _(*args, **kwargs):
    return None


@custom_op("fastsam::sam_restore", mutates_args=("params",))
def _op_restore(params: list[Tensor], w_old: list[Tensor]) -> None:
    _restore_body(params, w_old)


@_op_restore.register_fake
def _(params, w_old):
    return None


@custom_op("fastsam::sam_gsam_combine", mutates_args=("grads",))
def _op_gsam_combine(grads: list[Tensor], g_old: list[Tensor], alpha: float) -> None:
    _gsam_body(grads, g_old, alpha)


@_op_gsam_combine.register_fake
def _(grads, g_old, alpha):
    return None


# ------------------------------------------------------------------------------ public API
@eager_under_compile_on_old_torch
@no_grad
def sam_perturb_(
    params: list[Tensor],
    grads: list[Tensor],
    w_old: list[Tensor],
    ema: list[Tensor] | None,
    ema_ready: list[Tensor] | None,
    g_old: list[Tensor] | None,
    rhos: list[float],
    etas: list[float],
    adaptive: list[bool],
    offsets: list[int],
    *,
    p: float = 2.0,
    fsam_sigma: float | None = None,
    fsam_lambda: float = 0.9,
    swp_keep: float = 1.0,
    seed: int = 0,
    step: int = 0,
    ema_out: list[Tensor] | None = None,
    ready_out: list[Tensor] | None = None,
    reduce: Reduce | None = None,
) -> Tensor:
    """Triton twin of :func:`fastsam.reference.sam_perturb_` (K1 + K2 per (device, dtype) group).
    ``reduce`` (sharded parameters, eager only): K1's partials are made global between the
    launches (see :func:`_perturb_impl`)."""
    if not params:
        return torch.ones((), dtype=torch.bool)
    fs = fsam_sigma is not None
    # tuples stay tuples: the launch plans are cached per tuple object
    args = (ema if fs and ema is not None else (), ema_ready if fs and ema_ready is not None else (),
            g_old if g_old is not None else ())
    outs = (ema_out if fs and ema_out is not None else (), ready_out if fs and ready_out is not None else ())
    if _traced(params[0]) and reduce is None:
        return torch.ops.fastsam.sam_perturb(
            list(params), list(grads), list(w_old), *map(list, args), [float(r) for r in rhos],
            [float(e) for e in etas], [bool(a) for a in adaptive], [int(o) for o in offsets], float(p),
            None if fsam_sigma is None else float(fsam_sigma), float(fsam_lambda), float(swp_keep), int(seed),
            int(step), *map(list, outs),
        )
    ok = _perturb_impl(params, grads, w_old, *args, rhos, etas, adaptive, offsets, p, fsam_sigma, fsam_lambda,
                       swp_keep, seed, step, outs[0] or None, outs[1] or None, reduce)
    _bump_versions(params)
    return ok


@eager_under_compile_on_old_torch
@no_grad
def gsam_combine_(grads: list[Tensor], g_old: list[Tensor], alpha: float, *, reduce: Reduce | None = None) -> None:
    """Triton twin of :func:`fastsam.reference.gsam_combine_` (reduction + combine: 2 launches).
    ``reduce`` (sharded parameters): the foreach op, whose sums go through the hook."""
    if reduce is not None:
        from . import foreach_sam

        foreach_sam.gsam_combine_(grads, g_old, alpha, reduce=reduce)
        return
    if not grads:
        return
    if _traced(grads[0]):
        torch.ops.fastsam.sam_gsam_combine(list(grads), list(g_old), float(alpha))
    else:
        _gsam_body(grads, g_old, float(alpha))
        _bump_versions(grads)


@eager_under_compile_on_old_torch
@no_grad
def sam_restore_(params: list[Tensor], w_old: list[Tensor]) -> None:
    """``w <- w_old`` exactly (1 launch per group)."""
    if not params:
        return
    if _traced(params[0]):
        torch.ops.fastsam.sam_restore(list(params), list(w_old))
    else:
        _restore_body(params, w_old)
        _bump_versions(params)


def _floats(x: float | Sequence[float], n: int, name: str) -> float | Sequence[float]:
    """A float for every tensor, or one value per tensor (checked, kept as the caller's sequence:
    the plan recognizes a tuple it saw before and reuses its rows)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if len(x) != n:
        raise ValueError(f"{name}: expected a float or {n} values, got {len(x)}")
    return x


def _second_step_call(params, grads, w_old, g_old, s1, s2, s3, steps, hyper: tuple, fresh, *, mode, gsam_alpha,
                      nesterov=False, maximize=False, amsgrad=False, decoupled=False, mix=None,
                      mix_writeback=False) -> None:
    n = len(params)
    if n == 0:
        return
    check_mix(mix, gsam_alpha, g_old, params[0].device)
    if g_old is None or (gsam_alpha <= 0 and mix is None):
        g_old, mix = None, None
    gsam = g_old is not None and any(go is not None and g is not None for go, g in zip(g_old, grads))
    if not gsam:
        mix = None
    back = gsam and (mix is None or mix_writeback)  # .grad receives the combined gradient
    if not _traced(params[0]):
        _second_step_body(params, grads, w_old, g_old, s1, s2, s3, steps, hyper, fresh, mode,
                          float(gsam_alpha) if gsam and mix is None else 0.0, nesterov, maximize, amsgrad, decoupled,
                          mix, back)
        _bump_versions(list(params) + ([g for g in grads if g is not None] if back else []))
        return
    op = torch.ops.fastsam.sam_second_step_gsam if back else torch.ops.fastsam.sam_second_step
    dense = [x for lst in (grads, w_old, g_old if gsam else None, s1, s2, s3, steps) for x in _dense(lst)]
    cols = (tuple(hyper) + (0.0,) * 5)[:5]
    flat = [float(c if isinstance(c, (int, float)) else c[i]) for i in range(n) for c in cols]
    op(list(params), *dense, flat, [bool(f) for f in fresh], mode, float(gsam_alpha) if mix is None else 0.0,
       bool(nesterov), bool(maximize), bool(amsgrad), bool(decoupled), mix)


@eager_under_compile_on_old_torch
@no_grad
def sam_restore_sgd_(
    params: list[Tensor],
    grads: list[Tensor | None],
    w_old: list[Tensor | None],
    g_old: list[Tensor | None] | None,
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | list[float],
    weight_decay: float | list[float] = 0.0,
    momentum: float | list[float] = 0.0,
    dampening: float | list[float] = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    gsam_alpha: float = 0.0,
    mix: Tensor | None = None,
    mix_writeback: bool = False,
) -> None:
    """Triton twin of :func:`fastsam.reference.sam_restore_sgd_`: one K3 launch per group (GSAM +1;
    ``mix``: none, the kernel reads ``g_old`` and the two coefficients).

    ``None`` momentum buffers (momentum != 0) are allocated here (``empty_like``, no launch),
    stored into the list, and initialised by the kernel with the first ``d``.
    """
    n = len(params)
    lrs, wds = _floats(lr, n, "lr"), _floats(weight_decay, n, "weight_decay")
    moms, damps = _floats(momentum, n, "momentum"), _floats(dampening, n, "dampening")
    fresh: Sequence[bool] = (False,) * n
    nonzero = (moms != 0) if isinstance(moms, float) else (
        isinstance(moms, PerGroup) and all(v != 0 for v in moms.values))
    if nonzero and not any(map(_is_none, momentum_buffers)) and not any(map(_is_none, grads)):
        bufs: Sequence[Tensor | None] = momentum_buffers  # the usual step: every buffer exists
    else:
        mom_of = (lambda i: moms) if isinstance(moms, float) else (lambda i: moms[i])  # type: ignore[index]
        fresh = [False] * n
        bufs = [None] * n
        for i in range(n):
            if grads[i] is None or mom_of(i) == 0:
                continue
            if momentum_buffers[i] is None:
                bufs[i] = torch.empty_like(params[i], memory_format=torch.preserve_format)  # type: ignore[index]
                fresh[i] = True  # type: ignore[index]
            else:
                bufs[i] = momentum_buffers[i]  # type: ignore[index]
    _second_step_call(params, grads, w_old, g_old, bufs, None, None, None, (lrs, wds, moms, damps), fresh,
                      mode=K.MODE_SGD, gsam_alpha=gsam_alpha, nesterov=nesterov, maximize=maximize, mix=mix,
                      mix_writeback=mix_writeback)
    for i in range(n) if any(fresh) else ():  # handed over once the op succeeded (an exception changes nothing)
        if fresh[i]:
            momentum_buffers[i] = bufs[i]


@eager_under_compile_on_old_torch
@no_grad
def sam_restore_adam_(
    params: list[Tensor],
    grads: list[Tensor | None],
    w_old: list[Tensor | None],
    g_old: list[Tensor | None] | None,
    exp_avgs: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    max_exp_avg_sqs: list[Tensor | None] | None,
    steps: list[Tensor | None],
    *,
    lr: float | list[float],
    beta1: float | list[float] = 0.9,
    beta2: float | list[float] = 0.999,
    eps: float | list[float] = 1e-8,
    weight_decay: float | list[float] = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    gsam_alpha: float = 0.0,
    mix: Tensor | None = None,
    mix_writeback: bool = False,
) -> None:
    """Triton twin of :func:`fastsam.reference.sam_restore_adam_`: one K3 launch per group (GSAM +1,
    ``mix`` +0).

    ``steps`` are 0-dim tensors (torch keeps them on the CPU, so reading them is no device
    sync); they are incremented in place (one op when they are views of one buffer, as
    fastsam.SAM keeps them) and the bias corrections go into the hyper-parameter rows.
    """
    n = len(params)
    cols = (_floats(lr, n, "lr"), _floats(beta1, n, "beta1"), _floats(beta2, n, "beta2"), _floats(eps, n, "eps"),
            _floats(weight_decay, n, "weight_decay"))
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    _second_step_call(params, grads, w_old, g_old, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None,
                      steps, cols, (False,) * n, mode=K.MODE_ADAM, gsam_alpha=gsam_alpha, maximize=maximize,
                      amsgrad=amsgrad, decoupled=decoupled_weight_decay, mix=mix, mix_writeback=mix_writeback)


@eager_under_compile_on_old_torch
@no_grad
def sam_restore_accumulate_(
    params: list[Tensor],
    grads: list[Tensor | None],
    w_old: list[Tensor | None],
    g_old: list[Tensor | None] | None,
    acc: list[Tensor | None],
    reset: list[bool],
    *,
    weight: float,
    scale: float = 1.0,
    gsam_alpha: float = 0.0,
    acc_in: list[Tensor | None] | None = None,
    reduce: Reduce | None = None,
) -> None:
    """Triton twin of :func:`fastsam.reference.sam_restore_accumulate_`: one K3 launch (MODE 3)
    per group, GSAM +1. Reads ``w_old`` and ``g`` (+ the running sum unless reset, from
    ``acc_in`` when given), writes ``w`` and ``acc``: 5 parameter-sized passes, against 2
    (restore) + 3 (``acc += weight * g``) as separate ops, and 8 instead of 10 with GSAM (the
    combined gradient is not written back). ``reduce`` (sharded parameters with GSAM): the
    foreach op, whose sums go through the hook."""
    if reduce is not None and gsam_alpha > 0 and g_old is not None:
        from . import foreach_sam

        foreach_sam.sam_restore_accumulate_(params, grads, w_old, g_old, acc, reset, weight=weight, scale=scale,
                                            gsam_alpha=gsam_alpha, acc_in=acc_in, reduce=reduce)
        return
    check_accumulate_args(params, grads, w_old, acc, reset, acc_in)
    n = len(params)
    if n == 0:
        return
    if g_old is None or gsam_alpha <= 0:
        g_old, gsam_alpha = None, 0.0
    if not _traced(params[0]):
        _accumulate_body(params, grads, w_old, g_old, acc, reset, weight, scale, gsam_alpha, acc_in)
        _bump_versions(list(params) + [a for a in acc if a is not None])
        return
    dense = [x for lst in (grads, w_old, g_old, acc, acc_in) for x in _dense(lst)]
    torch.ops.fastsam.sam_restore_accumulate(list(params), *dense, [bool(r) for r in reset], float(weight),
                                             float(scale), float(gsam_alpha))
