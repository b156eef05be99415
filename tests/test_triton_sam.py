"""backend="triton" against fastsam.reference (and torch's own optimizers).

On a machine without CUDA these run under the Triton interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1); with CUDA they run the compiled kernels on the GPU.
Blocks are made small (64 elements under the interpreter, 256 on the GPU) and programs few, so
that small tensors still span several blocks and several programs.

Tolerances: fp32 and fp64 compared with the float64 reference at ~1e-6 /
1e-12 relative; bf16/fp16 by the 2x rule: the error of the triton result against a float64
reference run must be within 2x the error of plain PyTorch in the same dtype (foreach backend +
torch's base optimizer), plus one unit in the last place.
"""

from __future__ import annotations

import math
from functools import partial

import _harness
import pytest
import torch
from _harness import (
    ADAMW_KW,
    FUSED_SGD_KWS,
    LOW,
    SGD_KW,
    assert_close,
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
    ulp,
)

pytest.importorskip("triton")

import fastsam  # noqa: E402
from fastsam import _philox  # noqa: E402
from fastsam import functional as F  # noqa: E402
from fastsam import reference as R  # noqa: E402
from fastsam._compat import CUSTOM_OP_LISTS_TRACEABLE  # noqa: E402
from fastsam.kernels import _tables  # noqa: E402
from fastsam.kernels import triton_launch as TL
from fastsam.kernels import triton_sam as TS  # noqa: E402
from fastsam.optim._fused import fused_second_step  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _small_launches():
    with TS.configure(block=256, programs_per_sm=1, interp_block=64, interp_programs=3):
        yield


# ------------------------------------------------------------------------------ helpers (_harness)
# odd sizes, an empty tensor, one spanning several 64-element interpreter blocks
SHAPES = [(7, 5), (33,), (1,), (0,), (3, 11), (130,)]
# the harness on this module's shapes, on DEV
RUN = {"shapes": SHAPES, "device": DEV}
make_params = partial(_harness.make_params, **RUN)
make_loss = partial(_harness.make_loss, **RUN)
run_sam = partial(_harness.run_sam, **RUN)
perturb_inputs = partial(_harness.perturb_inputs, device=DEV)

# a subset of the option sets (the cpp module runs them all); ESAM here with the default seed 0
OPTIONS = {k: _harness.OPTIONS[k] for k in ("sam", "asam", "fsam", "p_inf", "p_3", "gsam", "esam", "all")}
OPTIONS["esam"] = {"swp_keep": 0.6}


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
    check_perturb_matches_reference("triton", dtype, shapes, opts, offset_stride=1000, device=DEV)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf arithmetic inside the interpreter's numpy
def test_perturb_nonfinite_norm_changes_nothing():
    """inf in one tensor of one dtype group: no tensor of any group is perturbed, EMA and flags
    stay, w_old gets w, g_old gets zeros, the returned flag is False."""
    shapes = [(5,), (70,), (3, 3)]
    dts = [torch.float32, torch.bfloat16, torch.float32]
    ins = list(perturb_inputs(torch.float32, shapes, 1, True, True, ready=[1, 0, 1]))
    for k in (0, 1, 2, 3, 5):
        ins[k] = [t.to(dt) for t, dt in zip(ins[k], dts)]
    ins[1][1][17] = float("inf")
    before = [clone_list(x) for x in ins]
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
    params, grads, w_old, offs = mixed_dtype_case(DEV)
    ref = clone_list(params)
    l0 = TS.LAUNCHES[0]
    F.sam_perturb_(params, grads, w_old, None, None, None, [0.2] * 5, [0.0] * 5, [True] * 5, offs, backend="triton")
    assert TS.LAUNCHES[0] - l0 == 2 * 4  # K1 + K2 per (device, dtype) group
    R.sam_perturb_(ref, grads, clone_list(w_old), None, None, None, [0.2] * 5, [0.0] * 5, [True] * 5, offs)
    for x, y in zip(params, ref):
        assert_close(x, y, rtol=2 * ulp(x.dtype) if x.dtype in LOW else 2e-6)


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
    check_noncontiguous_staged("triton", DEV)


