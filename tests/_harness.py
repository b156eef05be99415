"""What the kernel backends' test modules (test_cpp_sam.py, test_triton_sam.py) share.

Both check a backend against fastsam.reference the same way: the same comparison rules
(``assert_close``, the low-precision 2x rule), the same toy problem (``make_params`` and
``make_loss``), the same SAM loop (``run_sam``) and option tables. One copy here keeps the two
modules judging their backends by one standard: a fix to a rule or to the loop reaches both.

What differs between the modules is an argument, never a branch in here: the device (the triton
module runs on CUDA when there is one; the cpp module on the CPU), the shapes (the C++ kernels cut
tensors into 32768-element work items, Triton into blocks of 64 under the interpreter, so each
module picks sizes that span several of its own units) and the backend name. A module binds its
own shapes and device once (``functools.partial``) and calls the helpers as before.

Plain helpers, no fixtures: pytest's default import mode puts tests/ on sys.path (there is no
tests/__init__.py), so the modules import this with ``import _harness``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch

import fastsam
from fastsam import functional as F
from fastsam import reference as R
from fastsam.optim._fused import fused_second_step

LOW = (torch.bfloat16, torch.float16)

# ------------------------------------------------------------------------------ comparison rules


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close(got: torch.Tensor, want: torch.Tensor, *, rtol: float, name: str = "") -> None:
    """|got - want| <= rtol * (|want| + 0.1 * max|want|) elementwise, compared in float64 (the
    absolute part admits the rounding of values that cancel to near zero, e.g. an EMA update)."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert g.shape == w.shape, name
    if w.numel() == 0:
        return
    scale = w.abs().max().item()
    bad = (g - w).abs() > rtol * (w.abs() + 0.1 * scale) + 1e-30
    assert not bad.any(), f"{name}: max err {(g - w).abs().max().item():.3e} (scale {scale:.3e}, rtol {rtol})"


def assert_2x_rule(got: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, name: str = "") -> None:
    """Low precision: max and mean error of ``got`` vs the fp64 reference within 2x those of plain
    PyTorch in the same dtype, plus one ulp of the values' scale."""
    r = ref64.detach().double().cpu()
    if r.numel() == 0:
        return
    e_got = (got.detach().double().cpu() - r).abs()
    e_plain = (plain.detach().double().cpu() - r).abs()
    floor = ulp(got.dtype) * r.abs().max().item()
    assert e_got.max() <= 2 * e_plain.max() + floor, f"{name}: max {e_got.max():.3e} vs plain {e_plain.max():.3e}"
    assert e_got.mean() <= 2 * e_plain.mean() + floor, f"{name}: mean {e_got.mean():.3e} vs plain {e_plain.mean():.3e}"


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (torch.equal calls -0.0 == 0.0 and NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


# ------------------------------------------------------------------------------ the toy problem and the SAM loop
NO_GRAD = (2,)  # the parameter make_loss gives no gradient (parameter 2 of every module's shapes)


def make_params(dtype: torch.dtype, seed: int = 0, *, shapes: Sequence[tuple[int, ...]],
                device: torch.device | str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g, dtype=torch.float64) * 0.5).to(device, dtype))
            for s in shapes]


def make_loss(*, shapes: Sequence[tuple[int, ...]], seed: int = 1, skip: tuple[int, ...] = NO_GRAD,
              device: torch.device | str = "cpu"):
    """A nonlinear loss of the parameters (clean and perturbed gradients differ); parameters in
    ``skip`` get no gradient."""
    g = torch.Generator().manual_seed(seed)
    cs = [torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in shapes]
    ds = [torch.rand(s, generator=g, dtype=torch.float64).to(device) for s in shapes]

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
    """Param groups from a spec of ``{"n": count, **group options}`` (None: one plain list)."""
    if spec is None:
        return params
    out, k = [], 0
    for s in spec:
        n = s["n"]
        out.append({**{a: b for a, b in s.items() if a != "n"}, "params": params[k:k + n]})
        k += n
    assert k == len(params)
    return out


def run_sam(backend: str, dtype: torch.dtype, base: type, base_kw: dict, sam_kw: dict, *,
            shapes: Sequence[tuple[int, ...]], device: torch.device | str = "cpu", steps: int = 5,
            spec: list[dict[str, Any]] | None = None, seed: int = 0, sched: bool = False):
    """``steps`` SAM steps on the toy problem; returns (params, optimizer, the perturbed params of
    every step)."""
    params = make_params(dtype, seed, shapes=shapes, device=device)
    loss = make_loss(shapes=shapes, device=device)
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

