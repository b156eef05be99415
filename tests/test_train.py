"""fastsam.sam_step against hand-written loops (docs/design.md section 5)."""

from __future__ import annotations

import copy
import gc
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastsam


def _model(bn: bool = True, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 16)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.ReLU(), torch.nn.Linear(16, 4)]
    return torch.nn.Sequential(*layers)


def _data(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_states(a: dict, b: dict, tol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if tol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k].double(), b[k].double(), rtol=tol, atol=tol, msg=k)


def _manual_step(model, opt, x, y, micro=None, ascent=None, clip=None):
    """The reference loop: per micro-batch perturb, second pass with frozen BN, restore + GSAM,
    size-weighted average, clip, base step."""
    ascent = ascent or F.cross_entropy
    B = len(y)
    m = micro or B
    if m >= B and clip is None:  # one micro-batch: second_step (fused restore + update where available)
        ascent(model(x), y, reduction="mean").backward()
        opt.first_step(zero_grad=True)
        with fastsam.frozen_running_stats(model):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        return
    acc = None
    for lo in range(0, B, m):
        xb, yb = x[lo:lo + m], y[lo:lo + m]
        opt.zero_grad()
        ascent(model(xb), yb, reduction="mean").backward()
        opt.first_step(zero_grad=True)
        with fastsam.frozen_running_stats(model):
            F.cross_entropy(model(xb), yb).backward()
        opt.restore(apply_gsam=True)
        g = [p.grad * (len(yb) / B) for p in model.parameters()]
        acc = g if acc is None else [a + b for a, b in zip(acc, g)]
    for p, a in zip(model.parameters(), acc):
        p.grad = a
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
    opt.base_step()
    opt.zero_grad()


@pytest.mark.parametrize("opts", [{}, dict(gsam_alpha=0.3, fsam_sigma=1.0, adaptive=True, eta=0.01)])
def test_plain_step_equals_manual_loop(opts):
    x, y = _data()
    m1, m2 = _model(), _model()
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **opts)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **opts)
    for _ in range(4):
        r = fastsam.sam_step(m1, o1, x, y, F.cross_entropy)
        _manual_step(m2, o2, x, y)
        assert not r.skipped and r.updated and r.n_second_pass == 32
    _assert_states(_state(m1), _state(m2))  # weights and BatchNorm buffers, bit for bit


def test_msam_uneven_micro_batches_with_gsam():
    x, y = _data(32)
    m1, m2 = _model(), _model()
    o1 = fastsam.GSAM(m1.parameters(), torch.optim.SGD, lr=0.1, gsam_alpha=0.2)
    o2 = fastsam.GSAM(m2.parameters(), torch.optim.SGD, lr=0.1, gsam_alpha=0.2)
    for _ in range(3):
        fastsam.sam_step(m1, o1, x, y, F.cross_entropy, micro_batch=12)  # 12, 12, 8
        _manual_step(m2, o2, x, y, micro=12)
    _assert_states(_state(m1), _state(m2), tol=1e-6)


def test_each_micro_batch_gets_its_own_perturbation():
    """m-SAM differs from SAM on the whole batch (otherwise micro_batch would be a no-op)."""
    x, y = _data(32)
    m1, m2 = _model(bn=False), _model(bn=False)
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, lr=0.5, rho=0.5)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, lr=0.5, rho=0.5)
    fastsam.sam_step(m1, o1, x, y, F.cross_entropy, micro_batch=8)
    fastsam.sam_step(m2, o2, x, y, F.cross_entropy)
    assert any(not torch.allclose(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_ascent_loss_is_used_in_the_first_pass_only():
    calls = []

    def ascent(out, tgt, reduction="mean"):
        calls.append(reduction)
        return F.cross_entropy(out, tgt, reduction=reduction, label_smoothing=0.3)

    x, y = _data()
    m1, m2 = _model(), _model()
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, lr=0.1)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, lr=0.1)
    r = fastsam.sam_step(m1, o1, x, y, F.cross_entropy, ascent_loss_fn=ascent)
    _manual_step(m2, o2, x, y, ascent=lambda o, t, reduction="mean": F.cross_entropy(
        o, t, reduction=reduction, label_smoothing=0.3))
    assert calls == ["mean"]
    _assert_states(_state(m1), _state(m2))
    assert r.ascent_loss != pytest.approx(r.loss)