# ------------------------------------------------------------------------------ optimizer: fp32 parity
@pytest.mark.parametrize("opt_name", list(OPTIONS))
def test_sam_sgd_fp32_matches_reference(opt_name):
    check_matches_reference("triton", torch.float32, torch.optim.SGD, SGD_KW, OPTIONS[opt_name], rtol=1e-5, **RUN)


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
    check_matches_reference("triton", torch.float32, base, base_kw, OPTIONS[opts], rtol=1e-5, **RUN)


GROUP_SPEC = [
    {"n": 2, "rho": 0.05, "adaptive": True, "eta": 0.0, "lr": 0.02, "weight_decay": 0.0},
    {"n": 2, "rho": 0.2, "adaptive": False, "lr": 0.01},
    {"n": 2, "rho": 0.0, "weight_decay": 0.0},  # LSAM: not perturbed, still updated
]


@pytest.mark.parametrize("base,base_kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, ADAMW_KW)])
def test_sam_param_groups_and_scheduler(base, base_kw):
    """Per-group rho/adaptive/eta/lr/weight_decay, a rho = 0 group, a StepLR schedule."""
    kw = {"fsam_sigma": 1.0, "gsam_alpha": 0.2, "swp_keep": 0.8}
    a = check_matches_reference("triton", torch.float32, base, base_kw, kw, rtol=1e-5, spec=GROUP_SPEC, sched=True,
                                **RUN)
    assert a[1].param_groups[0]["lr"] == pytest.approx(0.02 * 0.25)


def test_sam_float64_params():
    check_matches_reference("triton", torch.float64, torch.optim.AdamW, ADAMW_KW, OPTIONS["all"], rtol=1e-11, **RUN)


# ------------------------------------------------------------------------------ optimizer: bf16 / fp16
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("base,base_kw,opts", [
    (torch.optim.SGD, SGD_KW, "all"),
    (torch.optim.AdamW, ADAMW_KW, "all"),
    (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-3}, "fsam"),
], ids=["sgd-all", "adamw-all", "adam-amsgrad-fsam"])
def test_sam_low_precision_2x_rule(dtype, base, base_kw, opts):
    check_low_precision_2x_rule("triton", dtype, base, base_kw, OPTIONS[opts], **RUN)


# ------------------------------------------------------------------------------ fused ops vs twins
# tensor 1 spans three 64-element interpreter blocks
FUSED_SHAPES = [(5,), (130,), (0,), (3, 7), (1,), (70,)]
fused_lists = partial(_harness.fused_lists, shapes=FUSED_SHAPES, device=DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gsam", [0.0, 0.5])
@pytest.mark.parametrize("kw", list(FUSED_SGD_KWS.values()), ids=list(FUSED_SGD_KWS))
def test_fused_sgd_matches_twin(dtype, gsam, kw):
    check_fused_sgd_matches_twin("triton", dtype, gsam, kw, fused_lists)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [
    {"lr": [1e-2, 2e-2, 1e-2, 1e-2, 1e-2, 5e-3], "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"lr": 1e-2, "weight_decay": 0.01, "amsgrad": True, "beta1": 0.5, "beta2": 0.9, "eps": 1e-4},
    {"lr": 1e-2, "maximize": True, "gsam_alpha": 0.4},
], ids=["adamw-lists", "adam-amsgrad", "maximize-gsam"])
def test_fused_adam_matches_twin(dtype, kw):
    check_fused_adam_matches_twin("triton", dtype, kw, fused_lists)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mix_id", list(_harness.FUSED_MIX_KWS))
def test_fused_mix_matches_twin(dtype, mix_id):
    _harness.check_mix_matches_twin("triton", dtype, mix_id, fused_lists)


def test_fused_mix_refused_before_any_write():
    _harness.check_mix_refused("triton", fused_lists)


def test_fused_reference_twins_match_torch_float64():
    """The fp64 twins equal restore + a real torch optimizer step (SGD, Adam, AdamW) in fp64."""
    for base, kw, twin in [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01}, "sgd"),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}, "sgd"),
        (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.01, "amsgrad": True}, "adam"),
        (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "betas": (0.5, 0.9)}, "adam"),
    ]:
        params, grads, w_old, _ = fused_lists(torch.float64, 5)
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
    check_state_dict_loads_into_plain_torch("triton", base, base_kw, **RUN)


