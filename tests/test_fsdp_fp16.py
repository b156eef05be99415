"""fp16 AMP with a grad scaler under FSDP2 (issue #15, deliverable 2): gloo on CPU, 2 ranks (loopback).

``sam_step(..., scaler=..., amp_dtype=torch.float16)`` on DTensor parameters. Both scalers torch
offers for sharded gradients are run: ``torch.amp.GradScaler("cpu")`` (since torch 2.5 DTensor
dispatches ``_amp_foreach_non_finite_check_and_unscale_`` on the local shards and max-reduces
``found_inf`` over the mesh, torch/distributed/tensor/_dispatch.py ``found_inf_reduce_handler``) and
FSDP's ``ShardedGradScaler`` (the same, plus its own all-reduce of ``found_inf``). Each is compared
with one process on the global batch with a ``torch.amp.GradScaler("cpu")`` of the same settings:

- the scale backs off from a too large initial scale (natural fp16 overflow in the backward: those
  steps skip), grows after ``growth_interval`` good steps, and backs off again at an injected overflow
  that only rank 0's gradient shard sees: the loss of rank 1 (only) has an infinite slope along a
  one-element parameter whose shard lives on rank 0 (rank 1's shard of it is empty); its own shards
  stay finite, so rank 1 skips only because the overflow flag is reduced over the shard group;
- skipped steps, scale and growth tracker equal the single process after every step, on every rank;
- a skipped step leaves every weight bit for bit unchanged; the weights of the updating steps equal
  the single process within fp16 rounding (the sharded forward / backward sums run over other rows).
"""

from __future__ import annotations

import _harness
import pytest
import torch
import torch.distributed as dist

import fastsam

STEPS = 6
BATCH = 12
INJECT = 4  # the step whose rank-1 loss has an infinite slope along ``probe``
#: init_scale 2^28 overflows fp16 in the backward (steps 0, 1: 2^28 -> 2^20 -> 2^12), then two good
#: steps grow it to 2^13, the injected overflow backs it off to 2^5
SCALER = dict(init_scale=2.0**28, backoff_factor=2.0**-8, growth_factor=2.0, growth_interval=2)
SKIPS = [True, True, False, False, True, False]
TOL = 5e-3  # fp16 (10-bit mantissa) rounding, relative to the largest weight of the parameter (measured 5.1e-4)


class _Net(torch.nn.Module):
    """Uneven shards over 2 ranks (7 rows: 4 / 3; 1 row: 1 / 0) and ``probe``, a one-element parameter
    (rank 0 holds it, rank 1 an empty shard) that the model returns as it is: a loss can put an
    overflow into its gradient alone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4),
                                       torch.nn.Tanh(), torch.nn.Linear(4, 1))
        self.probe = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), self.probe


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 5, generator=g), torch.randn(STEPS, BATCH, 1, generator=g)


def _loss(slope: float):
    """MSE of the prediction plus ``slope * probe`` (0: the plain MSE; inf: the probe's gradient
    alone is infinite, every other gradient is the MSE's)."""
    def fn(out, y, reduction="mean"):
        return torch.nn.functional.mse_loss(out[0], y, reduction=reduction) + slope * out[1].sum()
    return fn


def _steps(model: torch.nn.Module, opt: fastsam.SAM, scaler, rows: slice, inject: bool, full) -> list[dict]:
    """STEPS fp16 sam_steps on ``rows`` of each batch; after each: skipped, the scaler's state and
    the full weights (and whether a skipped step kept them bit for bit)."""
    x, y = _data()
    out = []
    for s in range(STEPS):
        before = [full(p).detach().clone() for p in model.parameters()]
        slope = float("inf") if s == INJECT and inject else 0.0
        r = fastsam.sam_step(model, opt, x[s][rows], y[s][rows], _loss(slope), scaler=scaler,
                             amp_dtype=torch.float16)
        after = [full(p).detach().clone() for p in model.parameters()]
        out.append({"skipped": r.skipped, "updated": r.updated, "scale": float(scaler._scale),
                    "tracker": int(scaler._growth_tracker), "weights": after,
                    "kept": all(torch.equal(a, b) for a, b in zip(before, after))})
    return out


def _optimizer(model: torch.nn.Module) -> fastsam.SAM:
    # F-SAM: its EMA is updated by every first step (a skipped step must undo it too)
    return fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, fsam_sigma=0.5)