# Every option alone and combined: the cpp module runs all of them, the triton module a subset.
OPTIONS = {
    "sam": {},
    "asam": {"adaptive": True, "eta": 0.01, "rho": 0.5},
    "asam_eta0": {"adaptive": True, "rho": 0.5},
    "fsam": {"fsam_sigma": 1.0, "fsam_lambda": 0.6},
    "p_inf": {"p": math.inf, "rho": 0.01},
    "p_3": {"p": 3.0},
    "p_1.5": {"p": 1.5},
    "gsam": {"gsam_alpha": 0.3},
    "esam": {"swp_keep": 0.6, "seed": 7},
    "fsam+asam+gsam": {"fsam_sigma": 0.8, "fsam_lambda": 0.6, "adaptive": True, "eta": 0.05, "gsam_alpha": 0.2},
    "all": {"adaptive": True, "eta": 0.02, "rho": 0.3, "fsam_sigma": 0.5, "gsam_alpha": 0.4,
            "swp_keep": 0.7, "p": 2.5, "seed": 12345},
}


def check_matches_reference(backend: str, dtype: torch.dtype, base: type, base_kw: dict, sam_kw: dict, *,
                            rtol: float, **run_kw):
    """``backend`` and the reference backend run from the same start agree by ``compare_runs``;
    returns the backend's run for further checks."""
    a = run_sam(backend, dtype, base, base_kw, sam_kw, **run_kw)
    b = run_sam("reference", dtype, base, base_kw, sam_kw, **run_kw)
    compare_runs(a, b, rtol=rtol)
    return a


def check_low_precision_2x_rule(backend: str, dtype: torch.dtype, base: type, base_kw: dict, sam_kw: dict,
                                **run_kw) -> None:
    """bf16/fp16 parameters and state of ``backend`` within the 2x rule of plain PyTorch (the
    foreach backend) against a float64 reference run; step counters and F-SAM flags exactly as
    plain PyTorch's."""
    got = run_sam(backend, dtype, base, base_kw, sam_kw, **run_kw)
    plain = run_sam("foreach", dtype, base, base_kw, sam_kw, **run_kw)
    ref = run_sam("reference", torch.float64, base, base_kw, sam_kw, **run_kw)
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


def check_state_dict_loads_into_plain_torch(backend: str, base: type, base_kw: dict, **run_kw) -> None:
    """The fused base optimizer's state_dict has torch's layout (keys, types, dtypes, devices,
    shapes), and a plain torch optimizer continues from it exactly as the fused one does."""
    params, opt, _ = run_sam(backend, torch.float32, base, base_kw, {}, steps=3, **run_kw)
    _, ref_opt, _ = run_sam("reference", torch.float32, base, base_kw, {}, steps=3, **run_kw)
    sd, ref_sd = opt.base_optimizer.state_dict(), ref_opt.base_optimizer.state_dict()
    assert sd["state"].keys() == ref_sd["state"].keys()
    for k in sd["state"]:
        assert sd["state"][k].keys() == ref_sd["state"][k].keys()
        for name, v in sd["state"][k].items():
            r = ref_sd["state"][k][name]
            assert type(v) is type(r)
            if isinstance(v, torch.Tensor):
                assert (v.dtype, v.device, v.shape) == (r.dtype, r.device, r.shape), name
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


def check_fused_path_taken(backend: str, *, shapes: Sequence[tuple[int, ...]], device: torch.device | str = "cpu"):
    """With an AdamW base, ``backend``'s second step takes the fused restore + update path; returns
    (params, loss, optimizer) for a module's further checks."""
    params = make_params(torch.float32, shapes=shapes, device=device)
    loss = make_loss(shapes=shapes, device=device)
    opt = fastsam.SAM(params, torch.optim.AdamW, backend=backend, lr=1e-2)
    loss(params).backward()
    opt.first_step(zero_grad=True)
    loss(params).backward()
    assert fused_second_step(opt, opt._layout)
    return params, loss, opt


