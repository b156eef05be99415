"""What fastsam guarantees (issue #13), one class at a time, with the cases the issue reported.

Each test names its class: 1 transactions, 2 aliasing and shape changes, 3 robust norms,
4 validation at the point of use, 5 checkpoints, 6 smaller ones. The exhaustive forms are in
tests/test_faults.py (an exception at every call site) and tests/test_properties.py (random
options, dtypes, sizes and gradient scales against the reference).
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import fastsam
from fastsam import functional as Fn
from fastsam import reference as R

BACKENDS = [b for b in ("reference", "foreach", "cpp", "triton") if b in Fn.available_backends("cpu")]
FUSED = [b for b in ("cpp", "triton") if b in BACKENDS]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _data(seed: int = 1, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _state(model, opt) -> dict:
    out = {f"w.{k}": v.detach().clone() for k, v in model.state_dict().items()}

    def walk(x, p):
        if isinstance(x, torch.Tensor):
            out[p] = x.clone()
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{p}.{k}")
        elif isinstance(x, (list, tuple)):
            for k, v in enumerate(x):
                walk(v, f"{p}[{k}]")
        else:
            out[p] = x
    walk(opt.state_dict(), "opt")
    return out


def _assert_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert _same(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _iteration(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


# ============================================================================== 1. transactions
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("api", ["perturbed", "closure"])
def test_1_fused_second_step_error_on_malformed_adam_state_restores_everything(backend, api):
    """The issue's first example: a fused second step raising (malformed Adam state) left the
    weights at w + e and is_perturbed True after perturbed() / step(closure)."""
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.AdamW, lr=1e-2, fsam_sigma=0.5, backend=backend)
    x, y = _data()
    for _ in range(2):
        _iteration(m, opt, x, y)
    p0 = next(iter(m.parameters()))
    opt.base_optimizer.state[p0]["exp_avg"] = torch.zeros(3)  # wrong size: the op refuses it
    before = _state(m, opt)
    with pytest.raises((ValueError, RuntimeError)):
        if api == "perturbed":
            F.cross_entropy(m(x), y).backward()
            with opt.perturbed():
                F.cross_entropy(m(x), y).backward()
        else:
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    assert not opt.is_perturbed
    opt.base_optimizer.state[p0]["exp_avg"] = before["opt.base_optimizer.state.0.exp_avg"].clone()
    _assert_state(_state(m, opt), before)


def test_1_reference_first_step_failing_half_way_leaves_w():
    """The reference perturbed tensor by tensor: an error on the second left the first
    perturbed with is_perturbed False."""
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, swp_keep=0.5, backend="reference")
    x, y = _data()
    F.cross_entropy(m(x), y).backward()
    w0 = [p.detach().clone() for p in m.parameters()]
    calls = {"n": 0}
    real = R.keep_mask

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("mask failed")
        return real(*a, **kw)

    R.keep_mask = failing
    try:
        with pytest.raises(RuntimeError, match="mask failed"):
            opt.first_step()
    finally:
        R.keep_mask = real
    assert not opt.is_perturbed and opt.step_count == 0
    assert all(_same(a, b) for a, b in zip(w0, m.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_1_sam_step_pass2_error_then_retry_equals_uninterrupted(backend):
    """An exception in pass 2 of sam_step restored w but had advanced the ESAM counter and the
    F-SAM EMA: retrying gave another trajectory."""
    kw = dict(lr=0.1, momentum=0.9, fsam_sigma=0.5, swp_keep=0.7, backend=backend)
    m1, m2 = _model(), _model()
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, **kw)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, **kw)
    x, y = _data()
    calls = {"n": 0}

    def flaky(out, tgt, reduction="mean"):
        calls["n"] += 1
        if calls["n"] == 2:  # the second pass of the first step
            raise RuntimeError("loss failed")
        return F.cross_entropy(out, tgt, reduction=reduction)

    before = _state(m1, o1)
    with pytest.raises(RuntimeError, match="loss failed"):
        fastsam.sam_step(m1, o1, x, y, flaky)
    _assert_state(_state(m1, o1), before)
    for _ in range(3):
        fastsam.sam_step(m1, o1, x, y, flaky)
        fastsam.sam_step(m2, o2, x, y, F.cross_entropy)
    _assert_state(_state(m1, o1), _state(m2, o2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_1_failed_accumulating_call_loses_only_its_own_batch(backend):
    """sam_step(update=False) discarded every earlier accumulated batch when a later call raised."""
    kw = dict(lr=0.1, gsam_alpha=0.2, backend=backend)
    m1, m2 = _model(), _model()
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, **kw)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, **kw)
    batches = [_data(s) for s in (3, 4, 5)]

    def broken(out, tgt, reduction="mean"):
        raise RuntimeError("bad batch")

    fastsam.sam_step(m1, o1, *batches[0], F.cross_entropy, update=False)
    with pytest.raises(RuntimeError, match="bad batch"):
        fastsam.sam_step(m1, o1, *batches[1], broken, update=False, micro_batch=4)
    assert o1.has_accumulated
    fastsam.sam_step(m1, o1, *batches[2], F.cross_entropy, update=True)
    fastsam.sam_step(m2, o2, *batches[0], F.cross_entropy, update=False)
    fastsam.sam_step(m2, o2, *batches[2], F.cross_entropy, update=True)
    _assert_state(_state(m1, o1), _state(m2, o2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_1_nonfinite_first_step_changes_no_state(backend):
    """A manual first_step with a non-finite gradient advanced the step counter."""
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, fsam_sigma=0.5, swp_keep=0.5, backend=backend)
    x, y = _data()
    _iteration(m, opt, x, y)
    before = _state(m, opt)
    F.cross_entropy(m(x), y).backward()
    next(iter(m.parameters())).grad[0, 0] = float("nan")
    opt.first_step()
    assert opt.perturbation_skipped and opt.step_count == 1
    opt.restore()  # abandon the step
    assert not opt.is_perturbed
    _assert_state(_state(m, opt), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_1_restore_abandons_and_restore_with_gsam_continues(backend):
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, fsam_sigma=0.5, gsam_alpha=0.3, backend=backend)
    x, y = _data()
    _iteration(m, opt, x, y)
    before = _state(m, opt)
    F.cross_entropy(m(x), y).backward()
    opt.first_step(zero_grad=True)
    opt.restore()
    _assert_state(_state(m, opt), before)  # EMA and counter as if the step never began
    # restore(apply_gsam=True) keeps the step open; base_step completes it, like second_step
    m2, o2 = copy.deepcopy((m, opt))
    for model, o, manual in ((m, opt, True), (m2, o2, False)):
        o.zero_grad()
        F.cross_entropy(model(x), y).backward()
        o.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        if manual:
            o.restore(apply_gsam=True)
            with pytest.raises(RuntimeError, match="step is open"):
                o.state_dict()
            o.base_step()
        else:
            o.second_step()
    assert opt.step_count == o2.step_count == 2
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(m.parameters(), m2.parameters()))


# ============================================================================== 2. aliasing, shapes
def test_2_two_parameters_over_one_storage_are_rejected():
    a = torch.nn.Parameter(torch.randn(6))
    tied = torch.nn.Parameter(a.data)  # hand-made tying: another Parameter, same memory
    with pytest.raises(ValueError, match=r"params\[0\].*params\[1\].*share memory"):
        fastsam.SAM([a, tied], torch.optim.SGD, lr=0.1)
    view = torch.nn.Parameter(a.data[2:5])
    with pytest.raises(ValueError, match="share memory"):
        fastsam.SAM([a, view], torch.optim.SGD, lr=0.1)
    opt = fastsam.SAM([a], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [view]})
    # one Parameter used twice (nn.Module ties) is fine: it is one parameter
    b = torch.nn.Parameter(torch.randn(4))
    c = torch.nn.Parameter(torch.randn(4))
    opt = fastsam.SAM([b, c], torch.optim.SGD, lr=0.1)
    c.data = b.data  # re-tied after construction: found before the next perturbation
    b.grad, c.grad = torch.ones(4), torch.ones(4)
    w0 = b.detach().clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.first_step()
    assert not opt.is_perturbed and _same(b.detach(), w0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_2_parameter_replaced_by_another_shape_keeps_w(backend):
    p = torch.nn.Parameter(torch.randn(4, 5))
    q = torch.nn.Parameter(torch.randn(3))
    opt = fastsam.SAM([p, q], torch.optim.SGD, lr=0.1, backend=backend)
    w0 = p.detach().clone()
    p.grad, q.grad = torch.randn(4, 5), torch.randn(3)
    opt.first_step()
    perturbed = p.data
    p.data = torch.zeros(2, 4, 5)  # broadcastable from (4, 5): must not be broadcast into
    for call in (opt.second_step, opt.restore, lambda: opt.accumulate(1.0)):
        with pytest.raises(RuntimeError, match=r"replaced by a tensor of shape \(2, 4, 5\).*p.data"):
            call()
        assert opt.is_perturbed
    p.data = perturbed
    opt.restore()
    assert not opt.is_perturbed and _same(p.detach(), w0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_2_same_address_other_dtype_is_checked_again(backend):
    """p.data replaced by a complex view of its own storage (same address): the cached checks
    must not let it through (the review's V5: reference perturbed the real part, foreach raised
    a raw linalg error)."""
    p = torch.nn.Parameter(torch.randn(4))
    opt = fastsam.SAM([p], torch.optim.SGD, lr=0.1, backend=backend)
    p.grad = torch.randn(4)
    opt.first_step()
    p.grad = torch.randn(4)
    opt.second_step()
    p.data = p.data.view(torch.complex64)  # same data_ptr
    p.grad = torch.randn(2, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"params\[0\].*complex64"):
        opt.first_step()
    assert not opt.is_perturbed


@pytest.mark.parametrize("backend", BACKENDS)
def test_2_same_address_smaller_view_is_a_new_layout(backend):
    """p.data = p.data[:3] keeps the address: the next steps work on 3 elements, as a fresh
    optimizer over the same tensors does (no cached plan of the old size is reused)."""
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(5))
    opt = fastsam.SAM([p, q], torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    for _ in range(2):
        p.grad, q.grad = torch.randn(6), torch.randn(5)
        opt.first_step()
        p.grad, q.grad = torch.randn(6), torch.randn(5)
        opt.second_step()
    tail = p.data[3:].clone()
    p.data = p.data[:3]
    opt.base_optimizer.state[p].clear()  # momentum of the old size: start it again
    p2, q2 = torch.nn.Parameter(p.detach().clone()), torch.nn.Parameter(q.detach().clone())
    ref = fastsam.SAM([p2, q2], torch.optim.SGD, lr=0.1, momentum=0.9, backend="reference")
    ref.base_optimizer.state[q2] = {k: v.clone() for k, v in opt.base_optimizer.state[q].items()}
    for _ in range(2):
        g1, h1, g2, h2 = torch.randn(3), torch.randn(5), torch.randn(3), torch.randn(5)
        p.grad, q.grad, p2.grad, q2.grad = g1, h1, g1.clone(), h1.clone()
        opt.first_step()
        ref.first_step()
        p.grad, q.grad, p2.grad, q2.grad = g2, h2, g2.clone(), h2.clone()
        opt.second_step()
        ref.second_step()
        torch.testing.assert_close(p.detach(), p2.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(q.detach(), q2.detach(), rtol=1e-6, atol=1e-7)
    full = torch.empty(6)
    full.untyped_storage().copy_(p.data.untyped_storage())
    assert torch.equal(full[3:], tail)  # the rest of the storage untouched


# ============================================================================== 3. robust norms
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,p,scale", [
    (torch.float32, 1.05, 1e2),  # cpp: NaN weights, not skipped
    (torch.float16, 1.5, 1e3),  # foreach: inf weights
    (torch.float32, 2.0, 1e20),  # foreach / triton: the fp32 sum of squares overflowed: skipped
    (torch.bfloat16, 2.0, 1e30),
    (torch.float64, 3.0, 1e200),
    (torch.float32, math.inf, 1e30),
    (torch.float32, 2.0, 1e-30),
])
def test_3_finite_gradients_always_perturb_as_the_reference(backend, dtype, p, scale):
    g = torch.Generator().manual_seed(0)
    shapes = [(40,), (3, 5), (1,)]

    def run(b):
        ws = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]
        for w in ws:
            w.grad = (torch.randn(w.shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        opt = fastsam.SAM(ws, torch.optim.SGD, lr=0.0, rho=0.05, p=p, adaptive=True, eta=0.01, backend=b)
        before = [w.detach().clone() for w in ws]
        opt.first_step()
        return [w.detach().double() - x.double() for w, x in zip(ws, before)], opt

    g.manual_seed(0)
    want, _ = run("reference")
    g.manual_seed(0)
    got, opt = run(backend)
    assert not opt.perturbation_skipped
    e_ref = torch.cat([t.flatten() for t in want])
    e = torch.cat([t.flatten() for t in got])
    assert torch.isfinite(e).all()
    assert e_ref.abs().max() > 0 or scale < 1e-20  # tiny gradients: e ~ rho g / 1e-12 is below w's ulp
    assert (e - e_ref).abs().max() <= 1e-2 * e_ref.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_3_sam_step_final_check_and_clipping_do_not_overflow(backend):
    """sam_step's own check summed squares in float32: gradients of 1e20 read as infinite and the
    step was skipped; clipping zeroed them."""
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=1e-22, backend=backend)
    x, y = torch.randn(6, 4), torch.randn(6, 2)

    def huge(out, tgt, reduction="mean"):
        return 1e20 * F.mse_loss(out, tgt, reduction=reduction)

    w0 = m.weight.detach().clone()
    assert not fastsam.sam_step(m, opt, x, y, huge).skipped
    assert torch.isfinite(m.weight).all() and not torch.equal(m.weight, w0)
    r = fastsam.sam_step(m, opt, x, y, huge, max_grad_norm=1.0)
    assert not r.skipped and torch.isfinite(m.weight).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_3_float64_models_run_every_path(backend):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    opt = fastsam.SAM(m.parameters(), torch.optim.AdamW, lr=1e-2, gsam_alpha=0.2, backend=backend)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    for kw in ({}, dict(micro_batch=3), dict(max_grad_norm=0.5), dict(update=False)):
        r = fastsam.sam_step(m, opt, x, y, F.cross_entropy, **kw)
        assert not r.skipped
    assert all(torch.isfinite(p).all() for p in m.parameters())


# ============================================================================== 4. validation
@pytest.mark.parametrize("kwargs,match", [
    (dict(swp_keep="0.5"), "swp_keep must be a finite float"),
    (dict(fsam_lambda="0.9"), "fsam_lambda must be a finite float"),
    (dict(gsam_alpha=None), "gsam_alpha must be a finite float"),
    (dict(swp_keep=torch.tensor(0.5)), "swp_keep must be a finite float.*Tensor"),
    (dict(rho="0.1"), "rho must be a finite float"),
    (dict(p=float("nan")), "p must be a float"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(adaptive=1), "adaptive must be True or False"),
])
def test_4_wrong_types_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastsam.SAM(_model().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sds_keep="x"), "sds_keep must be a finite float"),
    (dict(max_grad_norm="1"), "max_grad_norm must be a finite float"),
    (dict(micro_batch=True), "micro_batch must be an int"),
    (dict(micro_batch=0), "micro_batch must be an int >= 1"),
    (dict(update=1), "update must be True or False"),
    (dict(amp_dtype=torch.float32), "amp_dtype must be None, torch.float16 or torch.bfloat16"),
    (dict(scaler=object()), "scaler must be None or a torch.amp.GradScaler"),
])
def test_4_sam_step_arguments_name_themselves(kwargs, match):
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        fastsam.sam_step(m, opt, x, y, F.cross_entropy, **kwargs)
    assert opt.step_count == 0 and all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), -0.1, float("inf"), "0.1"])
def test_4_rho_written_later_is_checked_at_the_next_step(backend, bad):
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    x, y = _data()
    _iteration(m, opt, x, y)
    opt.param_groups[0]["rho"] = bad  # e.g. a scheduler fed a NaN lr
    before = _state(m, opt) if isinstance(bad, float) and math.isfinite(bad) else None
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match=r"rho \(param group 0\) must be a finite float"):
        opt.first_step()
    assert not opt.is_perturbed
    opt.param_groups[0]["rho"] = 0.05
    if before is not None:
        before["opt.base_optimizer.param_groups[0].rho"] = 0.05
        _assert_state(_state(m, opt), before)


@pytest.mark.parametrize("backend", FUSED)
def test_4_nonfinite_lr_is_refused_by_the_fused_update(backend):
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.AdamW, lr=1e-2, backend=backend)
    x, y = _data()
    _iteration(m, opt, x, y)
    before = _state(m, opt)
    opt.param_groups[0]["lr"] = float("nan")
    F.cross_entropy(m(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match="lr must be a finite"):
        opt.second_step()
    opt.param_groups[0]["lr"] = 1e-2
    _assert_state(_state(m, opt), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), "np.float32", "tensor", float("inf")])
def test_4_nonfinite_hyperparameters_are_refused_on_every_path(backend, bad):
    """NaN/inf written into a group by a scheduler or user code, as a Python, numpy or 0-dim tensor
    number, is refused before the base optimizer runs (fused or not): nothing changes."""
    import numpy as np

    value = {"np.float32": np.float32("nan"), "tensor": torch.tensor(float("nan"))}.get(bad, bad)
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    x, y = _data()
    _iteration(m, opt, x, y)
    before = _state(m, opt)
    opt.param_groups[0]["lr"] = value
    F.cross_entropy(m(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match="param group 0: lr must be"):
        opt.second_step()
    opt.restore()
    opt.param_groups[0]["lr"] = 0.1
    _assert_state(_state(m, opt), before)


@pytest.mark.parametrize("name,bad", [("p", 1.0), ("p", "2"), ("swp_keep", 0.0), ("gsam_alpha", float("nan")),
                                      ("fsam_lambda", 2.0), ("fsam_sigma", -1.0), ("seed", -1), ("seed", 1.5)])
def test_4_options_set_after_construction_are_checked(name, bad):
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, fsam_sigma=0.5)
    old = getattr(opt, name)
    with pytest.raises(ValueError, match=name):
        setattr(opt, name, bad)
    assert getattr(opt, name) == old


def test_4_options_cannot_change_inside_a_step_and_a_change_takes_effect():
    m = _model()
    ref_m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, backend="foreach")
    ref = fastsam.SAM(ref_m.parameters(), torch.optim.SGD, lr=0.1, gsam_alpha=0.3, backend="foreach")
    x, y = _data()
    F.cross_entropy(m(x), y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="gsam_alpha cannot change while a SAM step is open"):
        opt.gsam_alpha = 0.3
    opt.restore()  # (puts back the gradients too)
    opt.zero_grad()
    opt.gsam_alpha = 0.3  # between steps: the next step is a GSAM step
    _iteration(m, opt, x, y)
    _iteration(ref_m, ref, x, y)
    for a, b in zip(m.parameters(), ref_m.parameters()):
        assert _same(a, b)


@pytest.mark.parametrize("make,match", [
    (lambda: torch.nn.Parameter(torch.randn(3, dtype=torch.complex64)), "complex64"),
    (lambda: torch.zeros(3, dtype=torch.int32), "int32"),
    (lambda: torch.nn.Parameter(torch.empty(3, device="meta")), "meta device"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_4_complex_integer_and_meta_parameters_are_rejected(make, match, backend):
    with pytest.raises(ValueError, match=match):
        fastsam.SAM([make()], torch.optim.SGD, lr=0.1, backend=backend)


def test_2_a_refused_param_group_changes_nothing():
    p = torch.nn.Parameter(torch.randn(4))
    opt = fastsam.SAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="share memory with a parameter already in the optimizer"):
        opt.add_param_group({"params": [torch.nn.Parameter(p.data[1:3])]})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1
    p.grad = torch.randn(4)
    opt.first_step()
    opt.second_step()


def test_2_self_overlapping_parameters_are_rejected():
    with pytest.raises(ValueError, match="share one memory location"):
        fastsam.SAM([torch.nn.Parameter(torch.randn(3, 1).expand(3, 4))], torch.optim.SGD, lr=0.1)


# ============================================================================== 5. checkpoints
def _trained(backend="foreach", **kw):
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.AdamW, lr=1e-2, fsam_sigma=0.5, swp_keep=0.5, seed=3,
                      backend=backend, **kw)
    x, y = _data()
    for _ in range(2):
        _iteration(m, opt, x, y)
    return m, opt


@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd.pop("sam"), "keys 'base_optimizer' and 'sam'"),
    (lambda sd: sd["sam"].pop("step"), "no 'step' entry"),
    (lambda sd: sd["sam"].__setitem__("step", -1), "step.*must be an int >= 0"),
    (lambda sd: sd["base_optimizer"]["param_groups"][0]["params"].pop(), "has 3 parameters, this optimizer's 4"),
    (lambda sd: sd["base_optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(2, 2)),
     r"'exp_avg' of parameter 0 has shape \(2, 2\)"),
    (lambda sd: sd["sam"]["state"][1].__setitem__("fsam_ema", torch.zeros(5)), "F-SAM EMA of parameter 1"),
    (lambda sd: sd["sam"]["state"].__setitem__(9, sd["sam"]["state"][0]), "parameter index 9"),
    (lambda sd: sd["sam"]["options"].__setitem__("p", 3.0), r"other SAM options \(p: saved 3.0"),
    (lambda sd: (sd["sam"]["options"].__setitem__("seed", 4), sd["sam"].__setitem__("seed", 4)), "seed: saved 4"),
    (lambda sd: sd["base_optimizer"]["param_groups"][0].__setitem__("rho", float("nan")), "param group 0.*rho"),
    (lambda sd: sd["base_optimizer"]["state"][0].pop("exp_avg"), r"lacks \['exp_avg'\]"),
    (lambda sd: sd["base_optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(())), "has shape ()"),
    (lambda sd: sd["base_optimizer"]["state"][0].__setitem__("exp_avg", "zeros"), "must be a tensor of shape"),
    (lambda sd: sd["base_optimizer"]["state"][0].__setitem__("step", "2"), "'step' of parameter 0 must be"),
    (lambda sd: sd["base_optimizer"]["param_groups"][0].__setitem__("lr", "0.1"), "lr must be a finite number"),
    (lambda sd: sd["base_optimizer"]["param_groups"][0].__setitem__("lr", float("nan")), "lr must be a finite"),
    (lambda sd: sd["base_optimizer"]["param_groups"][0].__setitem__("betas", (0.9,)), "betas must be a pair"),
    (lambda sd: sd["sam"].__setitem__("seed", 7), r"inconsistent: seed 7, options\['seed'\] 3"),
    (lambda sd: sd["sam"].__setitem__("options", {}), r"options'\] lacks"),
    (lambda sd: sd["sam"].__setitem__("options", [1]), "must be a dict of the SAM options"),
    (lambda sd: sd["sam"]["state"][0].__setitem__("fsam_ready", torch.tensor(1j)), "real one-element tensor"),
])
def test_5_bad_checkpoints_change_nothing(corrupt, match):
    m, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    other_m, other = _trained()
    for _ in range(1):  # diverge a little, so that a partial load would show
        _iteration(other_m, other, *_data(7))
    before = _state(other_m, other)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(sd)
    _assert_state(_state(other_m, other), before)


def test_5_a_load_the_base_optimizer_refuses_changes_nothing(monkeypatch):
    """What no generic check sees, the base optimizer's own load refuses half-way (torch replaces
    its state, then fails in __setstate__): its previous state and groups are put back."""
    m, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    other_m, other = _trained()
    _iteration(other_m, other, *_data(7))
    before = _state(other_m, other)
    real = torch.optim.AdamW.__setstate__

    def half_way(self, state):
        real(self, state)
        raise RuntimeError("refused after replacing the state")

    monkeypatch.setattr(torch.optim.AdamW, "__setstate__", half_way)
    with pytest.raises(ValueError, match="refused by AdamW.load_state_dict.*unchanged"):
        other.load_state_dict(sd)
    monkeypatch.undo()
    _assert_state(_state(other_m, other), before)
    _iteration(other_m, other, *_data())  # and it still trains


def test_5_other_options_with_strict_false_and_plain_torch_state():
    m, opt = _trained()
    sd = opt.state_dict()
    m2 = _model()
    other = fastsam.SAM(m2.parameters(), torch.optim.AdamW, lr=1e-2, fsam_sigma=0.5, swp_keep=0.9, seed=3)
    with pytest.warns(UserWarning, match="swp_keep: saved 0.5, this optimizer 0.9"):
        other.load_state_dict(sd, strict=False)
    assert other.swp_keep == 0.9 and other.step_count == 2
    plain = torch.optim.AdamW(_model().parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="plain torch optimizer state dict.*strict=False"):
        other.load_state_dict(plain.state_dict())
    other.load_state_dict(plain.state_dict(), strict=False)
    assert other.step_count == 0 and other.param_groups[0]["rho"] == 0.05
    assert other.param_groups is other.base_optimizer.param_groups
    _iteration(m2, other, *_data())  # groups keep rho / adaptive / eta: the step runs


def test_5_state_dict_and_copies_refuse_an_open_step():
    m, opt = _trained()
    x, y = _data()
    F.cross_entropy(m(x), y).backward()
    opt.first_step()
    for call in (opt.state_dict, lambda: copy.deepcopy(opt), lambda: pickle.dumps(opt)):
        with pytest.raises(RuntimeError, match="step is open.*restore"):
            call()
    opt.restore()
    opt.state_dict()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_5_copies_with_an_lr_scheduler_attached_step_themselves(how):
    """An LR scheduler wraps the optimizer's step on the instance; a copy must not carry that
    wrapper (it would step the original) and must pickle."""
    m, opt = _trained()
    torch.optim.lr_scheduler.StepLR(opt, 1)
    pair = copy.deepcopy((m, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((m, opt)))
    m2, opt2 = pair
    x, y = _data()
    n0 = opt.step_count

    def closure():
        opt2.zero_grad()
        loss = F.cross_entropy(m2(x), y)
        loss.backward()
        return loss

    w = m2[0].weight.detach().clone()
    opt2.step(closure)
    assert opt.step_count == n0 and opt2.step_count == n0 + 1 and not torch.equal(w, m2[0].weight)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_5_copies_are_complete_working_optimizers(how):
    m, opt = _trained(gsam_alpha=0.2)
    fastsam.sam_step(m, opt, *_data(8), F.cross_entropy, update=False)  # pending partial sums too
    if how == "deepcopy":
        m2, opt2 = copy.deepcopy((m, opt))
    else:
        buf = io.BytesIO()
        if how == "pickle":
            pickle.dump((m, opt), buf)
            buf.seek(0)
            m2, opt2 = pickle.load(buf)
        else:
            torch.save((m, opt), buf)
            buf.seek(0)
            m2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.base_optimizer is not opt.base_optimizer and opt2.param_groups is opt2.base_optimizer.param_groups
    assert (opt2.seed, opt2.step_count, opt2.swp_keep, opt2.fsam_sigma) == (3, 2, 0.5, 0.5)
    for mm, oo in ((m, opt), (m2, opt2)):
        fastsam.sam_step(mm, oo, *_data(9), F.cross_entropy)
        _iteration(mm, oo, *_data())
    _assert_state(_state(m, opt), _state(m2, opt2))


# ============================================================================== 6. smaller ones
def test_6_skipped_perturbation_keeps_negative_zero_weights():
    """foreach turned -0.0 weights into +0.0 during a skipped perturbation."""
    for backend in BACKENDS:
        w = torch.nn.Parameter(torch.tensor([-0.0, 0.0, -1.5, 2.0]))
        opt = fastsam.SAM([w], torch.optim.SGD, lr=0.1, backend=backend)
        w.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
        before = w.detach().clone()
        opt.first_step()
        assert _same(w.detach(), before), backend


def test_6_repeated_accumulation_keeps_bounded_state():
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _data()
    for i in range(30):
        fastsam.sam_step(m, opt, x, y, F.cross_entropy, update=False, micro_batch=4, scaler=scaler)
        acc = opt._fastsam_accum
        assert set(acc) == {"ref", "samples", "bad", "key"} and acc["bad"].dim() == 0
        assert len(scaler._per_optimizer_states) == 1, i  # one merged key, not one per pass
    r = fastsam.sam_step(m, opt, x, y, F.cross_entropy, update=True, scaler=scaler)
    assert r.updated and not hasattr(opt, "_fastsam_accum")


def test_6_losses_at_infinite_logits_and_tiny_mu():
    z = torch.randn(3, 7)
    z[0, 2] = -math.inf
    t = torch.tensor([1, 2, 3])
    for sigmoid in (False, True):
        v = fastsam.losses.obf_loss(z, t, sigmoid=sigmoid, reduction="none", backend="reference")
        assert v[0] == -math.inf and torch.isfinite(v[1:]).all()
        if "triton" in BACKENDS:
            vt = fastsam.losses.obf_loss(z, t, sigmoid=sigmoid, reduction="none", backend="triton")
            assert vt[0] == -math.inf
            torch.testing.assert_close(vt[1:], v[1:])
    with pytest.raises(ValueError, match="mu: must be >= 0.001 for torch.float32 logits"):
        fastsam.losses.bisam_loss(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), mu=1e-6)
    fastsam.losses.bisam_loss(torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3]), mu=1e-6,
                              backend="reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_3_final_finiteness_check_per_element(dtype):
    """sam_step's final check (fastsam._grads.nonfinite): exactly "some element is NaN or +-inf",
    for huge finite values too (fp32 1e38, float64 1e308: a sum of squares would overflow) and
    with empty tensors in the list, wherever the bad element sits."""
    from fastsam import _grads

    big = torch.finfo(dtype).max / 2
    g = torch.Generator().manual_seed(4)
    for bad in (float("nan"), float("inf"), float("-inf"), None):
        for where in range(4):  # small tensors (one foreach call) and a large one (its own aminmax)
            gs = [(torch.randn(n, generator=g, dtype=torch.float64) * big).clamp(-big, big).to(dtype)
                  for n in (7, 0, 1000, 20000)]
            if bad is not None:
                t = gs[(0, 2, 3, 3)[where]]
                t.view(-1)[(0, 999, 0, 19999)[where]] = bad
            assert bool(_grads.nonfinite(gs)) == (bad is not None), (bad, where)
