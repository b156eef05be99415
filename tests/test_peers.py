"""Cross-check against an independent implementation: pytorch_optimizer (dev dependency).

pytorch_optimizer.SAM(adaptive=True) is ASAM with eta = 0: ``e = rho w^2 g / || |w| g ||``.
pytorch_optimizer restores with ``p.copy_(old_p)`` (SAM, FriendlySAM) or ``p.sub_(e)`` (GSAM),
so fp32 agreement is to rounding, not bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsam

po = pytest.importorskip("pytorch_optimizer")

BACKENDS = ["reference", "foreach"]
STEPS = 5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.GELU(), torch.nn.Linear(16, 5))


def _batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(32, 10, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(STEPS)]


def _close(m1, m2, tol=2e-6):
    for a, b in zip(m1.parameters(), m2.parameters()):
        err = (a - b).abs().max().item()
        assert err <= tol * max(b.abs().max().item(), 1e-6), err


def _two_step(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_and_asam_match_pytorch_optimizer(backend, adaptive):
    m1, m2 = _model(), _model()
    kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    rho = 0.5 if adaptive else 0.05
    ours = fastsam.SAM(m1.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, eta=0.0, backend=backend, **kw)
    peer = po.SAM(m2.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, **kw)
    for x, y in _batches():
        _two_step(m1, ours, x, y)
        _two_step(m2, peer, x, y)
    _close(m1, m2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_friendly_sam_matches_pytorch_optimizer(backend):
    m1, m2 = _model(), _model()
    ours = fastsam.FriendlySAM(m1.parameters(), torch.optim.SGD, rho=0.1, fsam_sigma=1.0, fsam_lambda=0.6,
                               backend=backend, lr=0.05, momentum=0.9)
    peer = po.FriendlySAM(m2.parameters(), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.6, lr=0.05, momentum=0.9)
    for x, y in _batches():
        _two_step(m1, ours, x, y)
        _two_step(m2, peer, x, y)
    _close(m1, m2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gsam_matches_pytorch_optimizer(backend):
    m1, m2 = _model(), _model()
    rho, alpha, lr = 0.08, 0.3, 0.05
    ours = fastsam.GSAM(m1.parameters(), torch.optim.SGD, rho=rho, gsam_alpha=alpha, backend=backend, lr=lr)
    base = torch.optim.SGD(m2.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(base, lambda t: 1.0)
    rho_sched = po.ProportionScheduler(lr_sched, max_lr=lr, min_lr=0.0, max_value=rho, min_value=rho)
    peer = po.GSAM(m2.parameters(), base, model=m2, rho_scheduler=rho_sched, alpha=alpha)
    for x, y in _batches():
        _two_step(m1, ours, x, y)

        def closure(x=x, y=y):  # the peer's step runs under no_grad, like its set_closure we re-enable it
            base.zero_grad()
            with torch.enable_grad():
                out = m2(x)
                loss = F.cross_entropy(out, y)
            loss.backward()
            return out, loss.detach()

        peer.step(closure)
    # the peer restores by subtracting e (w + e - e != w in fp32): a few ulps of drift per step
    _close(m1, m2, tol=1e-5)