# ------------------------------------------------------------------------------ functional ops
def perturb_inputs(dtype, shapes, seed, fsam, gsam, ready=None, device: torch.device | str = "cpu"):
    """Arguments of sam_perturb_: params, grads, w_old (filled with 7 so a missed write shows),
    F-SAM EMA and ready flags (alternating unless ``ready``) if ``fsam``, g_old (3s) if ``gsam``."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda s: torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype)  # noqa: E731
    params = [mk(s) for s in shapes]
    grads = [mk(s) * 0.1 for s in shapes]
    w_old = [torch.full_like(p, 7.0) for p in params]
    ema = [mk(s) * 0.1 for s in shapes] if fsam else None
    rdy = None
    if fsam:
        rdy = [torch.tensor(float(r), device=device) for r in (ready or [i % 2 for i in range(len(shapes))])]
    g_old = [torch.full_like(p, 3.0) for p in params] if gsam else None
    return params, grads, w_old, ema, rdy, g_old


def clone_list(x):
    return None if x is None else [t.clone() for t in x]


def check_perturb_matches_reference(backend: str, dtype: torch.dtype, shapes, opts: dict, *, offset_stride: int,
                                    device: torch.device | str = "cpu") -> None:
    """One first step: params and EMA against the reference (fp32/fp64 by tolerance, bf16/fp16 by
    the 2x rule), w_old, g_old, the untouched grads and the flags exactly. Tensor i starts at
    element ``offset_stride * i + 3`` of the ESAM mask stream."""
    fsam, gsam = opts.get("fsam_sigma") is not None, opts.get("gsam_alpha", 0) > 0
    n = len(shapes)
    rhos = [opts.get("rho", 0.05) * (1 + 0.5 * i) for i in range(n)]
    etas = [opts.get("eta", 0.0)] * n
    adaptive = [bool(opts.get("adaptive", False)) and i % 2 == 0 for i in range(n)]
    offsets = [offset_stride * i + 3 for i in range(n)]
    kw = dict(p=opts.get("p", 2.0), fsam_sigma=opts.get("fsam_sigma"), fsam_lambda=0.8,
              swp_keep=opts.get("swp_keep", 1.0), seed=opts.get("seed", 0), step=3)
    base = perturb_inputs(dtype, shapes, 0, fsam, gsam, device=device)
    runs = {}
    for be in (backend, "reference", "foreach"):
        ins = [clone_list(x) for x in base]
        ok = F.sam_perturb_(*ins, rhos, etas, adaptive, offsets, backend=be, **kw)
        runs[be] = (ok, ins)
    if dtype in LOW:  # the reference rounds once from fp64: also the fp64 truth for the 2x rule
        ref64 = [clone_list([t.double() for t in x]) if x is not None else None for x in base]
        if ref64[4] is not None:
            ref64[4] = [t.float() for t in ref64[4]]
        R.sam_perturb_(*ref64, rhos, etas, adaptive, offsets, **kw)
    ok, ins = runs[backend]
    assert bool(ok) and ok.dtype == torch.bool and ok.dim() == 0
    for k, label in enumerate(("params", "grads", "w_old", "ema", "ready", "g_old")):
        if ins[k] is None:
            continue
        for i, (x, y) in enumerate(zip(ins[k], runs["reference"][1][k])):
            assert x.dtype == y.dtype, label
            if label in ("w_old", "g_old", "grads", "ready"):
                assert torch.equal(x, y), f"{label} {i} must be exact"
            elif dtype in LOW:
                assert_2x_rule(x, runs["foreach"][1][k][i], ref64[k][i], name=f"{label} {i}")
            else:
                assert_close(x, y, rtol=1e-12 if dtype == torch.float64 else 2e-6, name=f"{label} {i}")


def mixed_dtype_case(device: torch.device | str = "cpu"):
    """fp32 + bf16 + fp16 + fp32 + fp64 tensors for one sam_perturb_ call (one global norm over
    every dtype): params, grads, an uninitialised w_old and the tensors' mask offsets."""
    dts = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float64]
    shapes = [(50,), (70,), (20, 3), (1,), (9,)]
    params, grads, w_old, _, _, _ = perturb_inputs(torch.float32, shapes, 2, False, False, device=device)
    params = [p.to(dt) for p, dt in zip(params, dts)]
    grads = [g.to(dt) for g, dt in zip(grads, dts)]
    w_old = [torch.empty_like(p) for p in params]
    return params, grads, w_old, [0, 50, 120, 180, 181]


def check_noncontiguous_staged(backend: str, device: torch.device | str = "cpu") -> None:
    """A transposed (non-contiguous) parameter and gradient: perturbed as the reference does it,
    w_old exact, restored exactly (the kernels stage such tensors through contiguous copies)."""
    base = torch.randn(6, 9, device=device)
    w = base.t()
    g = torch.randn(6, 9, device=device).t()
    ref_w = w.clone()
    wo, wo_ref = torch.empty_like(w), torch.empty_like(w)
    F.sam_perturb_([w], [g], [wo], None, None, None, [0.1], [0.0], [False], [11], swp_keep=0.5, backend=backend)
    R.sam_perturb_([ref_w], [g], [wo_ref], None, None, None, [0.1], [0.0], [False], [11], swp_keep=0.5)
    assert_close(w, ref_w, rtol=2e-6)
    assert torch.equal(wo, wo_ref)
    F.sam_restore_([w], [wo], backend=backend)
    assert torch.equal(w, wo_ref)


