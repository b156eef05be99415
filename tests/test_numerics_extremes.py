"""Extreme magnitudes and p -> 1: a finite gradient never skips the first step, and every backend
matches the perturbation formula evaluated exactly enough (fastsam/reference.py, "Scaled norms").

The oracle evaluates

    e = rho * T * sign(u) * |u|^(q-1) / (N^(q-1) + 1e-12),   u = T * d,   N = (sum |u|^q)^(1/q)

(d = g - sigma * m with F-SAM, T = |w| + eta with ASAM, q = p / (p - 1)) literally, in 60-digit
decimal arithmetic with an unbounded exponent range (no scaling, nothing to overflow or underflow),
from the exact values of the inputs. A backend's new weight must be within

    eps_out * |w + e|  +  16 * rho * T * (max(1, q - 1) * eps_u + eps_ct)

of ``w + e``: the output rounding, the compute dtype's rounding of e (eps_ct) and that of u
(eps_u; a relative error of u moves e by q - 1 times as much, which is what p -> 1 does). eps_u is
the float64 one where a backend forms u in float64 (the reference; the C++/CUDA/Triton kernels at
p != 2, inf) and the compute dtype's otherwise (float32 for float32/bf16 data).

Cases (fresh random inputs, no zeros, seeded per case): plain SAM, ASAM and F-SAM in normal
ranges, the adversarial review's magnitudes (ASAM w = 1e9, g = 1e30 in float32/bf16 and
w = g = 1e160 in float64; F-SAM g = 3e38, m = -3e38 in float32/bf16 and g, m near 1e308 in
float64, where d = g - sigma m overflows) and tiny gradients, for p in {1.0001, 1.0005, 1.01, 1.5,
2, 3, inf}. Also: for p -> 1 the perturbation concentrates on the largest |u| (max |e / T| = rho),
the dual-norm identity ||e / T||_p = rho (up to the 1e-12 term), and max_grad_norm clipping of a
float64 model whose gradients are ~1e160 (squares overflow float64).
"""

from __future__ import annotations

import decimal
import functools
import importlib.util
import math
import zlib
from decimal import Decimal as D

import pytest
import torch
import torch.nn.functional as NF

import fastsam
from fastsam import functional as F
from fastsam.kernels import _ext

# the Triton interpreter (numpy) warns about overflows in lanes a tl.where discards (u in the math
# type where it overflowed, 2^x of a huge x for the 1e-12 term): expected here
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

BACKENDS = ["reference", "foreach"]
if _ext.available("cpu"):
    BACKENDS.append("cpp")
if torch.cuda.is_available() and _ext.available("cuda"):
    BACKENDS.append("cuda")
if importlib.util.find_spec("triton") is not None:
    BACKENDS.append("triton")  # on the CPU under TRITON_INTERPRET=1 (tests/conftest.py)

