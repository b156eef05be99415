"""fastsam.losses at special logits and with bad hyperparameters (adversarial review V10, V11).

* Every backend's autograd gradient is the closed form (eq. 16 of Vani et al. for OBF,
  bisam_grad_reference for BiSAM) at logits that are exactly 0 (a zero-initialised classifier
  head: the old sigmoid-OBF reference differentiated max(z, 0) + log1p(exp(-|z|)) to 1 instead
  of 1/2 there), -0.0, near 0 (down to subnormals), tied, and large finite (+-1e38, +-3e38; the old
  reference value was -inf at [3e38, -3e38, ...] and its softmax gradient [1, 1] at a tie of two
  3e38 logits), in float32, bfloat16 and float16 with float64 as the truth, and in float64.
* Fresh (seeded) random rows around 0 and at the scale 1e37 besides the special points.
* Hyperparameters are real numbers: strings, bools, tensors, NaN/inf and out-of-range values are
  ValueErrors that name the argument and its allowed values.
* int32 targets with an ignore_index outside the int32 range, infinite target logits for BiSAM,
  NaN logits, empty batches on the chunked path.

The triton kernels run on CPU under TRITON_INTERPRET=1 (tests/conftest.py); sizes stay small.
"""

from __future__ import annotations

import fractions
import math
import zlib

import numpy as np
import pytest
import torch