def test_fused_path_taken_and_fallbacks():
    params, loss, opt = check_fused_path_taken("triton", **RUN)
    opt._set_perturbed(None)
    # a step hook must run around base.step(): no fused path
    h = opt.base_optimizer.register_step_post_hook(lambda *a: None)
    loss(params).backward()
    opt.first_step(zero_grad=True)
    loss(params).backward()
    assert not fused_second_step(opt, opt._layout)
    opt.second_step()
    h.remove()
    # unsupported options / optimizers
    for base, kw in [(torch.optim.SGD, {"lr": torch.tensor(0.1)}), (torch.optim.RMSprop, {"lr": 0.1}),
                     (torch.optim.Adam, {"lr": 0.1, "differentiable": True})]:
        o = fastsam.SAM(params, base, backend="triton", **kw)
        loss(params).backward()
        o.first_step(zero_grad=True)
        loss(params).backward()
        assert not fused_second_step(o, o._layout)
        o.restore()
    # the foreach backend never fuses
    o = fastsam.SAM(params, torch.optim.SGD, backend="foreach", lr=0.1)
    loss(params).backward()
    o.first_step(zero_grad=True)
    assert not fused_second_step(o, o._layout)
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


def _layer_params(n_layers: int, dtypes: list[torch.dtype]) -> list[torch.nn.Parameter]:
    """An 8x8 weight and an 8-element bias per layer, layer i in dtypes[i % len(dtypes)]: several
    tensors per dtype group, so a launch count that grew with the tensors would show."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for i in range(n_layers):
        dt = dtypes[i % len(dtypes)]
        params += [torch.nn.Parameter(torch.randn(8, 8, generator=gen).to(DEV, dt)),
                   torch.nn.Parameter(torch.randn(8, generator=gen).to(DEV, dt))]
    return params


def _launches_per_step(n_layers: int, dtypes: list[torch.dtype], gsam: float) -> tuple[int, int, list, list]:
    params = _layer_params(n_layers, dtypes)
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
    torch op, independent of the number of tensors (targets: at most 4 and 3). With two dtype
    groups the second step is a transaction over two launches: it keeps a copy of the optimizer
    state the smaller group's launch writes (its momentum buffers; the parameters come back from
    w_old), one clone per such tensor and nothing else."""
    for dtypes in ([torch.float32], [torch.float32, torch.bfloat16]):
        for n in (3, 6):
            first, second, ops1, ops2 = _launches_per_step(n, dtypes, gsam)
            assert ops1 == [], ops1
            assert first == 2 * len(dtypes)
            assert second == (2 if gsam else 1) * len(dtypes)
            if len(dtypes) == 1:
                assert ops2 == [], ops2
            else:
                sizes = {dt: sum(p.numel() for p in _layer_params(n, dtypes) if p.dtype == dt) for dt in dtypes}
                small = min(dtypes, key=lambda dt: sizes[dt])
                n_small = sum(p.dtype == small for p in _layer_params(n, dtypes))
                assert ops2 == ["aten.clone.default"] * n_small, ops2


