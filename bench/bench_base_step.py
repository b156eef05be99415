"""Benchmark: ``SAM.base_step()`` (the base update after m-SAM micro-batches, clipping or DDP
averaging) against torch's own AdamW step, ViT-B/16 parameter set (86.6M fp32, 152 tensors).

Since this session ``base_step`` runs the fused SGD/Adam/AdamW update of the backend (the
second-step kernel with nothing to restore) instead of ``base_optimizer.step()``. Methods,
interleaved round by round, median over rounds:

* ``fastsam base_step``  ``fastsam.SAM(..., torch.optim.AdamW, backend=<cpp | triton>).base_step``;
* ``torch default``      ``torch.optim.AdamW(params)`` (on CPU tensors: its per-tensor for-loop,
                         which is what ``base_optimizer.step()`` ran before);
* ``torch foreach``      ``AdamW(foreach=True)``;
* ``torch fused``        ``AdamW(fused=True)``: the 7-pass yardstick (reads w, g, m, v; writes w, m, v).

Usage::

    python -m bench.bench_base_step                  # CPU (backend cpp), 1 and all threads
    python -m bench.bench_base_step --device cuda    # GPU (backend triton)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastsam  # noqa: E402
from bench._env import write_result  # noqa: E402
from bench.bench_cpu_optim import vit_b16_shapes  # noqa: E402
from fastsam import functional as F  # noqa: E402

ADAMW = dict(lr=1e-4, weight_decay=0.05)


def _params(device: torch.device, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in vit_b16_shapes()]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    return ps


def methods(device: torch.device, backend: str) -> dict[str, Callable[[], None]]:
    out: dict[str, Callable[[], None]] = {}
    out["fastsam base_step"] = fastsam.SAM(_params(device, 0), torch.optim.AdamW, backend=backend, **ADAMW).base_step
    out["torch default"] = torch.optim.AdamW(_params(device, 1), **ADAMW).step
    out["torch foreach"] = torch.optim.AdamW(_params(device, 2), foreach=True, **ADAMW).step
    out["torch fused"] = torch.optim.AdamW(_params(device, 3), fused=True, **ADAMW).step
    return out


def measure(ms: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    def timed(f: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        f()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for f in ms.values():  # warm-up: state allocation, tables, compilation
        timed(f)
        timed(f)
    times: dict[str, list[float]] = {k: [] for k in ms}
    for _ in range(rounds):
        for k, f in ms.items():
            times[k].append(timed(f))
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results directory")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of 9")
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="CPU thread counts (default: all, then 1)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backend = "triton" if device.type == "cuda" else "cpp"
    # triton: checked without F.available_backends, which would also build the csrc extension
    usable = F._triton_runs_on(device) if backend == "triton" else backend in F.available_backends(device)
    if not usable:
        print(f"backend {backend} not available on {device}: {F.available_backends(device)}")
        return {}
    rounds = 3 if args.quick else 9
    threads = (args.threads or sorted({torch.get_num_threads(), 1}, reverse=True)) if device.type == "cpu" else [0]
    numel = sum(torch.Size(s).numel() for s in vit_b16_shapes())
    res: dict[str, Any] = {"model": "ViT-B/16 fp32, AdamW", "numel": numel, "backend": backend, "rounds": rounds,
                           "runs": {}}
    old = torch.get_num_threads()
    try:
        for nt in threads:
            if nt:
                torch.set_num_threads(nt)
            times = measure(methods(device, backend), rounds, device)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows = {k: {"median_ms": med[k] * 1e3, "min_ms": min(times[k]) * 1e3,
                        "gb_per_s_7_passes": 7 * numel * 4 / med[k] / 1e9} for k in times}
            key = f"threads={nt}" if nt else "gpu"
            res["runs"][key] = {"methods": rows,
                                "torch_default_over_base_step": med["torch default"] / med["fastsam base_step"]}
            print(f"== {key}")
            for k, r in rows.items():
                print(f"  {k:20s} {r['median_ms']:8.1f} ms  {r['gb_per_s_7_passes']:6.1f} GB/s")
    finally:
        torch.set_num_threads(old)
    path = write_result(f"base_step_{device.type}", res, args.out)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
