"""Plain-PyTorch reference implementations of the SAM ascent losses (the definition of correct).

Each function is written to be read next to the paper it implements:

* OBF, output bias forgetting: Vani et al., "Forget Sharpness: Perturbed Forgetting of Model
  Biases Within SAM Dynamics", eq. 15 (value), 16 (gradient), 17 (forgetting strength).
* BiSAM: Xie et al., "Improving SAM Requires Rethinking its Optimization Formulation",
  eq. 11/14 (logsumexp lower bound Q), 17 (tanh bound), 18 (-log bound).

Math runs in float32 for float16/bfloat16 logits (float64 stays float64, which is how the tests
build their exact answer); values come back in that compute dtype, gradients (through autograd)
in the logits' dtype. The value functions are differentiable with plain autograd and their
autograd gradient *is* the specified gradient (``a`` and ``p`` are detached in OBF); the
``*_grad_reference`` functions spell the same gradients out in closed form.

Both losses are *ascent* losses: SAM's first pass perturbs the weights along +grad of these
values (Alg. A.1 of Vani et al.: theta_p = theta + rho * Delta / |Delta| with Delta the gradient
of eq. 15; Alg. 1 of Xie et al.: eps = rho * grad Q / |grad Q|), exactly as it does with the
training loss. So they plug in wherever ``F.cross_entropy`` does, with no sign flip.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: BiSAM default mu per lower bound (docs/design.md section 2; CIFAR settings of Xie et al.).
BISAM_DEFAULT_MU = {"log": 1.5, "tanh": 10.0}

#: log(e - 1), the shift in eq. 18 that makes phi(0) = 0.
LOG_E_MINUS_1 = math.log(math.e - 1.0)

__all__ = [
    "BISAM_DEFAULT_MU",
    "bisam_grad_reference",
    "bisam_loss_reference",
    "bisam_phi",
    "obf_grad_reference",
    "obf_loss_reference",
    "obf_strength",
    "reduce_rows",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rows(logits: Tensor, target: Tensor, ignore_index: int):
    """(z in compute dtype, safe class index [B] int64, kept-row mask, in-range mask)."""
    z = logits.to(_compute_dtype(logits.dtype))
    C = z.shape[1]
    # int64 before comparing: torch compares an int32 tensor with a Python int outside the int32
    # range after wrapping it (int32 target != 2**40 is False where the target is 0)
    target = target.long()
    keep = target != ignore_index
    in_range = (target >= 0) & (target < C)
    y = torch.where(in_range, target, torch.zeros_like(target)).long()
    return z, y, keep, in_range


def _finish_rows(value: Tensor, keep: Tensor, in_range: Tensor) -> Tensor:
    # Ignored rows are exactly 0 with zero gradient; an out-of-range target (not ignore_index)
    # gives NaN, as the kernels do (the public API rejects it up front on CPU).
    value = torch.where(keep, value, torch.zeros_like(value))
    return torch.where(keep & ~in_range, torch.full_like(value, float("nan")), value)


def reduce_rows(rows: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Reduce per-row values like ``F.cross_entropy`` does, without a host sync.

    ``mean`` divides by the number of rows whose target is not ``ignore_index`` (a device
    tensor, never ``.item()``). With no kept rows the value is NaN and the gradient is 0, as
    with ``F.cross_entropy``.
    """
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    n = (target.long() != ignore_index).sum()  # int64: see _rows
    mean = total / n.clamp(min=1).to(total.dtype)
    return torch.where(n > 0, mean, torch.full_like(mean, float("nan")))


# --------------------------------------------------------------------------------------------
# OBF
# --------------------------------------------------------------------------------------------


def obf_strength(p_y: Tensor, gamma: float, lam: float) -> Tensor:
    """Eq. 17: ``a = gamma * max((1 - lam / p_y) / (1 - lam), 0)``, elementwise over ``p_y``.

    ``lam = 0`` gives ``a = gamma`` even where ``p_y`` underflowed to 0 (no 0/0).
    """
    r = lam / p_y if lam > 0 else torch.zeros_like(p_y)
    return gamma * torch.clamp((1.0 - r) / (1.0 - lam), min=0.0)


def _logsumexp(x: Tensor) -> Tensor:
    """``logsumexp`` over dim 1 whose autograd gradient is ``softmax(x)`` at any magnitude.

    ``torch.logsumexp``'s backward is ``exp(x - lse)``, and at large logits ``lse`` is rounded
    to a multiple of ``ulp(max x)``: at x = [3e38, 3e38] the lse is 3e38 (log 2 is far below
    its ulp) and the gradient [1, 1] instead of [0.5, 0.5]. Shifting by the detached row max
    ``m`` (the function does not depend on it) makes autograd see ``exp(x - m) / sum``.
    """
    m = x.detach().amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # as torch.logsumexp does
    return (m + torch.log(torch.exp(x - m).sum(1, keepdim=True))).squeeze(1)