@pytest.mark.parametrize("gamma,B", [(0.5, 32), (0.3, 20), (0.99, 7), (0.01, 10)])
def test_sds_keeps_round_gamma_b_largest_increases(gamma, B):
    x, y = _data(B)
    k = max(1, round(gamma * B))
    bn = k > 1  # BatchNorm cannot train on a single example
    m1, m2 = _model(bn), _model(bn)
    o1 = fastsam.ESAM(m1.parameters(), torch.optim.SGD, lr=0.1, rho=0.3, swp_keep=0.7)
    o2 = fastsam.ESAM(m2.parameters(), torch.optim.SGD, lr=0.1, rho=0.3, swp_keep=0.7)
    r = fastsam.sam_step(m1, o1, x, y, F.cross_entropy, sds_keep=gamma)
    assert r.n_second_pass == k
    # by hand: l(w), perturb, l(w + e) without touching BN statistics, top-k, second pass
    out = m2(x)
    l0 = F.cross_entropy(out, y, reduction="none").detach()
    F.cross_entropy(out, y).backward()
    o2.first_step(zero_grad=True)
    with torch.no_grad(), fastsam.frozen_running_stats(m2):
        lp = F.cross_entropy(m2(x), y, reduction="none")
    idx = torch.topk(lp - l0, k).indices
    with fastsam.frozen_running_stats(m2):
        F.cross_entropy(m2(x[idx]), y[idx]).backward()
    o2.second_step(zero_grad=True)
    _assert_states(_state(m1), _state(m2), tol=1e-6)


def test_batchnorm_statistics_updated_once_per_step():
    x, y = _data()
    m = _model()
    opt = fastsam.ESAM(m.parameters(), torch.optim.SGD, lr=0.0)
    ref = copy.deepcopy(m)
    ref.train()
    ref(x)  # exactly one train-mode forward on the batch
    fastsam.sam_step(m, opt, x, y, F.cross_entropy, sds_keep=0.5)
    bn, bn_ref = m[1], ref[1]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=0, atol=1e-7)
    assert bn.track_running_stats


def test_clipping_applies_to_the_final_gradient():
    x, y = _data()
    m1, m2 = _model(), _model()
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, lr=0.1, gsam_alpha=0.3)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, lr=0.1, gsam_alpha=0.3)
    for _ in range(3):
        fastsam.sam_step(m1, o1, x, y, F.cross_entropy, max_grad_norm=0.05)
        _manual_step(m2, o2, x, y, clip=0.05)
    _assert_states(_state(m1), _state(m2), tol=1e-7)


def test_accumulation_equals_micro_batches():
    """update=False on two halves, then a step == one call with micro_batch = half."""
    x, y = _data(32)
    m1, m2 = _model(bn=False), _model(bn=False)
    o1 = fastsam.SAM(m1.parameters(), torch.optim.AdamW, lr=1e-2, fsam_sigma=1.0)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.AdamW, lr=1e-2, fsam_sigma=1.0)
    for _ in range(3):
        r = fastsam.sam_step(m1, o1, x[:16], y[:16], F.cross_entropy, update=False)
        assert not r.updated
        r = fastsam.sam_step(m1, o1, x[16:], y[16:], F.cross_entropy)
        assert r.updated
        fastsam.sam_step(m2, o2, x, y, F.cross_entropy, micro_batch=16)
    _assert_states(_state(m1), _state(m2), tol=1e-6)


def test_nonfinite_gradient_skips_with_nothing_updated():
    x, y = _data()
    m = _model(bn=False)
    opt = fastsam.ESAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    fastsam.sam_step(m, opt, x, y, F.cross_entropy)
    before, base_before = _state(m), copy.deepcopy(opt.base_optimizer.state_dict())
    step_before = opt.state_dict()["sam"]["step"]

    def bad_loss(out, tgt, reduction="mean"):
        return F.cross_entropy(out, tgt, reduction=reduction) * float("inf")

    for kw in (dict(ascent_loss_fn=bad_loss), dict()):
        loss = bad_loss if not kw else F.cross_entropy  # inf in the second pass, then in the first
        r = fastsam.sam_step(m, opt, x, y, loss, **kw)
        assert r.skipped and not r.updated
        _assert_states(_state(m), before)
        assert str(opt.base_optimizer.state_dict()) == str(base_before)
        assert opt.state_dict()["sam"]["step"] == step_before
        assert not opt.is_perturbed


