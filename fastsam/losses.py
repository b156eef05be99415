"""SAM ascent losses: OBF (output bias forgetting) and BiSAM, fused with Triton where possible.

Both take ``(logits [B, C], target [B] int)`` like ``F.cross_entropy`` and can replace the
training loss in SAM's first (ascent) pass::

    loss = fastsam.losses.obf_loss(model(x), y)          # or bisam_loss(model(x), y)
    loss.backward(); opt.first_step(zero_grad=True)      # perturb along +grad of the ascent loss
    F.cross_entropy(model(x), y).backward(); opt.second_step(zero_grad=True)

See docs/design.md section 2 and :mod:`fastsam._reference_losses` for the formulas with paper
equation numbers. Sign: both are the values whose gradient SAM *ascends* (Vani et al. Alg. A.1,
Xie et al. Alg. 1 perturb along +grad), like the training loss; no sign flip is needed.

Backends: ``"reference"`` is plain PyTorch (autograd through the formula); ``"triton"`` runs
one fused kernel per call that writes the per-row value and the gradient in the same pass (the
gradient is saved and only rescaled by ``grad_output`` in backward); ``"auto"`` picks triton
for CUDA tensors when triton imports, else the reference (CPU tensors never need a GPU or the
Triton interpreter).

Validation: shapes, dtypes and hyperparameters are checked on the host for free. Target values
are checked on the host only for CPU tensors (a check of a GPU tensor is a device-to-host
sync). On GPU, a target outside ``[0, C)`` that is not ``ignore_index`` is *not* detected: the
row's value (and, with the triton backend, its gradient) becomes NaN, which makes the mean NaN,
which SAM's non-finite-norm guard then reports as a skipped step. Under ``torch.compile`` the
CPU target check is skipped as well (it is data-dependent).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastsam._compat import custom_op, may_be_traced
from fastsam._reference_losses import (
    BISAM_DEFAULT_MU,
    bisam_loss_reference,
    obf_loss_reference,
)
from fastsam._validate import check_bool, check_int, check_real

__all__ = ["bisam_loss", "obf_loss"]

_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# --------------------------------------------------------------------------------------------
# Autograd / torch.compile integration
#
# Why torch.library.custom_op and not a bare autograd.Function: dynamo traces *into* an
# autograd.Function's forward, and the triton launcher inside it (an interpreter launch on
# CPU, a JIT launch on GPU) is not something it can trace; `triton_op` would let it, but it
# fails under the CPU interpreter (docs/design.md section 4). A custom_op is opaque to dynamo: the
# fake kernel gives the output shapes, AOTAutograd puts the op in the forward graph, and the
# backward (a broadcasted multiply) is plain torch that any backend can fuse.
#
# The op returns (per-row value fp32 [B], per-row gradient [B, C] in the logits' dtype, or an
# empty [0] tensor when the logits need no gradient). The reduction happens outside the op in
# torch (differentiable, no host sync), so the op backward receives d loss / d row [B] and
# returns grad * that[:, None].
#
# Memory: in eager mode the saved gradient is scaled *in place* and returned as the logits'
# gradient: between forward and backward the op holds one [B, C] tensor and the backward
# allocates nothing of size [B, C] (F.cross_entropy holds log_softmax's output and allocates two
# [B, C] tensors in backward). Consequences, both raised as clear errors:
#   * a second backward through the same graph (retain_graph=True) would see the scaled
#     gradient, so it is refused;
#   * double backward (create_graph=True) is not supported: d grad / d logits (the Hessian of the
#     loss) is never formed.
# Under torch.compile the backward is traced with functional tensors and uses an out-of-place
# multiply (the compiler owns the buffers there).
# --------------------------------------------------------------------------------------------


def _kernels():
    # Lazy: `import fastsam.losses` must work without triton installed.
    from fastsam.kernels import triton_losses

    return triton_losses


@custom_op("fastsam::obf_fwd", mutates_args=())
def _obf_fwd(
    logits: Tensor, target: Tensor, gamma: float, lam: float, sigmoid: bool, ignore_index: int,
    write_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _kernels().obf_forward(logits, target, gamma, lam, sigmoid, ignore_index, write_grad)


@custom_op("fastsam::bisam_fwd", mutates_args=())
def _bisam_fwd(
    logits: Tensor, target: Tensor, mu: float, phi: str, alpha: float, ignore_index: int,
    write_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _kernels().bisam_forward(logits, target, mu, phi, alpha, ignore_index, write_grad)


def _fake_fwd(logits: Tensor, target: Tensor, *args) -> tuple[Tensor, Tensor]:
    B, C = logits.shape
    write_grad = args[-1]
    return logits.new_empty((B,), dtype=torch.float32), logits.new_empty((B, C) if write_grad else (0,))


_obf_fwd.register_fake(_fake_fwd)
_bisam_fwd.register_fake(_fake_fwd)


def _setup_context(ctx, inputs, output) -> None:
    _rows, grad = output
    ctx.save_for_backward(grad)
    # The gradient output is an implementation detail: no gradient flows into it, and no zeros
    # [B, C] tensor is materialised for it in backward.
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)
    ctx.fastsam_consumed = False


_DOUBLE_BACKWARD = (
    "fastsam.losses: double backward (create_graph=True) is not supported by the fused "
    "obf_loss/bisam_loss backward (the gradient is computed in the forward and saved); "
    "use backend='reference' to differentiate twice"
)
_SECOND_BACKWARD = (
    "fastsam.losses: backward was already run through this loss (retain_graph=True); the "
    "fused backward scales its saved gradient in place and can run only once per forward. "
    "Recompute the loss, or use backend='reference'"
)


def _check_backward(ctx) -> None:
    """The fused backward's limits (both paths): no double backward, one backward per forward."""
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    if ctx.fastsam_consumed:
        raise RuntimeError(_SECOND_BACKWARD)