def _softplus(z: Tensor) -> Tensor:
    """``log(1 + exp(z))`` with an exact gradient everywhere: autograd of ``logaddexp(0, z)`` is
    ``1 / (1 + exp(-z))``, so 0.5 at ``z = 0`` and 0 (not NaN) at ``z = -inf``. (The textbook
    ``max(z, 0) + log1p(exp(-|z|))`` differentiates to 1 + 0 at ``z = 0``: the one-sided
    derivatives of ``max`` and ``|z|`` that autograd picks do not add up to the true 0.5.
    ``F.softplus`` is linear above ``z = 20``, off by up to 2e-9 in float64.)"""
    return torch.logaddexp(torch.zeros_like(z), z)


def obf_loss_reference(
    logits: Tensor, target: Tensor, gamma: float = 1.0, lam: float | None = None,
    sigmoid: bool = False, reduction: str = "mean", ignore_index: int = -100,
) -> Tensor:
    """OBF ascent loss, eq. 15-17 of Vani et al., in plain PyTorch.

    ``logits [B, C]``, ``target [B]`` (int). Per example, with ``p = softmax(z)`` (or
    ``sigmoid(z)``) and ``U`` the uniform distribution over the C classes::

        a     = gamma * max((1 - lam / p_y) / (1 - lam), 0)      # eq. 17, a and p detached
        value = (1 - a) * L(y, z) - L(U, z)                        # eq. 15

    ``L`` is the cross-entropy (sigmoid: the sum over classes of binary cross-entropy with
    per-class targets onehot(y), resp. 1/C). ``lam`` defaults to ``1/C``.
    Returns ``[B]`` for ``reduction="none"``, else a scalar.

    Computed as eq. 15 with the cross-entropies written out, ``N = logsumexp(z)`` (softmax) or
    ``N = sum_j softplus(z_j)`` (sigmoid: ``BCE(t, z) = softplus(z) - t z``)::

        L(y) = N - z_y,   L(U) = N - mean_j z_j,   value = mean_j z_j - a N - (1 - a) z_y

    The same number, but no term is larger than the logits: ``L(y)`` and ``L(U)`` alone overflow
    for finite logits (z = [3e38, -3e38, ...]: ``log_softmax`` is -inf, the value came out -inf
    or NaN), and the value's autograd gradient is eq. 16, ``U - a p - (1 - a) onehot(y)``,
    at every finite logit (``d N / d z = p``). A -inf logit (masked class) gives value -inf and
    no NaN in the gradient; a -inf target logit makes ``L(y) - L(U)`` inf - inf (NaN), as in the
    kernels.
    """
    z, y, keep, in_range = _rows(logits, target, ignore_index)
    C = z.shape[1]
    lam = 1.0 / C if lam is None else float(lam)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    mean_z = (z / C).sum(1)  # not z.mean(1): sum(z) overflows for two logits of 3e38
    if sigmoid:
        sp = _softplus(z)
        p_y = torch.sigmoid(z_y).detach()
        a = obf_strength(p_y, gamma, lam)
        # a N as sum_j a softplus(z_j): with a = 0 an infinite N must not give 0 * inf = NaN
        aN = (a[:, None] * sp).sum(1)
    else:
        lse = _logsumexp(z)
        p_y = torch.softmax(z.detach(), dim=1).gather(1, y[:, None]).squeeze(1)  # exact at any magnitude
        a = obf_strength(p_y, gamma, lam)
        aN = a * lse
    value = mean_z - aN - (1.0 - a) * z_y
    return reduce_rows(_finish_rows(value, keep, in_range), target, ignore_index, reduction)


def obf_grad_reference(
    logits: Tensor, target: Tensor, gamma: float = 1.0, lam: float | None = None,
    sigmoid: bool = False,
) -> Tensor:
    """Eq. 16 in closed form, per row: ``d value_i / d z_i = U - a p - (1 - a) onehot(y)``.

    Sigmoid case: the same expression with ``p = sigmoid(z)``. Each per-class BCE has
    ``d BCE(t, z_j) / d z_j = sigmoid(z_j) - t_j``, so ``dL(y)/dz = p - onehot(y)`` and
    ``dL(U)/dz = p - U``; ``(1 - a)(p - onehot) - (p - U)`` is the formula above. (The paper
    notes the same: for sigmoid cross-entropy E_{i~p}[grad z_i] becomes sum_i p_i grad z_i.)
    Returns ``[B, C]`` in the compute dtype (no reduction, no ignore_index).
    """
    z = logits.to(_compute_dtype(logits.dtype))
    C = z.shape[1]
    lam = 1.0 / C if lam is None else float(lam)
    p = torch.sigmoid(z) if sigmoid else torch.softmax(z, dim=1)
    y = target.long()
    a = obf_strength(p.gather(1, y[:, None]), gamma, lam)
    return 1.0 / C - a * p - (1.0 - a) * F.one_hot(y, C).to(z.dtype)