@pytest.mark.parametrize("micro", [None, 8])
def test_amp_fp16_scaler_no_unscale_twice_and_overflow_skips(micro):
    x, y = _data()
    m = _model(bn=False)
    opt = fastsam.GSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(2):
        r = fastsam.sam_step(m, opt, x, y, F.cross_entropy, scaler=scaler, amp_dtype=torch.float16,
                             micro_batch=micro, max_grad_norm=1.0)
        assert not r.skipped
    before, base_before = _state(m), copy.deepcopy(opt.base_optimizer.state_dict())
    scaler_big = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # overflows fp16 gradients
    r = fastsam.sam_step(m, opt, x, y, F.cross_entropy, scaler=scaler_big, amp_dtype=torch.float16,
                         micro_batch=micro)
    assert r.skipped
    _assert_states(_state(m), before)
    assert str(opt.base_optimizer.state_dict()) == str(base_before)
    assert scaler_big.get_scale() == 2.0**119  # backoff 0.5
    r = fastsam.sam_step(m, opt, x, y, F.cross_entropy, scaler=scaler, amp_dtype=torch.float16, micro_batch=micro)
    assert not r.skipped and r.updated


def test_amp_result_matches_unscaled_step():
    """GradScaler scales and unscales by a power of two: the step equals the unscaled one."""
    x, y = _data()
    m1, m2 = _model(bn=False), _model(bn=False)
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, lr=0.1)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    fastsam.sam_step(m1, o1, x, y, F.cross_entropy, scaler=scaler, amp_dtype=torch.float16)
    fastsam.sam_step(m2, o2, x, y, F.cross_entropy, amp_dtype=torch.float16)
    _assert_states(_state(m1), _state(m2), tol=1e-6)


def test_bf16_autocast_without_scaler():
    x, y = _data()
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.AdamW, lr=1e-2)
    losses = [fastsam.sam_step(m, opt, x, y, F.cross_entropy, amp_dtype=torch.bfloat16).loss for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("where", ["first", "second", "sds"])
def test_exception_leaves_model_unperturbed_and_optimizer_ready(where):
    x, y = _data()
    m = _model(bn=False)
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    before = _state(m)
    calls = {"n": 0}

    def flaky(out, tgt, reduction="mean"):
        calls["n"] += 1
        fail_at = {"first": 1, "second": 2, "sds": 2}[where]
        if calls["n"] == fail_at:
            raise RuntimeError("loss exploded")
        return F.cross_entropy(out, tgt, reduction=reduction)

    kw = dict(sds_keep=0.5) if where == "sds" else {}
    if where == "first":
        kw["ascent_loss_fn"] = flaky
        loss = F.cross_entropy
    else:
        loss = flaky
    with pytest.raises(RuntimeError, match="loss exploded"):
        fastsam.sam_step(m, opt, x, y, loss, **kw)
    _assert_states(_state(m), before)
    assert not opt.is_perturbed
    assert all(p.grad is None for p in m.parameters())
    r = fastsam.sam_step(m, opt, x, y, F.cross_entropy)
    assert r.updated


@pytest.mark.parametrize("kwargs,match", [
    (dict(micro_batch=0), "micro_batch"), (dict(sds_keep=0.0), "sds_keep"), (dict(sds_keep=1.5), "sds_keep"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
])
def test_bad_arguments(kwargs, match):
    x, y = _data()
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=match):
        fastsam.sam_step(m, opt, x, y, F.cross_entropy, **kwargs)
    with pytest.raises(ValueError, match="fastsam.SAM"):
        fastsam.sam_step(m, torch.optim.SGD(m.parameters(), lr=0.1), x, y, F.cross_entropy)


def test_tuple_and_dict_inputs():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 4)

        def forward(self, u, v):
            return self.a(u) + self.a(v)

    x, y = _data()
    m = Two()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    r1 = fastsam.sam_step(m, opt, (x, x * 2), y, F.cross_entropy, micro_batch=10, sds_keep=0.5)
    r2 = fastsam.sam_step(m, opt, {"u": x, "v": x}, y, F.cross_entropy)
    assert r1.updated and r2.updated and r1.outputs.shape == (32, 4)


