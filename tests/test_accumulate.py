"""m-SAM micro-batch accumulation: ``sam_restore_accumulate_`` (every backend against
fastsam.reference) and ``SAM.accumulate`` / ``load_accumulated`` / ``clear_accumulated``.

The op restores ``w <- w_old``, GSAM-combines the gradient (``.grad`` only read) and does
``acc <- scale * ((0 if reset else acc) + weight * g)``. Tables: dtypes fp32/fp64/bf16/fp16,
odd and empty sizes, parameters without a gradient (restore only, or a live sum rescaled),
unperturbed parameters (no ``w_old``), GSAM on and off, chains of 5 micro-batches with the reset
flags a training step would pass. Tolerances: fp32 ~1e-6 relative, fp64 1e-12;
bf16/fp16: error against a float64 chain within 2x that of the foreach backend (plain PyTorch in
that dtype) plus one unit in the last place of the values' scale.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as TF

import fastsam
from fastsam import functional as F
from fastsam import reference as R

BACKENDS = ["foreach", "triton", "cpp"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# odd sizes, an empty tensor, one spanning two of the cpp kernels' 32768-element work items
SHAPES = [(7, 5), (33,), (0,), (1,), (3, 11), (40001,), (1023,)]


def _need(backend: str) -> None:
    if backend not in F.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not available here: {F.available_backends('cpu')}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}[t.dtype]
    return t.contiguous().view(view)


def _chain(seed: int, dtype: torch.dtype, gsam: bool) -> list[dict]:
    """Five micro-batches of op inputs. Tensor 2 has no gradient in micro-batch 1 (joins later,
    so its first call resets), tensor 4 loses its gradient in the last one (its live sum is only
    rescaled), tensor 5 is never perturbed (no w_old: an LSAM rho=0 group)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(s, k=1.0):
        return (torch.randn(s, generator=g, dtype=torch.float64) * k).to(dtype)

    n_k = [12, 12, 12, 12, 5]
    ref, total = 12.0, float(sum(n_k))
    calls = []
    live: set[int] = set()
    for k, nk in enumerate(n_k):
        grads = [rnd(s) for s in SHAPES]
        if k == 0:
            grads[2] = None
        if k == len(n_k) - 1:
            grads[4] = None
        w_old = [rnd(s) if i != 5 else None for i, s in enumerate(SHAPES)]
        g_old = [rnd(s, 0.7) if i != 5 else None for i, s in enumerate(SHAPES)] if gsam else None
        last = k == len(n_k) - 1
        scale = ref / total if last else 1.0
        has = [grads[i] is not None or (i in live and scale != 1.0) for i in range(len(SHAPES))]
        reset = [i not in live for i in range(len(SHAPES))]
        live |= {i for i in range(len(SHAPES)) if has[i]}
        calls.append(dict(grads=grads, w_old=w_old, g_old=g_old, has=has, reset=reset, weight=nk / ref,
                          scale=scale, alpha=0.3 if gsam else 0.0))
    return calls


def _run(op, dtype: torch.dtype, calls: list[dict], *, to: torch.dtype | None = None, device: str = "cpu"):
    """Run the chain with ``op``; ``to`` casts every input (the float64 chain of the 2x rule).
    Returns the final accumulators, each call's restored weights and the gradients after each call."""
    to = to or dtype
    params = [torch.full(s, 9.0, dtype=to, device=device) for s in SHAPES]
    acc = [torch.full(s, float("nan"), dtype=to, device=device) for s in SHAPES]  # reset must not read them
    restored, grads_after = [], []
    for c in calls:
        grads = [None if t is None else t.to(device, to) for t in c["grads"]]
        w_old = [None if t is None else t.to(device, to) for t in c["w_old"]]
        g_old = None if c["g_old"] is None else [None if t is None else t.to(device, to) for t in c["g_old"]]
        keep = [a if h else None for a, h in zip(acc, c["has"])]
        op(params, grads, w_old, g_old, keep, c["reset"], weight=c["weight"], scale=c["scale"],
           gsam_alpha=c["alpha"])
        restored.append([p.clone() for p in params])
        grads_after.append(grads)
    return acc, restored, grads_after


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, name: str) -> None:
    """|got - want| <= rtol * (|want| + 0.1 max|want|) in float64 (sums that cancel to ~0 keep
    the rounding error of their terms)."""
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    if w.numel() == 0:
        return
    err = (g - w).abs()
    assert (err <= rtol * (w.abs() + 0.1 * w.abs().max())).all(), f"{name}: max err {err.max():.3e}"