def _backward(ctx, grad_rows: Tensor | None, _grad_grad: Tensor | None):
    n_inputs = 7
    if grad_rows is None:
        return (None,) * n_inputs
    _check_backward(ctx)
    (grad,) = ctx.saved_tensors
    scale = grad_rows.to(torch.float32)[:, None]
    if type(grad) is torch.Tensor and not torch.compiler.is_compiling():
        ctx.fastsam_consumed = True
        out = grad.mul_(scale)  # fp32 opmath, one rounding into grad's dtype
    else:
        out = (grad * scale).to(grad.dtype)
    return (out,) + (None,) * (n_inputs - 1)


_obf_fwd.register_autograd(_backward, setup_context=_setup_context)
_bisam_fwd.register_autograd(_backward, setup_context=_setup_context)


# The reduction (mean over kept rows, or sum) as one op too: the torch formula (reduce_rows in
# _reference_losses) is ~9 small launches forward and ~4 backward, which at (256, 1000) would cost
# more GPU and host time than the loss kernel itself. Forward: one launch; backward: one 0-d
# multiply, then the loss op's in-place scaling of its saved gradient by the expanded scalar.
@custom_op("fastsam::reduce_rows", mutates_args=())
def _reduce_op(rows: Tensor, target: Tensor, ignore_index: int, mean: bool) -> tuple[Tensor, Tensor]:
    return _kernels().reduce_rows(rows, target, ignore_index, mean)


@_reduce_op.register_fake
def _(rows, target, ignore_index, mean):
    return rows.new_empty(()), rows.new_empty(())


def _reduce_setup(ctx, inputs, output) -> None:
    rows = inputs[0]
    _val, scale = output
    ctx.save_for_backward(scale)
    ctx.mark_non_differentiable(scale)
    ctx.n_rows = rows.shape[0]


def _reduce_backward(ctx, grad_val: Tensor | None, _grad_scale: Tensor | None):
    if grad_val is None:
        return None, None, None, None
    (scale,) = ctx.saved_tensors
    return (grad_val * scale).expand(ctx.n_rows), None, None, None


_reduce_op.register_autograd(_reduce_backward, setup_context=_reduce_setup)


