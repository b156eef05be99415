"""fastsam.SAM as a torch optimizer: validation, state machine, exact restore, checkpoints,
exception safety, davda54/sam compatibility, LR schedulers."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import fastsam

BACKENDS = ["reference", "foreach"]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _sam_iteration(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rho=-0.1), "rho"),
        (dict(rho=math.nan), "rho"),
        (dict(p=1.0), r"p must be a float in \(1, inf\]"),
        (dict(p=0.5), r"p must be a float in \(1, inf\]"),
        (dict(swp_keep=0.0), "swp_keep"),
        (dict(swp_keep=1.2), "swp_keep"),
        (dict(fsam_lambda=1.0), "fsam_lambda"),
        (dict(fsam_lambda=-0.1), "fsam_lambda"),
        (dict(fsam_sigma=-1.0), "fsam_sigma"),
        (dict(gsam_alpha=-0.1), "gsam_alpha"),
        (dict(eta=-0.01), "eta"),
        (dict(adaptive="yes"), "adaptive"),
        (dict(seed=-1), "seed"),
        (dict(backend="cuda_fast"), "backend must be one of"),
    ],
)
def test_bad_options_raise_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastsam.SAM(_model().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_per_group_options():
    m = _model()
    with pytest.raises(ValueError, match="rho"):
        fastsam.SAM([{"params": m[0].parameters(), "rho": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="eta"):
        fastsam.SAM([{"params": m[0].parameters(), "eta": -1.0}], torch.optim.SGD, lr=0.1)


def test_parameter_in_two_groups():
    m = _model()
    with pytest.raises(ValueError, match="more than one parameter group"):
        fastsam.SAM([{"params": m.parameters()}, {"params": m[0].parameters()}], torch.optim.SGD, lr=0.1)
    opt = fastsam.SAM(m[0].parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": m[0].weight})


def test_unavailable_backend_is_an_error_not_a_fallback():
    avail = fastsam.functional.available_backends()
    for name in ("triton", "cuda", "cpp"):
        if name not in avail:
            with pytest.raises(ValueError, match="not available"):
                fastsam.SAM(_model().parameters(), torch.optim.SGD, lr=0.1, backend=name)


def test_base_optimizer_must_be_an_optimizer():
    with pytest.raises(ValueError, match="base_optimizer"):
        fastsam.SAM(_model().parameters(), "sgd", lr=0.1)
    m = _model()
    with pytest.raises(ValueError, match="base_kwargs"):
        fastsam.SAM(m.parameters(), torch.optim.SGD(m.parameters(), lr=0.1), lr=0.2)


def test_sparse_gradients_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = fastsam.SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.first_step()
    assert not opt.is_perturbed


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_machine_errors(backend):
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    x, y = _batch()
    with pytest.raises(RuntimeError, match="without a matching first_step"):
        opt.second_step()
    F.cross_entropy(m(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.base_step()
    with pytest.raises(ValueError, match="closure"):
        opt.step()


# ----------------------------------------------------------------------------- exact restore
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [{}, dict(adaptive=True, eta=0.1, fsam_sigma=1.0, gsam_alpha=0.3, swp_keep=0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_restore_is_bit_exact_and_storage_is_kept(backend, opts, dtype):
    m = _model().to(dtype)
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.0, rho=0.5, backend=backend, **opts)
    ptrs = [p.data_ptr() for p in m.parameters()]
    for i in range(3):
        x, y = _batch(seed=i)  # fresh data: with lr = 0 and one batch, F-SAM's g - m would be 0
        before = [p.detach().clone() for p in m.parameters()]
        F.cross_entropy(m(x.to(dtype)), y).backward()
        opt.first_step(zero_grad=True)
        assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))  # perturbed
        F.cross_entropy(m(x.to(dtype)), y).backward()
        opt.second_step(zero_grad=True)
        for a, p in zip(before, m.parameters()):
            assert torch.equal(a, p), "weights must be bit-identical after second_step with lr=0"
        assert [p.data_ptr() for p in m.parameters()] == ptrs


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_without_base_step(backend):
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    before = copy.deepcopy(m.state_dict())
    x, y = _batch()
    F.cross_entropy(m(x), y).backward()
    opt.first_step(zero_grad=True)
    opt.restore()
    assert not opt.is_perturbed
    opt.restore()  # idempotent
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    assert not opt.base_optimizer.state  # no base step happened


# ----------------------------------------------------------------------------- exceptions
@pytest.mark.parametrize("backend", BACKENDS)
def test_context_manager_restores_on_exception(backend):
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    x, y = _batch()
    before = copy.deepcopy(m.state_dict())
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(KeyError):
        with opt.perturbed():
            assert opt.is_perturbed
            raise KeyError("boom in the perturbed pass")
    assert not opt.is_perturbed
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    _sam_iteration(m, opt, x, y)  # ready for the next step
    assert any(not torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_manager_equals_explicit_steps(backend):
    x, y = _batch()
    m1, m2 = _model(), _model()
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    for _ in range(3):
        _sam_iteration(m1, o1, x, y)
        F.cross_entropy(m2(x), y).backward()
        with o2.perturbed():
            F.cross_entropy(m2(x), y).backward()
        o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_step_closure_exception_restores():
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    x, y = _batch()
    before = copy.deepcopy(m.state_dict())
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second pass failed")
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="second pass failed"):
        opt.step(closure)
    assert not opt.is_perturbed
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


# ----------------------------------------------------------------------------- davda54 usage
def test_davda54_closure_usage_and_design_closure_usage_agree():
    """davda54/sam README: loss.backward(); opt.step(closure); opt.zero_grad(). DESIGN: closure
    does the first pass too. Both equal the explicit first_step / second_step loop."""
    x, y = _batch()
    ms = [_model() for _ in range(3)]
    opts = [fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9) for m in ms]

    for _ in range(4):
        _sam_iteration(ms[0], opts[0], x, y)

        def closure1():  # davda54 style: closure does not zero the gradient
            loss = F.cross_entropy(ms[1](x), y)
            loss.backward()
            return loss

        loss = F.cross_entropy(ms[1](x), y)
        loss.backward()
        opts[1].step(closure1)
        opts[1].zero_grad()

        def closure2():  # torch closure convention: zero, forward, backward
            opts[2].zero_grad()
            loss = F.cross_entropy(ms[2](x), y)
            loss.backward()
            return loss

        out = opts[2].step(closure2)
        assert torch.is_tensor(out)

    for a, b, c in zip(*(m.parameters() for m in ms)):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_davda54_constructor_keywords():
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, rho=2.0, adaptive=True, lr=0.1, momentum=0.9)
    assert opt.param_groups[0]["rho"] == 2.0 and opt.param_groups[0]["adaptive"] is True
    assert opt.base_optimizer.param_groups is opt.param_groups
    assert opt.param_groups[0]["momentum"] == 0.9


def test_base_optimizer_instance():
    x, y = _batch()
    m1, m2 = _model(), _model()
    o1 = fastsam.SAM(m1.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1, rho=0.1)
    base = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.1)
    o2 = fastsam.SAM(m2.parameters(), base, rho=0.1)
    o3_model = _model()
    o3 = fastsam.SAM(None, torch.optim.AdamW(o3_model.parameters(), lr=1e-2, weight_decay=0.1), rho=0.1)
    assert o2.base_optimizer is base and o2.param_groups is base.param_groups
    for _ in range(3):
        _sam_iteration(m1, o1, x, y)
        _sam_iteration(m2, o2, x, y)
        _sam_iteration(o3_model, o3, x, y)
    for a, b, c in zip(m1.parameters(), m2.parameters(), o3_model.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="exactly the parameters"):
        fastsam.SAM(_model().parameters(), torch.optim.SGD(m1.parameters(), lr=0.1))


def test_add_param_group_reaches_base_optimizer():
    m = _model()
    opt = fastsam.SAM(m[0].parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.07)
    opt.add_param_group({"params": m[2].parameters(), "rho": 0.0})
    assert len(opt.base_optimizer.param_groups) == 2
    g = opt.param_groups[1]
    assert g["rho"] == 0.0 and g["momentum"] == 0.9 and g["adaptive"] is False and g["lr"] == 0.1
    x, y = _batch()
    _sam_iteration(m, opt, x, y)


# ----------------------------------------------------------------------------- schedulers
def test_lr_scheduler_drives_base_and_no_order_warning(recwarn):
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _batch()
    _sam_iteration(m, opt, x, y)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_proportional_rho():
    m = _model()
    opt = fastsam.SAM([{"params": m[0].parameters(), "rho": 0.0}, {"params": m[2].parameters()}],
                      torch.optim.SGD, lr=0.2, rho=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / 4)
    rho_sched = fastsam.ProportionalRho(opt, min_rho=0.0)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[1]["rho"])
        assert opt.param_groups[0]["rho"] == 0.0  # LSAM group stays unperturbed
        sched.step()
        rho_sched.step()
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0])
    # clamped at 0 when lr drops below min_lr
    r = fastsam.ProportionalRho(opt, max_rho=0.1, min_lr=0.05, max_lr=0.2)
    assert r.step()[1] == 0.0
    with pytest.raises(ValueError, match="max_lr"):
        fastsam.ProportionalRho(opt, max_lr=0.01, min_lr=0.05)


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_proportional_rho_after_warmup_scheduler():
    """Built after a warmup scheduler lowered lr: max_lr must be the undecayed lr."""
    m = torch.nn.Linear(4, 2)
    opt = fastsam.GSAM(m.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 21 if s < 21 else 1.0)
    rs = fastsam.ProportionalRho(opt)
    seen = []
    for _ in range(30):
        sched.step()
        seen.append(rs.step()[0])
    assert max(seen) == pytest.approx(0.05)
    assert seen[0] == pytest.approx(0.05 * 2 / 21)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_state_dict_resume_is_bit_identical(backend, base):
    kw = dict(lr=0.05, momentum=0.9) if base is torch.optim.SGD else dict(lr=1e-2, weight_decay=0.1)
    opts = dict(fsam_sigma=1.0, swp_keep=0.5, seed=7, adaptive=True, eta=0.01, gsam_alpha=0.2)
    x, y = _batch()

    m = _model()
    opt = fastsam.SAM(m.parameters(), base, backend=backend, **opts, **kw)
    for _ in range(3):
        _sam_iteration(m, opt, x, y)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    sd = opt.state_dict()
    assert "w_old" not in str(sd["sam"]["state"]) and "g_old" not in str(sd["sam"]["state"])
    assert sd["sam"]["step"] == 3
    for _ in range(3):
        _sam_iteration(m, opt, x, y)

    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    m2 = _model(seed=123)
    # a checkpoint carries the options it was saved with: another seed is an error, strict=False keeps ours
    other = fastsam.SAM(m2.parameters(), base, backend=backend, **{**opts, "seed": 0}, **kw)
    with pytest.raises(ValueError, match="seed: saved 7, this optimizer 0"):
        other.load_state_dict(ck["opt"])
    with pytest.warns(UserWarning, match="keeping this optimizer's options and seed"):
        other.load_state_dict(ck["opt"], strict=False)
    assert other.seed == 0 and other.step_count == 3
    opt2 = fastsam.SAM(m2.parameters(), base, backend=backend, **opts, **kw)
    m2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.seed == 7
    for _ in range(3):
        _sam_iteration(m2, opt2, x, y)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    # the base optimizer's part is a plain torch state dict
    plain = base(m2.parameters(), **kw)
    plain.load_state_dict(ck["opt"]["base_optimizer"])
    with pytest.raises(ValueError, match="fastsam.SAM.state_dict"):
        opt2.load_state_dict(ck["opt"]["base_optimizer"])


# ----------------------------------------------------------------------------- presets
def test_presets_are_sam_with_defaults():
    m = _model()
    assert fastsam.ASAM(m.parameters(), torch.optim.SGD, lr=0.1).param_groups[0]["adaptive"] is True
    assert fastsam.GSAM(m.parameters(), torch.optim.SGD, lr=0.1).gsam_alpha == 0.4
    assert fastsam.ESAM(m.parameters(), torch.optim.SGD, lr=0.1).swp_keep == 0.5
    f = fastsam.FriendlySAM(m.parameters(), torch.optim.SGD, lr=0.1)
    assert (f.fsam_sigma, f.fsam_lambda) == (1.0, 0.9)
    for cls in (fastsam.ASAM, fastsam.GSAM, fastsam.ESAM, fastsam.FriendlySAM):
        assert issubclass(cls, fastsam.SAM)
        opt = cls(m.parameters(), torch.optim.SGD, lr=0.1)
        x, y = _batch()
        _sam_iteration(m, opt, x, y)


# ----------------------------------------------------------------------------- BatchNorm
def test_frozen_running_stats():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    net.train()
    x = torch.randn(32, 4)
    net(x)
    bn = net[1]
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    ref_out = net(x)  # updates stats again
    for k in state:
        state[k] = bn.state_dict()[k].clone()
    with fastsam.frozen_running_stats(net):
        out = net(x)
    assert torch.equal(out, ref_out)  # still normalizes with batch statistics
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k  # running mean/var and num_batches_tracked untouched
    assert bn.track_running_stats
    fastsam.disable_running_stats(net)
    fastsam.disable_running_stats(net)  # nested call keeps the original setting
    fastsam.enable_running_stats(net)
    assert bn.track_running_stats
    with pytest.raises(ZeroDivisionError):
        with fastsam.frozen_running_stats(net):
            raise ZeroDivisionError
    assert bn.track_running_stats
