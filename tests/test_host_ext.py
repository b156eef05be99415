"""The C++ host helpers (csrc/host.cpp, fastsam._host; issue #16) against their Python twins:
the same addresses, sizes, gradients, contiguity answers and version bumps on every kind of
tensor list a step passes them (None entries, views at an offset, empty, non-contiguous, sparse,
meta, Parameters and plain tensors mixed), and a clear error for anything else."""

from __future__ import annotations

import pytest
import torch

import fastsam
from fastsam import _host
from fastsam.kernels import _ext


@pytest.fixture(scope="module")
def cxx():
    if not _host.activate():
        pytest.skip(f"host helpers not built here: {_ext.status('host').reason}")
    return _host._M


def _python(fn, *args):
    """The Python twin of ``fn`` (the C++ module switched off for the call)."""
    saved = _host._M
    _host._M = None
    try:
        return fn(*args)
    finally:
        _host._M = saved


def _lists():
    base = torch.randn(10, 6)
    p = torch.nn.Parameter(torch.randn(5, 3))
    p.grad = torch.randn(5, 3)
    q = torch.nn.Parameter(torch.randn(4))
    empty = torch.nn.Parameter(torch.empty(0))
    empty.grad = torch.empty(0)
    view = base[3:, 1:]  # an offset and a stride: non-contiguous
    tail = base.view(-1)[7:]  # an offset, contiguous
    sparse = torch.randn(3, 3).to_sparse()
    meta = torch.empty(4, device="meta")
    return {
        "params": [p, q, empty],
        "tensors": [base, view, tail, empty, torch.randn(()), p.detach(), meta],
        "with_none": [p.grad, None, base, None],
        "sparse": [base, sparse],
        "transposed": [torch.randn(3, 4).t()],
    }


def test_addresses_layout_and_grads_equal_python(cxx):
    ls = _lists()
    for name in ("params", "tensors", "with_none"):
        assert _host.addresses(ls[name]) == _python(_host.addresses, ls[name]), name
    for name in ("params", "tensors"):
        assert _host.layout(ls[name]) == _python(_host.layout, ls[name]), name
        assert _host.layout(tuple(ls[name])) == _python(_host.layout, ls[name]), name
    for name in ("params", "with_none", "tensors"):
        assert _host.count_none(ls[name]) == _python(_host.count_none, ls[name]) == sum(t is None for t in ls[name])
    for name in ("params", "tensors"):
        ptrs, numels = _host.layout(ls[name])
        moved = (ptrs[0] + 4,) + ptrs[1:]
        bigger = (numels[0] + 1,) + numels[1:]
        for impl in (_host.layout_equal, lambda *a: _python(_host.layout_equal, *a)):
            assert impl(ls[name], ptrs, numels) and impl(ls[name], ptrs) and impl(ls[name], ptrs, None)
            assert not impl(ls[name], moved) and not impl(ls[name], ptrs, bigger) and not impl(ls[name], ptrs[:-1])
    got, want = _host.grads(ls["params"]), _python(_host.grads, ls["params"])
    assert len(got) == len(want) and all(a is b for a, b in zip(got, want))  # the same objects, None where absent
    assert got[1] is None and got[0] is ls["params"][0].grad


def test_all_contiguous_equals_python(cxx):
    ls = _lists()
    for name, want in (("params", True), ("with_none", True), ("tensors", False), ("sparse", False),
                       ("transposed", False)):
        assert _host.all_contiguous(ls[name]) is want, name
        assert _python(_host.all_contiguous, ls[name]) is want, name


def test_bump_versions_bumps_each_tensor_once(cxx):
    for impl in (_host.bump_versions, lambda ts: _python(_host.bump_versions, ts)):
        ts = [torch.randn(3), None, torch.randn(2), torch.nn.Parameter(torch.randn(1))]
        v0 = [None if t is None else t._version for t in ts]
        impl(ts)
        assert [None if t is None else t._version - v for t, v in zip(ts, v0)] == [1, None, 1, 1]


def test_same_and_state_same_equal_python(cxx):
    """The fused update's plan checks: identity of two sequences, and of a base optimizer's state
    (keys, state dicts, their entries) against what a plan saved; every change is seen."""
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    assert _host.same(ps, tuple(ps)) and _python(_host.same, ps, tuple(ps))
    for other in (ps[:3], ps[:3] + [torch.nn.Parameter(torch.randn(3))], list(reversed(ps))):
        assert not _host.same(ps, other) and not _python(_host.same, ps, other)
    opt = torch.optim.AdamW(ps, lr=0.1)
    for p in ps:
        p.grad = torch.randn(3)
    opt.step()
    state = opt.state

    def saved():
        skeys, svals = tuple(state), tuple(state.values())
        return skeys, svals, tuple(v for d in svals for v in d.values())

    def check(want):
        for impl in (_host.state_same, lambda *a: _python(_host.state_same, *a)):
            assert impl(state, *snap) is want

    snap = saved()
    check(True)
    state[ps[1]]["exp_avg"] = state[ps[1]]["exp_avg"].clone()  # a tensor replaced in place of the dict
    check(False)
    snap = saved()
    check(True)
    state[ps[2]] = dict(state[ps[2]])  # a state dict replaced
    check(False)
    snap = saved()
    state[ps[0]]["extra"] = torch.zeros(1)  # an entry added
    check(False)
    snap = saved()
    del state[ps[3]]  # a parameter's state removed
    check(False)
    snap = saved()
    check(True)
    state[ps[3]] = 5  # not a dict
    snap = (tuple(state), tuple(state.values()), snap[2])
    check(False)


def test_clear_errors(cxx):
    with pytest.raises(TypeError, match=r"tensors\[1\] is not a tensor"):
        _host.addresses([torch.randn(2), 3.0])
    with pytest.raises(TypeError, match=r"params\[0\] is not a tensor"):
        _host.grads(["x"])
    with pytest.raises(TypeError, match="expected a list or tuple"):
        _host.layout(5)
    with pytest.raises(TypeError, match=r"tensors\[0\] is not a tensor"):
        _host.layout([None])  # the layout of parameters: no None


@pytest.mark.parametrize("base,kw", [(torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}),
                                     (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True})],
                         ids=["adamw", "sgd"])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_fused_step_loads_them_and_gives_the_same_weights(cxx, backend, base, kw):
    """fastsam.SAM on a fused backend turns them on with its first step; steps with and without
    them are bit-identical (they only read; the cpp wrappers' per-group tables and one-op step
    counters give the per-tensor path's values), with two param groups of different lr and
    rho, over 4 steps."""
    if backend not in fastsam.functional.available_backends("cpu"):
        pytest.skip(f"{backend} backend not available")
    runs = []
    for use in (False, True):
        saved = _host._M
        _host._M = saved if use else None
        try:
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
            groups = [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": kw["lr"] / 3, "rho": 0.05}]
            opt = fastsam.SAM(groups, base, rho=0.1, backend=backend, **kw)
            opt._host_tried = True  # keep this run's choice
            for _ in range(4):
                x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
                fastsam.sam_step(m, opt, x, y, torch.nn.functional.cross_entropy)
            runs.append([p.detach().clone() for p in m.parameters()] + [
                t.clone() for st in opt.base_optimizer.state.values() for t in st.values() if torch.is_tensor(t)])
        finally:
            _host._M = saved
    assert len(runs[0]) == len(runs[1]) and all(torch.equal(a, b) for a, b in zip(*runs))