def _reduce(rows: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    return _reduce_op(rows, target, ignore_index, reduction == "mean")[0]


# Eager mode: the same kernels and the same backward without the custom-op dispatcher, which
# costs ~35 us of host time per op call (measured on CPU with the kernels stubbed: 53 vs 17 us),
# two per loss; at (256, 1000) on a GPU the host is what the device waits on. Anything that may
# trace (fastsam._compat.may_be_traced) takes the custom ops.
class _FusedLoss(torch.autograd.Function):
    """rows = fwd(logits, target) (per-row values and the saved gradient), then the reduction;
    backward scales the saved gradient in place (see the custom ops above)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, fwd, ignore_index: int, reduction: str) -> Tensor:
        rows, grad = fwd(logits, target, True)
        ctx.set_materialize_grads(False)
        ctx.fastsam_consumed = False
        if reduction == "none":
            ctx.save_for_backward(grad)
            return rows
        val, scale = _kernels().reduce_rows(rows, target, ignore_index, reduction == "mean")
        ctx.save_for_backward(grad, scale)
        return val

    @staticmethod
    def backward(ctx, grad_out: Tensor | None):
        if grad_out is None:
            return None, None, None, None, None
        _check_backward(ctx)
        ctx.fastsam_consumed = True
        saved = ctx.saved_tensors
        if len(saved) == 1:  # reduction="none": one factor per row
            factor = grad_out.to(torch.float32)[:, None]
        else:  # mean / sum: one factor for every row, as a [1, 1] tensor: a 0-d fp32 operand
            # would not take part in type promotion, and CUDA would round it to bf16/fp16 first
            factor = (grad_out.to(torch.float32) * saved[1]).reshape(1, 1)
        return saved[0].mul_(factor), None, None, None, None  # fp32 math, one rounding


def _fused(logits: Tensor, target: Tensor, fwd, op, op_args: tuple, ignore_index: int, reduction: str) -> Tensor:
    """Dispatch of the triton path: eager fast path or the traceable custom ops."""
    write_grad = _needs_grad(logits)
    if not may_be_traced(logits):
        if write_grad:
            return _FusedLoss.apply(logits, target, fwd, ignore_index, reduction)
        rows, _ = fwd(logits, target, False)
        if reduction == "none":
            return rows
        return _kernels().reduce_rows(rows, target, ignore_index, reduction == "mean")[0]
    rows, _grad = op(logits, target, *op_args, ignore_index, write_grad)
    return _reduce(rows, target, ignore_index, reduction)


# --------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------


# Largest BiSAM mu and alpha under float32 math: mu * phi (phi <= 1) and the logsumexp stay finite
# and 1/mu a normal float32 (a GPU may flush subnormals to 0); alpha * F = 0 at F = 0 instead of
# inf * 0. At mu = 1e30, Q is max_j phi(F_j) to within log(C) * 1e-30.
BISAM_MAX_MU_ALPHA = 1e30


def _as_float(name: str, value, **bounds) -> float:
    """A hyperparameter as a float: a Python or numpy real number, not a bool, a string or a
    tensor (fastsam._validate.check_real), within ``bounds``; a ValueError naming it otherwise."""
    try:
        return check_real(name, value, **bounds)
    except ValueError as e:
        if isinstance(value, Tensor):
            raise ValueError(f"{e} (a Python or numpy number, not a tensor: reading one would sync)") from None
        raise


def _check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def _check_common(logits: Tensor, target: Tensor, reduction: str, backend: str, ignore_index: int) -> int:
    """Checks the arguments both losses share; returns ignore_index as a Python int."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a 2-D tensor [B, C], got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"logits: expected a floating-point tensor, got {logits.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits: need at least 2 classes, got C={logits.shape[1]}")
    if not isinstance(target, Tensor) or target.dim() != 1:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target: expected a 1-D tensor [B], got {shape}")
    if target.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"target: expected int32 or int64 class indices, got {target.dtype}")
    if target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target: batch size {target.shape[0]} does not match logits' batch size {logits.shape[0]}"
        )
    if target.device != logits.device:
        raise ValueError(f"target: on {target.device}, logits on {logits.device}")
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_choice("backend", backend, _BACKENDS)
    # any int64 (numpy ints too): the kernels compare the target with it as an int64
    ignore_index = int(check_int("ignore_index", ignore_index, lo=-(2**63), hi=2**63 - 1,
                                 what="the target value of rows to skip"))
    # Target values: free to check on CPU; on GPU it would cost a sync (see module docstring).
    if target.device.type == "cpu" and target.numel() > 0 and not torch.compiler.is_compiling():
        C = logits.shape[1]
        # int64: an int32 tensor compared with an int outside the int32 range wraps the int
        target = target.long()
        bad = ((target < 0) | (target >= C)) & (target != ignore_index)
        if bool(bad.any()):
            first = target[bad][0].item()
            raise ValueError(
                f"target: class index {first} out of range [0, {C}) (and not ignore_index={ignore_index})"
            )
    return ignore_index


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _use_triton(logits: Tensor, backend: str) -> bool:
    if backend == "reference":
        return False
    if backend == "auto":
        return logits.is_cuda and logits.dtype in _TRITON_DTYPES and _triton_available()
    # backend == "triton": explicit request, explain what is missing
    if logits.dtype not in _TRITON_DTYPES:
        raise ValueError(f"logits: backend='triton' supports float32/bfloat16/float16, got {logits.dtype}")
    if not _triton_available():
        raise RuntimeError("fastsam.losses: backend='triton' needs triton installed (pip install triton)")
    return True


