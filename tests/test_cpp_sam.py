"""backend="cpp" (csrc/ C++ kernels on CPU tensors) against fastsam.reference; backend="cuda" (GPU).

The extension is built (or loaded from torch's extension cache) once per session by the
module-scoped fixture; if it cannot be built here every test of the module is skipped with the
reason. Tensors span several work items (the kernels cut tensors into 32768-element items and use
OpenMP threads above 65536 elements in a call), so thread partitioning is exercised.

Tolerances: fp32 against the float64 reference at ~1e-6 relative
(functional ops) and 1e-5 over 5 optimizer steps (trajectories drift by a few ulp per step); fp64
at 1e-12 / 1e-11; bf16/fp16 by the 2x rule: the error of the cpp run against a float64 run
from the same low-precision start is within 2x the error of plain PyTorch in that dtype (the
foreach backend and torch's own optimizer), plus one unit in the last place of the values' scale.
"""

from __future__ import annotations

import itertools
import math
import warnings
from functools import partial

import _harness
import pytest
import torch
from _harness import (
    ADAMW_KW,
    FUSED_SGD_KWS,
    LOW,
    SGD_KW,
    assert_2x_rule,
    assert_close,
    bits_equal,
    check_fused_adam_matches_twin,
    check_fused_path_taken,
    check_fused_sgd_matches_twin,
    check_low_precision_2x_rule,
    check_matches_reference,
    check_noncontiguous_staged,
    check_perturb_matches_reference,
    check_state_dict_loads_into_plain_torch,
    clone_list,
    mixed_dtype_case,
    perturb_inputs,
    state_tensors,
    ulp,
)

import fastsam
from fastsam import _philox
from fastsam import functional as F
from fastsam import reference as R
from fastsam.kernels import _ext


@pytest.fixture(scope="module", autouse=True)
def cpp_backend():
    """Build/load the extension once; register backend="cpp" (and "cuda") in the dispatcher for
    this module if the lead has not done so yet, and undo that afterwards."""
    if not _ext.available("cpu"):
        pytest.skip(f"C++ extension not available: {_ext.status('cpu').reason}")
    added = []
    for name, mod in (("cpp", "fastsam.kernels.cpp_sam"), ("cuda", "fastsam.kernels.cuda_sam")):
        if F._MODULES.get(name) is None:
            F._MODULES[name] = mod
            added.append(name)
    yield _ext.status("cpu")
    for name in added:
        F._MODULES[name] = None
        F._LOADED.pop(name, None)


# ------------------------------------------------------------------------------ helpers (_harness)
# odd sizes, an empty tensor, one spanning several 32768-element work items
SHAPES = [(7, 5), (33,), (1,), (0,), (3, 11), (70001,), (1023,)]
# the harness on this module's shapes, on the CPU (the CUDA tests pass device="cuda")
RUN = {"shapes": SHAPES, "device": "cpu"}
make_params = partial(_harness.make_params, **RUN)
make_loss = partial(_harness.make_loss, **RUN)
run_sam = partial(_harness.run_sam, **RUN)
OPTIONS = _harness.OPTIONS  # every option set


# ------------------------------------------------------------------------------ build / loading
def test_extension_loaded(cpp_backend):
    st = cpp_backend
    assert st.available and st.how in ("jit", "aot")
    assert _ext.available("cpu")  # cached: no second build
    assert _ext.status("cpu") is st
    assert F.resolve_backend("cpp", "cpu") == "cpp"
    assert F.supports_fused_updates("cpp", "cpu")