def _impl(backend: str):
    return lambda *a, **k: F.sam_restore_accumulate_(*a, **k, backend=backend)


@pytest.mark.parametrize("gsam", [False, True], ids=["sam", "gsam"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_accumulate_matches_reference(backend, dtype, gsam):
    _need(backend)
    calls = _chain(7, dtype, gsam)
    acc, restored, grads_after = _run(_impl(backend), dtype, calls)
    # restore is a copy, bit for bit; the gradients are only read
    for c, ws, gs in zip(calls, restored, grads_after):
        for i, (w, wo) in enumerate(zip(ws, c["w_old"])):
            if wo is not None:
                assert torch.equal(_bits(w), _bits(wo)), f"restore {i}"
        for i, (g, g0) in enumerate(zip(gs, c["grads"])):
            if g0 is not None:
                assert torch.equal(_bits(g), _bits(g0)), f"grads[{i}] was modified"
    ref_acc, _, _ = _run(R.sam_restore_accumulate_, dtype, calls)
    if dtype in (torch.float32, torch.float64):
        rtol = 2e-6 if dtype == torch.float32 else 1e-12
        for i, (a, r) in enumerate(zip(acc, ref_acc)):
            assert not torch.isnan(a).any(), f"acc {i} read before it was reset"
            _assert_close(a, r, rtol, f"acc {i}")
        return
    acc64, _, _ = _run(R.sam_restore_accumulate_, dtype, calls, to=torch.float64)
    plain, _, _ = _run(_impl("foreach"), dtype, calls)
    eps = torch.finfo(dtype).eps
    for i, (a, p, r) in enumerate(zip(acc, plain, acc64)):
        if r.numel() == 0:
            continue
        floor = eps * r.abs().max().item()
        e_got, e_plain = (a.double() - r).abs(), (p.double() - r).abs()
        assert e_got.max() <= 2 * e_plain.max() + floor, f"acc {i}: {e_got.max():.3e} vs plain {e_plain.max():.3e}"
        assert e_got.mean() <= 2 * e_plain.mean() + floor, f"acc {i} (mean)"
        # and plain PyTorch itself is a few roundings away (5 chained calls, ~3 roundings each)
        assert e_plain.max() <= 16 * floor, f"acc {i}: foreach error {e_plain.max():.3e}"


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_restore_accumulate_errors(backend):
    if backend != "reference":
        _need(backend)
    p = [torch.randn(3)]
    with pytest.raises(ValueError, match="no acc buffer"):
        F.sam_restore_accumulate_(p, [torch.randn(3)], [None], None, [None], [True], weight=1.0, backend=backend)
    with pytest.raises(ValueError, match="one entry per parameter"):
        F.sam_restore_accumulate_(p, [torch.randn(3)], [None], None, [torch.empty(3)], [], weight=1.0,
                                  backend=backend)


# ------------------------------------------------------------------------------ SAM methods
def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def _data(n: int = 30, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _hand_msam(model, opt, x, y, m):
    """m-SAM written with restore(apply_gsam=True) and a float64 running sum of n_k * grad / B."""
    B = len(y)
    acc = None
    for lo in range(0, B, m):
        xb, yb = x[lo:lo + m], y[lo:lo + m]
        opt.zero_grad()
        TF.cross_entropy(model(xb), yb).backward()
        opt.first_step(zero_grad=True)
        TF.cross_entropy(model(xb), yb).backward()
        opt.restore(apply_gsam=True)
        g = [p.grad.double() * (len(yb) / B) for p in model.parameters()]
        acc = g if acc is None else [a + b for a, b in zip(acc, g)]
    for p, a in zip(model.parameters(), acc):
        p.grad = a.to(p.dtype)
    opt.base_step()
    opt.zero_grad()


@pytest.mark.parametrize("opts", [{}, dict(gsam_alpha=0.3, adaptive=True, eta=0.01), dict(fsam_sigma=1.0)],
                         ids=["sam", "gsam+asam", "fsam"])
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_sam_step_micro_batches_every_backend(backend, opts):
    """sam_step(micro_batch=m) (SAM.accumulate per micro-batch, fused where the backend is) equals
    the hand-written loop over 5 steps; micro-batches 8, 8, 8, 6."""
    if backend != "reference":
        _need(backend)
    x, y = _data(30)
    m1, m2 = _model(), _model()
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, **opts)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="reference", **opts)
    for _ in range(5):
        r = fastsam.sam_step(m1, o1, x, y, TF.cross_entropy, micro_batch=8)
        assert r.updated and not o1.has_accumulated
        _hand_msam(m2, o2, x, y, 8)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_accumulate_api():
    m = _model()
    params = list(m.parameters())
    opt = fastsam.SAM([{"params": params[:2]}, {"params": params[2:], "rho": 0.0}], torch.optim.SGD, lr=0.1,
                      backend="foreach")
    x, y = _data(8)
    with pytest.raises(ValueError, match="weight must be a finite float"):
        opt.accumulate(math.nan)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        opt.accumulate(1.0, scale=math.inf)
    # unperturbed: accumulate only reads .grad, the weights do not move
    TF.cross_entropy(m(x), y).backward()
    g1 = [p.grad.clone() for p in params]
    w0 = [p.detach().clone() for p in params]
    opt.accumulate(0.25)
    assert opt.has_accumulated
    assert all(torch.equal(p, w) for p, w in zip(params, w0))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, g1))
    # perturbed: restores exactly; the rho=0 group (LSAM) is accumulated too
    opt.zero_grad()
    TF.cross_entropy(m(x[:4]), y[:4]).backward()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(p, w) for p, w in zip(params[:2], w0))
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.load_accumulated()
    TF.cross_entropy(m(x[:4]), y[:4]).backward()
    g2 = [p.grad.clone() for p in params]
    opt.accumulate(0.75, scale=2.0)
    assert not opt.is_perturbed
    assert all(torch.equal(p, w) for p, w in zip(params, w0))
    opt.zero_grad()
    opt.load_accumulated()
    assert not opt.has_accumulated
    for p, a, b in zip(params, g1, g2):
        torch.testing.assert_close(p.grad, 2.0 * (0.25 * a + 0.75 * b), rtol=1e-6, atol=1e-7)
    # the next accumulation starts from zero (reset), even though .grad aliases the buffer now
    opt.accumulate(1.0)
    opt.zero_grad()
    opt.load_accumulated()
    for p, a, b in zip(params, g1, g2):
        torch.testing.assert_close(p.grad, 2.0 * (0.25 * a + 0.75 * b), rtol=1e-6, atol=1e-7)
    # clear_accumulated drops partial sums; parameters without one get .grad = None on load
    TF.cross_entropy(m(x), y).backward()
    opt.accumulate(1.0)
    opt.clear_accumulated()
    assert not opt.has_accumulated
    opt.load_accumulated()
    assert all(p.grad is None for p in params)