def _needs_grad(logits: Tensor) -> bool:
    # No gradient wanted (evaluation, SDS-style per-example values under no_grad): the kernels
    # then skip writing the [B, C] gradient (and, for wide softmax rows, the second sweep).
    return torch.is_grad_enabled() and logits.requires_grad


def obf_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float = 1.0,
    lam: float | None = None,
    sigmoid: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    *,
    ignore_index: int = -100,
) -> Tensor:
    """Output-bias-forgetting (OBF) ascent loss of Vani et al. (eq. 15-17).

    Args:
        logits: ``[B, C]`` float32/bfloat16/float16 (float64 with the reference backend), C >= 2.
        target: ``[B]`` int32/int64 class indices in ``[0, C)`` or ``ignore_index``.
        gamma: forgetting strength cap, in ``[0, 1]``.
        lam: likelihood threshold, in ``[0, 1)``; default ``1/C``.
        sigmoid: use sigmoid cross-entropy (sum of per-class BCE), the ViT recipe of the paper.
        reduction: ``"mean"`` (over rows not ignored), ``"sum"`` or ``"none"`` (``[B]``).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        ignore_index: rows with this target contribute 0 and are not counted by the mean; an
            int (Python or numpy) in the int64 range.

    ``gamma`` and ``lam`` are Python or numpy real numbers, ``sigmoid`` a bool: a string, a
    tensor (or a bool for a number) is a ValueError naming the argument.

    Per example, with ``p = softmax(z)`` (``sigmoid(z)``) and ``U`` uniform over the classes,
    ``a`` and ``p`` treated as constants::

        a      = gamma * max((1 - lam / p_y) / (1 - lam), 0)
        value  = (1 - a) * L(y) - L(U)          L = CE (sum of per-class BCE if sigmoid)
        d/dz   = U - a * p - (1 - a) * onehot(y)

    Ascend it (it replaces the training loss in SAM's first pass). Values are float32 for
    half-precision logits (float32 math); the gradient has the logits' dtype.
    """
    ignore_index = _check_common(logits, target, reduction, backend, ignore_index)
    C = logits.shape[1]
    gamma = _as_float("gamma", gamma, lo=0.0, hi=1.0, what="the forgetting strength cap")
    lam = 1.0 / C if lam is None else _as_float("lam", lam, lo=0.0, hi=1.0, hi_open=True,
                                                   what="the likelihood threshold; None for 1/C")
    sigmoid = check_bool("sigmoid", sigmoid, what="sigmoid instead of softmax cross-entropy")
    if not _use_triton(logits, backend):
        return obf_loss_reference(logits, target, gamma, lam, sigmoid, reduction, ignore_index)
    def fwd(z: Tensor, y: Tensor, write: bool):
        return _kernels().obf_forward(z, y, gamma, lam, sigmoid, ignore_index, write)

    return _fused(logits, target, fwd, _obf_fwd, (gamma, lam, sigmoid), ignore_index, reduction)


# Smallest BiSAM temperature for float32 math: the value's absolute error is about
# log(C) * 6e-8 / mu (C = 1000: 4e-4 at mu = 1e-3, 0.4 at mu = 1e-6), against Q of order 0.1-1.
BISAM_MIN_MU = 1e-3