PS = [1.0001, 1.0005, 1.01, 1.5, 2.0, 3.0, math.inf]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
SHAPES = [(16,), (7, 3)]  # two tensors: one global norm over both
ETA = 2.0**-6  # exact in every table dtype (a backend's float32 hyper-parameter table holds it exactly)
CTX = decimal.Context(prec=60, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


def _device(backend: str) -> torch.device:
    return torch.device("cuda") if backend in ("cuda", "triton") and torch.cuda.is_available() else torch.device("cpu")


def _rand(gen: torch.Generator, n: int, scale: float, sign: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` float64 values of magnitude ``scale * [0.5, 2)`` (never 0), random signs unless given."""
    mag = scale * torch.exp2(torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 - 1.0)
    s = sign if sign is not None else torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    return mag * s


# kind -> dtype class -> (w scale, g scale, F-SAM m scale or None, sigma, adaptive, rho)
# F-SAM: m = -sigma_sign * sign(g) * |m|, so that d = g - sigma m never cancels (|d| >= |g|): the
# oracle's exact d and a backend's rounded one then differ by one rounding, relatively.
KINDS = {
    "sam": {"low": (1e-3, 1.0, None, 0.0, False, 0.5), "f64": (1e-3, 1.0, None, 0.0, False, 0.5)},
    "asam": {"low": (1.0, 1.0, None, 0.0, True, 0.5), "f64": (1.0, 1.0, None, 0.0, True, 0.5)},
    "fsam": {"low": (1e-3, 1.0, 1.0, 0.5, False, 0.5), "f64": (1e-3, 1.0, 1.0, 0.5, False, 0.5)},
    # the review's V2: u = (|w| + eta) g overflows the compute dtype before any scaling
    "asam_big": {"low": (1e9, 1e30, None, 0.0, True, 0.05), "f64": (1e160, 1e160, None, 0.0, True, 0.05)},
    # d = g - sigma m overflows (3e38 + 3e38 in float32, ~2e308 in float64)
    "fsam_big": {"low": (1.0, 1.5e38, 1.5e38, 1.0, False, 0.05), "f64": (1.0, 8e307, 8e307, 1.0, False, 0.05)},
    "asam_fsam_big": {"low": (1e30, 1.5e38, 1.5e38, 1.0, True, 0.05), "f64": (1e200, 8e307, 8e307, 1.0, True, 0.05)},
    "tiny": {"low": (1.0, 1e-30, None, 0.0, True, 0.5), "f64": (1.0, 1e-300, None, 0.0, True, 0.5)},
}


@functools.cache
def _case(kind: str, dtype: torch.dtype, p: float):
    """Inputs (exact values of the dtype, float64 tensors) and the exact new weights."""
    wsc, gsc, msc, sigma, adaptive, rho = KINDS[kind]["f64" if dtype == torch.float64 else "low"]
    seed = zlib.crc32(repr((kind, str(dtype), p)).encode())  # stable across processes (hash() is salted)
    gen = torch.Generator().manual_seed(seed)
    n = sum(math.prod(s) for s in SHAPES)
    w = _rand(gen, n, wsc).to(dtype).double()
    g = _rand(gen, n, gsc).to(dtype).double()
    m = None if msc is None else _rand(gen, n, msc, sign=-torch.sign(g)).to(dtype).double()
    assert torch.isfinite(w).all() and torch.isfinite(g).all() and (g != 0).all() and (w != 0).all()
    e, T = _exact_e(w.tolist(), g.tolist(), None if m is None else m.tolist(), rho, sigma, p, adaptive)
    with decimal.localcontext(CTX):
        w_new = [D(x) + y for x, y in zip(w.tolist(), e)]
    return w, g, m, sigma, adaptive, rho, e, T, w_new


def _exact_e(ws, gs, ms, rho, sigma, p, adaptive):
    """The formula in 60-digit decimals (no scaling): (e, T) per element."""
    with decimal.localcontext(CTX):
        q = D(1) if math.isinf(p) else D(p) / (D(p) - 1)
        us, Ts = [], []
        for i, (w, g) in enumerate(zip(ws, gs)):
            d = D(g) if ms is None else D(g) - D(sigma) * D(ms[i])
            T = abs(D(w)) + D(ETA) if adaptive else D(1)
            Ts.append(T)
            us.append(T * d)
        sign = [D(1) if u > 0 else D(-1) for u in us]  # no zeros
        if q == 1:
            return [D(rho) * T * s / (1 + D("1e-12")) for T, s in zip(Ts, sign)], Ts
        N = sum(abs(u) ** q for u in us) ** (1 / q)
        den = N ** (q - 1) + D("1e-12")
        return [D(rho) * T * s * abs(u) ** (q - 1) / den for u, T, s in zip(us, Ts, sign)], Ts


def _eps(backend: str, dtype: torch.dtype, p: float) -> tuple[float, float]:
    """(eps_u, eps_ct): the relative precision of u and of e in the backend's math (see the module
    docstring)."""
    if dtype == torch.float64:
        return 2.0**-53, 2.0**-53
    general_q = not (p == 2.0 or math.isinf(p))
    u_in_f64 = backend == "reference" or (backend != "foreach" and general_q)
    return (2.0**-53 if u_in_f64 else 2.0**-24), 2.0**-24


def _split(flat: torch.Tensor) -> list[torch.Tensor]:
    out, k = [], 0
    for s in SHAPES:
        n = math.prod(s)
        out.append(flat[k:k + n].reshape(s))
        k += n
    return out


def _perturb(backend: str, dtype: torch.dtype, kind: str, p: float):
    """Run one first step; returns (ok, new weights as float64 flat, the case)."""
    case = _case(kind, dtype, p)
    w, g, m, sigma, adaptive, rho = case[:6]
    dev = _device(backend)
    # copies: the cached case's tensors are shared by every backend (and .to() of a float64 tensor
    # to float64 is the tensor itself)
    ws = [t.to(dev, dtype, copy=True) for t in _split(w)]
    gs = [t.to(dev, dtype, copy=True) for t in _split(g)]
    wo = [torch.empty_like(t) for t in ws]
    kw: dict = {}
    ema = ready = None
    if m is not None:
        ema = [t.to(dev, dtype, copy=True) for t in _split(m)]
        ready = [torch.ones((), dtype=torch.float32, device=dev) for _ in SHAPES]
        kw = dict(fsam_sigma=sigma, fsam_lambda=0.5)
    k = len(SHAPES)
    ok = F.sam_perturb_(ws, gs, wo, ema, ready, None, [rho] * k, [ETA] * k, [adaptive] * k, [0, 16], p=p,
                        backend=backend, **kw)
    got = torch.cat([t.detach().double().cpu().reshape(-1) for t in ws])
    return bool(ok), got, case


def _errors(backend: str, dtype: torch.dtype, kind: str, p: float):
    """(ok, finite, worst error / tolerance, worst |error| / (rho T)) of one case."""
    ok, got, case = _perturb(backend, dtype, kind, p)
    rho, T, w_new = case[5], case[7], case[8]
    q = 1.0 if math.isinf(p) else p / (p - 1.0)
    eps_u, eps_ct = _eps(backend, dtype, p)
    eps_out = torch.finfo(dtype).eps
    worst = worst_rel = 0.0
    with decimal.localcontext(CTX):
        for x, want, t in zip(got.tolist(), w_new, T):
            if not math.isfinite(x):
                return ok, False, math.inf, math.inf
            err = float(abs(D(x) - want))
            scale = rho * float(t)
            tol = eps_out * float(abs(want)) + 16.0 * scale * (max(1.0, q - 1.0) * eps_u + eps_ct)
            worst = max(worst, err / tol)
            worst_rel = max(worst_rel, err / scale)
    return ok, True, worst, worst_rel


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("p", PS, ids=[f"p{p}" for p in PS])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_matches_exact_formula(backend, dtype, p, kind):
    """No skip for finite inputs, finite weights, and every new weight within the tolerance of the
    decimal evaluation (module docstring)."""
    ok, finite, worst, worst_rel = _errors(backend, dtype, kind, p)
    assert ok, f"{backend}: finite gradients, but the step reported a non-finite norm"
    assert finite, f"{backend}: non-finite weights"
    assert worst <= 1.0, f"{backend}: error {worst:.3g} x the tolerance ({worst_rel:.3g} of rho T)"


@pytest.mark.parametrize("p", [1.0001, 1.0005, 1.01])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_p_to_one_concentrates_on_the_largest_entry(backend, dtype, adaptive, p):
    """p -> 1 (q -> inf): e / T -> rho * sign(u) on the entry of largest |u| and 0 elsewhere, when
    that entry stands out (here by a factor 1.5: the others' share is below 0.67^q). Measured on the
    backend's own output: max |e / T| = rho, and the dual-norm identity ||e / T||_p = rho."""
    gen = torch.Generator().manual_seed(int(p * 1e4) + 7 * adaptive)
    n = sum(math.prod(s) for s in SHAPES)
    w = _rand(gen, n, 1.0 if adaptive else 1e-4)
    g = _rand(gen, n, 1.0)
    T = (w.abs() + ETA) if adaptive else torch.ones_like(w)
    u = T * g
    top = int(u.abs().argmax())
    g[top] *= 1.5 * float(u.abs().max() / u.abs()[top])  # u[top] stands out by 1.5x
    w, g = w.to(dtype), g.to(dtype)
    dev = _device(backend)
    ws = [t.clone().to(dev) for t in _split(w)]
    wo = [torch.empty_like(t) for t in ws]
    rho = 0.25
    ok = F.sam_perturb_(ws, [t.to(dev) for t in _split(g)], wo, None, None, None, [rho] * 2, [ETA] * 2,
                        [adaptive] * 2, [0, 16], p=p, backend=backend)
    assert bool(ok)
    new = torch.cat([t.double().cpu().reshape(-1) for t in ws])
    Td = (w.double().abs() + ETA) if adaptive else torch.ones(n, dtype=torch.float64)
    r = (new - w.double()) / (rho * Td)  # e / (rho T), from the stored (rounded) weights
    eps = torch.finfo(dtype).eps * float((new.abs() / (rho * Td)).max()) * 2 + 1e-6
    assert int(r.abs().argmax()) == top
    assert abs(float(r.abs().max()) - 1.0) <= eps
    others = torch.cat([r[:top], r[top + 1:]])
    assert float(others.abs().max()) <= eps
    assert abs(float((r.abs() ** p).sum()) ** (1.0 / p) - 1.0) <= 2 * eps


@pytest.mark.parametrize("backend", BACKENDS)
def test_review_repro_v2_through_the_optimizer(backend):
    """The review's V2 through fastsam.SAM: ASAM with w = 1e9, g = 1e30 (float32, bf16) and F-SAM
    with g = 3e38 after an EMA of -3e38 (float32) perturb like the float64 reference, not skip."""

    def run(bk, dtype, w0, g, **kw):
        dev = _device(bk)
        w = torch.nn.Parameter(torch.tensor([w0, 1.0], dtype=dtype, device=dev))
        opt = fastsam.SAM([w], torch.optim.SGD, rho=0.05, lr=0.0, backend=bk, **kw)
        if "fsam_sigma" in kw:  # prime the EMA with -g
            w.grad = torch.tensor([-g, 0.0], dtype=dtype, device=dev)
            opt.first_step()
            opt.second_step()
        w.grad = torch.tensor([g, 1.0], dtype=dtype, device=dev)
        before = w.detach().clone()
        opt.first_step()
        return opt.perturbation_skipped, (w.detach() - before).double().cpu()

    for dtype, w0, g, kw in ((torch.float32, 1e9, 1e30, dict(adaptive=True)),
                             (torch.bfloat16, 1e9, 1e30, dict(adaptive=True)),
                             (torch.float32, 1.0, 3e38, dict(fsam_sigma=1.0))):
        skipped, e = run(backend, dtype, w0, g, **kw)
        skipped_ref, e_ref = run("reference", dtype, w0, g, **kw)
        assert not skipped and not skipped_ref
        assert torch.isfinite(e).all() and e.abs().max() > 0
        torch.testing.assert_close(e, e_ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0.0)


def _flat_grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def _log_norm(gs: list[torch.Tensor]) -> float:
    """log ||g||_2 from logs: 0.5 * logsumexp(2 log |g|) (never forms a square)."""
    logs = torch.cat([g.abs().log().reshape(-1) for g in gs])
    return 0.5 * float(torch.logsumexp(2.0 * logs, 0))


@pytest.mark.parametrize("scale", [1e150, 1e160, 1e250])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "foreach", "cpp")])
def test_clipping_float64_huge_gradients_is_not_a_skip(backend, scale):
    """The review's V3: sam_step(max_grad_norm=...) on a float64 model whose loss is scaled by
    1e150..1e250 (gradient norms far above 1.3e154, whose squares overflow float64) updates the
    model, and the update is the clipped SAM step computed here in the log domain."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    w0 = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    rho, lr, max_norm = 0.05, 0.1, 1.0

    def loss(o, t, reduction="mean"):
        return NF.cross_entropy(o, t, reduction=reduction) * scale

    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, backend=backend)
    r = fastsam.sam_step(model, opt, x, y, loss, max_grad_norm=max_norm)
    assert not r.skipped and r.updated
    got = [p.detach().clone() for p in model.parameters()]

    # the same step by hand, every norm from logs: e = rho g1 / ||g1||, g2 at w0 + e,
    # w = w0 - lr * g2 * max_norm / ||g2|| (the 1e-12 and 1e-6 terms are below float64's resolution here)
    ref = torch.nn.Linear(4, 3).double()
    with torch.no_grad():
        for p, v in zip(ref.parameters(), w0):
            p.copy_(v)
    g1 = _flat_grads(ref, loss(ref(x), y))
    ln1 = _log_norm(g1)
    with torch.no_grad():
        for p, g in zip(ref.parameters(), g1):
            p.add_(rho * g.sign() * torch.exp(g.abs().log() - ln1))
    g2 = _flat_grads(ref, loss(ref(x), y))
    ln2 = _log_norm(g2)
    assert ln2 > math.log(max_norm)  # clipping applies
    for v, g, w_got in zip(w0, g2, got):
        want = v - lr * g.sign() * torch.exp(g.abs().log() + math.log(max_norm) - ln2)
        torch.testing.assert_close(w_got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", [1.0005, 2.0, 3.0, math.inf], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_asam_eta0_zero_weights_next_to_large_gradients(backend, dtype, p):
    """ASAM with eta = 0: T = 0 where w = 0, so u = 0 there however large g is, while the other
    entries are tiny: the split u (T's mantissa 0 times a scaled d) must give 0, not 0 * inf."""
    big, tiny = (1e300, 1e-300) if dtype == torch.float64 else (1e38, 1e-30)
    gen = torch.Generator().manual_seed(11)
    n = sum(math.prod(s) for s in SHAPES)
    w = _rand(gen, n, 1.0)
    g = _rand(gen, n, tiny)
    w[::3] = 0.0
    g[::3] = _rand(gen, len(g[::3]), big / 2)
    w, g = w.to(dtype), g.to(dtype)
    dev = _device(backend)
    ws = [t.to(dev, copy=True) for t in _split(w)]
    wo = [torch.empty_like(t) for t in ws]
    ok = F.sam_perturb_(ws, [t.to(dev) for t in _split(g)], wo, None, None, None, [0.5] * 2, [0.0] * 2, [True] * 2,
                        [0, 16], p=p, backend=backend)
    assert bool(ok)
    got = torch.cat([t.double().cpu().reshape(-1) for t in ws])
    assert torch.isfinite(got).all()
    assert torch.equal(got[::3], w.double()[::3])  # T = 0: nothing moves
    with decimal.localcontext(CTX):
        q = D(1) if math.isinf(p) else D(p) / (D(p) - 1)
        us = [abs(D(x)) * D(y) for x, y in zip(w.double().tolist(), g.double().tolist())]
        if q == 1:
            e = [D("0.5") * abs(D(x)) * (1 if u > 0 else -1 if u < 0 else 0) / (1 + D("1e-12"))
                 for x, u in zip(w.double().tolist(), us)]
        else:
            N = sum(abs(u) ** q for u in us if u != 0) ** (1 / q)
            den = N ** (q - 1) + D("1e-12")
            e = [D("0.5") * abs(D(x)) * (1 if u > 0 else -1) * abs(u) ** (q - 1) / den if u != 0 else D(0)
                 for x, u in zip(w.double().tolist(), us)]
        want = torch.tensor([float(D(x) + y) for x, y in zip(w.double().tolist(), e)], dtype=torch.float64)
    eps_u, eps_ct = _eps(backend, dtype, p)
    qf = 1.0 if math.isinf(p) else p / (p - 1.0)
    tol = torch.finfo(dtype).eps * want.abs() + 16 * 0.5 * w.double().abs() * (max(1.0, qf - 1) * eps_u + eps_ct)
    assert ((got - want).abs() <= tol).all(), float(((got - want).abs() / tol).max())