def test_non_batch_inputs_reach_every_micro_batch_unchanged():
    """A 0-dim tensor and a broadcast [1, F] row are not split (slicing them by micro-batch
    would give empty or wrong inputs); the result equals the hand loop that passes them whole."""
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 4)

        def forward(self, x, temperature, row):
            return self.a(x + row) / temperature

    x, y = _data(20)
    t, row = torch.tensor(2.0), torch.randn(1, 6)
    torch.manual_seed(0)
    m1 = Scaled()
    m2 = copy.deepcopy(m1)
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, lr=0.1)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, lr=0.1)
    r = fastsam.sam_step(m1, o1, {"x": x, "temperature": t, "row": row}, y, F.cross_entropy, micro_batch=8,
                         sds_keep=0.5)
    assert r.updated and r.outputs.shape == (20, 4) and r.n_second_pass == 4 + 4 + 2
    for lo in range(0, 20, 8):  # the same step by hand, non-batch inputs passed whole
        xb, yb = x[lo:lo + 8], y[lo:lo + 8]
        o2.zero_grad()
        l0 = F.cross_entropy(m2(xb, t, row), yb, reduction="none").detach()
        F.cross_entropy(m2(xb, t, row), yb).backward()
        o2.first_step(zero_grad=True)
        with torch.no_grad():
            lp = F.cross_entropy(m2(xb, t, row), yb, reduction="none")
        keep = torch.topk(lp - l0, max(1, round(0.5 * len(yb))), sorted=False).indices
        F.cross_entropy(m2(xb[keep], t, row), yb[keep]).backward()
        o2.accumulate(len(yb) / 20)
    o2.zero_grad()
    o2.load_accumulated()
    o2.base_step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- DDP (gloo, CPU)
WORLD, PER_RANK, STEPS = 2, 8, 3


def _ddp_worker(rank: int, init: str, opts: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model(bn=False))
        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **opts)
        x, y = _data(WORLD * PER_RANK)
        for _ in range(STEPS):
            r = fastsam.sam_step(model, opt, x[rank * PER_RANK:(rank + 1) * PER_RANK],
                                 y[rank * PER_RANK:(rank + 1) * PER_RANK], F.cross_entropy)
            assert not r.skipped
        if rank == 0:
            torch.save(_state(model.module), out_path)
        # leave together, and drop DDP's reducer before its process group: with the reducer
        # alive at interpreter exit, torch 2.13's gloo aborted about one worker in five at
        # shutdown ("terminate called without an active exception", no Python frame)
        dist.barrier()
        del model, opt, r
        gc.collect()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("opts", [{}, dict(gsam_alpha=0.3, adaptive=True, eta=0.01, swp_keep=0.6, seed=5),
                                  # the cheaper family (#17): plain steps, MSAM's one pass, WSAM's per-rank mix
                                  dict(sam_every=2), dict(perturb_from="momentum"),
                                  dict(wsam_gamma=0.8, wsam_decouple=False)])
def test_ddp_equals_single_process_m_sam(opts):
    """N ranks == one process with micro_batch = per-rank batch (GSAM combined per rank), ESAM
    masks included (one mask per step: keyed by the completed steps, on every rank and micro-batch).

    F-SAM's EMA is per optimizer: in one process it advances once per micro-batch, under DDP once
    per step on every rank (each rank keeps its own), so it is outside this equivalence by
    design (documented in sam_step)."""
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "w.pt")
        ctx = mp.get_context("spawn")
        init = f"tcp://127.0.0.1:{_free_port()}"
        procs = [ctx.Process(target=_ddp_worker, args=(r, init, opts, out)) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        assert not alive, "DDP workers timed out"
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        ddp_state = torch.load(out)
    single = _model(bn=False)
    opt = fastsam.SAM(single.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **opts)
    x, y = _data(WORLD * PER_RANK)
    for _ in range(STEPS):
        fastsam.sam_step(single, opt, x, y, F.cross_entropy, micro_batch=PER_RANK)
    _assert_states(ddp_state, _state(single), tol=1e-6)


def test_sds_needs_one_loss_per_example():
    """Per-token losses ([B, T], a language model's reduction="none") cannot rank examples: a
    ValueError says what to return, and nothing is changed."""
    m = _model(bn=False)
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    x, y = _data(8)
    before = _state(m)

    def per_token(out, tgt, reduction="mean"):
        v = F.cross_entropy(out, tgt, reduction=reduction)
        return v[:, None].expand(-1, 3) if reduction == "none" else v

    with pytest.raises(ValueError, match=r"one value per example \(8 values\), got shape \(8, 3\)"):
        fastsam.sam_step(m, opt, x, y, per_token, sds_keep=0.5)
    _assert_states(_state(m), before)
    assert not opt.is_perturbed


def test_keep_outputs_and_nested_outputs_are_detached():
    """keep_outputs=False returns no outputs and the same step; dict outputs come back detached
    (a kept output with a grad_fn would hold the logits of every micro-batch alive)."""
    class DictOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 4)

        def forward(self, x):
            return {"logits": self.a(x), "aux": (self.a.weight.sum(), 3)}

    def loss(out, tgt, reduction="mean"):
        return F.cross_entropy(out["logits"], tgt, reduction=reduction)

    x, y = _data(12)
    torch.manual_seed(0)
    m1 = DictOut()
    m2 = copy.deepcopy(m1)
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, lr=0.1)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, lr=0.1)
    r1 = fastsam.sam_step(m1, o1, x, y, loss)
    r2 = fastsam.sam_step(m2, o2, x, y, loss, keep_outputs=False)
    assert r2.outputs is None and r2.updated
    assert isinstance(r1.outputs, dict) and not r1.outputs["logits"].requires_grad
    assert not r1.outputs["aux"][0].requires_grad and r1.outputs["aux"][1] == 3
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    r3 = fastsam.sam_step(m1, o1, x, y, loss, micro_batch=5)
    assert isinstance(r3.outputs, list) and len(r3.outputs) == 3


