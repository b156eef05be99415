"""CPU micro-benchmarks (pytest-benchmark). Not part of the test suite: ``python -m pytest`` only
collects ``tests/`` (``testpaths`` in pyproject.toml). Run through ``python -m bench.run_all``
(which turns the pytest-benchmark JSON into ``bench/results/cpu_micro.json`` with the environment
header), or alone::

    python -m pytest bench/test_bench_cpu.py --benchmark-json=/tmp/micro.json

Two groups:

- ``optimizer_step``: ``first_step()`` + ``second_step()`` of :class:`fastsam.SAM` (AdamW base,
  gradients already in ``.grad``) for every available backend that runs on CPU tensors, next to
  a plain AdamW step. Two parameter sets: the demo's TinyViT (31 small tensors: launch/overhead
  bound) and two ViT-S/16 blocks (24 tensors, 3.5M parameters: memory bound). Two option sets:
  plain SAM, and (small set only) every option at once (ASAM + F-SAM + GSAM + ESAM masks).
- ``train_step``: one training step of the demo's TinyViT on a batch of 32 digits-sized inputs:
  the base AdamW step (one forward/backward), two forward/backward passes + AdamW (what any SAM
  step must cost), :func:`fastsam.sam_step`, and the same SAM step written by hand with
  ``first_step`` / ``second_step``. ``sam_step`` minus the hand-written step is the cost of its
  orchestration (checks, the one host sync, bookkeeping); both may beat "two passes + AdamW"
  because the foreach backend's fused second step is faster than torch's CPU AdamW.

Everything runs with one torch thread: the sizes are small, and on a shared 2-core machine two
OpenMP threads made small ops 10x slower or worse whenever another process was busy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastsam  # noqa: E402
from fastsam import functional  # noqa: E402
from fastsam.models import TinyViT  # noqa: E402

torch.set_num_threads(1)

ADAMW = {"lr": 1e-3, "weight_decay": 0.05}


def _vit_s_blocks(depth: int = 2, dim: int = 384, mlp: int = 1536) -> list[tuple[int, ...]]:
    """Parameter shapes of ``depth`` pre-norm ViT-S/16 blocks (timm layout: 12 tensors and
    1,774,464 parameters per block)."""
    shapes: list[tuple[int, ...]] = []
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),  # norm1, qkv, proj
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]  # norm2, fc1, fc2
    return shapes


PARAM_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "tinyvit": lambda: [tuple(p.shape) for p in TinyViT().parameters()],
    "vit_s16_2blocks": _vit_s_blocks,
}

OPTIONS: dict[str, dict[str, Any]] = {
    "sam": {},
    "all_options": {"adaptive": True, "eta": 0.01, "fsam_sigma": 1.0, "gsam_alpha": 0.4, "swp_keep": 0.5},
}


def _cpu_backends() -> list[str]:
    """Backends that run on CPU tensors here (triton needs CUDA; the interpreter is not a benchmark)."""
    return [b for b in functional.available_backends("cpu") if b in ("reference", "foreach", "cpp")]


def _params_with_grads(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.02)
        p.grad = torch.randn(s, generator=g) * 1e-3
        ps.append(p)
    return ps


def _run(benchmark: Any, fn: Callable[[], Any], budget_s: float = 1.5) -> None:
    """``benchmark.pedantic`` with rounds and iterations sized from one timed call: rounds of at
    least ~20 ms (timer resolution and per-round overhead stay negligible), 5 to 30 rounds, about
    ``budget_s`` seconds in all, so the whole file runs in about a minute."""
    fn()  # warm-up: state allocation, first-touch page faults
    t0 = time.perf_counter()
    fn()
    t = max(time.perf_counter() - t0, 1e-6)
    iterations = max(1, int(0.02 / t))
    rounds = min(30, max(5, int(budget_s / (t * iterations))))
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("param_set", list(PARAM_SETS))
@pytest.mark.parametrize("impl", ["adamw_only", *_cpu_backends()])
def test_optimizer_step(benchmark: Any, impl: str, param_set: str, options: str) -> None:
    """Median time of ``first_step(); second_step()`` (or of one AdamW step for ``adamw_only``)."""
    if impl == "adamw_only" and options != "sam":
        pytest.skip("AdamW alone has no SAM options")
    if param_set != "tinyvit" and options != "sam":
        # the ESAM mask is ~60 integer ops per element in torch on CPU: seconds per step at 3.5M
        pytest.skip("all options only on the small set (keeps the file near a minute)")
    shapes = PARAM_SETS[param_set]()
    params = _params_with_grads(shapes)
    numel = sum(p.numel() for p in params)
    if impl == "adamw_only":
        opt: Any = torch.optim.AdamW(params, **ADAMW)
        fn = opt.step
    else:
        sam = fastsam.SAM(params, torch.optim.AdamW, rho=0.05, backend=impl, **OPTIONS[options], **ADAMW)

        def fn() -> None:
            sam.first_step()
            sam.second_step()

    benchmark.group = "optimizer_step"
    benchmark.extra_info.update({"impl": impl, "param_set": param_set, "options": options,
                                 "numel": numel, "tensors": len(params)})
    _run(benchmark, fn)


def _train_setup() -> tuple[TinyViT, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return TinyViT(), torch.randn(32, 64), torch.randint(0, 10, (32,))


@pytest.mark.parametrize("kind", ["base_adamw", "two_passes_adamw", "sam_step", "manual_sam"])
def test_train_step(benchmark: Any, kind: str) -> None:
    """One TinyViT training step (batch 32): see the module docstring for the four kinds."""
    model, x, y = _train_setup()
    if kind in ("base_adamw", "two_passes_adamw"):
        opt: Any = torch.optim.AdamW(model.parameters(), **ADAMW)
        passes = 1 if kind == "base_adamw" else 2

        def fn() -> None:
            opt.zero_grad(set_to_none=True)
            for _ in range(passes):
                F.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        sam = fastsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, **ADAMW)
        if kind == "sam_step":
            def fn() -> None:
                fastsam.sam_step(model, sam, x, y, F.cross_entropy)
        else:
            def fn() -> None:
                sam.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                sam.first_step(zero_grad=True)
                F.cross_entropy(model(x), y).backward()
                sam.second_step(zero_grad=True)

    benchmark.group = "train_step"
    benchmark.extra_info.update({"kind": kind, "model": "TinyViT", "params": model.num_parameters(),
                                 "batch": int(x.shape[0]),
                                 "backend": functional.resolve_backend("auto", "cpu") if "sam" in kind else "torch"})
    _run(benchmark, fn, budget_s=2.0)
