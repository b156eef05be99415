"""fastsam.ProportionalRho under torch's LR schedulers (issue #14): rho never above max_rho,
never NaN / inf / negative, validated arguments."""

from __future__ import annotations

import math

import pytest
import torch

import fastsam

MAX_RHO, STEPS = 0.05, 60

SCHEDULERS = {
    # OneCycleLR sets initial_lr = max_lr / 25: taken as the reference lr, rho reached 25 x max_rho
    "one_cycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
    "warmup_lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 10)),
    "warmup_overshoot": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 + math.sin(s / 5)),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=10),
    "warm_restarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=15),
}


def _sam(lr: float = 0.1) -> fastsam.SAM:
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    return fastsam.SAM([{"params": [m.weight]}, {"params": [m.bias], "rho": 0.0}], torch.optim.SGD,
                       rho=MAX_RHO, lr=lr, momentum=0.9)


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_rho_never_exceeds_max_rho(name):
    opt = _sam()
    sched = SCHEDULERS[name](opt)
    rho_sched = fastsam.ProportionalRho(opt)
    rhos, lrs = [], []
    for _ in range(STEPS - 1):
        rho, lsam = rho_sched.step()
        assert lsam == 0.0  # the rho = 0 group (LSAM) stays unperturbed
        rhos.append(rho)
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert all(0.0 <= r <= MAX_RHO and math.isfinite(r) for r in rhos), max(rhos)
    if name == "one_cycle":  # proportional over the whole cycle, max_rho at the peak lr
        assert rhos == pytest.approx([MAX_RHO * lr / 0.1 for lr in lrs], rel=1e-9)
        assert max(rhos) == pytest.approx(MAX_RHO, rel=1e-3)
    if name in ("warmup_overshoot", "cyclic"):  # lr above the reference: held at max_rho
        assert max(rhos) == MAX_RHO


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_initial_rho_survives_a_checkpoint():
    """The configured rho is kept in the group as "initial_rho": a schedule rebuilt after a
    checkpoint load (where rho had decayed) still tops out at the configured value."""
    opt = _sam()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    rho_sched = fastsam.ProportionalRho(opt)
    for _ in range(6):
        sched.step()
        rho_sched.step()
    assert opt.param_groups[0]["rho"] < MAX_RHO / 2
    state = opt.state_dict()
    fresh = _sam(lr=0.1)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["initial_rho"] == MAX_RHO
    rebuilt = fastsam.ProportionalRho(fresh, max_lr=0.1)
    fresh.param_groups[0]["lr"] = 0.1
    assert rebuilt.step()[0] == pytest.approx(MAX_RHO)


@pytest.mark.parametrize("arg", ["max_rho", "min_rho", "max_lr", "min_lr"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.01, True, "0.1"])
def test_invalid_arguments_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=arg):
        fastsam.ProportionalRho(_sam(), **{arg: value})


def test_inconsistent_bounds():
    with pytest.raises(ValueError, match="max_lr"):
        fastsam.ProportionalRho(_sam(), max_lr=0.01, min_lr=0.05)
    with pytest.raises(ValueError, match="max_lr"):
        fastsam.ProportionalRho(_sam(), max_lr=0.0)
    with pytest.raises(ValueError, match="min_rho"):
        fastsam.ProportionalRho(_sam(), max_rho=0.05, min_rho=0.1)
    opt = _sam()
    opt.param_groups[0]["lr"] = 0.0  # lr = 0 at construction: no reference lr to derive from
    with pytest.raises(ValueError, match="max_lr"):
        fastsam.ProportionalRho(opt)


def test_never_writes_nan_inf_or_negative_rho():
    opt = _sam()
    rho_sched = fastsam.ProportionalRho(opt, min_rho=0.01, min_lr=0.02)
    for lr, want in [(math.inf, MAX_RHO), (1e300, MAX_RHO), (-math.inf, 0.0), (-1.0, 0.0), (0.0, 0.0),
                     (0.02, 0.01), (0.1, MAX_RHO)]:
        opt.param_groups[0]["lr"] = lr
        assert rho_sched.step()[0] == pytest.approx(want)
    opt.param_groups[0]["lr"] = math.nan
    with pytest.raises(ValueError, match="lr=nan"):
        rho_sched.step()
    assert opt.param_groups[0]["rho"] == MAX_RHO  # unchanged by the failed call
    opt.param_groups[0]["lr"] = 0.1
    flat = fastsam.ProportionalRho(opt, max_rho=0.03, min_rho=0.03)  # constant rho, even at lr = inf
    opt.param_groups[0]["lr"] = math.inf
    assert flat.step()[0] == 0.03
    with pytest.raises(ValueError, match="max_rho"):
        flat.load_state_dict({"min_rho": 0.0, "min_lr": 0.0, "bounds": [(0.1, math.nan), (0.1, 0.0)]})