def _unreduced_flags(rank: int, sharded: bool = True) -> dict:
    """The skip decision's write-back on its own: a GradScaler whose overflow flags differ by rank
    (rank 0's gradient is infinite; plain tensors, so no DTensor reduction in the unscale, as with a
    torch < 2.5 or a scaler that reduces nothing). The sharded skip decision must skip on both ranks
    and leave both flags set, so update() backs the scale off alike on both ranks."""
    from types import SimpleNamespace

    from fastsam import _amp
    from fastsam.train import _decide_skip

    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))  # creates the scale tensor
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([float("inf") if rank == 0 else 1.0, 1.0])
    key = _amp.unscale(scaler, [{"params": [w]}])
    local = float(sum(_amp.found_inf(scaler, [key])))
    plan = SimpleNamespace(sharded=sharded, ddp=not sharded, group=None)  # the fields _decide_skip reads
    skipped = _decide_skip(plan, torch.zeros((), dtype=torch.bool), scaler, [key])
    scaler.update()
    return {"local": local, "skipped": skipped, "scale": float(scaler._scale)}


def _worker(rank: int, world: int, init: str, out_path: str) -> None:
    with _harness.gloo_rank(rank, world, init, out_path) as result:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        from torch.distributed.tensor import DTensor

        def full(p):
            return p.full_tensor() if isinstance(p, DTensor) else p

        per = BATCH // world
        rows = slice(rank * per, (rank + 1) * per)
        mine: dict = {}
        for kind in ("amp", "sharded"):
            model = _Net()
            for m in model.net:
                if isinstance(m, torch.nn.Linear):
                    fully_shard(m)
            fully_shard(model)
            opt = _optimizer(model)
            group = opt._sharding.group
            scaler = (torch.amp.GradScaler("cpu", **SCALER) if kind == "amp"
                      else ShardedGradScaler("cpu", process_group=group, **SCALER))
            mine[kind] = _steps(model, opt, scaler, rows, rank == 1, full)
            mine[kind + " probe rows"] = model.probe.to_local().numel()
            del model, opt
        mine["unreduced"] = _unreduced_flags(rank)
        mine["unreduced ddp"] = _unreduced_flags(rank, sharded=False)
        got: list = [None] * world
        dist.all_gather_object(got, mine)
        result["ranks"] = got


def _spawn(world: int) -> dict:
    return _harness.spawn_ranks(_worker, world)


_RESULTS: dict = {}


def _results() -> dict:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    if not _RESULTS:
        _RESULTS.update(_spawn(2))
    return _RESULTS


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind", ["amp", "sharded"])
def test_fp16_scaler_fsdp2_equals_single_process(kind):
    """torch.amp.GradScaler("cpu") / ShardedGradScaler on FSDP2 (2 ranks) == one process on the
    global batch with a GradScaler: same skipped steps, scale and growth tracker after every step on
    both ranks, weights kept bit for bit on a skipped step and within fp16 rounding otherwise."""
    ranks = _results()["ranks"]
    model = _Net()
    opt = _optimizer(model)
    ref = _steps(model, opt, torch.amp.GradScaler("cpu", **SCALER), slice(0, BATCH), True, lambda p: p)
    assert [r["skipped"] for r in ref] == SKIPS, [r["skipped"] for r in ref]
    assert ref[-1]["scale"] == 2.0**5
    # rank 1 holds no element of probe: the injected overflow is in rank 0's shard only
    assert [got[kind + " probe rows"] for got in ranks] == [1, 0]
    worst = 0.0
    for rank, got in enumerate(ranks):
        for s, (g, r) in enumerate(zip(got[kind], ref)):
            where = f"{kind} rank {rank} step {s}"
            assert (g["skipped"], g["updated"]) == (r["skipped"], r["updated"]), where
            assert (g["scale"], g["tracker"]) == (r["scale"], r["tracker"]), (where, g["scale"], r["scale"])
            assert g["kept"] == r["skipped"], where  # a skipped step moves nothing, an update moves weights
            for i, (a, b) in enumerate(zip(g["weights"], r["weights"])):
                if b.abs().max() > 0:
                    worst = max(worst, _close(a, b))
                    assert _close(a, b) <= TOL, f"{where} param {i}: {_close(a, b):.3g}"
                else:  # probe: its gradient is 0 but at the injected (skipped) step
                    assert torch.equal(a, b), where
    print(kind, f"worst relative weight error {worst:.2e}")
    # the steps moved the weights (a step that did nothing would also "match")
    w0 = [p.detach() for p in _Net().parameters()]
    assert all(_close(a, b) > 1e-2 for a, b in zip(ranks[0][kind][-1]["weights"][1:], w0[1:]))


def test_sharded_skip_decision_reduces_the_scaler_flags():
    """Overflow flags that differ by rank (here rank 0 only) are reduced by sam_step's one skip
    collective and written back: both ranks skip and back the scale off (8 -> 4)."""
    for kind in ("unreduced", "unreduced ddp"):  # FSDP2, and DDP with passes under no_sync
        got = [r[kind] for r in _results()["ranks"]]
        assert [g["local"] > 0 for g in got] == [True, False], (kind, got)  # the flags did differ
        assert all(g["skipped"] and g["scale"] == 4.0 for g in got), (kind, got)
