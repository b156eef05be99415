"""backend="triton" against fastsam.reference (and torch's own optimizers).

On a machine without CUDA these run under the Triton interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1); with CUDA they run the compiled kernels on the GPU.
Blocks are made small (64 elements under the interpreter, 256 on the GPU) and programs few, so
that small tensors still span several blocks and several programs.

Tolerances (DESIGN.md section 5): fp32 and fp64 compared with the float64 reference at ~1e-6 /
1e-12 relative; bf16/fp16 by the 2x rule: the error of the triton result against a float64
reference run must be within 2x the error of plain PyTorch in the same dtype (foreach backend +
torch's base optimizer), plus one unit in the last place.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

import fastsam  # noqa: E402
from fastsam import _philox  # noqa: E402
from fastsam import functional as F  # noqa: E402
from fastsam import reference as R  # noqa: E402
from fastsam.kernels import _tables  # noqa: E402
from fastsam.kernels import triton_sam as TS  # noqa: E402
from fastsam.optim._fused import fused_second_step  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOW = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _small_launches():
    with TS.configure(block=256, programs_per_sm=1, interp_block=64, interp_programs=3):
        yield


# ------------------------------------------------------------------------------ helpers
def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close(got: torch.Tensor, want: torch.Tensor, *, rtol: float, name: str = "") -> None:
    """|got - want| <= rtol * (|want| + 0.1 * max|want|) elementwise, compared in float64 (the
    absolute part admits the rounding of values that cancel to near zero, e.g. an EMA update)."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert g.shape == w.shape, name
    if w.numel() == 0:
        return
    scale = w.abs().max().item()
    bound = rtol * (w.abs() + 0.1 * scale) + 1e-30
    bad = (g - w).abs() > bound
    assert not bad.any(), f"{name}: max err {(g - w).abs().max().item():.3e} (scale {scale:.3e}, rtol {rtol})"


def assert_2x_rule(got: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, name: str = "") -> None:
    """Low precision: max and mean error of ``got`` vs the fp64 reference within 2x those of plain
    PyTorch in the same dtype, plus one ulp of the values' scale."""
    r = ref64.detach().double().cpu()
    if r.numel() == 0:
        return
    e_got = (got.detach().double().cpu() - r).abs()
    e_plain = (plain.detach().double().cpu() - r).abs()
    floor = _ulp(got.dtype) * r.abs().max().item()
    assert e_got.max() <= 2 * e_plain.max() + floor, f"{name}: max {e_got.max():.3e} vs plain {e_plain.max():.3e}"
    assert e_got.mean() <= 2 * e_plain.mean() + floor, f"{name}: mean {e_got.mean():.3e} vs plain {e_plain.mean():.3e}"


SHAPES = [(7, 5), (33,), (1,), (0,), (3, 11), (130,)]


def make_params(dtype: torch.dtype, seed: int = 0, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g, dtype=torch.float64) * 0.5).to(DEV, dtype))
            for s in shapes]


def make_loss(shapes=SHAPES, seed: int = 1, skip: tuple[int, ...] = (2,)):
    """A nonlinear loss of the parameters (clean and perturbed gradients differ); parameters in
    ``skip`` get no gradient."""
    g = torch.Generator().manual_seed(seed)
    cs = [torch.randn(s, generator=g, dtype=torch.float64).to(DEV) for s in shapes]
    ds = [torch.rand(s, generator=g, dtype=torch.float64).to(DEV) for s in shapes]

    def loss(params: list[torch.Tensor]) -> torch.Tensor:
        tot = 0.0
        for i, (w, c, d) in enumerate(zip(params, cs, ds)):
            if i in skip:
                continue
            c, d = c.to(w.dtype), d.to(w.dtype)
            tot = tot + ((w * c).sin().sum() + 0.5 * (d * w * w).sum()).float()
        return tot

    return loss


def groups_of(params: list[torch.Tensor], spec: list[dict[str, Any]] | None) -> Any:
    if spec is None:
        return params
    out, k = [], 0
    for s in spec:
        n = s["n"]
        out.append({**{a: b for a, b in s.items() if a != "n"}, "params": params[k:k + n]})
        k += n
    assert k == len(params)
    return out


def run_sam(backend: str, dtype: torch.dtype, base: type, base_kw: dict, sam_kw: dict, *, steps: int = 5,
            spec: list[dict[str, Any]] | None = None, shapes=SHAPES, seed: int = 0, sched: bool = False):
    params = make_params(dtype, seed, shapes)
    loss = make_loss(shapes)
    opt = fastsam.SAM(groups_of(params, spec), base, backend=backend, **sam_kw, **base_kw)
    lr_s = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if sched else None
    perturbed = []
    for s in range(steps):
        loss(params).backward()
        opt.first_step(zero_grad=True)
        perturbed.append([p.detach().clone() for p in params])
        loss(params).backward()
        opt.second_step(zero_grad=s < steps - 1)  # keep the last (GSAM-combined) gradients
        if lr_s is not None:
            lr_s.step()
    return params, opt, perturbed


