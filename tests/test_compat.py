"""fastsam._compat: the shims that keep the library working on torch 2.4 (and triton 3.0).

These run on whatever torch CI has; the README's "Supported versions" lists the older
environments where the whole suite was also run by hand.
"""

from __future__ import annotations

import typing

import pytest
import torch
from torch import Tensor

from fastsam import _compat


def test_normalize_builtin_generics_to_typing_spellings():
    assert _compat._normalize(list[Tensor]) == typing.List[Tensor]  # noqa: UP006
    assert _compat._normalize(float | None) == typing.Optional[float]  # noqa: UP045
    assert _compat._normalize(list[float] | None) == typing.Optional[typing.List[float]]  # noqa: UP006, UP045
    assert _compat._normalize(tuple[Tensor, Tensor]) == tuple[Tensor, Tensor]
    assert _compat._normalize(int | float) == (int | float)  # not an Optional: left alone
    assert _compat._normalize(Tensor) is Tensor


@_compat.custom_op("fastsam_test::probe", mutates_args=("xs",))
def _probe(xs: list[Tensor], y: Tensor, z: float | None, k: int, b: bool, s: str) -> tuple[Tensor, Tensor]:
    for x in xs:
        x.add_(1.0)
    return y * 2.0, y + (z or 0.0) + k + float(b) + len(s)


@_probe.register_fake
def _(xs, y, z, k, b, s):
    return torch.empty_like(y), torch.empty_like(y)


@_compat.custom_op("fastsam_test::probe_none", mutates_args=())
def _probe_none(y: Tensor) -> None:
    return None


def test_custom_op_schema_from_future_annotations():
    """String annotations (this module uses `from __future__ import annotations`) and builtin
    generics give the schema torch infers from typing spellings on every release."""
    assert str(torch.ops.fastsam_test.probe.default._schema) == (
        "fastsam_test::probe(Tensor(a0!)[] xs, Tensor y, float? z, SymInt k, bool b, str s) -> (Tensor, Tensor)")
    assert str(torch.ops.fastsam_test.probe_none.default._schema) == "fastsam_test::probe_none(Tensor y) -> ()"
    xs = [torch.randn(3), torch.randn(2)]
    before = [x.clone() for x in xs]
    y = torch.randn(4)
    a, c = torch.ops.fastsam_test.probe(xs, y, 0.5, 2, True, "ab")
    assert torch.equal(a, y * 2.0)
    assert torch.equal(c, y + 0.5 + 2 + 1.0 + 2)
    for x, x0 in zip(xs, before):
        assert torch.equal(x, x0 + 1.0)
    # AOT dispatch of an op that mutates a Tensor[] argument needs torch >= 2.5 (see _compat)
    utils = ("test_schema", "test_faketensor") + (("test_aot_dispatch_dynamic",)
                                                  if _compat.CUSTOM_OP_LISTS_TRACEABLE else ())
    torch.library.opcheck(torch.ops.fastsam_test.probe.default, ([torch.randn(3)], torch.randn(4), None, 1, False, ""),
                          test_utils=utils)


@pytest.mark.skipif(not hasattr(torch.library, "infer_schema"), reason="torch.library.infer_schema: torch >= 2.5")
def test_custom_op_schema_equals_torch_inference_on_new_torch():
    """Where torch infers schemas from string annotations itself (>= 2.5), it agrees with the shim."""
    want = torch.library.infer_schema(_probe_fn, mutates_args=("xs",))
    assert str(torch.ops.fastsam_test.probe.default._schema) == "fastsam_test::probe" + want


def _probe_fn(xs: list[Tensor], y: Tensor, z: float | None, k: int, b: bool, s: str) -> tuple[Tensor, Tensor]:
    raise AssertionError("annotations only")


def test_eager_under_compile_on_old_torch():
    def f(x):
        return x + 1

    g = _compat.eager_under_compile_on_old_torch(f)
    assert (g is f) == _compat.CUSTOM_OP_LISTS_TRACEABLE
    assert torch.equal(g(torch.ones(2)), torch.full((2,), 2.0))


def test_bump_versions_both_forms():
    """The version bump that lets autograd see the fused in-place writes: the one-call form
    (torch >= 2.5) and the per-tensor form (torch 2.4) both change every tensor's version (newer
    torch iterates a single tensor argument, bumping once per row: still a change)."""
    pytest.importorskip("triton")
    from fastsam import _host
    from fastsam.kernels import triton_sam as TS

    saved, saved_host = TS._BUMP_LIST[0], _host._M
    _host._M = None  # the torch forms, not the C++ host helpers (tests/test_host_ext.py)
    try:
        for mode in (None, False):
            ts = [torch.randn(3), torch.randn(2)]
            v0 = [t._version for t in ts]
            TS._BUMP_LIST[0] = mode
            TS._bump_versions(ts)
            assert all(t._version > v for t, v in zip(ts, v0))
    finally:
        TS._BUMP_LIST[0] = saved
        _host._M = saved_host
