"""Host (Python) time per SAM step with the kernels stubbed out: what a GPU step would cost the CPU
before the device does anything (issue #16).

A fused GPU step is a handful of launches whose device time is ~1 ms for a ViT-B; if the Python
work that prepares them grows with the tensor count (~10 us a tensor), a 300-tensor model is
host-bound. This measures that work on this machine without a GPU:

- ``triton``: the real launcher code on CPU tensors under the Triton interpreter, with the final
  ``kernel[grid](...)`` call replaced by a no-op (tables, hyper-parameter rows, uploads, state
  bookkeeping all run; no kernel does);
- ``cpp``: the real op wrappers with the extension's ops replaced by no-ops (the C++ side
  validates and launches: on CUDA that is the ``cuda`` backend's host cost too);
- ``sam_step``: ``fastsam.sam_step`` against the same step written by hand (two forward/backward
  passes, first_step, second_step) on a TinyViT-shaped parameter set whose forward and backward
  are cheap; the difference is sam_step's own overhead.

Tensor sizes do not change host time, so the ViT parameter lists are built at 1/16 width (the
same tensor counts: ViT-B/16 152, ViT-L/16 296). Reported: median and minimum ms of
``first_step + second_step``, the cost per tensor (the slope between the two models) and the fixed
cost. ``python -m bench.bench_host [--steps N] [--out DIR]``; writes ``host_cpu.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch

import fastsam
from bench._env import environment, write_text_atomic
from bench.bench_optim import PRESETS, vit_shapes

BASES = {"adamw": (torch.optim.AdamW, {"lr": 1e-4, "weight_decay": 0.05}),
         "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})}


def shapes(preset: str, shrink: int = 16) -> list[tuple[int, ...]]:
    """The preset's parameter shapes with every dimension above 16 divided by ``shrink``."""
    return [tuple(max(1, d // shrink) if d > 16 else d for d in s) for s in vit_shapes(**PRESETS[preset])]


@contextlib.contextmanager
def stubbed(backend: str) -> Iterator[None]:
    """The backend's kernels replaced by no-ops (everything on the host side still runs)."""
    if backend == "triton":
        from fastsam.kernels import triton_launch as TL

        real = TL._launch

        def launch(kernel, grid, *args, **kw):
            TL.LAUNCHES[0] += 1
        TL._launch = launch
        try:
            yield
        finally:
            TL._launch = real
    elif backend == "cpp":
        from fastsam.kernels import cpp_sam

        class Ops:
            @staticmethod
            def sam_perturb(params, *a):
                return torch.ones((), dtype=torch.bool)

            @staticmethod
            def sam_second_step(*a):
                return None

        real = cpp_sam._BACKEND.ops
        cpp_sam._BACKEND.ops = lambda: Ops  # type: ignore[method-assign]
        try:
            yield
        finally:
            cpp_sam._BACKEND.ops = real  # type: ignore[method-assign]
    else:
        yield


def step_times(params: list[torch.nn.Parameter], backend: str, base: str, steps: int,
               **sam_kw: Any) -> dict[str, float]:
    cls, kw = BASES[base]
    opt = fastsam.SAM(params, cls, rho=0.05, backend=backend, **kw, **sam_kw)
    grads = [p.grad for p in params]
    first, second = [], []
    with stubbed(backend):
        for i in range(steps + 5):  # 5 warm-up steps: state, tables, caches
            a = time.perf_counter()
            opt.first_step()
            b = time.perf_counter()
            opt.second_step()
            c = time.perf_counter()
            for p, g in zip(params, grads):  # the next backward's gradients (same tensors)
                p.grad = g
            if i >= 5:
                first.append(b - a)
                second.append(c - b)
    tot = [x + y for x, y in zip(first, second)]
    return {"first_ms": 1e3 * statistics.median(first), "second_ms": 1e3 * statistics.median(second),
            "step_ms": 1e3 * statistics.median(tot), "step_min_ms": 1e3 * min(tot)}


def make(shp: list[tuple[int, ...]]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shp]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    return ps


class _Cheap(torch.nn.Module):
    """TinyViT's parameter shapes with a forward of one op per parameter (the passes cost little,
    so what remains of a step is the optimizer's and sam_step's own work)."""

    def __init__(self, shp: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(make(shp))
        for p in self.ps:
            p.grad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = sum(p.sum() for p in self.ps)
        return x * s


def sam_step_overhead(backend: str, steps: int) -> dict[str, float]:
    from fastsam.models import TinyViT

    shp = [tuple(p.shape) for p in TinyViT().parameters()]
    x, y = torch.randn(32, 10), torch.randn(32, 10)

    def loss(out, tgt, reduction="mean"):
        return torch.nn.functional.mse_loss(out, tgt, reduction=reduction)

    def run(manual: bool) -> list[float]:
        torch.manual_seed(0)
        model = _Cheap(shp)
        opt = fastsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, backend=backend)
        out = []
        for i in range(steps + 5):
            a = time.perf_counter()
            if manual:
                loss(model(x), y).backward()
                opt.first_step(zero_grad=True)
                loss(model(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                fastsam.sam_step(model, opt, x, y, loss)
            if i >= 5:
                out.append(time.perf_counter() - a)
        return out

    manual, step = run(True), run(False)
    return {"tensors": len(shp), "manual_ms": 1e3 * statistics.median(manual),
            "sam_step_ms": 1e3 * statistics.median(step),
            "overhead_ms": 1e3 * (statistics.median(step) - statistics.median(manual))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--label", default="current",
                    help="name of this run in host_cpu.json (other labels' runs are kept: e.g. before / after)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for backend in ("triton", "cpp"):
        if backend not in fastsam.functional.available_backends("cpu"):
            continue
        for base in ("adamw", "sgd"):
            per = {}
            for preset in ("vit_b16", "vit_l16"):
                params = make(shapes(preset))
                r = {"backend": backend, "base": base, "model": preset, "tensors": len(params),
                     **step_times(params, backend, base, args.steps)}
                per[preset] = r
                rows.append(r)
                print(f"{backend:7s} {base:6s} {preset}: {r['tensors']} tensors, first {r['first_ms']:.3f} ms + "
                      f"second {r['second_ms']:.3f} ms = {r['step_ms']:.3f} ms (min {r['step_min_ms']:.3f})",
                      flush=True)
            b, lg = per["vit_b16"], per["vit_l16"]
            slope = (lg["step_ms"] - b["step_ms"]) / (lg["tensors"] - b["tensors"])
            rows.append({"backend": backend, "base": base, "model": "slope", "us_per_tensor": 1e3 * slope,
                         "fixed_ms": b["step_ms"] - slope * b["tensors"], "l_over_b": lg["step_ms"] / b["step_ms"]})
            print(f"{backend:7s} {base:6s}: {1e3 * slope:.2f} us per tensor, "
                  f"ViT-L / ViT-B {lg['step_ms'] / b['step_ms']:.2f}")
    sam = {}
    for backend in ("cpp", "foreach"):
        if backend in fastsam.functional.available_backends("cpu"):
            sam[backend] = sam_step_overhead(backend, args.steps)
            print(f"sam_step overhead ({backend}, TinyViT-shaped, {sam[backend]['tensors']} tensors): "
                  f"{sam[backend]['overhead_ms']:.3f} ms ({sam[backend]['sam_step_ms']:.3f} vs manual "
                  f"{sam[backend]['manual_ms']:.3f})", flush=True)
    import json
    from pathlib import Path

    run = {"environment": environment(), "load_average": os.getloadavg(), "steps": args.steps, "rows": rows,
           "sam_step": sam}
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "host_cpu.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result["note"] = ("host time per SAM step (first_step + second_step) with the kernels stubbed: no device "
                      "work; 1/16-width ViT shapes with the real tensor counts; median of --steps steps, min too")
    result.setdefault("runs", {})[args.label] = run
    write_text_atomic(path, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