def test_loader_fallbacks(monkeypatch):
    """Disabled: unavailable, no warning, ops raise with the reason. Missing ninja: one warning."""
    monkeypatch.setattr(_ext, "_STATUS", {})
    monkeypatch.setattr(_ext, "_WARNED", set())
    monkeypatch.setenv(_ext.ENV_DISABLE, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _ext.available("cpu")
    with pytest.raises(RuntimeError, match=_ext.ENV_DISABLE):
        _ext.ops("cpu")
    assert _ext.could_build("cpu") == (False, f"{_ext.ENV_DISABLE} is set")

    monkeypatch.delenv(_ext.ENV_DISABLE)
    monkeypatch.setattr(_ext, "_STATUS", {})
    monkeypatch.setattr(_ext, "_aot_library", lambda kind: None)
    from torch.utils import cpp_extension as ce

    monkeypatch.setattr(ce, "is_ninja_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="ninja") as rec:
        assert _ext.load("cpu") is None
        assert _ext.load("cpu") is None  # cached: no second attempt, no second warning
    assert len([w for w in rec if "fastsam" in str(w.message)]) == 1
    monkeypatch.setattr(_ext, "_STATUS", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.load("cpu") is None  # one warning per process and kind
    # a CPU build of torch never builds (nor warns about) the CUDA kind
    if torch.version.cuda is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not _ext.available("cuda")


def test_wrong_device_and_dtype_are_clear_errors():
    w = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="float32"):
        F.sam_restore_([w], [w.clone()], backend="cpp")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU"):
            F.sam_restore_([torch.zeros(3, device="cuda")], [torch.zeros(3, device="cuda")], backend="cpp")


# ------------------------------------------------------------------------------ ESAM mask
def test_philox_mask_bit_identical():
    """The kept elements are exactly those of fastsam._philox, across the 2^32 index boundary,
    for large steps and seeds, in one call with several tensors and threads."""
    n = 40000  # > one work item
    offsets = [2**32 - 17000, 5, 2**33 + 7]
    params = [torch.zeros(n) for _ in offsets]
    grads = [torch.ones(n) for _ in offsets]
    w_old = [torch.empty_like(p) for p in params]
    for seed, step, beta in ((2**32 - 5, 0, 0.37), (0, 1, 0.5), (123, 2**31 + 3, 0.9), (7, 2**32 + 9, 0.01)):
        for p in params:
            p.zero_()
        ok = F.sam_perturb_(params, grads, w_old, None, None, None, [1.0] * 3, [0.0] * 3, [False] * 3, offsets,
                            swp_keep=beta, seed=seed, step=step, backend="cpp")
        assert bool(ok)
        for p, off in zip(params, offsets):
            want = _philox.keep_mask(off, n, seed, step, beta)
            assert torch.equal(p != 0, want)


# ------------------------------------------------------------------------------ first step (functional)
FUNC_SHAPES = [(1,), (7,), (1023,), (0,), (31, 33), (40000,)]
FUNC_CASES = [(f"{dt_name}-{opt}", dt, opt) for dt_name, dt in
              (("fp32", torch.float32), ("fp64", torch.float64), ("bf16", torch.bfloat16), ("fp16", torch.float16))
              for opt in ("sam", "asam", "fsam", "p_inf", "p_3", "gsam", "esam", "all")]


@pytest.mark.parametrize("name,dtype,opt", FUNC_CASES, ids=[c[0] for c in FUNC_CASES])
def test_perturb_matches_reference(name, dtype, opt):
    """One first step: params, w_old, EMA, flags, g_old against the reference (w_old, g_old, the
    untouched grads and the flags exactly)."""
    check_perturb_matches_reference("cpp", dtype, FUNC_SHAPES, OPTIONS[opt], offset_stride=100000)


def test_perturb_nonfinite_norm_changes_nothing():
    """inf in one tensor: no tensor (of any dtype) is perturbed, EMA and flags stay, w_old gets w,
    g_old gets zeros, the returned flag is False; NaN likewise."""
    shapes = [(5,), (70000,), (3, 3)]
    dts = [torch.float32, torch.bfloat16, torch.float64]
    for bad in (float("inf"), float("nan")):
        ins = list(perturb_inputs(torch.float32, shapes, 1, True, True, ready=[1, 0, 1]))
        for k in (0, 1, 2, 3, 5):
            ins[k] = [t.to(dt) for t, dt in zip(ins[k], dts)]
        ins[1][1][40000] = bad
        before = [clone_list(x) for x in ins]
        ok = F.sam_perturb_(*ins, [0.1] * 3, [0.0] * 3, [False, True, False], [0, 5, 70005], fsam_sigma=1.0,
                            backend="cpp")
        assert not bool(ok)
        for i in range(3):
            assert bits_equal(ins[0][i], before[0][i])
            assert bits_equal(ins[2][i], before[0][i])
            assert bits_equal(ins[3][i], before[3][i])
            assert torch.equal(ins[4][i], before[4][i])
            assert torch.equal(ins[5][i], torch.zeros_like(ins[5][i]))


def test_mixed_dtypes_one_global_norm():
    """fp32 + bf16 + fp16 + fp64 tensors in one call share one norm."""
    params, grads, w_old, offs = mixed_dtype_case()
    ref = clone_list(params)
    F.sam_perturb_(params, grads, w_old, None, None, None, [0.2] * 5, [0.0] * 5, [True] * 5, offs, backend="cpp")
    R.sam_perturb_(ref, grads, clone_list(w_old), None, None, None, [0.2] * 5, [0.0] * 5, [True] * 5, offs)
    for x, y in zip(params, ref):
        assert_close(x, y, rtol=2 * ulp(x.dtype) if x.dtype in LOW else 2e-6)


def test_noncontiguous_tensors_are_staged():
    check_noncontiguous_staged("cpp")


def test_empty_lists_and_empty_tensors():
    ok = F.sam_perturb_([], [], [], None, None, None, [], [], [], [], backend="cpp")
    assert bool(ok)
    e = torch.empty(0)
    ok = F.sam_perturb_([e], [e.clone()], [e.clone()], None, None, None, [0.1], [0.0], [False], [0], backend="cpp")
    assert bool(ok)
    F.sam_restore_([e], [e.clone()], backend="cpp")
    F.gsam_combine_([e], [e.clone()], 0.5, backend="cpp")


# ------------------------------------------------------------------------------ storage conversions
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_low_precision_conversions_match_torch(dtype):
    """Every 16-bit pattern: widening then narrowing is the identity (SGD with lr = 0 and g = 0
    stores w_old back through float32), and float32 -> dtype rounding equals torch's
    round-to-nearest-even (SGD with w = 0, lr = -x stores the float32 value 0 - (-x) * g, rounded once);
    NaN stays NaN."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    src = bits.view(dtype).clone()
    nan = torch.isnan(src)
    w = torch.zeros_like(src)
    F.sam_restore_sgd_([w], [torch.zeros_like(src)], [src], None, [None], lr=0.0, backend="cpp")
    assert bits_equal(w[~nan], src[~nan]) and torch.isnan(w[nan]).all()
    for x in (1.2345678, 3.0e-3, 7.1e4, 0.5):
        w = torch.zeros_like(src)
        F.sam_restore_sgd_([w], [src.clone()], [None], None, [None], lr=-x, backend="cpp")
        want = (torch.zeros(()) - torch.tensor(-x, dtype=torch.float32) * src.float()).to(dtype)
        ok = ~torch.isnan(want)
        assert bits_equal(w[ok], want[ok]), f"x={x}"
        assert torch.isnan(w[~ok]).all()


# ------------------------------------------------------------------------------ optimizer: fp32 parity
@pytest.mark.parametrize("opt_name", list(OPTIONS))
@pytest.mark.parametrize("base,base_kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, ADAMW_KW)],
                         ids=["sgd", "adamw"])
def test_sam_fp32_matches_reference(opt_name, base, base_kw):
    """Every option alone and combined, 5 steps: params, perturbed params, every state entry."""
    check_matches_reference("cpp", torch.float32, base, base_kw, OPTIONS[opt_name], rtol=1e-5, **RUN)


BASES = [
    ("sgd-plain", torch.optim.SGD, {"lr": 0.1}),
    ("sgd-damp-maximize", torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "maximize": True}),
    ("sgd-wd-no-momentum", torch.optim.SGD, {"lr": 0.05, "weight_decay": 0.1}),
    ("adam-l2-amsgrad", torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-2, "amsgrad": True, "betas": (0.8, 0.95)}),
    ("adamw-maximize-eps", torch.optim.AdamW, {"lr": 3e-3, "eps": 1e-3, "maximize": True}),
    ("adamw-amsgrad", torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    # eps keeps g / sqrt(v) well conditioned where g ~ 0 (else fp32 rounding flips O(1) updates)
    ("rmsprop-unfused", torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5, "eps": 0.1}),
]


@pytest.mark.parametrize("opts", ["sam", "all"])
@pytest.mark.parametrize("name,base,base_kw", BASES, ids=[b[0] for b in BASES])
def test_sam_bases_fp32_match_torch(name, base, base_kw, opts):
    """Fused restore + update against restore + the real torch optimizer."""
    check_matches_reference("cpp", torch.float32, base, base_kw, OPTIONS[opts], rtol=1e-5, **RUN)


GROUP_SPEC = [
    {"n": 2, "rho": 0.05, "adaptive": True, "eta": 0.0, "lr": 0.02, "weight_decay": 0.0},
    {"n": 3, "rho": 0.2, "adaptive": False, "lr": 0.01},
    {"n": 2, "rho": 0.0, "weight_decay": 0.0},  # LSAM: not perturbed, still updated
]


@pytest.mark.parametrize("base,base_kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, ADAMW_KW)],
                         ids=["sgd", "adamw"])
def test_sam_param_groups_and_scheduler(base, base_kw):
    kw = {"fsam_sigma": 1.0, "gsam_alpha": 0.2, "swp_keep": 0.8}
    a = check_matches_reference("cpp", torch.float32, base, base_kw, kw, rtol=1e-5, spec=GROUP_SPEC, sched=True,
                                **RUN)
    assert a[1].param_groups[0]["lr"] == pytest.approx(0.02 * 0.25)


@pytest.mark.parametrize("base,base_kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, ADAMW_KW)],
                         ids=["sgd", "adamw"])
def test_sam_float64_params(base, base_kw):
    check_matches_reference("cpp", torch.float64, base, base_kw, OPTIONS["all"], rtol=1e-11, **RUN)


# ------------------------------------------------------------------------------ optimizer: bf16 / fp16
LOW_CASES = [
    (torch.bfloat16, torch.optim.SGD, SGD_KW, "all"),
    (torch.bfloat16, torch.optim.AdamW, ADAMW_KW, "all"),
    (torch.bfloat16, torch.optim.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-3}, "fsam"),
    (torch.float16, torch.optim.SGD, SGD_KW, "all"),
    (torch.float16, torch.optim.SGD, {"lr": 0.05, "momentum": 0.5}, "fsam+asam+gsam"),
]


# fp16 runs with SGD only: torch's Adam on fp16 *storage* rounds small v to 0 and divides by
# zero (plain PyTorch gives NaN here, so there is no error to be within 2x of).
@pytest.mark.parametrize("dtype,base,base_kw,opts", LOW_CASES,
                         ids=["bf16-sgd-all", "bf16-adamw-all", "bf16-adam-amsgrad-fsam", "fp16-sgd-all",
                              "fp16-sgd-fsam-asam-gsam"])
def test_sam_low_precision_2x_rule(dtype, base, base_kw, opts):
    check_low_precision_2x_rule("cpp", dtype, base, base_kw, OPTIONS[opts], **RUN)


# ------------------------------------------------------------------------------ fused ops vs twins
# tensor 1 spans two work items
FUSED_SHAPES = [(5,), (40000,), (0,), (3, 7), (1,), (70,)]
fused_lists = partial(_harness.fused_lists, shapes=FUSED_SHAPES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("gsam", [0.0, 0.5])
@pytest.mark.parametrize("kw", list(FUSED_SGD_KWS.values()), ids=list(FUSED_SGD_KWS))
def test_fused_sgd_matches_twin(dtype, gsam, kw):
    check_fused_sgd_matches_twin("cpp", dtype, gsam, kw, fused_lists)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kw", [
    {"lr": [1e-2, 2e-2, 1e-2, 1e-2, 1e-2, 5e-3], "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"lr": 1e-2, "weight_decay": 0.01, "amsgrad": True, "beta1": 0.5, "beta2": 0.9, "eps": 1e-4},
    {"lr": 1e-2, "maximize": True, "gsam_alpha": 0.4, "amsgrad": True, "weight_decay": 0.1,
     "decoupled_weight_decay": True},
], ids=["adamw-lists", "adam-amsgrad", "maximize-gsam-amsgrad"])
def test_fused_adam_matches_twin(dtype, kw):
    check_fused_adam_matches_twin("cpp", dtype, kw, fused_lists)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mix_id", list(_harness.FUSED_MIX_KWS))
def test_fused_mix_matches_twin(dtype, mix_id):
    _harness.check_mix_matches_twin("cpp", dtype, mix_id, fused_lists)


def test_fused_mix_refused_before_any_write():
    _harness.check_mix_refused("cpp", fused_lists)


def test_gsam_combine_matches_reference():
    for dtype, rtol in ((torch.float32, 2e-6), (torch.float64, 1e-12)):
        gen = torch.Generator().manual_seed(5)
        shapes = [(3,), (40000,), (0,), (17, 3)]
        gs = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
        go = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
        a, b = clone_list(gs), clone_list(gs)
        F.gsam_combine_(a, go, 0.7, backend="cpp")
        R.gsam_combine_(b, go, 0.7)
        for x, y in zip(a, b):
            assert_close(x, y, rtol=rtol)


# ------------------------------------------------------------------------------ determinism, threads, streaming
def _one_step(threads: int, nt_min: int, dtype=torch.float32):
    from fastsam.kernels import cpp_sam

    old_t, old_nt = torch.get_num_threads(), cpp_sam.NT_MIN_BYTES
    torch.set_num_threads(threads)
    cpp_sam.NT_MIN_BYTES = nt_min
    try:
        shapes = [(300001,), (5, 7), (65536,), (1,)]
        return run_sam("cpp", dtype, torch.optim.AdamW, ADAMW_KW,
                       {"fsam_sigma": 0.5, "adaptive": True, "gsam_alpha": 0.3, "swp_keep": 0.9},
                       steps=3, shapes=shapes)
    finally:
        torch.set_num_threads(old_t)
        cpp_sam.NT_MIN_BYTES = old_nt


def test_bitwise_independent_of_threads_and_streaming_stores():
    """Fixed work partition and float64 partials in item order: 1 or several threads, plain or
    non-temporal stores, the bits are the same (parameters, perturbed points, state)."""
    base = _one_step(1, 1 << 62)
    for threads, nt_min in ((max(2, torch.get_num_threads()), 1 << 62), (1, 0), (max(2, torch.get_num_threads()), 0)):
        other = _one_step(threads, nt_min)
        for x, y in zip(base[0], other[0]):
            assert bits_equal(x.detach(), y.detach())
        for xs, ys in zip(base[2], other[2]):
            for x, y in zip(xs, ys):
                assert bits_equal(x, y)
        sa, sb = state_tensors(base[1]), state_tensors(other[1])
        for k in sa:
            assert bits_equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------ state layout / dispatch
@pytest.mark.parametrize("base,base_kw", [
    (torch.optim.SGD, SGD_KW), (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}), (torch.optim.AdamW, ADAMW_KW),
], ids=["sgd", "adam", "adamw"])
def test_fused_state_dict_loads_into_plain_torch(base, base_kw):
    check_state_dict_loads_into_plain_torch("cpp", base, base_kw, **RUN)


def test_fused_path_taken():
    check_fused_path_taken("cpp", **RUN)


def test_restore_is_exact_after_many_steps():
    """restore() puts back the exact bits (fp32 and bf16, every step)."""
    for dtype in (torch.float32, torch.bfloat16):
        params = make_params(dtype)
        loss = make_loss()
        opt = fastsam.SAM(params, torch.optim.SGD, backend="cpp", lr=0.1, rho=0.3, swp_keep=0.5)
        for _ in range(3):
            before = [p.detach().clone() for p in params]
            loss(params).backward()
            opt.first_step(zero_grad=True)
            assert any(not torch.equal(p, b) for p, b in zip(params, before) if p.numel())
            opt.restore()
            for p, b in zip(params, before):
                assert bits_equal(p.detach(), b)
            opt.zero_grad()


def test_ops_schema_and_fake_kernels():
    """The registered schemas declare every in-place mutation and the fake kernels match the real
    ones (what torch.compile relies on)."""
    from fastsam.kernels import cpp_sam

    ops = cpp_sam._BACKEND.ops()
    params, grads, w_old, ema, rdy, g_old = perturb_inputs(torch.float32, [(5,), (9,)], 0, True, True)
    args = (params, grads, w_old, ema, rdy, g_old, [0.1, 0.2], [0.0, 0.0], [1, 0], [0, 5],
            2.0, True, 1.0, 0.9, 0.5, 3, 1, False, [], [])
    torch.library.opcheck(ops.sam_perturb.default, args, test_utils=("test_schema", "test_faketensor"))
    # out-of-place EMA and flags: the inputs are only read
    ema_out, rdy_out = [torch.empty_like(m) for m in ema], [torch.empty_like(r) for r in rdy]
    args = args[:-2] + (ema_out, rdy_out)
    torch.library.opcheck(ops.sam_perturb.default, args, test_utils=("test_schema", "test_faketensor"))
    gs = [g.clone() for g in grads]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    hyp = [0.0, 0.1, 0.999, 0.001, 1e-8, 1e-3, 0.5, 1.0] * 2
    args = (2, params, gs, [0, 1], w_old, [0, 1], g_old, [0, 1], m, [0, 1], v, [0, 1], [], [], hyp, [0, 0],
            0.3, False, False, False, True, False)
    torch.library.opcheck(ops.sam_second_step.default, args, test_utils=("test_schema", "test_faketensor"))
    # the cheaper family's mix, written back into the gradients and not
    for back in (True, False):
        mix_args = args[:16] + (0.0,) + args[17:] + (torch.tensor([0.7, 0.3], dtype=torch.float64), back)
        torch.library.opcheck(ops.sam_second_step.default, mix_args, test_utils=("test_schema", "test_faketensor"))
    acc = [torch.randn_like(p) for p in params]
    hyp4 = [0.5, 2.0, 0, 0, 0, 0, 0, 0] * 2
    args = (4, params, gs, [0, 1], w_old, [0, 1], g_old, [0, 1], acc, [0, 1], [], [], [], [], hyp4, [1, 0],
            0.3, False, False, False, False, False)
    torch.library.opcheck(ops.sam_second_step.default, args, test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------ CUDA backend (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("opt_name", ["sam", "asam", "fsam", "p_inf", "p_3", "gsam", "esam", "all"])
@pytest.mark.parametrize("base,base_kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, ADAMW_KW)],
                         ids=["sgd", "adamw"])
def test_cuda_fp32_matches_reference(opt_name, base, base_kw):
    if not _ext.available("cuda"):
        pytest.skip(f"CUDA extension not available: {_ext.status('cuda').reason}")
    check_matches_reference("cuda", torch.float32, base, base_kw, OPTIONS[opt_name], rtol=1e-5, shapes=SHAPES,
                            device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_cuda_low_precision_2x_rule(dtype):
    if not _ext.available("cuda"):
        pytest.skip(f"CUDA extension not available: {_ext.status('cuda').reason}")
    kw = OPTIONS["all"]
    got = run_sam("cuda", dtype, torch.optim.AdamW, ADAMW_KW, kw, device="cuda")
    plain = run_sam("foreach", dtype, torch.optim.AdamW, ADAMW_KW, kw, device="cuda")
    ref = run_sam("reference", torch.float64, torch.optim.AdamW, ADAMW_KW, kw, device="cuda")
    for i, (x, y, z) in enumerate(zip(got[0], plain[0], ref[0])):
        assert_2x_rule(x, y, z, name=f"param {i}")


@pytest.mark.gpu
def test_cuda_mask_and_nonfinite():
    if not _ext.available("cuda"):
        pytest.skip(f"CUDA extension not available: {_ext.status('cuda').reason}")
    n = 40000
    offsets = [2**32 - 17000, 5]
    params = [torch.zeros(n, device="cuda") for _ in offsets]
    grads = [torch.ones(n, device="cuda") for _ in offsets]
    w_old = [torch.empty_like(p) for p in params]
    ok = F.sam_perturb_(params, grads, w_old, None, None, None, [1.0] * 2, [0.0] * 2, [False] * 2, offsets,
                        swp_keep=0.37, seed=2**32 - 5, step=2**31 + 3, backend="cuda")
    assert bool(ok)
    for p, off in zip(params, offsets):
        assert torch.equal((p != 0).cpu(), _philox.keep_mask(off, n, 2**32 - 5, 2**31 + 3, 0.37))
    grads[1][123] = float("inf")
    before = [p.clone() for p in params]
    ok = F.sam_perturb_(params, grads, w_old, None, None, None, [1.0] * 2, [0.0] * 2, [False] * 2, offsets,
                        backend="cuda")
    assert not bool(ok)
    for p, b, wo in zip(params, before, w_old):
        assert torch.equal(p, b) and torch.equal(wo, b)


@pytest.mark.gpu
def test_cuda_fused_twins_and_threads_free_determinism():
    if not _ext.available("cuda"):
        pytest.skip(f"CUDA extension not available: {_ext.status('cuda').reason}")
    outs = []
    for _ in range(2):  # run twice: bitwise identical (no atomics on floats)
        params, grads, w_old, g_old = [[None if t is None else t.cuda() for t in x]
                                       for x in fused_lists(torch.float32, 4)]
        n = len(params)
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = [torch.tensor(0.0) for _ in range(n)]
        F.sam_restore_adam_(params, grads, w_old, g_old, m, v, None, steps, lr=1e-2, weight_decay=0.1,
                            decoupled_weight_decay=True, gsam_alpha=0.4, backend="cuda")
        outs.append(params)
    ref = [[None if t is None else t.cuda() for t in x] for x in fused_lists(torch.float32, 4)]
    m = [torch.zeros_like(p) for p in ref[0]]
    v = [torch.zeros_like(p) for p in ref[0]]
    R.sam_restore_adam_(ref[0], ref[1], ref[2], ref[3], m, v, None, [torch.tensor(0.0) for _ in ref[0]], lr=1e-2,
                        weight_decay=0.1, decoupled_weight_decay=True, gsam_alpha=0.4)
    for x, y, z in zip(outs[0], outs[1], ref[0]):
        assert bits_equal(x, y)
        assert_close(x, z, rtol=5e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("mix_id", list(_harness.FUSED_MIX_KWS))
def test_cuda_fused_mix_matches_twin(mix_id):
    if not _ext.available("cuda"):
        pytest.skip(f"CUDA extension not available: {_ext.status('cuda').reason}")
    _harness.check_mix_matches_twin("cuda", torch.float32, mix_id, partial(fused_lists, device="cuda"))
    _harness.check_mix_refused("cuda", partial(fused_lists, device="cuda"))


def check_sharded_first_step(backend: str, device: str, opts: dict) -> None:
    """The sharded first step (FSDP2), two "ranks" in one process: each runs K1 on its tensors, the
    reduce hook hands it both ranks' (S, E) as the collective would, and K2 perturbs with the global
    norm: the same weights as one unsharded step over all tensors (the reference), and a non-finite
    gradient on one rank stops both."""
    shapes = [(40000,), (7, 9), (1,), (0,), (33,)]
    fsam = opts.get("fsam", False)
    kw = {"p": opts.get("p", 2.0)} | ({"fsam_sigma": 0.5, "fsam_lambda": 0.8} if fsam else {})
    adaptive = [opts.get("adaptive", False)] * len(shapes)
    offsets = [0] + list(itertools.accumulate(math.prod(sh) for sh in shapes))[:-1]

    def step(idx, reduce, be=backend, bad=False):
        g = torch.Generator().manual_seed(7)
        mk = lambda: [torch.randn(sh, generator=g).to(device) for sh in shapes]  # noqa: E731
        ps, gs = mk(), mk()
        ema = mk() if fsam else None
        rdy = [torch.ones((), device=device) for _ in shapes] if fsam else None
        if bad:
            gs[4][3] = float("inf")
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        ps = pick(ps)
        wo = [torch.empty_like(p) for p in ps]
        ok = F.sam_perturb_(ps, pick(gs), wo, pick(ema), pick(rdy), None, [0.1] * len(idx), [0.01] * len(idx),
                            [adaptive[i] for i in idx], [offsets[i] for i in idx], backend=be, reduce=reduce, **kw)
        return ps, ok

    for bad in (False, True):
        parts = {}

        def keep(name, parts=parts):
            def hook(part):
                parts[name] = part.reshape(-1).to(torch.float64).clone()
                return torch.stack([parts[name], parts[name]])
            return hook

        a, b = [0, 2, 3], [1, 4]
        step(a, keep("a"), bad=bad)
        step(b, keep("b"), bad=bad)
        table = torch.stack([parts["a"], parts["b"]])
        got_a, ok_a = step(a, lambda part, t=table: t, bad=bad)
        got_b, ok_b = step(b, lambda part, t=table: t, bad=bad)
        want, ok = step(list(range(len(shapes))), None, be="reference", bad=bad)
        assert bool(ok_a) == bool(ok_b) == bool(ok) == (not bad)
        got = dict(zip(a, got_a)) | dict(zip(b, got_b))
        for i, w in enumerate(want):
            assert_close(got[i], w, rtol=2e-6, name=f"tensor {i}")


SHARDED_OPTS = {"sam": {}, "p3-asam": {"p": 3.0, "adaptive": True}, "fsam": {"fsam": True}}


@pytest.mark.parametrize("opts", list(SHARDED_OPTS.values()), ids=list(SHARDED_OPTS))
def test_sharded_first_step_matches_unsharded(opts):
    check_sharded_first_step("cpp", "cpu", opts)


@pytest.mark.gpu
@pytest.mark.parametrize("opts", list(SHARDED_OPTS.values()), ids=list(SHARDED_OPTS))
def test_cuda_sharded_first_step_matches_unsharded(opts):
    """The same on the cuda backend: the gathered table goes to K2 on the device (no host sync)."""
    if not _ext.available("cuda"):
        pytest.skip(f"CUDA extension not available: {_ext.status('cuda').reason}")
    check_sharded_first_step("cuda", "cuda", opts)


def test_cuda_op_layer_compiles(tmp_path):
    """csrc/ops_cuda.cpp (the CUDA op layer: argument checks, tables, the sharded split) compiles
    against this torch's headers and the CUDA runtime headers without warnings of its own
    (-fsyntax-only, torch and CUDA headers as system headers; a CPU torch lacks one generated CUDA
    header, replaced by a stub), so CPU CI catches op-layer errors before a GPU session."""
    import os
    import re
    import shutil
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    nvcc, gxx = shutil.which("nvcc"), shutil.which("g++")
    if nvcc is None or gxx is None:
        pytest.skip("nvcc or g++ not found")
    dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                         text=True, timeout=60)
    inc = re.findall(r'INCLUDES="-I([^"]+)"', dry.stdout + dry.stderr)
    if not inc:
        pytest.skip("could not find the CUDA include directory from nvcc --dryrun")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys_inc = [str(tmp_path)] + cpp_extension.include_paths() + [sysconfig.get_paths()["include"], inc[0].strip()]
    cmd = [gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-I", os.path.join(root, "csrc")]
    for d in sys_inc:
        cmd += ["-isystem", d]
    r = subprocess.run(cmd + [os.path.join(root, "csrc", "ops_cuda.cpp")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "warning" not in (r.stdout + r.stderr).lower(), r.stderr[-4000:]


def test_cuda_sources_compile_with_nvcc(tmp_path):
    """csrc/cuda_kernels.cu compiles for sm_90 without warnings (-Wall -Wextra), checked on machines
    with nvcc but no GPU, so CPU CI catches CUDA source errors the GPU sessions would meet late."""
    import os
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda_kernels.cu")
    r = subprocess.run([nvcc, "-std=c++17", "-O1", "-arch=sm_90", "-Xcompiler", "-Wall,-Wextra", "-c", src, "-o",
                        str(tmp_path / "k.o")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "warning" not in (r.stdout + r.stderr).lower(), r.stderr[-4000:]
