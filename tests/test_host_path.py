"""The cached host path of a SAM step (issue #16): what it keeps between steps must never change a
result or outlive the optimizer.

fastsam.SAM keeps the layout of P (a ``Tensors`` tuple that carries the Triton launch plans) and
the fused second step keeps a plan per layout; these tests change, between steps, everything
those caches depend on (parameter storage, gradients' presence, the base optimizer's state
tensors, hyper-parameters, F-SAM's alternating buffers) and check every step against the same
steps on the foreach backend with torch's own optimizer, which caches nothing. They also check
that the caches die with the optimizer and that the launcher builds each plan once.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

pytest.importorskip("triton")

import fastsam  # noqa: E402
from fastsam.kernels import triton_plan as TP  # noqa: E402
from fastsam.kernels import triton_sam as TS  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(7, 5), (5,), (3, 4), (9,)]


@pytest.fixture(autouse=True)
def _small_launches():
    with TS.configure(block=256, programs_per_sm=1, interp_block=64, interp_programs=3):
        yield


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(DEV)) for s in SHAPES]


def _grads(params: list[torch.Tensor], seed: int, skip: tuple[int, ...] = ()) -> None:
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=g).to(DEV)


def _pair(**kw):
    """The same optimizer on triton (cached plans) and foreach (torch's AdamW step)."""
    a, b = _params(), _params()
    base = kw.pop("base", torch.optim.AdamW)
    base_kw = kw.pop("base_kw", {"lr": 1e-2, "weight_decay": 0.1})
    oa = fastsam.SAM(a, base, backend="triton", rho=0.1, **kw, **base_kw)
    ob = fastsam.SAM(b, base, backend="foreach", rho=0.1, **kw, **base_kw)
    return a, oa, b, ob


def _step(params, opt, seed: int, skip: tuple[int, ...] = ()) -> None:
    _grads(params, seed, skip)
    opt.first_step()
    _grads(params, seed + 1000, skip)
    opt.second_step()


def _close(a, b, tol: float = 2e-6) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("options", [{}, {"fsam_sigma": 0.5}, {"gsam_alpha": 0.2}, {"adaptive": True, "eta": 0.01},
                                     {"base": torch.optim.SGD, "base_kw": {"lr": 0.1, "momentum": 0.9}}])
def test_changes_between_steps_are_seen(options):
    """Every cache key moved between steps: results stay those of the uncached path."""
    a, oa, b, ob = _pair(**options)
    seed = 0

    def both(skip: tuple[int, ...] = ()) -> None:
        nonlocal seed
        seed += 1
        _step(a, oa, seed, skip)
        _step(b, ob, seed, skip)
        _close(a, b)

    for _ in range(3):
        both()
    both(skip=(1,))  # another P (a parameter without gradient)
    both()
    for p in (a, b):  # new storage for a parameter (same values)
        p[2].data = p[2].data.clone()
    both()
    for g in (*oa.param_groups, *ob.param_groups):  # a scheduler's write
        g["lr"] = g["lr"] * 0.5
        g["rho"] = 0.05
    both()
    st_a, st_b = oa.base_optimizer.state, ob.base_optimizer.state
    for st in (st_a, st_b):  # a user resets one tensor of the base state (a new tensor, not in place)
        s = st[a[0]] if st is st_a else st[b[0]]
        key = "exp_avg" if "exp_avg" in s else "momentum_buffer"
        s[key] = torch.zeros_like(s[key])
    both()
    for p, o in ((a, oa), (b, ob)):  # a base state dict replaced by a user
        o.base_optimizer.state[p[3]] = dict(o.base_optimizer.state[p[3]])
    both()
    oa.load_state_dict(copy.deepcopy(ob.state_dict()))  # a load (new state dicts and tensors everywhere)
    both()
    both()


def test_caches_die_with_the_optimizer():
    """No process-wide cache keeps a model's tensors alive: the plans live on the optimizer's
    own objects."""
    params = _params()
    opt = fastsam.SAM(params, torch.optim.AdamW, backend="triton", rho=0.1, lr=1e-2, fsam_sigma=0.5)
    for s in range(3):
        _step(params, opt, s)
    refs = [weakref.ref(p) for p in params]
    state_ref = weakref.ref(opt.base_optimizer.state[params[0]]["exp_avg"])
    del params, opt
    gc.collect()
    assert all(r() is None for r in refs) and state_ref() is None


def test_plans_are_built_once(monkeypatch):
    """Steady state: no launch plan is built after the first steps (F-SAM's two buffer sets
    included), and the Adam hyper-parameter rows are the only table that changes."""
    builds = []
    real = TP.build
    monkeypatch.setattr(TP, "build", lambda *a, **k: builds.append(a[0]) or real(*a, **k))
    params = _params()
    opt = fastsam.SAM(params, torch.optim.AdamW, backend="triton", rho=0.1, lr=1e-2, fsam_sigma=0.5)
    for s in range(4):
        _step(params, opt, s)
    n = len(builds)
    for s in range(4, 10):
        _step(params, opt, s)
    assert len(builds) == n, builds[n:]


def test_trusted_addresses_never_outlive_a_call(monkeypatch):
    """The addresses fastsam.SAM hands to the launcher are consumed or dropped by the call, also
    when it stages (non-contiguous gradient) or raises."""
    from fastsam.kernels import triton_launch as TL

    params = _params()
    opt = fastsam.SAM(params, torch.optim.AdamW, backend="triton", rho=0.1, lr=1e-2)
    _step(params, opt, 0)
    lay = opt._layouts[next(iter(opt._layouts))]
    _grads(params, 1)
    params[0].grad = torch.randn(5, 7, device=DEV).t()  # not contiguous: the launcher stages (a one-call plan)
    opt.first_step()
    assert "_fastsam_ptrs" not in lay.params.__dict__
    opt.restore()

    def boom(*a, **k):
        raise RuntimeError("injected launch failure")

    monkeypatch.setattr(TL, "_launch", boom)
    _grads(params, 2)
    w0 = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="injected"):
        opt.first_step()
    assert "_fastsam_ptrs" not in lay.params.__dict__ and not opt.is_perturbed
    assert all(torch.equal(p, q) for p, q in zip(params, w0))