def test_exception_in_a_micro_batch_clears_the_sums():
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    x, y = _data(12)
    calls = []

    def loss(out, tgt, reduction="mean"):
        calls.append(1)
        if len(calls) == 5:  # first pass of the third micro-batch
            raise RuntimeError("boom")
        return TF.cross_entropy(out, tgt, reduction=reduction)

    w0 = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        fastsam.sam_step(m, opt, x, y, loss, micro_batch=4)
    assert not opt.has_accumulated and not opt.is_perturbed
    assert all(torch.equal(p, w) for p, w in zip(m.parameters(), w0))
    # the optimizer is ready: a clean step equals one from a fresh optimizer
    m2 = _model()
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, lr=0.1)
    fastsam.sam_step(m, opt, x, y, TF.cross_entropy, micro_batch=4)
    fastsam.sam_step(m2, o2, x, y, TF.cross_entropy, micro_batch=4)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_restore_accumulate_on_gpu(backend, dtype):
    """The same chain on CUDA tensors (GPU sessions): reference vs the GPU kernels."""
    if not torch.cuda.is_available() or backend not in F.available_backends("cuda"):
        pytest.skip(f"{backend} on CUDA not available")
    calls = _chain(11, dtype, True)
    got, _, _ = _run(_impl(backend), dtype, calls, device="cuda")
    want, _, _ = _run(R.sam_restore_accumulate_, dtype, calls)
    for i, (a, w) in enumerate(zip(got, want)):
        _assert_close(a, w, 2e-6 if dtype == torch.float32 else 2e-2, f"acc {i}")


