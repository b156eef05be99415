"""Backend parity: foreach against reference over tables of cases, several steps, params and
every state entry.

Gradients come from a fixed smooth function of the weights plus fresh noise per step, so the
second-pass gradient depends on where the first step moved the weights.

Tolerance: fp32/fp64 near 1e-6 relative; for bf16/fp16 the foreach error against
an fp64 run must be within 2x (plus a one-ulp floor) of the error that the reference backend run
in the same dtype has against that fp64 run.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastsam

SIZES = [(1,), (7,), (33, 31), (0,), (1023,), (5, 0, 3), (65537,)]
NO_GRAD = {3}  # index of a parameter that never gets a gradient

OPTIONS = {
    "sam": {},
    "asam": dict(adaptive=True, eta=0.01),
    "asam_eta0": dict(adaptive=True),
    "p_inf": dict(p=math.inf),
    "p3": dict(p=3.0),
    "p1.5": dict(p=1.5),
    "fsam": dict(fsam_sigma=1.0, fsam_lambda=0.9),
    "gsam": dict(gsam_alpha=0.3),
    "esam": dict(swp_keep=0.6, seed=5),
    "fsam+asam+gsam": dict(fsam_sigma=0.8, fsam_lambda=0.6, adaptive=True, eta=0.05, gsam_alpha=0.2),
    "all": dict(fsam_sigma=1.0, adaptive=True, eta=0.01, gsam_alpha=0.4, swp_keep=0.5, p=4.0, seed=3),
}

# Adam's update m / (sqrt(v) + eps) is ~ lr * sign(g) for |g| >> eps: a gradient element near 0
# (GSAM makes some) flips sign under a 1-ulp difference and moves by 2 * lr. eps = 1e-3 keeps the
# update Lipschitz in g (slope lr / eps), so backend differences are not amplified to O(lr).
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3, amsgrad=True, eps=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, eps=1e-3)),
}


def _grad(w: torch.Tensor, step: int, which: int, idx: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + 10 * which + idx)
    noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    # 1-Lipschitz in w (so rounding differences are not amplified) with per-tensor scales
    return (torch.sin(w.double()) + noise * (1 + idx)).to(w.dtype)


def _groups(params: list[torch.Tensor], layout: str) -> list[dict]:
    if layout == "one":
        return [{"params": params}]
    if layout == "lsam":  # perturb only the "last layer"
        return [{"params": params[:-2], "rho": 0.0}, {"params": params[-2:]}]
    if layout == "mixed":
        return [
            {"params": params[:2], "rho": 0.1, "adaptive": True, "eta": 0.1},
            {"params": params[2:5], "rho": 0.02},
            {"params": params[5:], "rho": 0.07, "adaptive": False},
        ]
    raise ValueError(layout)


def run(backend: str, dtype: torch.dtype, options: dict, base: str, layout: str = "one", steps: int = 5,
        init_dtype: torch.dtype | None = None):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(init_dtype or dtype).to(dtype))
              for s in SIZES]
    cls, kw = BASES[base]
    opt = fastsam.SAM(_groups(params, layout), cls, rho=0.05, backend=backend, **options, **kw)
    for t in range(steps):
        for i, w in enumerate(params):
            w.grad = None if i in NO_GRAD else _grad(w.detach(), t, 0, i)
        opt.first_step(zero_grad=True)
        for i, w in enumerate(params):
            w.grad = None if i in NO_GRAD else _grad(w.detach(), t, 1, i)
        opt.second_step(zero_grad=True)
    state = {}
    for i, w in enumerate(params):
        for k, v in opt.base_optimizer.state[w].items():
            state[f"base.{i}.{k}"] = v
        for k, v in opt.state[w].items():
            state[f"sam.{i}.{k}"] = v
    return [w.detach() for w in params], state


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x.double() - y.double()).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))


def assert_rel(got: torch.Tensor, exp: torch.Tensor, tol: float, msg: str = "") -> None:
    """Norm-wise relative closeness: max|got - exp| <= tol * max(|exp|max, 1e-30)."""
    assert got.shape == exp.shape and got.dtype == exp.dtype, msg
    if not exp.numel():
        return
    err = (got.double() - exp.double()).abs().max().item()
    scale = max(exp.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{msg}: max abs err {err:.3e} > {tol:.1e} * {scale:.3e}"


def _assert_close_lists(got, exp, tol):
    for i, (x, y) in enumerate(zip(got, exp)):
        assert_rel(x, y, tol, f"param {i}")


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("base", list(BASES))
def test_foreach_matches_reference_fp32(option, base):
    pf, sf = run("foreach", torch.float32, OPTIONS[option], base)
    pr, sr = run("reference", torch.float32, OPTIONS[option], base)
    _assert_close_lists(pf, pr, 2e-6)
    assert sf.keys() == sr.keys()
    for k in sf:
        assert_rel(sf[k], sr[k], 2e-6, k)


@pytest.mark.parametrize("option", ["sam", "asam", "p_inf", "fsam", "gsam", "esam", "all"])
def test_foreach_matches_reference_fp64(option):
    pf, sf = run("foreach", torch.float64, OPTIONS[option], "sgd")
    pr, sr = run("reference", torch.float64, OPTIONS[option], "sgd")
    _assert_close_lists(pf, pr, 1e-13)
    assert sf.keys() == sr.keys()
    for k in sf:
        assert_rel(sf[k], sr[k], 1e-13, k)


@pytest.mark.parametrize("layout", ["lsam", "mixed"])
@pytest.mark.parametrize("option", ["sam", "all", "fsam+asam+gsam"])
def test_groups(layout, option):
    pf, sf = run("foreach", torch.float32, OPTIONS[option], "adamw", layout)
    pr, sr = run("reference", torch.float32, OPTIONS[option], "adamw", layout)
    _assert_close_lists(pf, pr, 2e-6)
    assert sf.keys() == sr.keys()
    for k in sf:
        assert_rel(sf[k], sr[k], 2e-6, k)


def test_lsam_body_moves_only_by_base_step():
    """With rho = 0 for the body, SAM gives the body exactly what plain SGD would."""
    p_sam, _ = run("foreach", torch.float64, {}, "sgd", "lsam", steps=1)
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SIZES]
    for i in range(len(SIZES) - 2):
        if i in NO_GRAD:
            assert torch.equal(p_sam[i], w0[i])
            continue
        g = _grad(w0[i], 0, 1, i)  # second-pass gradient at the unperturbed body weights
        d_p = g + 1e-3 * w0[i]  # weight decay
        exp = w0[i] - 0.05 * (d_p + 0.9 * d_p)  # first nesterov step: buf = d_p, update d_p + 0.9 buf
        torch.testing.assert_close(p_sam[i], exp, rtol=1e-12, atol=1e-13)


LOW_PRECISION = [(torch.bfloat16, "sgd"), (torch.bfloat16, "adamw"), (torch.float16, "sgd")]


@pytest.mark.parametrize("dtype,base", LOW_PRECISION)
@pytest.mark.parametrize("option", ["sam", "asam", "fsam", "gsam", "esam", "all"])
def test_low_precision_error_within_2x_of_plain(dtype, option, base):
    """Both runs start from the same low-precision weights; truth is the fp64 run from them.

    fp16 runs with SGD only: torch's Adam on fp16 *storage* rounds eps and small v to 0 and
    divides by zero, in every backend alike (fp16 training keeps fp32 master weights)."""
    truth, _ = run("reference", torch.float64, OPTIONS[option], base, init_dtype=dtype)
    plain, _ = run("reference", dtype, OPTIONS[option], base)
    fe, _ = run("foreach", dtype, OPTIONS[option], base)
    ulp = torch.finfo(dtype).eps * max(w.abs().max().item() for w in truth if w.numel())
    err_plain, err_fe = _max_err(plain, truth), _max_err(fe, truth)
    assert err_fe <= 2.0 * err_plain + ulp, (err_fe, err_plain, ulp)


def test_mixed_dtypes_in_one_optimizer():
    """fp32 and bf16 parameters share one global norm."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for backend in ("reference", "foreach"):
        a = torch.nn.Parameter(torch.randn(100, generator=gen, dtype=torch.float64).float())
        b = torch.nn.Parameter(torch.randn(50, generator=gen, dtype=torch.float64).bfloat16())
        gen.manual_seed(1)
        opt = fastsam.SAM([a, b], torch.optim.SGD, lr=0.0, rho=0.5, backend=backend)
        a.grad = torch.ones(100)
        b.grad = torch.full((50,), 2.0, dtype=torch.bfloat16)
        opt.first_step()
        out[backend] = (a.detach() - opt._scratch[a]["w_old"], b.detach().double() - opt._scratch[b]["w_old"].double())
    N = math.sqrt(100 + 4 * 50)
    torch.testing.assert_close(out["reference"][0], torch.full((100,), 0.5 / N), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["foreach"][0], out["reference"][0], rtol=1e-6, atol=1e-7)
    # bf16 weights: e = 1/N ~ 0.058 on weights of magnitude ~1 is resolved to a bf16 ulp (2^-7)
    torch.testing.assert_close(out["foreach"][1], out["reference"][1], rtol=0, atol=2**-7)