def state_tensors(opt: fastsam.SAM) -> dict[str, torch.Tensor]:
    """Every state entry (F-SAM EMA and flags, the base optimizer's state) by a readable key."""
    out = {}
    for i, w in enumerate(opt._all_params()):
        for k, v in opt.state.get(w, {}).items():
            out[f"sam.{i}.{k}"] = v
        for k, v in opt.base_optimizer.state.get(w, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"base.{i}.{k}"] = v
    return out


def compare_runs(a, b, *, rtol: float) -> None:
    """Parameters after every first step and at the end, and every state entry. (Gradients are
    not compared here: they amplify fp32 trajectory differences by the loss curvature; the GSAM
    gradient write-back is compared exactly in the functional tests.)"""
    (pa, oa, perta), (pb, ob, pertb) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert_close(x, y, rtol=rtol, name=f"param {i}")
    for s, (xs, ys) in enumerate(zip(perta, pertb)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert_close(x, y, rtol=rtol, name=f"perturbed param {i} step {s}")
    sa, sb = state_tensors(oa), state_tensors(ob)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device, k
        assert_close(sa[k], sb[k], rtol=rtol, name=k)


SGD_KW = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}
ADAMW_KW = {"lr": 1e-2, "weight_decay": 0.05}

OPTIONS = {
    "sam": {},
    "asam": {"adaptive": True, "eta": 0.01, "rho": 0.5},
    "fsam": {"fsam_sigma": 1.0, "fsam_lambda": 0.6},
    "p_inf": {"p": math.inf, "rho": 0.01},
    "p_3": {"p": 3.0},
    "gsam": {"gsam_alpha": 0.3},
    "esam": {"swp_keep": 0.6},
    "all": {"adaptive": True, "eta": 0.02, "rho": 0.3, "fsam_sigma": 0.5, "gsam_alpha": 0.4,
            "swp_keep": 0.7, "p": 2.5, "seed": 12345},
}