def test_sds_with_micro_batches_keeps_round_gamma_b_in_total():
    """B = 9, m = 3, gamma = 0.5: round(4.5) = 4 examples in total (cumulative rounding per
    micro-batch: 2, 1, 1), not round(1.5) * 3 = 6."""
    m = _model(bn=False)
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    x, y = _data(9)
    assert fastsam.sam_step(m, opt, x, y, F.cross_entropy, micro_batch=3, sds_keep=0.5).n_second_pass == 4
    assert fastsam.sam_step(m, opt, x, y, F.cross_entropy, micro_batch=4, sds_keep=0.3).n_second_pass == 3


def test_sds_edge_shapes_and_containers():
    """(n, 1) per-example losses are one value per example; container outputs (a one-field
    namedtuple) work with SDS and come back as the same type; a per-step input shared by all
    examples ([2, 3], not the batch size) is never split, by micro-batches or by SDS."""
    import collections

    Out = collections.namedtuple("Out", ["logits"])

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 1)

        def forward(self, x, shared):
            assert shared.shape == (2, 3)
            return Out(self.a(x) + shared.sum())

    def bce(out, tgt, reduction="mean"):
        return F.binary_cross_entropy_with_logits(out.logits, tgt, reduction=reduction)  # (n, 1) for "none"

    x, _ = _data(10)
    y = (x[:, :1] > 0).float()
    m = M()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    r = fastsam.sam_step(m, opt, (x, torch.randn(2, 3)), y, bce, micro_batch=4, sds_keep=0.5)
    assert r.updated and r.n_second_pass == 5
    assert all(isinstance(o, Out) and isinstance(o.logits, torch.Tensor) for o in r.outputs)
    r = fastsam.sam_step(m, opt, (x, torch.randn(2, 3)), y, bce)
    assert isinstance(r.outputs, Out) and not r.outputs.logits.requires_grad


def test_language_model_step_bisam_ascent_ignore_index_micro_batches():
    """A causal-LM-shaped step: [B, T, V] logits flattened into the losses, prompt tokens ignored
    (-100), BiSAM ascent loss, micro-batches, keep_outputs=False; equals the hand-written loop
    (micro-batches weighted by their number of sequences, as for any batch)."""
    V, T, B = 40, 10, 6

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(V, 16)
            self.out = torch.nn.Linear(16, V)

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids)))

    def ce(out, tgt, reduction="mean"):
        return F.cross_entropy(out.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction=reduction)

    def ascent(out, tgt, reduction="mean"):
        return fastsam.losses.bisam_loss(out.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction=reduction)

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (B, T + 1), generator=g)
    ids, tgt = tokens[:, :-1], tokens[:, 1:].clone()
    tgt[:, :3] = -100  # the prompt
    torch.manual_seed(0)
    m1 = TinyLM()
    m2 = copy.deepcopy(m1)
    o1 = fastsam.SAM(m1.parameters(), torch.optim.AdamW, lr=1e-2)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.AdamW, lr=1e-2)
    for _ in range(3):
        r = fastsam.sam_step(m1, o1, ids, tgt, ce, ascent_loss_fn=ascent, micro_batch=4, keep_outputs=False)
        assert r.updated and r.outputs is None
        for lo in range(0, B, 4):
            xb, yb = ids[lo:lo + 4], tgt[lo:lo + 4]
            o2.zero_grad()
            ascent(m2(xb), yb).backward()
            o2.first_step(zero_grad=True)
            ce(m2(xb), yb).backward()
            o2.accumulate(len(yb) / B)
        o2.zero_grad()
        o2.load_accumulated()
        o2.base_step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert r.loss < 4.0  # finite and in range (log 40 = 3.7 at init)
