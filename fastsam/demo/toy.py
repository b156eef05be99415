"""The two-feature toy of Springer et al., "SAM Enhances Feature Quality via Balanced Learning"
(ICLR 2024), section 5.1 and appendix E, at a scale that trains in seconds.

Every input carries two features, each fully predictive of the binary label on its own:

- an *easy* linear feature ``x_easy = a_easy * [z, z]``, ``z ~ U(0, 1)`` for y = 1 and
  ``U(-1, 0)`` for y = 0 (paper: y = -1);
- a *hard* spiral feature ``x_hard = a_hard * [-z cos z, z sin z] + eta``, ``eta ~ U([0, 0.5]^2)``,
  ``z = s * sqrt(u) * 2 pi chi / 360``, ``u ~ U(0, 1)``, ``s = +1`` for y = 1 and ``-1`` for y = 0.
  The paper writes ``z^2 ~ U(0, (2 pi chi / 360)^2)`` (and ``U(-(...)^2, 0)`` for the other class),
  which we read as: ``|z|^2`` uniform (points spread evenly along the arc), sign of ``z`` from the
  label. ``chi`` is the spiral's rotation in degrees, its "complexity".

The network is disentangled (paper eq. 4): one small MLP ``Phi`` (Linear-LayerNorm-ReLU x 2,
then Linear to one output) is applied twice, to ``[x_easy, 0]`` and to ``[0, x_hard]``, and the
logit is ``v_easy * Phi_easy + v_hard * Phi_hard``. Because the hard feature has its own scalar
representation, its *probing error* is measured on that one scalar. Two measures are reported:

- ``hard_sign_error`` (the demo's headline, the paper's toy measure, section 5.1): the 0-1 error
  of the hard feature's contribution to the logit, ``sign(v_hard * Phi_hard(x))`` (paper: "simply
  measure the error l_01(Phi_hard(x), y)"; the factor ``v_hard`` keeps a feature learned with the
  opposite sign from counting as wrong), on fresh test points. Its threshold is fixed at 0, and
  ``Phi``'s output bias is shared by the two halves, so a constant offset that the easy feature
  compensates for counts as error here.
- ``hard_probe_error``: the paper's section 3 definition, a linear probe trained on balanced
  data, which for a scalar feature is a sign and a threshold: fitted on the first half of the
  fresh balanced test set, evaluated on the second half. It does not count that offset.

LSAM (paper eq. 5) perturbs only the last layer ``v``; every parameter is still updated. With
:class:`fastsam.SAM` that is two parameter groups: ``Phi`` with ``rho = 0`` and ``v`` with ``rho``
(see :func:`lsam_optimizer`). ``rho = 0`` is plain SGD.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastsam

__all__ = [
    "DisentangledNet",
    "ToyConfig",
    "bce_loss",
    "lsam_optimizer",
    "make_two_feature_data",
    "probing_errors",
    "threshold_probe_error",
    "train_toy",
]


@dataclass(frozen=True)
class ToyConfig:
    """Hyperparameters of one toy run (paper values in the comments)."""

    complexity: float = 360.0  # spiral rotation chi in degrees (paper: several values)
    a_easy: float = 2.0  # paper appendix E
    a_hard: float = 0.25  # paper appendix E
    noise: float = 0.5  # side of the uniform noise square added to x_hard (paper: 0.5)
    n_train: int = 300  # paper: 300 training points
    n_test: int = 2000  # fresh points for the probing error (not in the paper's text)
    hidden: int = 100  # paper: width 100
    batch_size: int = 20  # paper: 5 (see the fastsam.demo docstring for why we use more)
    lr: float = 0.05  # paper: 0.01 at batch 5 (scaled with the batch size here)
    epochs: int = 25  # not given in the paper (longer runs let |v| grow and shrink rho's relative effect)
    test_seed: int = 2**20  # the test set is the same for every run (seed-independent)
    backend: str = "auto"  # fastsam.SAM backend of the LSAM runs


def make_two_feature_data(
    n: int, cfg: ToyConfig = ToyConfig(), *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``n`` points (half of each class, shuffled): inputs [n, 4] = [x_easy, x_hard], labels [n] in {0., 1.}."""
    g = generator
    y = (torch.randperm(n, generator=g) < n // 2).float()
    s = 2.0 * y - 1.0  # the paper's label in {-1, 1}
    z_easy = torch.rand(n, generator=g) * s
    x_easy = cfg.a_easy * torch.stack([z_easy, z_easy], dim=1)
    z_max = 2.0 * math.pi * cfg.complexity / 360.0
    z_hard = s * torch.sqrt(torch.rand(n, generator=g)) * z_max
    x_hard = cfg.a_hard * torch.stack([-z_hard * torch.cos(z_hard), z_hard * torch.sin(z_hard)], dim=1)
    x_hard = x_hard + cfg.noise * torch.rand(n, 2, generator=g)
    return torch.cat([x_easy, x_hard], dim=1), y


class DisentangledNet(nn.Module):
    """``f(x) = v_easy * Phi([x_easy, 0]) + v_hard * Phi([0, x_hard])`` with one shared MLP ``Phi``.

    ``phi`` is the paper's three-layer representation network (appendix B), ``head`` holds
    ``v = [v_easy, v_hard]`` (no bias, as in the paper's ``sign(v_easy Phi_easy + v_hard Phi_hard)``).
    """

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.phi = nn.Sequential(
            nn.Linear(4, hidden), nn.LayerNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        self.head = nn.Linear(2, 1, bias=False)

    def features(self, x: Tensor) -> Tensor:
        """``[Phi_easy(x), Phi_hard(x)]`` as [B, 2]; both halves go through ``phi`` in one call."""
        zeros = torch.zeros_like(x[:, :2])
        both = torch.cat([torch.cat([x[:, :2], zeros], 1), torch.cat([zeros, x[:, 2:]], 1)], 0)
        return self.phi(both).view(2, -1).t()

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B] (class 1 when positive)."""
        return self.head(self.features(x)).squeeze(1)


def bce_loss(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Logistic loss with the ``F.cross_entropy`` calling convention, as ``sam_step`` expects."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction=reduction)


def lsam_optimizer(model: DisentangledNet, rho: float, lr: float, backend: str = "auto") -> fastsam.SAM:
    """LSAM over plain SGD: ``phi`` in a ``rho = 0`` group (updated, never perturbed), ``v`` perturbed."""
    groups = [{"params": list(model.phi.parameters()), "rho": 0.0},
              {"params": list(model.head.parameters()), "rho": float(rho)}]
    return fastsam.SAM(groups, torch.optim.SGD, lr=lr, backend=backend)


def threshold_probe_error(score_fit: Tensor, y_fit: Tensor, score_eval: Tensor, y_eval: Tensor) -> float:
    """0-1 error on ``(score_eval, y_eval)`` of the best 1-D linear probe fitted on ``(score_fit, y_fit)``.

    The probe predicts ``1`` iff ``sign * (score - threshold) > 0``; sign and threshold minimize the
    0-1 error on the fit set (exhaustively: every gap between sorted scores, both signs).
    Labels are in {0, 1}.
    """
    s, order = torch.sort(score_fit.double())
    yy = y_fit[order].double()
    n = s.numel()
    # Threshold below the k-th smallest score (k = 0..n): the k lowest are predicted 0, the rest 1.
    ones_below = torch.cat([yy.new_zeros(1), torch.cumsum(yy, 0)])
    k = torch.arange(n + 1, dtype=torch.float64)
    zeros_above = (n - k) - (yy.sum() - ones_below)
    err_pos = ones_below + zeros_above  # errors with sign +1
    err_neg = n - err_pos  # sign -1 flips every prediction
    sign = 1.0 if float(err_pos.min()) <= float(err_neg.min()) else -1.0
    kb = int(torch.argmin(err_pos if sign > 0 else err_neg))
    lo = s[kb - 1] if kb > 0 else s[0] - 1.0
    hi = s[kb] if kb < n else s[-1] + 1.0
    thr = float((lo + hi) / 2)
    pred = (sign * (score_eval.double() - thr) > 0).to(y_eval.dtype)
    return float((pred != y_eval).double().mean())


@torch.no_grad()
def probing_errors(model: DisentangledNet, x: Tensor, y: Tensor) -> dict[str, float]:
    """Errors of the model and of each feature on ``(x, y)`` (a fresh, balanced set).

    ``hard_probe`` / ``easy_probe``: :func:`threshold_probe_error` of ``Phi_hard`` / ``Phi_easy``
    fitted on the first half of ``(x, y)``, evaluated on the second half. ``hard_sign`` /
    ``easy_sign``: 0-1 error of ``sign(v_f * Phi_f(x))`` on all of it. ``model``: 0-1 error of
    the classifier.
    """
    f = model.features(x)
    v = model.head.weight[0]
    contrib = f * v
    err = lambda score: float(((score > 0).to(y.dtype) != y).float().mean())
    h = x.shape[0] // 2
    probe = lambda col: threshold_probe_error(f[:h, col].cpu(), y[:h].cpu(), f[h:, col].cpu(), y[h:].cpu())
    return {"easy_probe": probe(0), "hard_probe": probe(1), "easy_sign": err(contrib[:, 0]),
            "hard_sign": err(contrib[:, 1]), "model": err(contrib.sum(1))}


def train_toy(
    rho: float,
    seed: int,
    cfg: ToyConfig = ToyConfig(),
    device: str | torch.device = "cpu",
    on_epoch: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train one toy model (SGD if ``rho == 0``, else LSAM through :func:`fastsam.sam_step`).

    ``seed`` draws the training set, the initialization and the batch order; the test set is
    fixed by ``cfg.test_seed``. Returns the probing errors on the test set, ``v`` and the step count.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    x, y = make_two_feature_data(cfg.n_train, cfg, generator=g)
    xt, yt = make_two_feature_data(cfg.n_test, cfg, generator=torch.Generator().manual_seed(cfg.test_seed))
    x, y, xt, yt = x.to(device), y.to(device), xt.to(device), yt.to(device)
    torch.manual_seed(seed)
    model = DisentangledNet(cfg.hidden).to(device)
    opt: torch.optim.Optimizer = (torch.optim.SGD(model.parameters(), lr=cfg.lr) if rho == 0
                                  else lsam_optimizer(model, rho, cfg.lr, cfg.backend))
    steps = 0
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        perm = torch.randperm(cfg.n_train, generator=g).to(device)
        for i in range(0, cfg.n_train, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if isinstance(opt, fastsam.SAM):
                fastsam.sam_step(model, opt, x[idx], y[idx], bce_loss)
            else:
                opt.zero_grad(set_to_none=True)
                bce_loss(model(x[idx]), y[idx]).backward()
                opt.step()
            steps += 1
        if on_epoch is not None:
            on_epoch()
    errs = probing_errors(model, xt, yt)
    v = model.head.weight[0].tolist()
    return {"rho": float(rho), "seed": seed, "hard_probe_error": errs["hard_probe"],
            "easy_probe_error": errs["easy_probe"], "hard_sign_error": errs["hard_sign"],
            "easy_sign_error": errs["easy_sign"], "test_error": errs["model"],
            "v_easy": v[0], "v_hard": v[1], "steps": steps, "train_s": time.perf_counter() - t0,
            "config": asdict(cfg)}