# ------------------------------------------------------------------------------ backend selection
def test_backend_resolution(monkeypatch):
    # the interpreter is never picked automatically: auto on CPU is the C++ extension when it builds
    assert F.resolve_backend("auto", "cpu") == ("cpp" if F._ext_runs_on("cpp", "cpu") else "foreach")
    if DEV.type == "cpu":
        assert F.resolve_backend("triton", "cpu") == "triton"
        assert "triton" in F.available_backends("cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "triton" not in F.available_backends("cpu")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            F.resolve_backend("triton", "cpu")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            F.sam_restore_([torch.zeros(3)], [torch.ones(3)], backend="triton")
        monkeypatch.setattr(F, "_interpreter_on", lambda: False)
    assert F.resolve_backend("auto", "cuda") == "triton"
    assert F.supports_fused_updates("triton", "cuda")
    assert not F.supports_fused_updates("foreach", "cuda")
    with pytest.raises(ValueError, match="fused"):
        F.sam_restore_sgd_([torch.zeros(2)], [torch.ones(2)], [None], None, [None], lr=0.1, backend="foreach")


# ------------------------------------------------------------------------------ ESAM mask
def test_philox_mask_bit_identical():
    """The kept elements are exactly those of fastsam._philox, across the 2^32 index boundary."""
    n = 300
    offsets = [2**32 - 170, 5, 2**33 + 7]
    params = [torch.zeros(n, device=DEV) for _ in offsets]
    grads = [torch.ones(n, device=DEV) for _ in offsets]
    w_old = [torch.empty_like(p) for p in params]
    for step in (0, 1, 2**31 + 3):
        for p in params:
            p.zero_()
        ok = F.sam_perturb_(params, grads, w_old, None, None, None, [1.0] * 3, [0.0] * 3, [False] * 3, offsets,
                            swp_keep=0.37, seed=2**32 - 5, step=step, backend="triton")
        assert bool(ok)
        for p, off in zip(params, offsets):
            want = _philox.keep_mask(off, n, 2**32 - 5, step, 0.37, device=DEV)
            assert torch.equal(p != 0, want)


# ------------------------------------------------------------------------------ first step (functional)
def _perturb_inputs(dtype, shapes, seed, fsam, gsam, ready=None):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda s: torch.randn(s, generator=gen, dtype=torch.float64).to(DEV, dtype)  # noqa: E731
    params = [mk(s) for s in shapes]
    grads = [mk(s) * 0.1 for s in shapes]
    w_old = [torch.full_like(p, 7.0) for p in params]
    ema = [mk(s) * 0.1 for s in shapes] if fsam else None
    rdy = None
    if fsam:
        rdy = [torch.tensor(float(r), device=DEV) for r in (ready or [i % 2 for i in range(len(shapes))])]
    g_old = [torch.full_like(p, 3.0) for p in params] if gsam else None
    return params, grads, w_old, ema, rdy, g_old


def _clone(x):
    if x is None:
        return None
    return [t.clone() for t in x]


FUNC_CASES = [
    ("fp32-all-sizes", torch.float32, [(1,), (7,), (1023,), (0,), (31, 33)], OPTIONS["all"]),
    ("fp32-asam-fsam", torch.float32, [(5, 3), (64,), (65,)], {"adaptive": True, "eta": 0.1, "fsam_sigma": 1.0}),
    ("fp64-all", torch.float64, [(7,), (300,)], OPTIONS["all"]),
    ("bf16-all", torch.bfloat16, [(7,), (1023,), (40, 3)], OPTIONS["all"]),
    ("fp16-all", torch.float16, [(7,), (1023,), (40, 3)], OPTIONS["all"]),
    ("fp32-p-inf", torch.float32, [(9,), (200,)], {"p": math.inf}),
    ("fp32-65537-asam", torch.float32, [(65537,), (3,)], {"adaptive": True, "eta": 0.01}),
]


@pytest.mark.parametrize("name,dtype,shapes,opts", FUNC_CASES, ids=[c[0] for c in FUNC_CASES])
def test_perturb_matches_reference(name, dtype, shapes, opts):
    fsam, gsam = opts.get("fsam_sigma") is not None, opts.get("gsam_alpha", 0) > 0
    n = len(shapes)
    rhos = [opts.get("rho", 0.05) * (1 + 0.5 * i) for i in range(n)]
    etas = [opts.get("eta", 0.0)] * n
    adaptive = [bool(opts.get("adaptive", False)) and i % 2 == 0 for i in range(n)]
    offsets = [1000 * i + 3 for i in range(n)]
    kw = dict(p=opts.get("p", 2.0), fsam_sigma=opts.get("fsam_sigma"), fsam_lambda=0.8,
              swp_keep=opts.get("swp_keep", 1.0), seed=opts.get("seed", 0), step=3)
    base = _perturb_inputs(dtype, shapes, 0, fsam, gsam)
    runs = {}
    for be in ("triton", "reference", "foreach"):
        ins = [_clone(x) for x in base]
        ok = F.sam_perturb_(*ins, rhos, etas, adaptive, offsets, backend=be, **kw)
        runs[be] = (ok, ins)
    if dtype in LOW:  # the reference rounds once from fp64: also the fp64 truth for the 2x rule
        ref64 = [_clone([t.double() for t in x]) if x is not None else None for x in base]
        if ref64[4] is not None:
            ref64[4] = [t.float() for t in ref64[4]]
        R.sam_perturb_(*ref64, rhos, etas, adaptive, offsets, **kw)
    for be in ("triton",):
        ok, ins = runs[be]
        assert bool(ok) and ok.dtype == torch.bool and ok.dim() == 0
        for k, label in enumerate(("params", "grads", "w_old", "ema", "ready", "g_old")):
            if ins[k] is None:
                continue
            for i, (x, y) in enumerate(zip(ins[k], runs["reference"][1][k])):
                if label in ("w_old", "g_old", "grads", "ready"):
                    assert torch.equal(x, y), f"{label} {i} must be exact"
                elif dtype in LOW:
                    assert_2x_rule(x, runs["foreach"][1][k][i], ref64[k][i], name=f"{label} {i}")
                else:
                    assert_close(x, y, rtol=1e-12 if dtype == torch.float64 else 2e-6, name=f"{label} {i}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf arithmetic inside the interpreter's numpy
def test_perturb_nonfinite_norm_changes_nothing():
    """inf in one tensor of one dtype group: no tensor of any group is perturbed, EMA and flags
    stay, w_old gets w, g_old gets zeros, the returned flag is False."""
    shapes = [(5,), (70,), (3, 3)]
    dts = [torch.float32, torch.bfloat16, torch.float32]
    ins = list(_perturb_inputs(torch.float32, shapes, 1, True, True, ready=[1, 0, 1]))
    for k in (0, 1, 2, 3, 5):
        ins[k] = [t.to(dt) for t, dt in zip(ins[k], dts)]
    ins[1][1][17] = float("inf")
    before = [_clone(x) for x in ins]
    ok = F.sam_perturb_(*ins, [0.1] * 3, [0.0] * 3, [False, True, False], [0, 5, 75], fsam_sigma=1.0,
                        backend="triton")
    assert not bool(ok)
    for i in range(3):
        assert torch.equal(ins[0][i], before[0][i])
        assert torch.equal(ins[2][i], before[0][i])
        assert torch.equal(ins[3][i], before[3][i])
        assert torch.equal(ins[4][i], before[4][i])
        assert torch.equal(ins[5][i], torch.zeros_like(ins[5][i]))


def test_mixed_dtypes_one_global_norm():
    """fp32 + bf16 + fp16 + fp64 tensors in one call: one norm over all groups (2 launches each)."""
    dts = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float64]
    shapes = [(50,), (70,), (20, 3), (1,), (9,)]
    params, grads, w_old, _, _, _ = _perturb_inputs(torch.float32, shapes, 2, False, False)
    params = [p.to(dt) for p, dt in zip(params, dts)]
    grads = [g.to(dt) for g, dt in zip(grads, dts)]
    w_old = [torch.empty_like(p) for p in params]
    ref = _clone(params)
    l0 = TS.LAUNCHES[0]
    F.sam_perturb_(params, grads, w_old, None, None, None, [0.2] * 5, [0.0] * 5, [True] * 5, [0, 50, 120, 180, 181],
                   backend="triton")
    assert TS.LAUNCHES[0] - l0 == 2 * 4  # K1 + K2 per (device, dtype) group
    R.sam_perturb_(ref, grads, _clone(w_old), None, None, None, [0.2] * 5, [0.0] * 5, [True] * 5,
                   [0, 50, 120, 180, 181])
    for x, y in zip(params, ref):
        assert_close(x, y, rtol=2 * _ulp(x.dtype) if x.dtype in LOW else 2e-6)


def test_inplace_writes_are_seen_by_autograd():
    """The eager path writes through raw addresses, so it bumps the version counters itself:
    a backward through a graph that saved the (now perturbed) weights must fail loudly."""
    w = torch.nn.Parameter(torch.randn(10, device=DEV))
    loss = (w * w).sum()  # saves w for backward
    g = torch.randn(10, device=DEV)
    F.sam_perturb_([w], [g], [torch.empty_like(w)], None, None, None, [0.1], [0.0], [False], [0], backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_mismatched_buffers_are_rejected():
    """Raw addresses must never be followed into a tensor of the wrong size or dtype."""
    w = torch.randn(10, device=DEV)
    g = torch.randn(10, device=DEV)
    for bad in (torch.empty(9, device=DEV), torch.empty(10, device=DEV, dtype=torch.float64)):
        with pytest.raises(ValueError, match="does not match"):
            F.sam_perturb_([w], [g], [bad], None, None, None, [0.1], [0.0], [False], [0], backend="triton")
        step = torch.tensor(0.0)
        with pytest.raises(ValueError, match="does not match"):
            F.sam_restore_adam_([w], [g], [None], None, [bad], [torch.zeros_like(w)], None, [step],
                                lr=0.1, backend="triton")
        assert step.item() == 0.0  # validated before anything was changed


def test_noncontiguous_params_are_staged():
    base = torch.randn(6, 9, device=DEV)
    w = base.t()  # a non-contiguous parameter
    g = torch.randn(6, 9, device=DEV).t()
    ref_w = w.clone()
    wo, wo_ref = torch.empty_like(w), torch.empty_like(w)
    F.sam_perturb_([w], [g], [wo], None, None, None, [0.1], [0.0], [False], [11], swp_keep=0.5, backend="triton")
    R.sam_perturb_([ref_w], [g], [wo_ref], None, None, None, [0.1], [0.0], [False], [11], swp_keep=0.5)
    assert_close(w, ref_w, rtol=2e-6)
    assert torch.equal(wo, wo_ref)
    F.sam_restore_([w], [wo], backend="triton")
    assert torch.equal(w, wo_ref)


# ------------------------------------------------------------------------------ optimizer: fp32 parity
@pytest.mark.parametrize("opt_name", list(OPTIONS))
def test_sam_sgd_fp32_matches_reference(opt_name):
    kw = OPTIONS[opt_name]
    a = run_sam("triton", torch.float32, torch.optim.SGD, SGD_KW, kw)
    b = run_sam("reference", torch.float32, torch.optim.SGD, SGD_KW, kw)
    compare_runs(a, b, rtol=1e-5)


BASES = [
    ("sgd-plain", torch.optim.SGD, {"lr": 0.1}),
    ("sgd-damp-maximize", torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "maximize": True}),
    ("adam-l2-amsgrad", torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-2, "amsgrad": True, "betas": (0.8, 0.95)}),
    ("adamw", torch.optim.AdamW, ADAMW_KW),
    ("adamw-maximize-eps", torch.optim.AdamW, {"lr": 3e-3, "eps": 1e-3, "maximize": True}),
    # eps keeps g / sqrt(v) well conditioned where g ~ 0 (else fp32 rounding flips O(1) updates)
    ("rmsprop-unfused", torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5, "eps": 1e-3}),
]


