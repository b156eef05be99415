"""Benchmark: the optimizer-side cost of one m-SAM micro-batch after its second backward.

What ``fastsam.sam_step(micro_batch=m)`` does per micro-batch once the gradient at ``w + e`` is
in ``.grad``: restore ``w`` exactly, GSAM-combine (when on), add ``(n_k / B) * g`` into the
running sum. Parameter set: ViT-B/16 (86.6M fp32, 152 tensors; shapes from
:mod:`bench.bench_cpu_optim`); forward/backward and the first step are not timed.

Methods (interleaved round by round, median over rounds):

* ``unfused``  what sam_step did before the fused op: ``opt.restore(apply_gsam=True)`` then
               ``torch._foreach_add_(acc, grads, alpha=w)`` (the backend does the restore);
* ``fused``    ``opt.accumulate(w)``: ``sam_restore_accumulate_``, one call / launch per dtype group;
* ``copy``     ``torch._foreach_copy_`` of the parameters: the 2-pass bandwidth yardstick.

Both move 5 parameter-sized passes without GSAM (read ``w_old``, write ``w``; read ``g``, read
and write ``acc``); with GSAM the unfused path adds a reduction (2) and an in-place combine (3)
for 10, the fused one 8 (the reduction, then ``g_old`` read in the same pass, nothing written
back to ``.grad``).

Usage::

    python -m bench.bench_msam                      # CPU: backends cpp + foreach, 1 and all threads
    python -m bench.bench_msam --device cuda        # GPU: triton (+ cuda ext) + foreach
    python -m bench.bench_msam --quick              # 3 rounds
"""

from __future__ import annotations

import argparse
import gc
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

PASSES = {"unfused": 5, "fused": 5, "unfused_gsam": 10, "fused_gsam": 8, "copy": 2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(backend: str, gsam: bool, fused: bool, device: torch.device, seed: int) -> Callable[[], float]:
    """A timed micro-batch: first_step (untimed), a fresh gradient at w + e (untimed), then the
    restore + accumulate under test (timed, device synchronized)."""
    shapes = vit_b16_shapes()
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
    g1 = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
    g2 = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
    opt = fastsam.SAM(params, torch.optim.SGD, lr=0.1, backend=backend, gsam_alpha=0.1 if gsam else 0.0)
    acc = [torch.zeros_like(p) for p in params]

    def step() -> float:
        for p, g in zip(params, g1):
            p.grad = g
        opt.first_step()
        for p, g in zip(params, g2):
            p.grad = g.clone() if gsam and not fused else g  # the unfused GSAM combine writes .grad
        _sync(device)
        t0 = time.perf_counter()
        if fused:
            opt.accumulate(0.25)
        else:
            opt.restore(apply_gsam=True)
            torch._foreach_add_(acc, [p.grad for p in params], alpha=0.25)
        _sync(device)
        dt = time.perf_counter() - t0
        opt.zero_grad()  # the fused sum stays live: every timed call reads and writes acc
        return dt

    if fused:  # steady state: the timed call adds into a live sum
        for p, g in zip(params, g1):
            p.grad = g
        opt.accumulate(0.0)
        opt.zero_grad()
    return step


def build_copy(device: torch.device) -> Callable[[], float]:
    shapes = vit_b16_shapes()
    src = [torch.randn(s, device=device) for s in shapes]
    dst = [torch.empty_like(t) for t in src]

    def step() -> float:
        _sync(device)
        t0 = time.perf_counter()
        torch._foreach_copy_(dst, src)
        _sync(device)
        return time.perf_counter() - t0

    return step


def measure(methods: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    for fn in methods.values():  # warm-up: tables, compilation, first-touch page faults
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            gc.collect()
            times[name].append(fn())
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results directory")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of 11")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="CPU thread counts (default: all, then 1)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rounds = args.rounds or (3 if args.quick else 11)
    avail = F.available_backends(device)
    backends = [b for b in (("triton", "cuda", "foreach") if device.type == "cuda" else ("cpp", "foreach"))
                if b in avail]
    threads = (args.threads or sorted({torch.get_num_threads(), 1}, reverse=True)) if device.type == "cpu" else [0]
    numel = sum(torch.Size(s).numel() for s in vit_b16_shapes())
    bytes_pass = numel * 4
    results: dict[str, Any] = {"model": "ViT-B/16 fp32", "numel": numel, "rounds": rounds, "device": str(device),
                               "passes": PASSES, "runs": {}}
    old = torch.get_num_threads()
    try:
        for nt in threads:
            if nt:
                torch.set_num_threads(nt)
            methods: dict[str, Callable[[], float]] = {"copy": build_copy(device)}
            for b in backends:
                for gsam in (False, True):
                    for fused in (False, True):
                        name = f"{b}/{'fused' if fused else 'unfused'}{'_gsam' if gsam else ''}"
                        methods[name] = build(b, gsam, fused, device, seed=len(methods))
            times = measure(methods, rounds)
            rows = {}
            for name, ts in times.items():
                kind = name.split("/")[-1]
                med = statistics.median(ts)
                rows[name] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "passes": PASSES[kind],
                              "gb_per_s": PASSES[kind] * bytes_pass / med / 1e9}
            ratios = {}
            for b in backends:
                for sfx in ("", "_gsam"):
                    u, f = times[f"{b}/unfused{sfx}"], times[f"{b}/fused{sfx}"]
                    ratios[f"{b}{sfx}: unfused / fused"] = statistics.median(a / c for a, c in zip(u, f))
            key = f"threads={nt}" if nt else "gpu"
            results["runs"][key] = {"methods": rows, "per_round_median_speedup": ratios}
            print(f"== {key}")
            for name, r in rows.items():
                print(f"  {name:28s} {r['median_ms']:9.2f} ms  {r['gb_per_s']:7.1f} GB/s ({r['passes']} passes)")
            for k, v in ratios.items():
                print(f"  {k:28s} {v:6.2f}x")
    finally:
        torch.set_num_threads(old)
    path = write_result("msam_" + device.type, results, args.out)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