# ------------------------------------------------------------------------------ fused restore + update ops
def fused_lists(dtype, seed, shapes, device: torch.device | str = "cpu"):
    """Six tensors' params, grads, w_old, g_old for the fused ops, with the holes the optimizer
    produces: tensor 4 has no gradient (restore only), tensor 5 was not perturbed (update only),
    tensors 1 and 5 have no GSAM g_old. ``shapes``: six shapes."""
    assert len(shapes) == 6
    gen = torch.Generator().manual_seed(seed)
    mk = lambda s, k=1.0: (torch.randn(s, generator=gen, dtype=torch.float64) * k).to(device, dtype)  # noqa: E731
    params = [mk(s) for s in shapes]
    grads = [mk(s, 0.3) if i != 4 else None for i, s in enumerate(shapes)]
    w_old = [mk(s) if i != 5 else None for i, s in enumerate(shapes)]
    g_old = [mk(s, 0.3) if i not in (1, 5) else None for i, s in enumerate(shapes)]
    return params, grads, w_old, g_old


# sam_restore_sgd_ keyword sets, by test id: per-tensor lr and weight-decay lists, Nesterov + maximize, plain
FUSED_SGD_KWS = {
    "mom-damp-lists": {"lr": [0.1, 0.2, 0.1, 0.05, 0.1, 0.3], "momentum": 0.9, "dampening": 0.1,
                       "weight_decay": [0.0, 0.1] * 3},
    "nesterov-max": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True},
    "plain": {"lr": 0.1},
}


# the cheaper family's combines (``mix = (c1, c2[, c3])``, issue #17): WSAM's (a, 1 - a) written back
# into .grad, LookSAM's reuse (1, alpha |g|) not written back, decoupled WSAM's (0, 1, lr a): the
# update with g_old (written back), then w -= lr a (g - g_old); by test id
FUSED_MIX_KWS = {
    "wsam-mix": {"mix": (0.7, 0.3), "mix_writeback": True},
    "looksam-reuse": {"mix": (1.0, 2.5), "mix_writeback": False},
    "wsam-decoupled": {"mix": (0.0, 1.0, 0.05), "mix_writeback": True},
}


def _on_device(kw: dict, device: torch.device) -> dict:
    """``kw`` with its ``mix`` pair as the float64 device tensor the ops take."""
    if "mix" not in kw:
        return kw
    return {**kw, "mix": torch.tensor(kw["mix"], dtype=torch.float64, device=device)}


def fused_sgd_run(backend: str, dtype: torch.dtype, gsam: float, kw: dict, lists: Callable[..., tuple]):
    """5 calls of sam_restore_sgd_ on ``lists(dtype, 3)`` with fresh gradients each time; returns
    (params, grads, momentum buffers)."""
    params, grads, w_old, g_old = lists(dtype, 3)
    kw = _on_device(kw, params[0].device)
    bufs: list = [None] * len(params)
    for step in range(5):
        fresh = lists(dtype, 10 + step)
        for g, g2 in zip(grads, fresh[1]):
            if g is not None:
                g.copy_(g2)
        F.sam_restore_sgd_(params, grads, w_old, g_old if gsam or "mix" in kw else None, bufs, gsam_alpha=gsam,
                           backend=backend, **kw)
    return params, grads, bufs


def fused_adam_run(backend: str, dtype: torch.dtype, kw: dict, lists: Callable[..., tuple]):
    """5 calls of sam_restore_adam_ on ``lists(dtype, 4)`` with fresh gradients each time, the
    tensors starting at different steps; returns (params, grads, m, v, vmax, steps)."""
    params, grads, w_old, g_old = lists(dtype, 4)
    kw = _on_device(kw, params[0].device)
    n = len(params)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(float(i % 2)) for i in range(n)]
    for step in range(5):
        fresh = lists(dtype, 20 + step)
        for g, g2 in zip(grads, fresh[1]):
            if g is not None:
                g.copy_(g2)
        F.sam_restore_adam_(params, grads, w_old, g_old, m, v, vmax, steps, backend=backend, **kw)
    return params, grads, m, v, vmax, steps