@pytest.mark.parametrize("opts", ["sam", "all"])
@pytest.mark.parametrize("name,base,base_kw", BASES, ids=[b[0] for b in BASES])
def test_sam_bases_fp32_match_torch(name, base, base_kw, opts):
    """Fused restore + update (SGD/Adam/AdamW) against restore + the real torch optimizer."""
    a = run_sam("triton", torch.float32, base, base_kw, OPTIONS[opts])
    b = run_sam("reference", torch.float32, base, base_kw, OPTIONS[opts])
    compare_runs(a, b, rtol=1e-5)


GROUP_SPEC = [
    {"n": 2, "rho": 0.05, "adaptive": True, "eta": 0.0, "lr": 0.02, "weight_decay": 0.0},
    {"n": 2, "rho": 0.2, "adaptive": False, "lr": 0.01},
    {"n": 2, "rho": 0.0, "weight_decay": 0.0},  # LSAM: not perturbed, still updated
]


@pytest.mark.parametrize("base,base_kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, ADAMW_KW)])
def test_sam_param_groups_and_scheduler(base, base_kw):
    """Per-group rho/adaptive/eta/lr/weight_decay, a rho = 0 group, a StepLR schedule."""
    kw = {"fsam_sigma": 1.0, "gsam_alpha": 0.2, "swp_keep": 0.8}
    a = run_sam("triton", torch.float32, base, base_kw, kw, spec=GROUP_SPEC, sched=True)
    b = run_sam("reference", torch.float32, base, base_kw, kw, spec=GROUP_SPEC, sched=True)
    compare_runs(a, b, rtol=1e-5)
    assert a[1].param_groups[0]["lr"] == pytest.approx(0.02 * 0.25)


def test_sam_float64_params():
    a = run_sam("triton", torch.float64, torch.optim.AdamW, ADAMW_KW, OPTIONS["all"])
    b = run_sam("reference", torch.float64, torch.optim.AdamW, ADAMW_KW, OPTIONS["all"])
    compare_runs(a, b, rtol=1e-11)


# ------------------------------------------------------------------------------ optimizer: bf16 / fp16
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("base,base_kw,opts", [
    (torch.optim.SGD, SGD_KW, "all"),
    (torch.optim.AdamW, ADAMW_KW, "all"),
    (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-3}, "fsam"),
], ids=["sgd-all", "adamw-all", "adam-amsgrad-fsam"])
def test_sam_low_precision_2x_rule(dtype, base, base_kw, opts):
    kw = OPTIONS[opts]
    got = run_sam("triton", dtype, base, base_kw, kw)
    plain = run_sam("foreach", dtype, base, base_kw, kw)
    ref = run_sam("reference", torch.float64, base, base_kw, kw)
    for i, (x, y, z) in enumerate(zip(got[0], plain[0], ref[0])):
        assert x.dtype == dtype
        assert_2x_rule(x, y, z, name=f"param {i}")
    sg, sp, sr = state_tensors(got[1]), state_tensors(plain[1]), state_tensors(ref[1])
    assert sg.keys() == sr.keys()
    for k in sg:
        if k.endswith("step") or k.endswith("fsam_ready"):
            assert torch.equal(sg[k], sp[k]), k
        else:
            assert sg[k].dtype == dtype, k
            assert_2x_rule(sg[k], sp[k], sr[k], name=k)