@pytest.mark.parametrize("gsam", [0.0, 0.3])
def test_accumulate_launch_count_is_fixed(gsam):
    """m-SAM per micro-batch: SAM.accumulate (restore + GSAM + acc) is 1 launch per dtype group
    (GSAM 2) and no other torch op, for 6 and 12 tensors."""
    for dtypes in ([torch.float32], [torch.float32, torch.bfloat16]):
        counts = []
        for n_layers in (3, 6):
            params = _layer_params(n_layers, dtypes)
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
    params, grads, w_old, ema, rdy, g_old = perturb_inputs(torch.float32, [(5,), (9,)], 0, True, True)
    args = (params, grads, w_old, ema, rdy, g_old, [0.1, 0.2], [0.0, 0.0], [True, False], [0, 5],
            2.0, 1.0, 0.9, 0.5, 3, 1, [], [])
    torch.library.opcheck(torch.ops.fastsam.sam_perturb.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    # out-of-place F-SAM state: ema / ema_ready only read, ema_out / ready_out written
    outs = ([torch.empty_like(m) for m in ema], [torch.empty_like(r) for r in rdy])
    torch.library.opcheck(torch.ops.fastsam.sam_perturb.default, args[:-2] + outs,
                          test_utils=("test_schema", "test_faketensor"))
    gs, gos = [g.clone() for g in grads], [g.clone() * 2 for g in grads]
    torch.library.opcheck(torch.ops.fastsam.sam_gsam_combine.default, (gs, gos, 0.5),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastsam.sam_restore.default, ([p.clone() for p in params], w_old),
                          test_utils=("test_schema", "test_faketensor"))
    accs = [torch.randn_like(p) for p in params]
    torch.library.opcheck(torch.ops.fastsam.sam_restore_accumulate.default,
                          ([p.clone() for p in params], gs, [0, 1], w_old, [0, 1], gos, [0, 1], accs, [0, 1],
                           [], [], [True, False], 0.5, 2.0, 0.3),
                          test_utils=("test_schema", "test_faketensor"))
    acc_in = [torch.randn_like(p) for p in params]  # the running sums read from other tensors
    torch.library.opcheck(torch.ops.fastsam.sam_restore_accumulate.default,
                          ([p.clone() for p in params], gs, [0, 1], w_old, [0, 1], gos, [0, 1], accs, [0, 1],
                           acc_in, [0, 1], [False, False], 0.5, 2.0, 0.3),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_model_and_optimizer_step():
    """Compiled (aot_eager) training steps give the eager results: (a) the model compiled, the SAM
    steps eager; (b) model and both SAM steps inside one compiled function, the steps kept out of
    the graph with torch.compiler.disable (torch 2.13's dynamo loses attribute writes on an
    Optimizer across a graph break inside its method, which SAM's state machine needs); (c) the
    custom op itself in a fullgraph compile (torch 2.4: the public function, run eagerly)."""
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

    params, grads, w_old, _, _, _ = perturb_inputs(torch.float32, [(5,), (9,)], 0, False, False)
    ref = clone_list(params)

    if CUSTOM_OP_LISTS_TRACEABLE:  # torch >= 2.5: the op itself in a fullgraph compile
        @torch.compile(backend="aot_eager", fullgraph=True)
        def perturb(ps, gs, wo):
            return torch.ops.fastsam.sam_perturb(ps, gs, wo, [], [], [], [0.1, 0.1], [0.0, 0.0], [False, False],
                                                 [0, 5], 2.0, None, 0.9, 1.0, 0, 0, [], [])
    else:  # torch 2.4 cannot functionalize it: the public function runs eagerly (a graph break)
        @torch.compile(backend="aot_eager")
        def perturb(ps, gs, wo):
            return F.sam_perturb_(ps, gs, wo, None, None, None, [0.1, 0.1], [0.0, 0.0], [False, False], [0, 5],
                                  backend="triton")

    ok = perturb(params, grads, w_old)
    R.sam_perturb_(ref, grads, clone_list(w_old), None, None, None, [0.1, 0.1], [0.0, 0.0], [False, False], [0, 5])
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
    """Every kernel family (SAM and ascent losses) lowers through Triton's CUDA compiler (sm_90) at
    the geometry it is launched with, checked without a GPU in a subprocess without the
    interpreter (which accepts programs the compiler rejects), ptxas reports no register
    spills (issue 4: "no register spills for wide rows"; see _triton_aot._spill_is_a_failure for
    the one allowance), and every vectorized SAM variant has 16-byte accesses."""
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
    assert "compiled 89 variants" in r.stdout  # 64 SAM kernel variants + 21 ascent-loss + 4 reduction variants
    if "ptxas not found" not in r.stdout:  # ptxas -v on every variant as launched: no spills
        assert "register spills: none" in r.stdout, r.stdout[-3000:]


# ------------------------------------------------------------------------------ full blocks vs tail
@pytest.mark.parametrize("vectorize", [True, False], ids=["split", "masked"])
def test_full_block_path_and_tail_path(vectorize):
    """With 32-element blocks most blocks of these tensors are full: the kernels' unmasked
    full-block body (vectorize=True; K1, K2, KG, K3 in every mode) and the single masked body
    (vectorize=False) both match the references, over the same cases as above (all perturbation
    options; SGD momentum/nesterov/maximize with GSAM; Adam amsgrad; AdamW lists; GSAM + maximize;
    m-SAM accumulate with and without GSAM, fp32 and bf16)."""
    import test_accumulate

    shapes = [(64,), (95,), (7, 5), (0,), (1,), (33,)]  # 95 = 2 full blocks + 31: one short of full
    # the GPU block too (on CUDA the fixture's 256 would make every case here a single masked block)
    with TS.configure(block=32, interp_block=32, vectorize=vectorize):
        check_perturb_matches_reference("triton", torch.float32, shapes, OPTIONS["all"], offset_stride=1000,
                                        device=DEV)
        check_perturb_matches_reference("triton", torch.bfloat16, shapes, {"adaptive": True, "fsam_sigma": 1.0},
                                        offset_stride=1000, device=DEV)
        check_fused_sgd_matches_twin("triton", torch.float32, 0.5, FUSED_SGD_KWS["nesterov-max"], fused_lists)
        check_fused_sgd_matches_twin("triton", torch.float32, 0.0, FUSED_SGD_KWS["mom-damp-lists"], fused_lists)
        for kw in ({"lr": 1e-2, "weight_decay": 0.01, "amsgrad": True, "beta1": 0.5, "beta2": 0.9, "eps": 1e-4},
                   {"lr": [1e-2, 2e-2, 1e-2, 1e-2, 1e-2, 5e-3], "weight_decay": 0.1, "decoupled_weight_decay": True},
                   {"lr": 1e-2, "maximize": True, "gsam_alpha": 0.4}):
            check_fused_adam_matches_twin("triton", torch.float32, kw, fused_lists)
    with TS.configure(block=2048, interp_block=2048, vectorize=vectorize):  # its (40001,): 19 full blocks + a tail
        for dtype in (torch.float32, torch.bfloat16):
            for gsam in (False, True):
                test_accumulate.test_restore_accumulate_matches_reference("triton", dtype, gsam)


def test_resident_programs_from_registers():
    """The persistent grid is sized to what stays resident (64 K registers and 2048 threads per
    SM; registers allocated 8 per thread at a time): 8-warp programs."""
    assert TL._resident_programs(32, 8) == 8  # thread-limited: 8 x 256 = 2048
    assert TL._resident_programs(64, 8) == 4
    assert TL._resident_programs(80, 8) == 3  # the AdamW K3 at BLOCK 2048 (ptxas, sm_90)
    assert TL._resident_programs(126, 8) == 2  # rounds up to 128
    assert TL._resident_programs(129, 8) == 1
    assert TL._resident_programs(255, 4) == 2


@pytest.mark.parametrize("vectorize", [True, False], ids=["split", "masked"])
def test_no_access_past_a_tensor(vectorize):
    """Every tensor the kernels touch is a view at the start of a larger buffer whose tail holds a
    canary: after perturbation (all options), the SGD / Adam second steps (GSAM on) and an m-SAM
    accumulate, no canary changed. Numels 3B - 1, 2B, B + 1, 1 with B-element blocks: a full-block
    test that is off by one would write element 3B - 1. B = 32 under the interpreter (95, 64, 33,
    1); on a GPU the default launch block (2048, with the configured warps: the vectorized body's
    16-byte accesses), not this module's 256, at which no tensor here would have a full block."""
    blk = 32 if DEV.type == "cpu" else TS.LaunchConfig().block
    numels = [3 * blk - 1, 2 * blk, blk + 1, 1]
    canary = -12345.0
    bufs: list[tuple[torch.Tensor, int]] = []  # (buffer, where its canary starts)

    def views(nonneg: bool = False) -> list[torch.Tensor]:
        out = []
        for n in numels:
            b = torch.full((n + 16,), canary, device=DEV)  # 16 fp32 = 64 bytes: views stay 16-byte aligned
            x = torch.randn(n, device=DEV)
            b[:n] = x.abs() if nonneg else x
            bufs.append((b, n))
            out.append(b[:n])
        return out

    def flags() -> list[torch.Tensor]:
        out = []
        for i in range(len(numels)):
            b = torch.full((16,), canary, device=DEV)
            b[0] = float(i % 2)
            bufs.append((b, 1))
            out.append(b[:1])
        return out

    k = len(numels)
    with TS.configure(interp_block=32, block=max(blk, 32), vectorize=vectorize):
        params, grads, w_old, ema, g_old = views(), views(), views(), views(), views()
        F.sam_perturb_(params, grads, w_old, ema, flags(), g_old, [0.1] * k, [0.01] * k, [True, False] * 2,
                       [0, 100, 200, 300], p=3.0, fsam_sigma=0.5, swp_keep=0.7, seed=3, step=2, backend="triton")
        F.sam_restore_sgd_(params, views(), w_old, g_old, views(), lr=0.1, momentum=0.9, weight_decay=0.01,
                           nesterov=True, gsam_alpha=0.3, backend="triton")
        steps = [torch.tensor(3.0, device=DEV) for _ in numels]
        F.sam_restore_adam_(params, views(), w_old, g_old, views(), views(nonneg=True), views(nonneg=True), steps,
                            lr=1e-3, weight_decay=0.1, amsgrad=True, decoupled_weight_decay=True, gsam_alpha=0.3,
                            backend="triton")
        F.sam_restore_accumulate_(params, views(), w_old, g_old, views(), [False, True] * 2, weight=0.5, scale=2.0,
                                  gsam_alpha=0.3, backend="triton")
    assert len(bufs) == 14 * k  # 13 lists of views + the flags
    for b, start in bufs:
        assert torch.all(b[start:] == canary), b[start:]


def test_spill_allowance_is_narrow():
    """Spills fail the sm_90 check for every kernel but the non-default-norm perturbation ones,
    and there above 64 bytes."""
    pytest.importorskip("triton.backends.nvidia")
    from fastsam.kernels._triton_aot import _spill_is_a_failure

    general_p = "K2 fp32 q0 fsam=True asam=True gsam=True esam=True"
    assert not _spill_is_a_failure(general_p, 28)  # triton 3.6's ptxas on this variant
    assert not _spill_is_a_failure("K1 bf16 q1 fsam=True asam=False", 64)
    assert _spill_is_a_failure(general_p, 65)  # bounded even there
    for name in ("K2 fp32 q2 fsam=False asam=False gsam=False esam=False", "K1 fp32 q2 fsam=False asam=False",
                 "K3 fp32 mode=2 gsam=False nesterov=False maximize=False amsgrad=False decoupled=True",
                 "KG bf16", "OBF softmax fp32 one_chunk=False grad=True",
                 "BiSAM bf16 one_chunk=False tanh=True grad=False"):
        assert _spill_is_a_failure(name, 4), name
        assert not _spill_is_a_failure(name, 0), name