def test_step_closure_after_manual_steps_warns_when_gradients_were_left():
    """An optimizer used with first_step/second_step does not record its gradients (the passes
    cost host time); step(closure) after such a step that left gradients behind says how it
    reads them."""
    params = _params()
    opt = fastsam.SAM(params, torch.optim.SGD, backend="triton", rho=0.1, lr=0.1)
    _step(params, opt, 0)  # gradients left in .grad

    def closure():
        _grads(params, 5)
        return torch.zeros(())

    with pytest.warns(UserWarning, match="first-pass gradient"):
        opt.step(closure)
    # from now on the steps record their gradients: stale ones are seen as stale, no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calls = []
        opt.step(lambda: calls.append(1) or closure())
        assert len(calls) == 2  # the stale gradients were not taken as fresh


def test_cuda_graph_capture_is_refused_with_the_reason(monkeypatch):
    """Inside CUDA graph capture every SAM op refuses before doing anything (the host-side
    contract; on this machine the capture state is simulated)."""
    from fastsam import functional as F
    from fastsam._compat import check_not_capturing

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph"):
        check_not_capturing(torch.device("cuda", 0))
    check_not_capturing(torch.device("cpu"))  # CPU tensors: no capture possible, nothing asked
    if DEV.type == "cuda":
        p = _params()
        with pytest.raises(RuntimeError, match="CUDA graph"):
            F.sam_restore_(p, [q.detach().clone() for q in p], backend="triton")


def test_tables_used_on_another_stream_are_recorded_there(monkeypatch):
    """A kept device table handed out on a stream other than its allocation stream is recorded on
    it once (the caching allocator then waits for that stream before reusing the memory)."""
    from fastsam.kernels import _tables as T

    class Stream:
        def __init__(self, sid):
            self.cuda_stream = sid

    current = [Stream(1)]
    recorded = []

    class FakeTensor:
        def record_stream(self, s):
            recorded.append(s.cuda_stream)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(T, "upload", lambda values, dtype, device: FakeTensor())
    m = T.DeviceMirror(torch.int64)
    dev = torch.device("cuda", 0)
    t = m.get((1, 2, 3), dev)
    assert m.get((1, 2, 3), dev) is t and recorded == []  # same stream: nothing to record
    current[0] = Stream(2)
    m.get((1, 2, 3), dev)
    m.get((1, 2, 3), dev)
    assert recorded == [2]  # once per stream
    m.get((4, 5), dev)  # a new table, allocated on stream 2
    current[0] = Stream(1)
    m.get((4, 5), dev)
    assert recorded == [2, 1]