# ------------------------------------------------------------------------------ fused ops vs twins
def _fused_lists(dtype, seed, n_upd=4):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5,), (130,), (0,), (3, 7), (1,), (70,)]
    mk = lambda s, k=1.0: (torch.randn(s, generator=gen, dtype=torch.float64) * k).to(DEV, dtype)  # noqa: E731
    params = [mk(s) for s in shapes]
    grads = [mk(s, 0.3) if i != 4 else None for i, s in enumerate(shapes)]  # tensor 4: restore only
    w_old = [mk(s) if i != 5 else None for i, s in enumerate(shapes)]  # tensor 5: update only
    g_old = [mk(s, 0.3) if i not in (1, 5) else None for i, s in enumerate(shapes)]
    return params, grads, w_old, g_old


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gsam", [0.0, 0.5])
@pytest.mark.parametrize("kw", [
    {"lr": [0.1, 0.2, 0.1, 0.05, 0.1, 0.3], "momentum": 0.9, "dampening": 0.1, "weight_decay": [0.0, 0.1] * 3},
    {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True},
    {"lr": 0.1},
], ids=["mom-damp-lists", "nesterov-max", "plain"])
def test_fused_sgd_matches_twin(dtype, gsam, kw):
    runs = {}
    for be in ("triton", "reference"):
        params, grads, w_old, g_old = _fused_lists(dtype, 3)
        bufs: list = [None] * len(params)
        for step in range(5):
            fresh = _fused_lists(dtype, 10 + step)
            for g, g2 in zip(grads, fresh[1]):
                if g is not None:
                    g.copy_(g2)
            F.sam_restore_sgd_(params, grads, w_old, g_old if gsam else None, bufs, gsam_alpha=gsam,
                               backend=be, **kw)
        runs[be] = (params, grads, bufs)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    for k in range(3):
        for i, (x, y) in enumerate(zip(runs["triton"][k], runs["reference"][k])):
            assert (x is None) == (y is None)
            if x is not None:
                assert_close(x, y, rtol=rtol, name=f"list {k} tensor {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [
    {"lr": [1e-2, 2e-2, 1e-2, 1e-2, 1e-2, 5e-3], "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"lr": 1e-2, "weight_decay": 0.01, "amsgrad": True, "beta1": 0.5, "beta2": 0.9, "eps": 1e-4},
    {"lr": 1e-2, "maximize": True, "gsam_alpha": 0.4},
], ids=["adamw-lists", "adam-amsgrad", "maximize-gsam"])
def test_fused_adam_matches_twin(dtype, kw):
    runs = {}
    for be in ("triton", "reference"):
        params, grads, w_old, g_old = _fused_lists(dtype, 4)
        n = len(params)
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        vmax = [torch.zeros_like(p) for p in params]
        steps = [torch.tensor(float(i % 2)) for i in range(n)]  # tensors at different steps
        for step in range(5):
            fresh = _fused_lists(dtype, 20 + step)
            for g, g2 in zip(grads, fresh[1]):
                if g is not None:
                    g.copy_(g2)
            F.sam_restore_adam_(params, grads, w_old, g_old, m, v, vmax, steps, backend=be, **kw)
        runs[be] = (params, grads, m, v, vmax, steps)
    rtol = 1e-12 if dtype == torch.float64 else 5e-6
    for k in range(6):
        for i, (x, y) in enumerate(zip(runs["triton"][k], runs["reference"][k])):
            if x is not None:
                assert_close(x, y, rtol=rtol, name=f"list {k} tensor {i}")