def compare_fused(got: tuple, want: tuple, *, rtol: float) -> None:
    """Every tensor of a fused run's lists against the reference twin's; a hole (None: no gradient,
    no momentum buffer) must be a hole in both, and dtypes must agree (which says something for the
    tensors the op creates: momentum buffers)."""
    for k, (xs, ys) in enumerate(zip(got, want)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.dtype == y.dtype, f"list {k} tensor {i}: {x.dtype} vs {y.dtype}"
                assert_close(x, y, rtol=rtol, name=f"list {k} tensor {i}")


def check_fused_sgd_matches_twin(backend: str, dtype: torch.dtype, gsam: float, kw: dict,
                                 lists: Callable[..., tuple]) -> None:
    """``fused_sgd_run`` of ``backend`` against the reference twin (params, grads, buffers)."""
    got = fused_sgd_run(backend, dtype, gsam, kw, lists)
    want = fused_sgd_run("reference", dtype, gsam, kw, lists)
    compare_fused(got, want, rtol=1e-12 if dtype == torch.float64 else 2e-6)


def check_mix_matches_twin(backend: str, dtype: torch.dtype, mix_id: str, lists: Callable[..., tuple]) -> None:
    """The fused SGD (momentum, Nesterov) and AdamW updates with a ``mix`` against the reference
    twins: params, state, and ``.grad`` (which holds the mix only when written back)."""
    kw = FUSED_MIX_KWS[mix_id]
    check_fused_sgd_matches_twin(backend, dtype, 0.0, {**FUSED_SGD_KWS["nesterov-max"], **kw}, lists)
    check_fused_adam_matches_twin(
        backend, dtype, {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True, **kw}, lists)


def check_mix_refused(backend: str, lists: Callable[..., tuple]) -> None:
    """A bad ``mix`` (with GSAM, without g_old, not 2 elements) raises a ValueError naming it,
    before anything is written."""
    params, grads, w_old, g_old = lists(torch.float32, 7)
    before = [t.clone() for t in params + [g for g in grads if g is not None]]
    dev = params[0].device
    good = torch.tensor([0.5, 0.5], dtype=torch.float64, device=dev)
    bufs: list = [None] * len(params)
    bad = [({"g_old": g_old, "gsam_alpha": 0.3, "mix": good}, "exclude each other"),
           ({"g_old": None, "mix": good}, "needs the g_old list"),
           ({"g_old": g_old, "mix": torch.zeros(4, dtype=torch.float64, device=dev)}, "2 or 3 elements")]
    for kw, msg in bad:
        go = kw.pop("g_old")
        with pytest.raises(ValueError, match=msg):
            F.sam_restore_sgd_(params, grads, w_old, go, bufs, lr=0.1, momentum=0.9, backend=backend, **kw)
    after = [t for t in params + [g for g in grads if g is not None]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(b is None for b in bufs)


def check_fused_adam_matches_twin(backend: str, dtype: torch.dtype, kw: dict, lists: Callable[..., tuple]) -> None:
    """``fused_adam_run`` of ``backend`` against the reference twin (params, grads, m, v, vmax, steps)."""
    got = fused_adam_run(backend, dtype, kw, lists)
    want = fused_adam_run("reference", dtype, kw, lists)
    compare_fused(got, want, rtol=1e-12 if dtype == torch.float64 else 5e-6)


# ------------------------------------------------------------------------------ spawned ranks (gloo)
@contextlib.contextmanager
def gloo_rank(rank: int, world: int, init: str, out_path: str) -> Iterator[dict]:
    """The frame of a spawned rank's work (a :func:`spawn_ranks` target): one thread, a gloo
    process group at ``init``; yields the result dict, which rank 0 saves to ``out_path`` at the
    end, with the traceback as ``"error"`` if the body raised (swallowed here, reported by
    spawn_ranks). The ranks leave together (a barrier: gloo aborts a worker left alone at
    interpreter exit) and drop their last references before the group is destroyed."""
    import gc
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    result: dict = {}
    try:
        yield result
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        if rank == 0:
            torch.save(result, out_path)
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def spawn_ranks(target: Callable[..., None], world: int, extra: tuple = (), timeout: float = 120.0) -> dict:
    """Run ``target(rank, world, init, out_path, *extra)`` on ``world`` spawned processes that meet
    at a free loopback port (``init`` a ``tcp://`` address); returns rank 0's result dict, which the
    target saves to ``out_path`` with ``torch.save`` (an ``"error"`` entry fails the test). Every
    process is joined within ``timeout`` seconds and killed after it."""
    import os
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.pt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=target, args=(r, world, f"tcp://127.0.0.1:{port}", out) + tuple(extra))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join(timeout=10)
        assert not alive, "spawned ranks timed out"
        assert os.path.exists(out), [p.exitcode for p in procs]
        res = torch.load(out, weights_only=False)
        assert "error" not in res, res["error"]
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        return res