# --------------------------------------------------------------------------------------------
# BiSAM
# --------------------------------------------------------------------------------------------


def bisam_phi(x: Tensor, phi: str = "log", alpha: float = 0.1) -> Tensor:
    """Lower bounds of the 0-1 step function {x > 0}, with phi(0) = 0.

    ``"tanh"``: eq. 17, ``tanh(alpha * x)``.
    ``"log"``:  eq. 18, ``-log(1 + exp(log(e-1) - x)) + 1 = 1 - softplus(log(e-1) - x)``
    (``logaddexp(0, u)`` is softplus without ``F.softplus``'s linear cut-off at u > 20).
    """
    if phi == "tanh":
        return torch.tanh(alpha * x)
    if phi == "log":
        u = LOG_E_MINUS_1 - x
        return 1.0 - torch.logaddexp(torch.zeros_like(u), u)
    raise ValueError(f"phi: expected 'log' or 'tanh', got {phi!r}")


def _bisam_inputs(logits: Tensor, target: Tensor, mu: float | None, phi: str, ignore_index: int):
    z, y, keep, in_range = _rows(logits, target, ignore_index)
    mu = BISAM_DEFAULT_MU[phi] if mu is None else float(mu)
    is_y = F.one_hot(y, z.shape[1]).bool()
    # F_j = z_j - z_y (Lemma 1); F_y is identically 0 (z_y - z_y would be NaN at an infinite
    # z_y, and the NaN would reach z_y's gradient through phi's backward)
    Fm = (z - z.gather(1, y[:, None])).masked_fill(is_y, 0.0)
    return z, y, keep, in_range, mu, is_y, Fm


def bisam_loss_reference(
    logits: Tensor, target: Tensor, mu: float | None = None, phi: str = "log", alpha: float = 0.1,
    reduction: str = "mean", ignore_index: int = -100,
) -> Tensor:
    """BiSAM perturbation loss Q, eq. 11/14 of Xie et al., in plain PyTorch.

    ``logits [B, C]``, ``target [B]`` (int). Per example, with ``F_j = z_j - z_y``::

        Q = (1/mu) * log sum_j exp(mu * phi(F_j)) - (1/mu) * log C

    over all C classes (the j = y term is exp(mu * phi(0)) = 1). ``phi`` is ``"log"``
    (eq. 18, default mu = 1.5) or ``"tanh"`` (eq. 17, ``tanh(alpha x)``, default mu = 10).
    Returns ``[B]`` for ``reduction="none"``, else a scalar.
    """
    z, y, keep, in_range, mu, is_y, Fm = _bisam_inputs(logits, target, mu, phi, ignore_index)
    # The j = y term is phi(F_y) = phi(0) = 0 exactly (F_y is identically 0, so it carries no
    # gradient either); masking it avoids phi's rounding at 0.
    ph = bisam_phi(Fm, phi, alpha).masked_fill(is_y, 0.0)
    C = z.shape[1]
    Q = _logsumexp(mu * ph) / mu - math.log(C) / mu
    return reduce_rows(_finish_rows(Q, keep, in_range), target, ignore_index, reduction)


def bisam_grad_reference(
    logits: Tensor, target: Tensor, mu: float | None = None, phi: str = "log", alpha: float = 0.1,
) -> Tensor:
    """dQ/dz in closed form, per row: ``s_j phi'(F_j)`` for j != y and minus their sum at y.

    ``s = softmax(mu * phi(F))`` over all j. ``phi'``: ``alpha (1 - tanh^2(alpha x))`` (tanh),
    ``sigmoid(log(e-1) - x)`` (log). Returns ``[B, C]`` in the compute dtype.
    """
    z, y, _keep, _in_range, mu, is_y, Fm = _bisam_inputs(logits, target, mu, phi, -100)
    ph = bisam_phi(Fm, phi, alpha).masked_fill(is_y, 0.0)
    if phi == "tanh":
        dphi = alpha * (1.0 - torch.tanh(alpha * Fm) ** 2)
    else:
        dphi = torch.sigmoid(LOG_E_MINUS_1 - Fm)
    g = (torch.softmax(mu * ph, dim=1) * dphi).masked_fill(is_y, 0.0)
    return g - is_y.to(g.dtype) * g.sum(1, keepdim=True)