def test_fused_reference_twins_match_torch_float64():
    """The fp64 twins equal restore + a real torch optimizer step (SGD, Adam, AdamW) in fp64."""
    for base, kw, twin in [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01}, "sgd"),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}, "sgd"),
        (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.01, "amsgrad": True}, "adam"),
        (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "betas": (0.5, 0.9)}, "adam"),
    ]:
        params, grads, w_old, _ = _fused_lists(torch.float64, 5)
        grads[5] = None  # no grad and not perturbed: untouched by both
        twin_params = [p.clone() for p in params]
        torch_params = [torch.nn.Parameter(p.clone()) for p in params]
        opt = base(torch_params, **kw)
        st: dict[str, list] = {"buf": [None] * 6, "m": [], "v": [], "vmax": [], "steps": []}
        st["m"] = [torch.zeros_like(p) for p in params]
        st["v"] = [torch.zeros_like(p) for p in params]
        st["vmax"] = [torch.zeros_like(p) for p in params]
        st["steps"] = [torch.tensor(0.0) for _ in params]
        for _step in range(5):
            for p, wo in zip(torch_params, w_old):  # restore, then the torch step
                if wo is not None:
                    p.data.copy_(wo)
            for p, g in zip(torch_params, grads):
                p.grad = None if g is None else g.clone()
            opt.step()
            if twin == "sgd":
                R.sam_restore_sgd_(twin_params, grads, w_old, None, st["buf"], lr=kw["lr"],
                                   momentum=kw.get("momentum", 0.0), dampening=kw.get("dampening", 0.0),
                                   weight_decay=kw.get("weight_decay", 0.0), nesterov=kw.get("nesterov", False),
                                   maximize=kw.get("maximize", False))
            else:
                b1, b2 = kw.get("betas", (0.9, 0.999))
                R.sam_restore_adam_(twin_params, grads, w_old, None, st["m"], st["v"], st["vmax"], st["steps"],
                                    lr=kw["lr"], beta1=b1, beta2=b2, weight_decay=kw.get("weight_decay", 0.0),
                                    amsgrad=kw.get("amsgrad", False), decoupled_weight_decay=base is torch.optim.AdamW)
            for w_o in w_old:  # next "perturbed point"
                if w_o is not None:
                    w_o.add_(0.01)
        for i, (x, y) in enumerate(zip(twin_params, torch_params)):
            assert_close(x, y, rtol=1e-12, name=f"{base.__name__} param {i}")


# ------------------------------------------------------------------------------ state layout
@pytest.mark.parametrize("base,base_kw", [
    (torch.optim.SGD, SGD_KW), (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}), (torch.optim.AdamW, ADAMW_KW),
])
def test_fused_state_dict_loads_into_plain_torch(base, base_kw):
    params, opt, _ = run_sam("triton", torch.float32, base, base_kw, {}, steps=3)
    _, ref_opt, _ = run_sam("reference", torch.float32, base, base_kw, {}, steps=3)
    sd, ref_sd = opt.base_optimizer.state_dict(), ref_opt.base_optimizer.state_dict()
    assert sd["state"].keys() == ref_sd["state"].keys()
    for k in sd["state"]:
        assert sd["state"][k].keys() == ref_sd["state"][k].keys()
        for name, v in sd["state"][k].items():
            r = ref_sd["state"][k][name]
            assert type(v) is type(r)
            if isinstance(v, torch.Tensor):
                assert (v.dtype, v.device, v.shape) == (r.dtype, r.device, r.shape), name
    # a plain torch optimizer continues from it exactly as the fused one does
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = base(clones, **base_kw)
    plain.load_state_dict(copy.deepcopy(sd))  # torch may keep references to the loaded tensors
    for p, c in zip(params, clones):
        g = torch.randn_like(p) if p.grad is not None else None
        p.grad, c.grad = g, None if g is None else g.clone()
    opt.base_optimizer.step()
    plain.step()
    for p, c in zip(params, clones):
        assert torch.equal(p, c)


def test_fused_path_taken_and_fallbacks():
    params = make_params(torch.float32)
    loss = make_loss()
    opt = fastsam.SAM(params, torch.optim.AdamW, backend="triton", lr=1e-2)
    loss(params).backward()
    opt.first_step(zero_grad=True)
    loss(params).backward()
    assert fused_second_step(opt, opt._perturbed)
    opt._perturbed = None
    # a step hook must run around base.step(): no fused path
    h = opt.base_optimizer.register_step_post_hook(lambda *a: None)
    loss(params).backward()
    opt.first_step(zero_grad=True)
    loss(params).backward()
    assert not fused_second_step(opt, opt._perturbed)
    opt.second_step()
    h.remove()
    # unsupported options / optimizers
    for base, kw in [(torch.optim.SGD, {"lr": torch.tensor(0.1)}), (torch.optim.RMSprop, {"lr": 0.1}),
                     (torch.optim.Adam, {"lr": 0.1, "differentiable": True})]:
        o = fastsam.SAM(params, base, backend="triton", **kw)
        loss(params).backward()
        o.first_step(zero_grad=True)
        loss(params).backward()
        assert not fused_second_step(o, o._perturbed)
        o.restore()
    # the foreach backend never fuses
    o = fastsam.SAM(params, torch.optim.SGD, backend="foreach", lr=0.1)
    loss(params).backward()
    o.first_step(zero_grad=True)
    assert not fused_second_step(o, o._perturbed)
    o.restore()


