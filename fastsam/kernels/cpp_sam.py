"""``backend="cpp"``: the SAM ops as C++ kernels on CPU tensors (``csrc/``, OpenMP).

Same functions and signatures as :mod:`fastsam.reference` (``sam_perturb_``, ``gsam_combine_``,
``sam_restore_``, ``sam_restore_sgd_``, ``sam_restore_adam_``). Each op is one call into the
extension whatever the number of tensors; inside, all tensors (all dtypes) are cut into fixed
work items shared by ``torch.get_num_threads()`` threads:

==============================  ====================================================
op                              passes over parameter-sized memory (fp32, AdamW)
==============================  ====================================================
first step                      K1 reads g (1); K2 reads w, g, writes w, w_old (4)
second step, SGD / Adam(W)      reads w_old, g, m, v; writes w, m, v (7 for Adam)
GSAM                            +2 (reads gs, g_old for the dot and norms), K3 also
                                reads g_old and writes the combined gradient
==============================  ====================================================

Math is float32 for fp32/bf16/fp16 tensors and float64 for fp64 ones, rounded once to the
storage dtype (round to nearest even); norms and dot products accumulate in float64 over a fixed
partition, so results do not depend on the thread count. ESAM masks are the Philox function of
:mod:`fastsam._philox`, bit for bit.

Calls whose parameters total at least ``NT_MIN_BYTES`` write ``w_old`` (first step) and the
restored-and-updated ``w`` (second step) with non-temporal stores: those lines are written
without being read, and a plain store would first fetch them (one extra pass each).

The module imports without the extension; the first op call loads it (building it once, see
:mod:`fastsam.kernels._ext`) and raises RuntimeError if it cannot be had.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _host
from .._compat import no_grad
from .._sequences import PerGroup
from .._shard import Reduce
from ..reference import check_accumulate_args, check_mix, dual_exponent
from . import _ext

FUSED_UPDATES = True  # implements sam_restore_sgd_ / sam_restore_adam_ (fastsam.optim._fused)
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Non-temporal stores above 64 MiB of parameters: twice this machine's 32 MiB L3. Below, the
# written lines may still be in cache for the next forward pass, and streaming them out would
# cost that reuse.
NT_MIN_BYTES = int(os.environ.get("FASTSAM_CPP_NT_MIN_BYTES", 64 << 20))

_MODE_RESTORE, _MODE_SGD, _MODE_ADAM, _MODE_COMBINE, _MODE_ACCUM = 0, 1, 2, 3, 4
_NUM_HYP = 8  # csrc/kernels.h kNumHyp
_CHECKED = "_fastsam_cpp_checked"  # attribute of a checked tensor tuple: (addresses, sizes, bytes)
_MASK32 = 0xFFFFFFFF


class _Staging:
    """Contiguous stand-ins for non-contiguous tensors, copied back after the op if mutated
    (the kernels address row-major memory; the ESAM mask index is the row-major element index)."""

    def __init__(self) -> None:
        self.back: list[tuple[Tensor, Tensor]] = []

    def __call__(self, t: Tensor, mutated: bool) -> Tensor:
        if t.is_contiguous():
            return t
        c = t.contiguous()
        if mutated:
            self.back.append((t, c))
        return c

    def many(self, ts: Sequence[Tensor], mutated: bool) -> list[Tensor]:
        if _host.active() and _host.all_contiguous(ts):  # the usual call: one C loop, nothing staged
            return list(ts)
        return [self(t, mutated) for t in ts]

    def finish(self) -> None:
        for orig, c in self.back:
            orig.copy_(c)


def _floats(x: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(x, (int, float)):
        return [float(x)] * n
    vals = [float(v) for v in x]
    if len(vals) != n:
        raise ValueError(f"{name}: expected a float or {n} values, got {len(vals)}")
    return vals


def _group_rows(cols: Sequence[Any], n: int) -> tuple[tuple[int, ...] | None, list[tuple[float, ...]]] | None:
    """Hyper-parameter columns (a float for every tensor, or a :class:`PerGroup` over one shared
    group index) as one value tuple per group and the group of each tensor (None: one group);
    None when some column is a plain per-tensor list (the per-tensor path then runs)."""
    group_of = None
    for c in cols:
        if isinstance(c, PerGroup):
            if group_of is not None and c.group_of is not group_of and c.group_of != group_of:
                return None
            group_of = c.group_of
        elif not isinstance(c, (int, float)):
            return None
    if group_of is not None and len(group_of) != n:
        return None
    ng = 1 if group_of is None else (max(group_of) + 1 if group_of else 0)
    rows = [tuple(float(c.values[g]) if isinstance(c, PerGroup) else float(c) for c in cols) for g in range(ng)]
    return group_of, rows


def _spread(group_of: tuple[int, ...] | None, rows: list[list[float]], n: int) -> list[float]:
    """The per-tensor hyper table from one row per group (C-level list building, no per-tensor math)."""
    if group_of is None:
        return rows[0] * n
    return list(itertools.chain.from_iterable(map(rows.__getitem__, group_of)))


def _flag(x: object) -> int:
    return 1 if x else 0


def _column(col: Sequence[Any], conv: Any) -> list:
    """A per-tensor argument list: a :class:`PerGroup` converted once per group and spread at C
    speed (the usual step), anything else element by element."""
    if isinstance(col, PerGroup):
        vals = [conv(v) for v in col.values]
        return list(map(vals.__getitem__, col.group_of))
    return list(map(conv, col))


def _dense(xs: Sequence[Tensor | None] | None, st: _Staging, mutated: bool) -> tuple[list[Tensor], list[int]]:
    """Optional per-tensor list -> (present tensors, their indices)."""
    if xs is None:
        return [], []
    if _host.active() and not _host.count_none(xs):
        return st.many(xs, mutated), list(range(len(xs)))  # type: ignore[arg-type]
    idx = [i for i, t in enumerate(xs) if t is not None]
    return [st(xs[i], mutated) for i in idx], idx  # type: ignore[arg-type]


_FAKES: set[str] = set()


def _register_fakes(kind: str) -> None:
    """Fake (meta) kernels of the extension ops, so graphs that contain them can be traced by
    ``torch.compile`` (the ops mutate their inputs in place and return at most a 0-dim flag)."""
    if kind in _FAKES:
        return
    _FAKES.add(kind)
    ns = f"fastsam_{kind}"

    def perturb_fake(params, grads, w_old, ema, ema_ready, g_old, rhos, etas, adaptive, offsets, q, fsam, sigma,
                     lam, beta, seed, step, nt, ema_out, ready_out):
        return torch.empty((), dtype=torch.bool, device=params[0].device if params else "cpu")

    def second_step_fake(*args, **kwargs):
        return None

    torch.library.register_fake(f"{ns}::sam_perturb")(perturb_fake)
    torch.library.register_fake(f"{ns}::sam_second_step")(second_step_fake)


class CsrcBackend:
    """The op wrappers over one extension kind (``"cpu"``: this module, ``"cuda"``:
    :mod:`fastsam.kernels.cuda_sam`); the kernels differ, the argument handling does not."""

    def __init__(self, kind: str, device_type: str, name: str) -> None:
        self.kind = kind
        self.device_type = device_type
        self.name = name

    # ------------------------------------------------------------------ helpers
    def ops(self) -> Any:
        ns = _ext.ops(self.kind)
        _register_fakes(self.kind)
        return ns

    def check(self, tensors: Sequence[Tensor]) -> None:
        # a list that passed before (fastsam.SAM's layouts and plans are tuples with a __dict__, which
        # keeps the result and dies with them) passes again while its tensors keep their addresses
        # and sizes (one C loop; a same-size dtype swap in place is not seen, as in fastsam.SAM)
        d = getattr(tensors, "__dict__", None)
        c = None if d is None else d.get(_CHECKED)
        if c is not None and _host.active() and _host.layout_equal(tensors, c[0], c[1]):
            return
        for t in tensors:
            if t.dtype not in SUPPORTED_DTYPES:
                raise ValueError(
                    f"backend={self.name!r} supports float32/float64/bfloat16/float16 tensors, got {t.dtype}"
                )
            if t.device.type != self.device_type:
                other = "'cpp' (or 'auto')" if self.device_type == "cuda" else "'cuda', 'triton' (or 'auto')"
                raise ValueError(
                    f"backend={self.name!r} runs on {self.device_type.upper()} tensors, got one on {t.device}; "
                    f"use backend={other} there"
                )
        if d is not None and _host.active():
            ptrs, numels = _host.layout(tensors)
            d[_CHECKED] = (ptrs, numels, sum(n * t.element_size() for n, t in zip(numels, tensors)))

    def stream(self, params: Sequence[Tensor]) -> bool:
        if self.device_type != "cpu":
            return False
        d = getattr(params, "__dict__", None)
        c = None if d is None else d.get(_CHECKED)
        if c is not None:  # check() ran on this list just now
            return c[2] >= NT_MIN_BYTES
        return sum(t.numel() * t.element_size() for t in params) >= NT_MIN_BYTES

    # ------------------------------------------------------------------ ops
    @no_grad
    def sam_perturb_(
        self,
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
        """First step in two passes (K1 norm partials, K2 perturbation); same contract as
        :func:`fastsam.reference.sam_perturb_`:

        ``d = g`` (F-SAM: ``g - sigma * m`` once the tensor's ``ema_ready`` flag is set),
        ``u = T * d`` with ``T = |w| + eta`` on adaptive tensors, ``N = ||u||_q`` over all tensors,
        ``w += rho * T * sign(u) |u|^(q-1) / (N^(q-1) + 1e-12)`` (ESAM: ``* keep / beta``),
        ``w_old = w``, ``g_old = g``; the new EMA and flags go to ``ema_out`` / ``ready_out``
        (default: in place). Returns the 0-dim bool "N finite"; when False nothing is perturbed,
        the EMA and flags keep their values and ``g_old`` is zeroed. One call into the
        extension, which validates every tensor before it writes any: an exception changes nothing.

        ``reduce`` (sharded parameters): the call is split at the global sum (K1 on this rank's
        shards -> its partial ``(S, E)`` -> one ``reduce`` -> the global ``(S, E)``, combined as the
        kernels combine their work items -> K2); see :mod:`fastsam._shard`. CPU combines the
        gathered pairs on the host; CUDA passes the gathered table to K2 on the device (no host
        sync, as the unsplit step).
        """
        if not params:
            return torch.ones((), dtype=torch.bool)
        self.check(params)
        fsam = fsam_sigma is not None
        if fsam and (ema is None or ema_ready is None):
            raise ValueError("F-SAM (fsam_sigma set) needs ema and ema_ready lists")
        st = _Staging()
        q = float(dual_exponent(p))
        args = (
            st.many(params, True), st.many(grads, False), st.many(w_old, True),
            st.many(ema, True) if fsam else [], list(ema_ready) if fsam else [],  # type: ignore[arg-type]
            st.many(g_old, True) if g_old is not None else [],
            _column(rhos, float), _column(etas, float), _column(adaptive, _flag), _column(offsets, int),
            q, fsam, 0.0 if fsam_sigma is None else float(fsam_sigma),
            float(fsam_lambda), float(swp_keep), int(seed) & _MASK32, int(step) & _MASK32, self.stream(params),
            st.many(ema_out, True) if fsam and ema_out is not None else [],  # type: ignore[arg-type]
            list(ready_out) if fsam and ready_out is not None else [],
        )
        if reduce is None:
            ok = self.ops().sam_perturb(*args)
        elif self.device_type == "cpu":
            part = self.ops().sam_perturb_sharded(1, *args, 0.0, 0.0)
            s_g, e_g = combine_scaled(reduce, part, q)
            ok = self.ops().sam_perturb_sharded(2, *args, s_g, e_g)
        else:  # every rank's (S, E) gathered on the device: [world, 2] -> the S row, then the E row
            part = self.ops().sam_perturb_sharded(1, *args, 0.0, 0.0)
            table = reduce(part).to(torch.float64).t().contiguous()
            ok = self.ops().sam_perturb_sharded(2, *args, 0.0, 0.0, table)
        st.finish()
        return ok

    @no_grad
    def gsam_combine_(self, grads: list[Tensor], g_old: list[Tensor], alpha: float, *,
                      reduce: Reduce | None = None) -> None:
        """``gs <- gs - alpha * (g_old - cos |g_old| gs / (|gs| + 1e-12))`` with
        ``cos = <g_old, gs> / (|gs| |g_old| + 1e-12)`` (global sums in float64), in place.
        ``reduce`` (sharded parameters): the foreach backend's combine, whose sums go through
        the hook (the extension has no cross-rank step for GSAM's sums yet)."""
        if reduce is not None:
            from . import foreach_sam

            foreach_sam.gsam_combine_(grads, g_old, alpha, reduce=reduce)
            return
        if not grads:
            return
        self.check(grads)
        st = _Staging()
        gs = st.many(grads, True)
        idx = list(range(len(gs)))
        self.ops().sam_second_step(
            _MODE_COMBINE, gs, gs, idx, [], [], st.many(g_old, False), idx, [], [], [], [], [], [], [], [],
            float(alpha), False, False, False, False, False,
        )
        st.finish()

    @no_grad
    def sam_restore_(self, params: list[Tensor], w_old: list[Tensor]) -> None:
        """``w <- w_old`` exactly (byte copies, one call)."""
        if not params:
            return
        self.check(params)
        st = _Staging()
        ps = st.many(params, True)
        self.ops().sam_second_step(
            _MODE_RESTORE, ps, [], [], st.many(w_old, False), list(range(len(ps))), [], [], [], [], [], [], [], [],
            [], [], 0.0, False, False, False, False, self.stream(params),
        )
        st.finish()

    def _second_step(self, mode: int, params, grads, w_old, g_old, s1, s2, s3, hyp, fresh, gsam_alpha, *,
                     nesterov=False, maximize=False, amsgrad=False, decoupled=False, mix=None,
                     mix_writeback=False) -> None:
        check_mix(mix, gsam_alpha, g_old, params[0].device if params else None)
        st = _Staging()
        ps = st.many(params, True)
        use_gsam = (gsam_alpha > 0 or mix is not None) and g_old is not None
        back = use_gsam and (mix is None or mix_writeback) and mode != _MODE_ACCUM
        gd, gi = _dense(grads, st, back)
        wd_, wi = _dense(w_old, st, False)
        god, goi = _dense(g_old if use_gsam else None, st, False)
        ad, ai = _dense(s1, st, True)
        bd, bi = _dense(s2, st, True)
        cd, ci = _dense(s3, st, True)
        self.ops().sam_second_step(
            mode, ps, gd, gi, wd_, wi, god, goi, ad, ai, bd, bi, cd, ci, hyp, fresh, float(gsam_alpha),
            bool(nesterov), bool(maximize), bool(amsgrad), bool(decoupled), self.stream(params),
            None if mix is None else mix.detach().to(torch.float64).contiguous(), bool(mix_writeback),
        )
        st.finish()

    @no_grad
    def sam_restore_sgd_(
        self,
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
        """Restore + GSAM (or ``mix``) + ``torch.optim.SGD`` step in one pass (formulas:
        :func:`fastsam.reference.sam_restore_sgd_`). ``None`` momentum buffers (momentum != 0)
        are allocated here, stored into the list and initialised by the kernel (``buf = d``)."""
        n = len(params)
        if n == 0:
            return
        self.check(params)
        lrs, wds = _floats(lr, n, "lr"), _floats(weight_decay, n, "weight_decay")
        moms, damps = _floats(momentum, n, "momentum"), _floats(dampening, n, "dampening")
        fresh = [0] * n
        bufs: list[Tensor | None] = [None] * n
        hyp = [0.0] * (n * _NUM_HYP)
        for i in range(n):
            if grads[i] is None:
                continue
            hyp[i * _NUM_HYP:i * _NUM_HYP + 4] = [lrs[i], wds[i], moms[i], 1.0 - damps[i]]
            if moms[i] == 0:
                continue
            if momentum_buffers[i] is None:
                bufs[i] = torch.empty_like(params[i], memory_format=torch.preserve_format)
                fresh[i] = 1
            else:
                bufs[i] = momentum_buffers[i]
        self._second_step(_MODE_SGD, params, grads, w_old, g_old, bufs, None, None, hyp, fresh, gsam_alpha,
                          nesterov=nesterov, maximize=maximize, mix=mix, mix_writeback=mix_writeback)
        for i in range(n):  # handed over once the op succeeded (an exception leaves the list as it was)
            if fresh[i]:
                momentum_buffers[i] = bufs[i]

    @no_grad
    def sam_restore_adam_(
        self,
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
        """Restore + GSAM (or ``mix``) + ``torch.optim.Adam`` / ``AdamW`` step in one pass (formulas:
        :func:`fastsam.reference.sam_restore_adam_`). ``steps`` (0-dim tensors, CPU as torch keeps
        them) are incremented here; the bias corrections travel in the per-tensor table."""
        n = len(params)
        if n == 0:
            return
        self.check(params)
        if self._adam_by_group(params, grads, w_old, g_old, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                               (lr, beta1, beta2, eps, weight_decay), amsgrad, maximize, decoupled_weight_decay,
                               gsam_alpha, mix, mix_writeback):
            return
        lrs, b1s, b2s = _floats(lr, n, "lr"), _floats(beta1, n, "beta1"), _floats(beta2, n, "beta2")
        epss, wds = _floats(eps, n, "eps"), _floats(weight_decay, n, "weight_decay")
        upd = [i for i in range(n) if grads[i] is not None]
        present = [steps[i] for i in upd]
        if any(s is None for s in present):
            raise ValueError("sam_restore_adam_: every tensor with a gradient needs its step tensor")
        if present:  # the incremented values (the counters move just before the kernels)
            if all(s.device == present[0].device and s.dtype == present[0].dtype for s in present):  # type: ignore
                vals = torch.stack(present).add(1).tolist()  # type: ignore[arg-type]  # in the step's dtype
            else:
                vals = [float(s + 1) for s in present]  # type: ignore[operator]
        hyp = [0.0] * (n * _NUM_HYP)
        for i, t in zip(upd, vals if present else []):
            bc1 = 1.0 - b1s[i] ** t
            bc2 = 1.0 - b2s[i] ** t
            hyp[i * _NUM_HYP:(i + 1) * _NUM_HYP] = [
                wds[i], 1.0 - b1s[i], b2s[i], 1.0 - b2s[i], epss[i], lrs[i] / bc1, math.sqrt(bc2),
                1.0 - lrs[i] * wds[i],
            ]
        keep = set(upd)
        m = [exp_avgs[i] if i in keep else None for i in range(n)]
        v = [exp_avg_sqs[i] if i in keep else None for i in range(n)]
        vmax = [max_exp_avg_sqs[i] if i in keep else None for i in range(n)] if amsgrad and max_exp_avg_sqs else None
        # torch increments the step before the update; here before the kernels too, undone if they
        # raise (nothing may run after them: an op that failed there would leave the update half-done)
        if present:
            torch._foreach_add_(present, 1.0)  # type: ignore[arg-type]
        try:
            self._second_step(_MODE_ADAM, params, grads, w_old, g_old, m, v, vmax, hyp, [0] * n, gsam_alpha,
                              maximize=maximize, amsgrad=amsgrad, decoupled=decoupled_weight_decay, mix=mix,
                              mix_writeback=mix_writeback)
        except BaseException:
            if present:
                torch._foreach_sub_(present, 1.0)  # type: ignore[arg-type]
            raise


    def _adam_by_group(self, params, grads, w_old, g_old, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, cols,
                       amsgrad, maximize, decoupled, gsam_alpha, mix, mix_writeback) -> bool:
        """The usual Adam step without per-tensor Python: every tensor has a gradient, the step
        counters are 0-dim views of one buffer holding one value (as fastsam.SAM keeps them), the
        hyper-parameters are per group. The table is one row per group, spread by C-level list
        building, and the counters move with one op; the values are those of the per-tensor path
        (the same formulas on the same floats). False (nothing done) when a condition fails."""
        n = len(params)
        if not _host.active() or _host.count_none(grads) or not _host.consecutive_scalars(steps):
            return False
        base = steps[0]._base
        if base is None or base.device.type != "cpu" or base.dim() != 1 or base.numel() != n or (
                steps[0].storage_offset() != base.storage_offset()):
            return False  # (counters on the CPU, as torch keeps them: reading them is no device sync)
        grouped = _group_rows(cols, n)
        if grouped is None:
            return False
        group_of, hv = grouped
        lo, hi = base.aminmax()
        if bool(lo != hi):
            return False  # counters at different steps: the per-tensor path
        t = (base[:1] + 1).tolist()[0]  # the incremented value, in the counters' dtype
        rows = []
        for lr, b1, b2, eps, wd in hv:
            bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
            rows.append([wd, 1.0 - b1, b2, 1.0 - b2, eps, lr / bc1, math.sqrt(bc2), 1.0 - lr * wd])
        hyp = _spread(group_of, rows, n)
        vmax = list(max_exp_avg_sqs) if amsgrad and max_exp_avg_sqs else None
        base.add_(1.0)  # before the kernels, as torch increments first; undone if they raise
        try:
            self._second_step(_MODE_ADAM, params, grads, w_old, g_old, list(exp_avgs), list(exp_avg_sqs), vmax, hyp,
                              [0] * n, gsam_alpha, maximize=maximize, amsgrad=amsgrad, decoupled=decoupled, mix=mix,
                              mix_writeback=mix_writeback)
        except BaseException:
            base.sub_(1.0)
            raise
        return True

    @no_grad
    def sam_restore_accumulate_(
        self,
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
        """m-SAM micro-batch in one call: restore, GSAM combine (``grads`` only read),
        ``acc <- scale * ((0 if reset else acc_in) + weight * g)`` (formulas:
        :func:`fastsam.reference.sam_restore_accumulate_`; ``acc_in`` default ``acc``). 5
        parameter-sized passes (8 with GSAM) against 5 (10) for restore, combine and
        ``acc += weight * g`` as separate ops. ``reduce`` (sharded parameters with GSAM): the
        foreach backend's op (see :meth:`gsam_combine_`)."""
        if reduce is not None and gsam_alpha > 0:
            from . import foreach_sam

            foreach_sam.sam_restore_accumulate_(params, grads, w_old, g_old, acc, reset, weight=weight, scale=scale,
                                                gsam_alpha=gsam_alpha, acc_in=acc_in, reduce=reduce)
            return
        check_accumulate_args(params, grads, w_old, acc, reset, acc_in)
        n = len(params)
        if n == 0:
            return
        self.check(params)
        hyp = [0.0] * (n * _NUM_HYP)
        for i in range(n):
            if acc[i] is not None:
                hyp[i * _NUM_HYP] = float(weight)
                hyp[i * _NUM_HYP + 1] = float(scale)
        fresh = [1 if r else 0 for r in reset]
        src = None
        if acc_in is not None:  # out of place: the running sums are read from acc_in
            src = [None if (a is None or reset[i] or acc_in[i] is acc[i]) else acc_in[i] for i, a in enumerate(acc)]
        self._second_step(_MODE_ACCUM, params, grads, w_old, g_old if gsam_alpha > 0 else None, acc, src, None,
                          hyp, fresh, float(gsam_alpha) if gsam_alpha > 0 else 0.0)


_BACKEND = CsrcBackend("cpu", "cpu", "cpp")

sam_perturb_ = _BACKEND.sam_perturb_
gsam_combine_ = _BACKEND.gsam_combine_
sam_restore_ = _BACKEND.sam_restore_
sam_restore_sgd_ = _BACKEND.sam_restore_sgd_
sam_restore_adam_ = _BACKEND.sam_restore_adam_
sam_restore_accumulate_ = _BACKEND.sam_restore_accumulate_


SHARDED = True  # sam_perturb_ / gsam_combine_ / sam_restore_accumulate_ take reduce= (fastsam._shard)
PER_GROUP = True  # hyper-parameter columns may be PerGroup: the usual Adam step builds one row per group


def combine_scaled(reduce: Reduce, part: Tensor, q: float) -> tuple[float, float]:
    """The global ``(S, E)`` of the first step's sum ``sum |u|^q = S * 2^(q E)`` from every rank's
    K1 partial ``part = [S_r, E_r]`` (``E_r = -inf``: nothing on that rank), in one call of
    ``reduce``: ``E = max E_r``, ``S = sum_r S_r 2^(q (E_r - E))`` in rank order (the kernels'
    ``scaled_add``), NaN when some rank's ``S_r`` is not finite (no rank perturbs then)."""
    table = reduce(part.to(torch.float64)).cpu()
    s_r, e_r = table[:, 0], table[:, 1]
    if not bool(torch.isfinite(s_r).all()):
        return math.nan, 0.0
    live = e_r > -math.inf
    if not bool(live.any()):
        return 0.0, -math.inf
    e = float(e_r[live].max())
    s = 0.0
    for sr, er in zip(s_r[live].tolist(), e_r[live].tolist()):
        s += sr * 2.0 ** (q * (er - e))
    return s, e


def available() -> bool:
    """True if the C++ extension is usable here (builds it on the first call of the process)."""
    return _ext.available("cpu")