@pytest.mark.parametrize("backend", ["foreach", "cpp"])
def test_grad_after_load_does_not_alias_the_next_sum(backend):
    """After load_accumulated, .grad is handed over: zeroing it in place (set_to_none=False) or
    keeping a reference must not touch the next step's running sum."""
    _need(backend)
    x, y = _data(12)
    runs = []
    for set_to_none in (True, False):
        m = _model()
        opt = fastsam.GSAM(m.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
        kept = []
        for _ in range(3):
            for xb, yb in zip(x.split(5), y.split(5)):
                opt.zero_grad(set_to_none=set_to_none)
                TF.cross_entropy(m(xb), yb).backward()
                opt.first_step(zero_grad=False)
                opt.zero_grad(set_to_none=set_to_none)
                TF.cross_entropy(m(xb), yb).backward()
                opt.accumulate(len(yb) / len(y))
            opt.zero_grad(set_to_none=set_to_none)
            opt.load_accumulated()
            kept.append([p.grad.clone() for p in m.parameters()])
            opt.base_step()
        runs.append((kept, [p.detach().clone() for p in m.parameters()]))
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
    for ga, gb in zip(runs[0][0], runs[1][0]):
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_load_state_dict_drops_partial_accumulation():
    """A checkpoint loaded between update=False calls: the next update averages only what came
    after the load (not a mix with the dropped batches' sample count)."""
    x, y = _data(16)
    m1 = _model()
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    fastsam.sam_step(m1, o1, x, y, TF.cross_entropy)  # some state to save
    sd = copy.deepcopy(o1.state_dict())
    w = [p.detach().clone() for p in m1.parameters()]
    fastsam.sam_step(m1, o1, x[:8], y[:8], TF.cross_entropy, update=False)
    with torch.no_grad():
        for p, v in zip(m1.parameters(), w):
            p.copy_(v)
    o1.load_state_dict(copy.deepcopy(sd))  # torch's load keeps the given tensors: one copy per optimizer
    assert not o1.has_accumulated
    fastsam.sam_step(m1, o1, x[8:], y[8:], TF.cross_entropy)
    m2 = _model()
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with torch.no_grad():
        for p, v in zip(m2.parameters(), w):
            p.copy_(v)
    o2.load_state_dict(copy.deepcopy(sd))
    fastsam.sam_step(m2, o2, x[8:], y[8:], TF.cross_entropy)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_sam_step_refuses_foreign_partial_sums():
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    x, y = _data(8)
    TF.cross_entropy(m(x), y).backward()
    opt.accumulate(1.0)
    with pytest.raises(RuntimeError, match="partial sums from SAM.accumulate"):
        fastsam.sam_step(m, opt, x, y, TF.cross_entropy)
    opt.clear_accumulated()
    assert fastsam.sam_step(m, opt, x, y, TF.cross_entropy).updated


@pytest.mark.parametrize("base,kw", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
], ids=["sgd-nesterov", "adamw-amsgrad"])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_base_step_is_the_fused_update(backend, base, kw, monkeypatch):
    """base_step (used after m-SAM micro-batches) runs the fused SGD/Adam update on fused backends
    and matches torch's optimizer over 5 steps (params and state)."""
    _need(backend)
    m1, m2 = _model(), _model()
    opt = fastsam.SAM(m1.parameters(), base, backend=backend, **kw)
    ref = base(m2.parameters(), **kw)

    fused_calls = []

    def counting(f):
        def run(*a, **k):
            fused_calls.append(1)
            return f(*a, **k)
        return run

    for name in ("sam_restore_sgd_", "sam_restore_adam_"):
        monkeypatch.setattr(F, name, counting(getattr(F, name)))
    x, y = _data(16)
    for _ in range(5):
        for m, o in ((m1, opt), (m2, ref)):
            o.zero_grad()
            TF.cross_entropy(m(x), y).backward()
        opt.base_step()
        ref.step()
    assert len(fused_calls) == 5, "base_step did not take the fused path"
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        sa, sb = opt.base_optimizer.state[a], ref.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_steps_respect_a_replaced_step_but_not_an_lr_scheduler(backend):
    """A step() replaced on the base optimizer instance must run (fallback to base_optimizer.step);
    an LR scheduler's counting wrapper on the base does not prevent the fused update."""
    _need(backend)
    m = _model()
    opt = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    x, y = _data(8)
    calls = []
    orig = opt.base_optimizer.step

    def mine(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    opt.base_optimizer.step = mine
    for step in (opt.base_step, opt.second_step):
        opt.zero_grad()
        TF.cross_entropy(m(x), y).backward()
        if step == opt.second_step:
            opt.first_step(zero_grad=True)
            TF.cross_entropy(m(x), y).backward()
        step()
    assert len(calls) == 2
    del opt.base_optimizer.step
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    assert "step" in vars(opt.base_optimizer)  # torch's counting wrapper
    fused = []
    orig_sgd = F.sam_restore_sgd_
    F.sam_restore_sgd_ = lambda *a, **k: (fused.append(1), orig_sgd(*a, **k))[1]
    try:
        opt.zero_grad()
        TF.cross_entropy(m(x), y).backward()
        opt.base_step()
    finally:
        F.sam_restore_sgd_ = orig_sgd
    sched.step()
    assert fused == [1] and opt.param_groups[0]["lr"] == pytest.approx(0.05)