# ------------------------------------------------------------------------------ launches
class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten ops that would launch device work (allocations and views excluded)."""

    FREE = ("empty", "empty_like", "empty_strided", "view", "_unsafe_view", "alias", "detach", "lift_fresh",
            "t", "as_strided")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in self.FREE and not TS.IN_LAUNCH[0]:  # inside: the interpreter's argument copies
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _launches_per_step(n_layers: int, dtypes: list[torch.dtype], gsam: float) -> tuple[int, int, list, list]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for i in range(n_layers):
        dt = dtypes[i % len(dtypes)]
        params += [torch.nn.Parameter(torch.randn(8, 8, generator=gen).to(DEV, dt)),
                   torch.nn.Parameter(torch.randn(8, generator=gen).to(DEV, dt))]
    opt = fastsam.SAM(params, torch.optim.SGD, backend="triton", lr=0.1, momentum=0.9, gsam_alpha=gsam)

    def backward():
        sum(((p.float() * 1.5).sin().sum() for p in params), torch.zeros((), device=DEV)).backward()

    # gradients stay at the same addresses (zero_grad(set_to_none=False)), so the tables stay cached
    for _ in range(2):  # warm-up: state, tables, compilation
        backward()
        opt.first_step()
        opt.zero_grad(set_to_none=False)
        backward()
        opt.second_step()
        opt.zero_grad(set_to_none=False)
    backward()
    l0, u0 = TS.LAUNCHES[0], _tables.UPLOADS[0]
    with TS.call_directly(), _OpCounter() as c1:
        opt.first_step()
    l1 = TS.LAUNCHES[0]
    for p in params:  # a fresh gradient at the perturbed point, in place
        p.grad.mul_(0.5)
    with TS.call_directly(), _OpCounter() as c2:
        opt.second_step()
    assert _tables.UPLOADS[0] == u0, "tables must be cached while nothing changes"
    return l1 - l0, TS.LAUNCHES[0] - l1, c1.ops, c2.ops


@pytest.mark.parametrize("gsam", [0.0, 0.3])
def test_launch_count_is_fixed(gsam):
    """first_step: 2 launches, second_step: 1 (GSAM 2) per dtype group with an SGD base, no other
    torch op, independent of the number of tensors (targets: at most 4 and 3)."""
    for dtypes in ([torch.float32], [torch.float32, torch.bfloat16]):
        counts = [_launches_per_step(n, dtypes, gsam) for n in (3, 6)]
        for first, second, ops1, ops2 in counts:
            assert ops1 == [] and ops2 == [], (ops1, ops2)
            assert first == 2 * len(dtypes)
            assert second == (2 if gsam else 1) * len(dtypes)
        assert counts[0][:2] == counts[1][:2]


@pytest.mark.parametrize("gsam", [0.0, 0.3])
def test_accumulate_launch_count_is_fixed(gsam):
    """m-SAM per micro-batch: SAM.accumulate (restore + GSAM + acc) is 1 launch per dtype group
    (GSAM 2) and no other torch op, for 6 and 12 tensors."""
    for dtypes in ([torch.float32], [torch.float32, torch.bfloat16]):
        counts = []
        for n_layers in (3, 6):
            gen = torch.Generator().manual_seed(0)
            params = []
            for i in range(n_layers):
                dt = dtypes[i % len(dtypes)]
                params += [torch.nn.Parameter(torch.randn(8, 8, generator=gen).to(DEV, dt)),
                           torch.nn.Parameter(torch.randn(8, generator=gen).to(DEV, dt))]
            opt = fastsam.SAM(params, torch.optim.SGD, backend="triton", lr=0.1, gsam_alpha=gsam)

            def backward(params=params):
                sum(((p.float() * 1.5).sin().sum() for p in params), torch.zeros((), device=DEV)).backward()

            for _ in range(3):  # warm-up (tables, compilation); the third call is measured
                backward()
                opt.first_step()
                opt.zero_grad(set_to_none=False)
                backward()
                l0 = TS.LAUNCHES[0]
                with TS.call_directly(), _OpCounter() as c:
                    opt.accumulate(0.5)
                opt.zero_grad(set_to_none=False)
            assert c.ops == [], c.ops
            counts.append(TS.LAUNCHES[0] - l0)
        assert counts == [(2 if gsam else 1) * len(dtypes)] * 2, counts


# ------------------------------------------------------------------------------ torch.compile
def test_custom_ops_opcheck():
    params, grads, w_old, ema, rdy, g_old = _perturb_inputs(torch.float32, [(5,), (9,)], 0, True, True)
    args = (params, grads, w_old, ema, rdy, g_old, [0.1, 0.2], [0.0, 0.0], [True, False], [0, 5],
            2.0, 1.0, 0.9, 0.5, 3, 1)
    torch.library.opcheck(torch.ops.fastsam.sam_perturb.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    gs, gos = [g.clone() for g in grads], [g.clone() * 2 for g in grads]
    torch.library.opcheck(torch.ops.fastsam.sam_gsam_combine.default, (gs, gos, 0.5),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastsam.sam_restore.default, ([p.clone() for p in params], w_old),
                          test_utils=("test_schema", "test_faketensor"))
    accs = [torch.randn_like(p) for p in params]
    torch.library.opcheck(torch.ops.fastsam.sam_restore_accumulate.default,
                          ([p.clone() for p in params], gs, [0, 1], w_old, [0, 1], gos, [0, 1], accs, [0, 1],
                           [True, False], 0.5, 2.0, 0.3),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_model_and_optimizer_step():
    """Compiled (aot_eager) training steps give the eager results: (a) the model compiled, the SAM
    steps eager; (b) model and both SAM steps inside one compiled function, the steps kept out of
    the graph with torch.compiler.disable (torch 2.13's dynamo loses attribute writes on an
    Optimizer across a graph break inside its method, which SAM's state machine needs); (c) the
    custom op itself in a fullgraph compile."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).to(DEV)
        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, backend="triton", lr=0.1, momentum=0.9,
                          rho=0.1, gsam_alpha=0.2)
        return model, opt

    x = torch.randn(16, 6, device=DEV)
    y = torch.randint(0, 3, (16,), device=DEV)

    def make_step(model, fwd, first, second):
        def step():
            torch.nn.functional.cross_entropy(fwd(x), y).backward()
            first(zero_grad=True)
            torch.nn.functional.cross_entropy(fwd(x), y).backward()
            second(zero_grad=True)
        return step

    m1, o1 = build()
    m2, o2 = build()
    m3, o3 = build()
    eager = make_step(m1, m1, o1.first_step, o1.second_step)
    compiled_model = make_step(m2, torch.compile(m2, backend="aot_eager"), o2.first_step, o2.second_step)
    compiled_all = torch.compile(make_step(m3, m3, torch.compiler.disable(o3.first_step),
                                           torch.compiler.disable(o3.second_step)), backend="aot_eager")
    for _ in range(3):
        eager()
        compiled_model()
        compiled_all()
    for a, b, c in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        assert_close(b, a, rtol=1e-5)
        assert_close(c, a, rtol=1e-5)

    params, grads, w_old, _, _, _ = _perturb_inputs(torch.float32, [(5,), (9,)], 0, False, False)
    ref = _clone(params)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def perturb(ps, gs, wo):
        return torch.ops.fastsam.sam_perturb(ps, gs, wo, [], [], [], [0.1, 0.1], [0.0, 0.0], [False, False],
                                             [0, 5], 2.0, None, 0.9, 1.0, 0, 0)

    ok = perturb(params, grads, w_old)
    R.sam_perturb_(ref, grads, _clone(w_old), None, None, None, [0.1, 0.1], [0.0, 0.0], [False, False], [0, 5])
    assert bool(ok)
    for a, b in zip(params, ref):
        assert_close(a, b, rtol=2e-6)


