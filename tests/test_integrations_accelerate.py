"""fastsam.sam_step with accelerate's prepared optimizer (issue #14), on the real library."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsam

accelerate = pytest.importorskip("accelerate", reason="the [dev] extra installs accelerate")


def _net(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _sam(model: torch.nn.Module) -> fastsam.SAM:
    return fastsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, fsam_sigma=0.5)


def _batches(n: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_prepared_optimizer_equals_the_raw_one(accumulate):
    """accelerator.prepare(model, sam, sched) and sam_step inside accelerator.accumulate: only the
    batch that syncs gradients steps (the others accumulate, as sam_step(update=False)), the
    prepared scheduler steps with it, and the SAM object inside keeps the state."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    net = _net()
    sam = _sam(net)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    model, opt, psched = accelerator.prepare(net, sam, sched)
    assert type(opt).__name__ == "AcceleratedOptimizer"

    ref = _net()
    ref_opt = _sam(ref)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    updates = 0
    for i, (x, y) in enumerate(_batches(6)):
        with accelerator.accumulate(model):
            res = fastsam.sam_step(model, opt, x, y, F.cross_entropy)
            psched.step()
        last = (i + 1) % accumulate == 0
        assert res.updated == last and not opt.step_was_skipped
        ref_res = fastsam.sam_step(ref, ref_opt, x, y, F.cross_entropy, update=last)
        assert ref_res.loss == res.loss
        if last:
            ref_sched.step()
            updates += 1
    assert _same(net, ref)
    assert sam.state_dict()["sam"]["step"] == ref_opt.state_dict()["sam"]["step"] > 0
    assert sam.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**updates)
    accelerator.free_memory()


def test_skipped_step_is_reported_to_the_prepared_scheduler():
    """A non-finite gradient skips the SAM step: step_was_skipped is set, so accelerate's
    scheduler does not step either."""
    accelerator = accelerate.Accelerator(cpu=True)
    net = _net()
    sam = _sam(net)
    model, opt, psched = accelerator.prepare(net, sam, torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5))
    before = [p.detach().clone() for p in net.parameters()]
    x, y = _batches(1)[0]
    res = fastsam.sam_step(model, opt, torch.full_like(x, float("nan")), y, F.cross_entropy)
    psched.step()
    assert res.skipped and opt.step_was_skipped
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert sam.param_groups[0]["lr"] == 1e-2
    res = fastsam.sam_step(model, opt, x, y, F.cross_entropy)
    psched.step()
    assert not res.skipped and not opt.step_was_skipped and sam.param_groups[0]["lr"] == 5e-3
    accelerator.free_memory()


def test_non_sam_prepared_optimizer_says_how_to_build_one():
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(_net(), torch.optim.AdamW(_net().parameters(), lr=1e-3))
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match=r"got AcceleratedOptimizer wrapping AdamW: build "
                                         r"fastsam\.SAM\(model\.parameters\(\), torch\.optim\.AdamW"):
        fastsam.sam_step(model, opt, x, y, F.cross_entropy)
    with pytest.raises(ValueError, match=r"got AdamW: build fastsam\.SAM"):
        fastsam.sam_step(model, torch.optim.AdamW(_net().parameters()), x, y, F.cross_entropy)
    accelerator.free_memory()