def bisam_loss(
    logits: Tensor,
    target: Tensor,
    mu: float | None = None,
    phi: str = "log",
    alpha: float = 0.1,
    reduction: str = "mean",
    backend: str = "auto",
    *,
    ignore_index: int = -100,
) -> Tensor:
    """BiSAM perturbation loss Q of Xie et al. (eq. 11/14 with the bounds of eq. 17/18).

    Args:
        logits: ``[B, C]`` float32/bfloat16/float16 (float64 with the reference backend), C >= 2.
        target: ``[B]`` int32/int64 class indices in ``[0, C)`` or ``ignore_index``.
        mu: logsumexp temperature, > 0 (in [1e-3, 1e30] unless the logits are float64: below,
            float32 cancellation ruins the value; above, mu * phi and 1/mu leave the float32 range);
            default 1.5 for ``phi="log"``, 10 for ``phi="tanh"``.
        phi: ``"log"`` (``1 - softplus(log(e-1) - x)``) or ``"tanh"`` (``tanh(alpha x)``).
        alpha: slope of the tanh bound, > 0 (<= 1e30 unless the logits are float64; checked but
            unused by ``"log"``).
        reduction: ``"mean"`` (over rows not ignored), ``"sum"`` or ``"none"`` (``[B]``).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        ignore_index: rows with this target contribute 0 and are not counted by the mean; an
            int (Python or numpy) in the int64 range.

    ``mu`` and ``alpha`` are Python or numpy real numbers: a bool, a string or a tensor is a
    ValueError naming the argument.

    Per example, with ``F_j = z_j - z_y`` and ``s = softmax_j(mu * phi(F_j))``::

        Q      = (1/mu) * logsumexp_j(mu * phi(F_j)) - (1/mu) * log C      (j = y term: phi(0) = 0)
        dQ/dz_j = s_j * phi'(F_j)  (j != y),   dQ/dz_y = -sum_{j != y} s_j * phi'(F_j)

    Ascend it (it replaces the training loss in SAM's first pass). Values are float32 for
    half-precision logits (float32 math); the gradient has the logits' dtype.
    """
    ignore_index = _check_common(logits, target, reduction, backend, ignore_index)
    phi = _check_choice("phi", phi, tuple(BISAM_DEFAULT_MU))
    mu = BISAM_DEFAULT_MU[phi] if mu is None else _as_float("mu", mu, lo=0.0, lo_open=True, hi=math.inf, hi_open=True,
                                                             what="the logsumexp temperature; None for the default")
    f32_math = logits.dtype != torch.float64
    if mu > BISAM_MAX_MU_ALPHA and f32_math:
        raise ValueError(
            f"mu: must be in (0, {BISAM_MAX_MU_ALPHA:g}] for {logits.dtype} logits (float32 math), got {mu:g}: above, "
            "mu * phi and 1/mu leave the float32 range (Q is already max_j phi(F_j) there); float64 logits "
            "(backend='reference') take any finite mu > 0"
        )
    if mu < BISAM_MIN_MU and f32_math:
        raise ValueError(
            f"mu: must be >= {BISAM_MIN_MU:g} for {logits.dtype} logits, got {mu:g}: Q = logsumexp(mu phi)/mu - "
            "log(C)/mu cancels in float32 (at mu = 1e-6 the value is off by ~0.4); Xie et al. use mu = 1.5 (log "
            "bound) and 10 (tanh bound). float64 logits (backend='reference') take any finite mu > 0"
        )
    alpha = _as_float("alpha", alpha, lo=0.0, lo_open=True, hi=BISAM_MAX_MU_ALPHA if f32_math else math.inf,
                      hi_open=not f32_math, what="the slope of the tanh bound; float32 math: at most 1e30")
    if not _use_triton(logits, backend):
        return bisam_loss_reference(logits, target, mu, phi, alpha, reduction, ignore_index)
    def fwd(z: Tensor, y: Tensor, write: bool):
        return _kernels().bisam_forward(z, y, mu, phi, alpha, ignore_index, write)

    return _fused(logits, target, fwd, _bisam_fwd, (mu, phi, alpha), ignore_index, reduction)
