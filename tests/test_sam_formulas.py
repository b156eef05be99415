"""Each SAM formula on tiny hand-computed tensors, for the reference and foreach backends."""

from __future__ import annotations

import math

import pytest
import torch

import fastsam
from fastsam._philox import keep_mask

BACKENDS = ["reference", "foreach"]
f64 = torch.float64
EPS = 1e-12  # added to N^(q-1) (docs/design.md section 2)


def _opt(params, backend, **kw):
    kw.setdefault("lr", 0.0)
    return fastsam.SAM(params, torch.optim.SGD, backend=backend, **kw)


def _perturb(w, g, backend, **kw):
    """Weights after first_step with gradient g (fp64 tensors)."""
    p = torch.nn.Parameter(torch.tensor(w, dtype=f64))
    opt = _opt([p], backend, **kw)
    p.grad = torch.tensor(g, dtype=f64)
    opt.first_step()
    return p.detach().clone(), opt, p


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_l2(backend):
    # g = (3, 4): |g| = 5, e = rho g / (|g| + eps)
    w, _, _ = _perturb([1.0, 2.0], [3.0, 4.0], backend, rho=0.5)
    exp = torch.tensor([1.0 + 0.5 * 3.0 / (5.0 + EPS), 2.0 + 0.5 * 4.0 / (5.0 + EPS)], dtype=f64)
    torch.testing.assert_close(w, exp, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_asam(backend):
    # T = |w| + eta = (1.5, 2.5); u = T g = (4.5, 10); N = sqrt(120.25); e = rho T u / N
    w, _, _ = _perturb([1.0, -2.0], [3.0, 4.0], backend, rho=0.5, adaptive=True, eta=0.5)
    N = math.sqrt(4.5**2 + 10.0**2) + EPS
    exp = torch.tensor([1.0 + 0.5 * 1.5 * 4.5 / N, -2.0 + 0.5 * 2.5 * 10.0 / N], dtype=f64)
    torch.testing.assert_close(w, exp, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_inf_is_sign(backend):
    w, _, _ = _perturb([1.0, -2.0, 0.5], [3.0, -4.0, 0.0], backend, rho=0.1, p=math.inf)
    torch.testing.assert_close(w, torch.tensor([1.1, -2.1, 0.5], dtype=f64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p3_dual_norm(backend):
    # p = 3 -> q = 1.5: e = rho sign(g)|g|^0.5 / N^0.5, N = (sum |g|^1.5)^(1/1.5)
    g = [3.0, -4.0]
    N = (3.0**1.5 + 4.0**1.5) ** (1 / 1.5)
    den = math.sqrt(N) + EPS
    exp = torch.tensor([0.2 * math.sqrt(3.0) / den, -0.2 * 2.0 / den], dtype=f64)
    w, _, _ = _perturb([0.0, 0.0], g, backend, rho=0.2, p=3.0)
    torch.testing.assert_close(w, exp, rtol=1e-12, atol=1e-14)
    # the perturbation lies on the p-norm sphere of radius rho: ||e||_3 = rho
    assert abs(w.abs().pow(3).sum().pow(1 / 3).item() - 0.2) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_near_one_puts_rho_on_the_largest_entry(backend):
    # p = 1.0001 -> q = 10001: e_i = rho sign(g_i) (|g_i| / N)^(q-1), N = (3^q + 4^q)^(1/q) = 4 (1 + 0.75^q)^(1/q);
    # 0.75^10000 ~ 1e-1250: e = (0, -rho) in float64 (the sum's largest term must not underflow: |g|^q
    # scaled by a power of two just above 4 is 0.5^q = 0)
    w, opt, _ = _perturb([0.0, 0.0], [3.0, -4.0], backend, rho=0.2, p=1.0001)
    assert not opt.perturbation_skipped
    torch.testing.assert_close(w, torch.tensor([0.0, -0.2], dtype=f64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_near_one_small_norm_float32(backend):
    # p = 1.0546875 (q = 19.29), one float32 element g = 2^-8: N^(q-1) = 2^-146.3 is far below the
    # 1e-12 term, e = rho N^(q-1) / (N^(q-1) + 1e-12) ~ 5.6e-34, a float32 number; the factor
    # 1 / (1 + 1e-12 N^-(q-1)) must not be formed as 2^146.3 in float32 (overflow: e was 0)
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float32))
    opt = _opt([p], backend, rho=0.05, p=1.0546875)
    p.grad = torch.full((1,), 2.0**-8, dtype=torch.float32)
    opt.first_step()
    q = 1.0546875 / 0.0546875
    a = (2.0**-8) ** (q - 1.0)
    want = 0.05 * a / (a + EPS)
    assert not opt.perturbation_skipped
    assert abs(float(p.detach()[0]) - want) <= 1e-5 * want, (float(p.detach()[0]), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_asam_product_beyond_float64(backend):
    # u = (|w| + eta) g = (1e320, 2e320) overflows float64 although w and g are finite:
    # N = sqrt(5) 1e320, e_i = rho T_i u_i / N = rho (1e160, 2e160) (1, 2) / sqrt(5)
    w, opt, _ = _perturb([1e160, -1e160], [1e160, 2e160], backend, rho=0.5, adaptive=True, eta=0.5)
    assert not opt.perturbation_skipped
    exp = torch.tensor([1e160 + 0.5 * 1e160 / math.sqrt(5.0), -1e160 + 0.5 * 1e160 * 2.0 / math.sqrt(5.0)], dtype=f64)
    torch.testing.assert_close(w, exp, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsam_two_steps(backend):
    p = torch.nn.Parameter(torch.tensor([0.0, 0.0], dtype=f64))
    opt = _opt([p], backend, rho=1.0, fsam_sigma=0.5, fsam_lambda=0.9)
    g1, g2 = torch.tensor([3.0, 4.0], dtype=f64), torch.tensor([1.0, -2.0], dtype=f64)
    p.grad = g1.clone()
    opt.first_step()
    torch.testing.assert_close(p.detach(), g1 / (5.0 + EPS), rtol=0, atol=1e-15)  # first call: d = g
    torch.testing.assert_close(opt.state[p]["fsam_ema"], g1, rtol=0, atol=0)  # m = g
    p.grad = torch.zeros(2, dtype=f64)
    opt.second_step()
    p.grad = g2.clone()
    opt.first_step()
    d = g2 - 0.5 * g1  # d = g - sigma m_prev
    torch.testing.assert_close(p.detach(), d / (d.norm() + EPS), rtol=0, atol=1e-15)
    torch.testing.assert_close(opt.state[p]["fsam_ema"], 0.9 * g1 + 0.1 * g2, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gsam_combine(backend):
    # g_old = (1, 0), gs = (1, 1): cos = 1/sqrt2, v = g_old - cos |g_old| gs/|gs| = (0.5, -0.5)
    a = 0.3
    p = torch.nn.Parameter(torch.tensor([0.0, 0.0], dtype=f64))
    opt = fastsam.SAM([p], torch.optim.SGD, rho=0.1, gsam_alpha=a, lr=1.0, backend=backend)
    p.grad = torch.tensor([1.0, 0.0], dtype=f64)
    opt.first_step()
    p.grad = torch.tensor([1.0, 1.0], dtype=f64)
    opt.second_step()
    # SGD lr=1 from w = 0: w = -(gs - a v)
    exp = -torch.tensor([1.0 - 0.5 * a, 1.0 + 0.5 * a], dtype=f64)
    torch.testing.assert_close(p.detach(), exp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_esam_mask(backend):
    n, beta, seed = 64, 0.5, 11
    w0 = torch.zeros(n, dtype=f64)
    g = torch.linspace(1.0, 2.0, n, dtype=f64)
    p1 = torch.nn.Parameter(torch.zeros(3, dtype=f64))  # earlier parameter: shifts the global index
    p2 = torch.nn.Parameter(w0.clone())
    opt = _opt([p1, p2], backend, rho=1.0, swp_keep=beta, seed=seed)
    p2.grad = g.clone()  # p1 has no gradient, but its 3 elements still count in the index
    opt.first_step()
    keep = keep_mask(3, n, seed, 0, beta).to(f64)
    exp = g / (g.norm() + EPS) * keep / beta
    torch.testing.assert_close(p2.detach(), exp, rtol=0, atol=1e-14)
    assert 0 < int(keep.sum()) < n
    # second step uses the next mask (step counter 1)
    p2.grad = torch.zeros(n, dtype=f64)
    opt.second_step()
    p2.grad = g.clone()
    opt.first_step()
    keep1 = keep_mask(3, n, seed, 1, beta).to(f64)
    torch.testing.assert_close(p2.detach(), g / (g.norm() + EPS) * keep1 / beta, rtol=0, atol=1e-14)
    assert not torch.equal(keep, keep1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lsam_rho_zero_group_untouched_and_out_of_norm(backend):
    body = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=f64))
    head = torch.nn.Parameter(torch.tensor([0.0, 0.0], dtype=f64))
    opt = _opt([{"params": [body], "rho": 0.0}, {"params": [head]}], backend, rho=1.0)
    body.grad = torch.tensor([100.0, 100.0], dtype=f64)
    head.grad = torch.tensor([3.0, 4.0], dtype=f64)
    opt.first_step()
    assert torch.equal(body.detach(), torch.tensor([1.0, 1.0], dtype=f64))
    exp = torch.tensor([3.0, 4.0], dtype=f64) / (5.0 + EPS)  # the rho = 0 group's gradient is not in N
    torch.testing.assert_close(head.detach(), exp, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_group_rho_and_adaptive_share_one_norm(backend):
    a = torch.nn.Parameter(torch.tensor([2.0], dtype=f64))
    b = torch.nn.Parameter(torch.tensor([0.0], dtype=f64))
    opt = _opt([{"params": [a], "adaptive": True, "eta": 0.0, "rho": 0.5}, {"params": [b], "rho": 0.1}],
               backend, rho=1.0)
    a.grad = torch.tensor([3.0], dtype=f64)  # u_a = |w| g = 6
    b.grad = torch.tensor([8.0], dtype=f64)  # u_b = 8
    opt.first_step()
    N = 10.0 + EPS
    torch.testing.assert_close(a.detach(), torch.tensor([2.0 + 0.5 * 2.0 * 6.0 / N], dtype=f64), rtol=0, atol=1e-14)
    torch.testing.assert_close(b.detach(), torch.tensor([0.1 * 8.0 / N], dtype=f64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_gradient_perturbs_nothing(backend, bad):
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float32))
    v = torch.nn.Parameter(torch.tensor([-1.0], dtype=torch.float32))
    opt = fastsam.SAM([w, v], torch.optim.SGD, lr=0.0, fsam_sigma=1.0, gsam_alpha=0.5, backend=backend)
    # one finite step first so the F-SAM EMA is initialized
    w.grad, v.grad = torch.tensor([1.0, 1.0]), torch.tensor([1.0])
    opt.first_step()
    opt.second_step()
    ema_before = opt.state[w]["fsam_ema"].clone()
    before = [w.detach().clone(), v.detach().clone()]
    w.grad, v.grad = torch.tensor([bad, 1.0]), torch.tensor([2.0])
    opt.first_step()
    assert opt.perturbation_skipped
    assert not bool(opt.perturbation_ok)
    assert torch.equal(w.detach(), before[0]) and torch.equal(v.detach(), before[1])
    assert torch.equal(opt.state[w]["fsam_ema"], ema_before)
    assert torch.equal(opt._scratch[w]["g_old"], torch.zeros(2))  # GSAM combine becomes a no-op
    w.grad, v.grad = torch.tensor([0.5, 0.5]), torch.tensor([0.5])
    opt.second_step()  # lr = 0: weights unchanged, GSAM leaves the finite gradient alone
    assert torch.equal(w.detach(), before[0])
    torch.testing.assert_close(w.grad, torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsam_first_step_nonfinite_keeps_ema_uninitialized(backend):
    w = torch.nn.Parameter(torch.tensor([0.0, 0.0], dtype=f64))
    opt = _opt([w], backend, rho=1.0, fsam_sigma=1.0, fsam_lambda=0.5)
    w.grad = torch.tensor([math.inf, 0.0], dtype=f64)
    opt.first_step()
    w.grad = torch.zeros(2, dtype=f64)
    opt.second_step()
    assert float(opt.state[w]["fsam_ready"]) == 0.0
    g = torch.tensor([3.0, 4.0], dtype=f64)
    w.grad = g.clone()
    opt.first_step()  # behaves as the first call: d = g, m = g
    torch.testing.assert_close(w.detach(), g / (5.0 + EPS), rtol=0, atol=1e-15)
    torch.testing.assert_close(opt.state[w]["fsam_ema"], g, rtol=0, atol=0)