import fastsam.losses as L
from fastsam._reference_losses import bisam_grad_reference, obf_grad_reference

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (loss, kwargs, closed-form gradient); OBF with several (gamma, lam): lam = 0 makes a = gamma
# for every p_y, lam = 0.3 puts the rows on both sides of the threshold.
VARIANTS = {
    "obf": (L.obf_loss, {}),
    "obf_g05_l03": (L.obf_loss, {"gamma": 0.5, "lam": 0.3}),
    "obf_sigmoid": (L.obf_loss, {"sigmoid": True}),
    "obf_sigmoid_g05_l03": (L.obf_loss, {"sigmoid": True, "gamma": 0.5, "lam": 0.3}),
    "obf_sigmoid_l0": (L.obf_loss, {"sigmoid": True, "lam": 0.0}),
    "bisam_log": (L.bisam_loss, {}),
    "bisam_tanh": (L.bisam_loss, {"phi": "tanh"}),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# largest |logit| of the "large" points per dtype: the values (up to ~2.4 M) stay finite
BIG = {"fp32": 1e38, "bf16": 1e38, "fp16": 2e4, "fp64": 1e307}


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def closed_form(name: str, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    _, kw = VARIANTS[name]
    if name.startswith("obf"):
        return obf_grad_reference(z, t, kw.get("gamma", 1.0), kw.get("lam"), kw.get("sigmoid", False))
    return bisam_grad_reference(z, t, None, kw.get("phi", "log"), 0.1)


def value_and_grad(name: str, z: torch.Tensor, t: torch.Tensor, backend: str):
    """Per-row values and the gradient of their sum (each row's own gradient)."""
    fn, kw = VARIANTS[name]
    z = z.detach().clone().requires_grad_(True)
    v = fn(z, t, reduction="none", backend=backend, **kw)
    v.sum().backward()
    return v.detach(), z.grad


def points(dt: str) -> dict[str, torch.Tensor]:
    M = BIG[dt]
    tiny = {"fp16": 1e-7, "bf16": 1e-38, "fp32": 1e-40, "fp64": 1e-310}[dt]  # a subnormal where it exists
    return {
        "zeros": torch.zeros(3, 5),
        "signed_zeros": torch.tensor([[-0.0, 0.0, -0.0, 0.0, 0.0]] * 3),
        "near_zero": torch.tensor([[1e-7, -1e-7, 0.0, 3e-8, -5e-8]] * 3, dtype=torch.float64),
        "tiny": torch.tensor([[tiny, -tiny, 0.0, 2 * tiny, -0.0]] * 3, dtype=torch.float64),
        "ties": torch.tensor([[1.0, 1.0, 1.0, -2.0, 1.0]] * 3),
        "large": torch.tensor([[M, -M, 0.0, 1.0, 0.5]] * 3, dtype=torch.float64),
        "large_ties": torch.tensor([[M, M, 0.0, 0.0, -1.0]] * 3, dtype=torch.float64),
        "large_mixed": torch.tensor([[-M, M, M / 2, 0.0, -M / 2]] * 3, dtype=torch.float64),
        "all_large": torch.tensor([[M, M / 2, M / 4, M / 8, M / 16]] * 3, dtype=torch.float64),
    }


def check_against_truth(name: str, z: torch.Tensor, t: torch.Tensor, backends, what: str) -> dict:
    """Every backend's value and autograd gradient against the float64 truth on the same
    (rounded) logits, and the float64 autograd gradient against the float64 closed form.
    Returns the largest gradient and value errors per backend (for the report)."""
    z64 = z.double()
    v64, g64 = value_and_grad(name, z64, t, "reference")
    cf64 = closed_form(name, z64, t)
    # the reference's autograd *is* the closed form, at every one of these points
    torch.testing.assert_close(g64, cf64, rtol=1e-12, atol=1e-14, msg=f"{what}: fp64 autograd vs closed form")
    assert torch.isfinite(g64).all() and torch.isfinite(v64).all(), what
    C = z.shape[1]
    scale = z64.abs().max().item() + math.log(C) + 1.0
    if z.dtype == torch.float64:
        tol_g, tol_v = 1e-12, 8 * C * torch.finfo(torch.float64).eps * scale
    else:
        # float32 math; the gradient is rounded to the logits' dtype (bf16/fp16: half an ulp)
        tol_g = {torch.float32: 2e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}[z.dtype]
        tol_v = 8 * C * torch.finfo(torch.float32).eps * scale
    errs = {}
    for backend in backends:
        v, g = value_and_grad(name, z, t, backend)
        assert g.dtype == z.dtype and torch.isfinite(g).all() and torch.isfinite(v).all(), (what, backend, v, g)
        eg = (g.double() - g64).abs().max().item()
        ev = (v.double() - v64).abs().max().item()
        assert eg <= tol_g, f"{what} {backend}: gradient error {eg:.3g} > {tol_g:.3g}\n{g}\n{g64}"
        assert ev <= tol_v, f"{what} {backend}: value error {ev:.3g} > {tol_v:.3g}\n{v}\n{v64}"
        errs[backend] = (eg, ev)
    return errs


def _backends(dtype: torch.dtype):
    return ["reference"] + (["triton"] if HAS_TRITON and dtype != torch.float64 else [])


# --------------------------------------------------------------------------------------------
# V10: special points, every dtype
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_special_points_match_closed_form(name, dt):
    dtype = DTYPES[dt]
    t = torch.tensor([0, 1, 3], device=DEV)
    for pname, z in points(dt).items():
        z = z.to(dtype).to(DEV)
        check_against_truth(name, z, t, _backends(dtype), f"{name} {dt} {pname}")


@pytest.mark.parametrize("sigmoid", [False, True])
def test_zero_logits_give_the_closed_form_gradient(sigmoid):
    """V10 exactly: a zero-initialised head. p = 1/2 (sigmoid) or 1/C (softmax), so
    a = gamma * max((1 - lam/p)/(1 - lam), 0) and grad = 1/C - a p - (1 - a) onehot(y)."""
    C = 4
    z, y = torch.zeros(1, C), torch.tensor([1])
    p = 0.5 if sigmoid else 1.0 / C
    a = max((1 - (1 / C) / p) / (1 - 1 / C), 0.0)
    want = torch.tensor([[1 / C - a * p - (1 - a) * (j == 1) for j in range(C)]])
    for backend in ["reference", "auto"] + (["triton"] if HAS_TRITON else []):
        zz = z.clone().to(DEV).requires_grad_(True)
        L.obf_loss(zz, y.to(DEV), sigmoid=sigmoid, reduction="sum", backend=backend).backward()
        torch.testing.assert_close(zz.grad.cpu(), want, rtol=0, atol=1e-7, msg=f"{backend}")
    if sigmoid:  # the numbers of the review: [-1/12, -5/12, -1/12, -1/12]
        torch.testing.assert_close(want, torch.tensor([[-1 / 12, -5 / 12, -1 / 12, -1 / 12]]))


def test_large_finite_logits_give_finite_values():
    """V10 value: z = [3e38, -3e38, 0, 1] (log_softmax -inf at -3e38). The value is
    mean(z) - a lse - (1 - a) z_y ~ -3e38 in every backend, not -inf."""
    z = torch.tensor([[3e38, -3e38, 0.0, 1.0], [-3e38, 3e38, 0.0, 1.0]])
    t = torch.tensor([0, 0])
    for sigmoid in (False, True):
        for backend in ["reference"] + (["triton"] if HAS_TRITON else []):
            v = L.obf_loss(z.to(DEV), t.to(DEV), sigmoid=sigmoid, reduction="none", backend=backend).cpu()
            v64 = L.obf_loss(z.double(), t, sigmoid=sigmoid, reduction="none", backend="reference")
            assert torch.isfinite(v).all(), (sigmoid, backend, v)
            torch.testing.assert_close(v.double(), v64, rtol=1e-6, atol=0.0)
        # row 0: a = 1 (p_y = 1), value = mean z - lse = 0.25 - 3e38; row 1: a = 0, value = mean z - z_y
        if not sigmoid:
            torch.testing.assert_close(v64, torch.tensor([0.25 - 3e38, 0.25 + 3e38], dtype=torch.float64))


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_chunked_rows_at_large_logits():
    """Rows wider than the interpreter's block (16384 columns: the online logsumexp and the second
    sweep) at large logits: a tie of two 1e38 logits must give p = 1/2 each (exp(z - lse) with the
    rounded lse gave 1 each), and BiSAM at mu = 1e30 (s is 1/2 on each of two tied margins)."""
    C = 16500
    z = torch.zeros(2, C)
    z[0, 3], z[0, 16400] = 1e38, 1e38
    z[1, 5], z[1, 16401] = -1e38, 1e38
    t = torch.tensor([3, 5])
    for name in ("obf", "obf_g05_l03", "obf_sigmoid_g05_l03"):
        check_against_truth(name, z, t, ["reference", "triton"], f"{name} chunked large")
    zb = torch.zeros(1, C)
    zb[0, 7], zb[0, 16000] = 2.0, 2.0
    tb = torch.tensor([0])
    for phi in ("log", "tanh"):
        g = {}
        for backend in ("reference", "triton"):
            zz = zb.clone().requires_grad_(True)
            L.bisam_loss(zz, tb, mu=1e30, phi=phi, reduction="sum", backend=backend).backward()
            g[backend] = zz.grad
        slope = 0.1 * (1 - math.tanh(0.2) ** 2) if phi == "tanh" else 1 / (1 + math.exp(2.0 - math.log(math.e - 1)))
        for backend, gr in g.items():
            assert math.isclose(gr[0, 7].item(), 0.5 * slope, rel_tol=1e-5), (phi, backend, gr[0, 7])
            assert math.isclose(gr[0, 16000].item(), 0.5 * slope, rel_tol=1e-5), (phi, backend)
            assert math.isclose(gr[0, 0].item(), -slope, rel_tol=1e-5), (phi, backend)
            assert gr[0, 1:7].abs().max() == 0


# --------------------------------------------------------------------------------------------
# Fresh random rows: around 0 (a freshly initialised head) and at 1e37
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_random_rows_near_zero_and_large(name, dt):
    dtype = DTYPES[dt]
    g = _gen("extremes", name, dt)
    B, C = 12, 37
    near = torch.randn(B, C, generator=g, dtype=torch.float64) * 1e-6
    near[torch.rand(B, C, generator=g) < 0.4] = 0.0  # exact zeros among them
    near[:2] = 0.0  # whole rows of zeros
    big_scale = 1e37 if dt != "fp64" else 1e300
    big = torch.randn(B, C, generator=g, dtype=torch.float64) * big_scale
    big[:, :5] = big[:, :1]  # ties at the large scale
    t = torch.randint(0, C, (B,), generator=g)
    t[::3] = big.argmax(1)[::3]  # some rows classified right (OBF's a > 0)
    for what, z in (("near zero", near), ("large", big)):
        z = z.to(dtype).to(DEV)
        check_against_truth(name, z, t.to(DEV), _backends(dtype), f"{name} {dt} {what}")


# --------------------------------------------------------------------------------------------
# Non-finite logits
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("phi", ["log", "tanh"])
def test_bisam_infinite_target_logit_has_a_finite_gradient(phi):
    """z_y = +-inf: every margin F_j is -+inf, Q is finite and the gradient is 0 (phi' is 0 at
    +inf, s_j is 0 at -inf). The reference computed F_y = inf - inf = NaN, which reached z_y's
    gradient through phi's backward."""
    z = torch.tensor([[math.inf, 1.0, -2.0, 0.0], [-math.inf, 1.0, -2.0, 0.0]])
    t = torch.tensor([0, 0])
    res = {}
    for backend in ["reference"] + (["triton"] if HAS_TRITON else []):
        zz = z.clone().to(DEV).requires_grad_(True)
        v = L.bisam_loss(zz, t.to(DEV), phi=phi, reduction="none", backend=backend)
        v.sum().backward()
        assert torch.isfinite(v).all() and (zz.grad == 0).all(), (backend, v, zz.grad)
        res[backend] = v.detach().cpu()
    mu = 1.5 if phi == "log" else 10.0
    lo = 0.0 if phi == "log" else math.exp(-mu)  # exp(mu phi(-inf)): phi_log(-inf) = -inf, tanh: -1
    want = torch.tensor([math.log(1 + 3 * lo), math.log(1 + 3 * math.exp(mu))]) / mu - math.log(4) / mu
    for v in res.values():
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bisam_grad_reference(z, t, None, phi, 0.1), torch.zeros_like(z))


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_logit_poisons_the_row_in_every_backend():
    """A NaN logit makes the row's value NaN and puts NaN in its gradient row (SAM's non-finite
    guard then skips the step), in the same places in both backends; other rows are untouched."""
    z = torch.randn(3, 6, generator=_gen("nan"))
    t = torch.tensor([0, 2, 5])
    for pos in (0, 3):  # at the target, elsewhere
        zn = z.clone()
        zn[0, pos] = math.nan
        for name in VARIANTS:
            out = {b: value_and_grad(name, zn, t, b) for b in ("reference", "triton")}
            for b, (v, g) in out.items():
                assert torch.isnan(v[0]) and torch.isnan(g[0]).any(), (name, pos, b, v, g)
                assert torch.isfinite(v[1:]).all() and torch.isfinite(g[1:]).all(), (name, pos, b)
            # the same NaNs in the same places (the kernels' max used to turn OBF's NaN a into 0)
            for k in (0, 1):
                torch.testing.assert_close(out["triton"][k], out["reference"][k], rtol=1e-5, atol=1e-6,
                                           equal_nan=True, msg=f"{name} NaN at {pos}")


# --------------------------------------------------------------------------------------------
# V11 and the sweep: argument validation
# --------------------------------------------------------------------------------------------


def _bad_calls():
    z, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    obf, bis = L.obf_loss, L.bisam_loss
    allowed = {"gamma": r"\[0, 1\]", "lam": r"\[0, 1\)", "mu": r"\(0, ", "alpha": r"\(0, ",
               "sigmoid": "True or False", "phi": "'log', 'tanh'", "reduction": "'mean', 'sum', 'none'",
               "backend": "'auto', 'triton', 'reference'", "ignore_index": "an int"}
    calls = [
        # V11 as found by the review
        ("gamma", lambda: obf(z, t, gamma="0.5")),
        ("gamma", lambda: obf(z, t, gamma=True)),
        ("lam", lambda: obf(z, t, lam="0.1")),
        ("mu", lambda: bis(z, t, mu=True)),
        ("mu", lambda: bis(z, t, mu="2")),
        ("alpha", lambda: bis(z, t, phi="tanh", alpha="0.1")),
        # the same classes for every hyperparameter
        ("gamma", lambda: obf(z, t, gamma=False)),
        ("gamma", lambda: obf(z, t, gamma=np.bool_(True))),
        ("gamma", lambda: obf(z, t, gamma=None)),
        ("gamma", lambda: obf(z, t, gamma=torch.tensor(0.5))),
        ("gamma", lambda: obf(z, t, gamma=np.array([0.5]))),
        ("gamma", lambda: obf(z, t, gamma=1 + 0j)),
        ("gamma", lambda: obf(z, t, gamma=math.nan)),
        ("gamma", lambda: obf(z, t, gamma=math.inf)),
        ("gamma", lambda: obf(z, t, gamma=np.float32("nan"))),
        ("lam", lambda: obf(z, t, lam=True)),
        ("lam", lambda: obf(z, t, lam=False)),
        ("lam", lambda: obf(z, t, lam=torch.tensor(0.1))),
        ("lam", lambda: obf(z, t, lam=math.nan)),
        ("lam", lambda: obf(z, t, lam=1.0)),
        ("mu", lambda: bis(z, t, mu=False)),
        ("mu", lambda: bis(z, t, mu=np.float64("nan"))),
        ("mu", lambda: bis(z, t, mu=math.inf)),
        ("mu", lambda: bis(z, t, mu=torch.tensor(1.5))),
        ("mu", lambda: bis(z, t, mu=1e31)),  # float32 math: mu * phi and 1/mu leave the range
        ("alpha", lambda: bis(z, t, phi="tanh", alpha=True)),
        ("alpha", lambda: bis(z, t, alpha="0.1")),  # checked with phi="log" too
        ("alpha", lambda: bis(z, t, phi="tanh", alpha=None)),
        ("alpha", lambda: bis(z, t, phi="tanh", alpha=math.inf)),
        ("alpha", lambda: bis(z, t, phi="tanh", alpha=1e31)),
        ("alpha", lambda: bis(z.double(), t, phi="tanh", alpha=math.inf)),
        ("alpha", lambda: bis(z, t, phi="tanh", alpha=-0.1)),
        ("sigmoid", lambda: obf(z, t, sigmoid=1)),
        ("sigmoid", lambda: obf(z, t, sigmoid=np.bool_(True))),
        ("sigmoid", lambda: obf(z, t, sigmoid=None)),
        ("phi", lambda: bis(z, t, phi=["log"])),
        ("phi", lambda: bis(z, t, phi=None)),
        ("phi", lambda: bis(z, t, phi="LOG")),
        ("reduction", lambda: obf(z, t, reduction=None)),
        ("reduction", lambda: obf(z, t, reduction="MEAN")),
        ("reduction", lambda: bis(z, t, reduction=["mean"])),
        ("reduction", lambda: bis(z, t, reduction=np.array(["mean", "sum"]))),
        ("backend", lambda: obf(z, t, backend=None)),
        ("backend", lambda: bis(z, t, backend=["reference"])),
        ("ignore_index", lambda: obf(z, t, ignore_index=True)),
        ("ignore_index", lambda: obf(z, t, ignore_index="-100")),
        ("ignore_index", lambda: obf(z, t, ignore_index=2**63)),
        ("ignore_index", lambda: bis(z, t, ignore_index=-(2**63) - 1)),
        ("ignore_index", lambda: bis(z, t, ignore_index=torch.tensor(-100))),
        ("target", lambda: obf(z, t.to(torch.int16))),
        ("target", lambda: obf(z, t.to(torch.uint8))),
        ("target", lambda: bis(z, t.bool())),
    ]
    return [(name, allowed.get(name), call) for name, call in calls]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_argument_raises_value_error_naming_it_and_what_is_allowed(i):
    name, allowed, call = _bad_calls()[i]
    with pytest.raises(ValueError, match=rf"^{name}\b") as info:
        call()
    if allowed is not None:
        assert __import__("re").search(allowed, str(info.value)), str(info.value)


def test_numbers_of_every_kind_are_accepted_and_equal():
    z, t = torch.randn(4, 5, generator=_gen("num")), torch.tensor([0, 1, 2, 3])
    ref = L.obf_loss(z, t, gamma=0.5, lam=0.25)
    for gamma, lam in [(np.float32(0.5), np.float64(0.25)), (fractions.Fraction(1, 2), 0.25), (0.5, np.float32(0.25))]:
        torch.testing.assert_close(L.obf_loss(z, t, gamma=gamma, lam=lam), ref, rtol=0, atol=0)
    assert L.obf_loss(z, t, gamma=1).item() == L.obf_loss(z, t, gamma=1.0).item()  # int
    assert L.obf_loss(z, t, lam=0).item() == L.obf_loss(z, t, lam=0.0).item()
    ref = L.bisam_loss(z, t, mu=2.0, phi="tanh", alpha=0.25)
    for mu, alpha in [(2, np.float32(0.25)), (np.int64(2), 0.25), (np.float64(2.0), fractions.Fraction(1, 4))]:
        torch.testing.assert_close(L.bisam_loss(z, t, mu=mu, phi="tanh", alpha=alpha), ref, rtol=0, atol=0)
    # numpy ints as ignore_index
    torch.testing.assert_close(L.obf_loss(z, t, ignore_index=np.int64(2)), L.obf_loss(z, t, ignore_index=2))
    # the bounds themselves: mu up to 1e30 under float32 math, any finite mu and alpha for float64
    assert torch.isfinite(L.bisam_loss(z, t, mu=1e30, phi="tanh", alpha=1e30))
    assert torch.isfinite(L.bisam_loss(z.double(), t, mu=1e100, alpha=1e200, phi="tanh"))
    assert torch.isfinite(L.obf_loss(z, t, gamma=0.0, lam=0.0)) and torch.isfinite(L.obf_loss(z, t, gamma=1.0))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_int32_target_with_ignore_index_outside_int32(backend):
    """torch compares an int32 tensor with an int outside the int32 range after wrapping it:
    int32 target != 2**40 was False where the target is 0, so the reference dropped those rows
    from the mean. Every backend now gives the int64 target's result."""
    z, _ = torch.randn(6, 5, generator=_gen("i32")), None
    t64 = torch.tensor([0, 1, 0, 4, 0, 2])
    for fn, kw in VARIANTS.values():
        for ignore_index in (2**40, -(2**40), 2**32, 2**63 - 1):
            want = fn(z, t64, backend="reference", ignore_index=-100, **kw)
            for t in (t64, t64.int()):
                got = fn(z.to(DEV), t.to(DEV), backend=backend, ignore_index=ignore_index, **kw)
                torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    # and the CPU range check does not let a wrapped ignore_index excuse a bad class index
    t_bad = torch.tensor([0, 1, -100, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="^target"):
        L.obf_loss(torch.randn(4, 5), t_bad, backend=backend, ignore_index=-100 + 2**32)


@needs_triton
@pytest.mark.parametrize("C", [5, 20000], ids=["one-chunk", "chunked"])
def test_empty_batch_every_dtype_and_target_dtype(C):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for tdtype in (torch.int32, torch.int64):
            for name, (fn, kw) in VARIANTS.items():
                for backend in ("reference", "triton"):
                    for reduction in ("mean", "sum", "none"):
                        z = torch.zeros(0, C, dtype=dtype, device=DEV, requires_grad=True)
                        t = torch.zeros(0, dtype=tdtype, device=DEV)
                        v = fn(z, t, reduction=reduction, backend=backend, **kw)
                        v.sum().backward()
                        assert z.grad.shape == (0, C) and z.grad.dtype == dtype
                        assert v.dtype == torch.float32
                        if reduction == "mean":
                            assert torch.isnan(v), (name, backend)
                        elif reduction == "sum":
                            assert v.item() == 0.0
                        else:
                            assert v.shape == (0,)
                    with torch.no_grad():
                        assert fn(z.detach(), t, reduction="none", backend="triton", **kw).shape == (0,)