# ------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base,base_kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, ADAMW_KW)])
def test_gpu_no_host_sync(dtype, base, base_kw):
    """A whole SAM step (every option on, fused base update) never synchronizes with the host."""
    params = make_params(dtype)
    loss = make_loss()
    opt = fastsam.SAM(params, base, backend="auto", **OPTIONS["all"], **base_kw)
    assert F.resolve_backend("auto", DEV) == "triton"
    for step in range(4):
        loss(params).backward()  # autograd itself is outside the check
        if step >= 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.first_step(zero_grad=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        loss(params).backward()
        if step >= 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.second_step(zero_grad=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.perturbation_ok is not None and bool(opt.perturbation_ok)


@pytest.mark.gpu
def test_gpu_profiler_kernel_count():
    """CUDA kernels per SAM step (profiler): 2 + 1 per dtype group with SGD, whatever the tensor count."""
    from torch.profiler import ProfilerActivity, profile

    for n in (10, 40):
        params = [torch.nn.Parameter(torch.randn(64, 65, device=DEV)) for _ in range(n)]
        opt = fastsam.SAM(params, torch.optim.SGD, backend="triton", lr=0.1, momentum=0.9)
        for p in params:
            p.grad = torch.randn_like(p)
        for _ in range(2):
            opt.first_step()
            opt.second_step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.first_step()
            opt.second_step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
        assert len(kernels) == 3, [e.name for e in kernels]


def test_kernels_compile_for_sm90():
    """Every kernel family lowers through Triton's CUDA compiler (sm_90), checked without a GPU in
    a subprocess without the interpreter: the interpreter accepts programs the compiler rejects."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("on a GPU every test above compiles the kernels for real")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "fastsam.kernels._triton_aot", "90"], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "compiled 52 variants" in r.stdout
