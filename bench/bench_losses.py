"""Benchmark: ascent losses (OBF, BiSAM) forward+backward against F.cross_entropy.

For each (B, C) and dtype, one "step" is ``loss = fn(logits, target); loss.backward()`` with
``reduction="mean"``. Compared side by side:

* ``F.cross_entropy``           the training loss, the bar to meet;
* ``<loss>/eager``              the PyTorch formula (``backend="reference"``), autograd through it;
* ``<loss>/fused``              the Triton kernel (``backend="triton"``), CUDA only;
* ``<loss>/compiled``           the PyTorch formula under ``torch.compile`` (``--compile``).

Reported per row: median time per step, peak memory above the inputs (logits + target) during
the step (the logits' gradient included), and ratios against F.cross_entropy and eager.

Targets (issue 4, GPU): fused no slower than F.cross_entropy and with no more peak memory at
every shape; fused >= 2x faster than eager.

Modes:
* CUDA present (default): all methods on the GPU, timings with CUDA events, memory from
  ``torch.cuda.max_memory_allocated``.
* ``--cpu``: eager formula and F.cross_entropy on CPU (no Triton, no interpreter), so the script
  is exercised without a GPU. Memory is the peak resident-set growth during the step (Linux
  VmHWM, see ``_cpu_memory_setup``; page-granular). These numbers say nothing about the GPU
  targets.

Usage::

    python bench/bench_losses.py                      # GPU, the five issue shapes, bf16 and fp32
    python bench/bench_losses.py --cpu                # CPU smoke run (small shapes, fp32)
    python bench/bench_losses.py --shapes 256x1000 4096x128256 --dtypes bf16 --out /tmp/res
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._env import write_result, write_text_atomic  # noqa: E402
from bench.bench_optim import count_kernels  # noqa: E402
from fastsam import losses as L  # noqa: E402

GPU_SHAPES = [(256, 1000), (4096, 1000), (1024, 21843), (8192, 32000), (4096, 128256)]
CPU_SHAPES = [(256, 1000), (4096, 1000), (1024, 21843)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

LOSSES = {
    "obf": (L.obf_loss, {}),
    "obf_sigmoid": (L.obf_loss, {"sigmoid": True}),
    "bisam_log": (L.bisam_loss, {}),
    "bisam_tanh": (L.bisam_loss, {"phi": "tanh"}),
}


def make_fn(method: str):
    """A callable (logits, target) -> scalar loss for a method name."""
    if method == "F.cross_entropy":
        return lambda z, t: F.cross_entropy(z, t)
    loss, kind = method.split("/")
    fn, kw = LOSSES[loss]
    if kind == "fused":
        return lambda z, t: fn(z, t, backend="triton", **kw)
    eager = lambda z, t: fn(z, t, backend="reference", **kw)
    if kind == "eager":
        return eager
    if kind == "compiled":
        return torch.compile(eager, dynamic=False)
    raise ValueError(method)


def make_inputs(B: int, C: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device="cpu").manual_seed(B * 1_000_003 + C)
    z = torch.empty(B, C).normal_(0.0, 2.0, generator=g).to(device=device, dtype=dtype)
    t = torch.randint(0, C, (B,), generator=g).to(device)
    return z, t


def step(fn, z, t) -> None:
    z.grad = None
    fn(z, t).backward()


def time_cuda(fn, z, t, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step(fn, z, t)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step(fn, z, t)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def time_cuda_back_to_back(fn, z, t, iters: int) -> float:
    """ms per step with ``iters`` steps between two events and no sync in between: the host runs
    ahead as in training, so launch and dispatch overhead is hidden where the GPU work is longer
    (``time_cuda`` syncs every step and charges that overhead at small shapes)."""
    step(fn, z, t)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        step(fn, z, t)
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def host_cuda(fn, z, t, iters: int) -> float:
    """ms of host (Python) time per step: wall time of the call with the GPU idle at its start
    (synchronized before, not after), so the launches are only queued; the device time is
    ``time_cuda``'s."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(fn, z, t)
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def time_cpu(fn, z, t, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step(fn, z, t)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step(fn, z, t)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_cuda(fn, z, t) -> int:
    step(fn, z, t)  # compile / autotune outside the measurement
    z.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, z, t)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


_CPU_MEMORY_READY: bool | None = None


def _cpu_memory_setup() -> bool:
    """Make the resident set track live tensors, once: Linux only, else no CPU memory numbers.

    glibc's malloc serves big blocks with mmap but raises that threshold dynamically after a
    free, after which freed tensors stay resident and get reused silently; pinning the threshold
    at 64 KiB (mallopt M_MMAP_THRESHOLD = -3) returns every tensor-sized block on free. The peak
    is then the kernel's VmHWM, which writing "5" to /proc/self/clear_refs resets.
    """
    global _CPU_MEMORY_READY
    if _CPU_MEMORY_READY is None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _proc_status_bytes("VmHWM")
            _CPU_MEMORY_READY = True
        except Exception:
            _CPU_MEMORY_READY = False
    return _CPU_MEMORY_READY


def peak_cpu(fn, z, t) -> int | None:
    """Peak resident-set growth during one step (coarse: page granularity, allocator slack)."""
    if not _cpu_memory_setup():
        return None
    z.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_bytes("VmRSS")
    step(fn, z, t)
    return max(0, _proc_status_bytes("VmHWM") - base)


def cpu_memory_in_child(shapes, dtypes, methods) -> dict[tuple, int | None]:
    """Run the CPU memory pass in a fresh process; {(B, C, dtype, method): peak bytes}."""
    losses = sorted({m.split("/")[0] for m in methods if "/" in m})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", "--shapes",
           *[f"{b}x{c}" for b, c in shapes], "--dtypes", *dtypes, "--losses", *losses]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    try:
        raw = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception:
        print(f"CPU memory pass failed: {out.stderr[-2000:]}", file=sys.stderr)
        return {}
    result = {}
    for key, peak in raw.items():
        shape, dname, method = key.split("|")
        B, C = parse_shape(shape)
        result[(B, C, dname, method)] = peak
    return result


def parse_shape(s: str) -> tuple[int, int]:
    b, c = s.lower().split("x")
    return int(b), int(c)


def markdown(rows: list[dict], device: str) -> str:
    lines = [
        f"Ascent losses, forward+backward, reduction=mean, on {device}.",
        "",
        "ms: device time of one synchronized step (CUDA events); back-to-back: steps issued with no sync; "
        "host ms: wall time of the Python call with the device idle at its start (launches only queued).",
        "",
        "| B x C | dtype | method | ms | ms back-to-back | host ms | peak MB | time / F.ce | b2b time / F.ce "
        "| mem / F.ce | eager / this | kernels |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        def f(x, fmt):
            return "" if x is None else format(x, fmt)
        lines.append(
            f"| {r['B']}x{r['C']} | {r['dtype']} | {r['method']} | {f(r['ms'], '.3f')} | "
            f"{f(r.get('ms_b2b'), '.3f')} | {f(r.get('host_ms'), '.3f')} | {f(r['peak_mb'], '.1f')} | "
            f"{f(r.get('time_vs_ce'), '.2f')} | "
            f"{f(r.get('b2b_time_vs_ce'), '.2f')} | {f(r.get('mem_vs_ce'), '.2f')} | "
            f"{f(r.get('speedup_vs_eager'), '.2f')} | {r.get('kernels', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU mode: eager formula vs F.cross_entropy, no triton")
    p.add_argument("--shapes", nargs="*", type=parse_shape, help="BxC list, e.g. 256x1000 4096x128256")
    p.add_argument("--dtypes", nargs="*", choices=list(DTYPES), help="default: bf16 fp32 (GPU), fp32 (CPU)")
    p.add_argument("--losses", nargs="*", choices=list(LOSSES), default=list(LOSSES))
    p.add_argument("--compile", action="store_true", help="also time the formula under torch.compile")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU mode: torch threads (default 1: on a shared 2-core machine, OpenMP "
                        "barriers under load made 2 threads 10-40x slower than 1 for small shapes)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--_memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._memory_child:  # CPU memory pass, see cpu_memory_in_child
        _cpu_memory_setup()
        out = {}
        for B, C in args.shapes:
            for dname in args.dtypes:
                z, t = make_inputs(B, C, DTYPES[dname], "cpu")
                z.requires_grad_(True)
                for method in ["F.cross_entropy"] + [f"{loss}/eager" for loss in args.losses]:
                    out[f"{B}x{C}|{dname}|{method}"] = peak_cpu(make_fn(method), z, t)
                del z, t
        print(json.dumps(out))
        return 0

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda:
        torch.set_num_threads(args.threads)
    if not cuda and not args.cpu:
        print("no CUDA device: running the CPU mode (--cpu); GPU numbers are pending", file=sys.stderr)
    device = "cuda" if cuda else "cpu"
    shapes = args.shapes or (GPU_SHAPES if cuda else CPU_SHAPES)
    dtypes = args.dtypes or (["bf16", "fp32"] if cuda else ["fp32"])
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    iters = args.iters if args.iters is not None else (20 if cuda else 3)
    kinds = ["eager"] + (["fused"] if cuda else []) + (["compiled"] if args.compile else [])
    methods = ["F.cross_entropy"] + [f"{loss}/{k}" for loss in args.losses for k in kinds]

    name = f"losses_{device}"
    table: dict[tuple, dict] = {}

    def finish() -> dict:
        """Ratios against F.cross_entropy / eager for the rows so far, and the targets."""
        rows = list(table.values())
        for row in rows:
            ce = table.get((row["B"], row["C"], row["dtype"], "F.cross_entropy"), {})
            if row["ms"] and ce.get("ms"):
                row["time_vs_ce"] = row["ms"] / ce["ms"]
            if row.get("ms_b2b") and ce.get("ms_b2b"):
                row["b2b_time_vs_ce"] = row["ms_b2b"] / ce["ms_b2b"]
            if row["peak_bytes"] and ce.get("peak_bytes"):
                row["mem_vs_ce"] = row["peak_bytes"] / ce["peak_bytes"]
            if row["method"].endswith(("/fused", "/compiled")):
                eager = table.get((row["B"], row["C"], row["dtype"], row["method"].split("/")[0] + "/eager"))
                if eager and eager["ms"] and row["ms"]:
                    row["speedup_vs_eager"] = eager["ms"] / row["ms"]
        summary: dict = {"device": device, "shapes": [list(s) for s in shapes], "dtypes": dtypes,
                         "warmup": warmup, "iters": iters, "rows": rows,
                         "complete": len(rows) == len(shapes) * len(dtypes) * len(methods)}
        if cuda:
            fused = [r for r in rows if r["method"].endswith("/fused") and r["ms"] is not None]
            summary["targets"] = {
                "fused_not_slower_than_ce": all(r.get("time_vs_ce", 9) <= 1.0 for r in fused),
                "fused_not_slower_than_ce_back_to_back": all(r.get("b2b_time_vs_ce", 9) <= 1.0 for r in fused),
                "fused_rows_failed": [f"{r['B']}x{r['C']} {r['dtype']} {r['method']}: {r['error']}"
                                      for r in rows if r["method"].endswith("/fused") and r.get("error")],
                "fused_no_more_memory_than_ce": all(r.get("mem_vs_ce", 9) <= 1.0 for r in fused),
                "fused_2x_faster_than_eager": all(r.get("speedup_vs_eager", 0) >= 2.0 for r in fused),
            }
        else:
            summary["note"] = ("CPU mode: eager formula vs F.cross_entropy only; the fused Triton path "
                               "and the GPU targets are not measured here (GPU numbers pending).")
        return summary

    def save() -> Path:
        # after every row: a run cut by its time cap keeps every row measured before the cut
        path = write_result(name, finish(), args.out)
        write_text_atomic(path.with_suffix(".md"), markdown(list(table.values()), device))
        return path

    # Timings here; memory on CPU in one child process (the memory probe changes malloc's
    # behaviour for the whole process, see _cpu_memory_setup, which must not touch timings).
    for B, C in shapes:
        for dname in dtypes:
            z, t = make_inputs(B, C, DTYPES[dname], device)
            z.requires_grad_(True)
            for method in methods:
                row = table[(B, C, dname, method)] = {
                    "B": B, "C": C, "dtype": dname, "method": method, "ms": None, "ms_b2b": None,
                    "host_ms": None, "peak_bytes": None, "peak_mb": None}
                fn = make_fn(method)
                try:
                    row["ms"] = (time_cuda if cuda else time_cpu)(fn, z, t, warmup, iters)
                    if cuda:
                        row["ms_b2b"] = time_cuda_back_to_back(fn, z, t, iters)
                        row["host_ms"] = host_cuda(fn, z, t, max(1, min(iters, 10)))
                    if cuda and not args.no_memory:
                        row["peak_bytes"] = peak_cuda(fn, z, t)
                        row["peak_mb"] = row["peak_bytes"] / 2**20
                    if cuda:  # after the timings: the profiler must not slow them (see bench_optim)
                        row["kernels"] = count_kernels(torch.device("cuda"), lambda fn=fn, z=z, t=t: step(fn, z, t))[
                            "kernels"]
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row["error"] = "OOM"
                except Exception as e:  # one failing method must not lose the other rows
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                z.grad = None
                print(f"{B}x{C} {dname} {method:24s} " + (
                    row.get("error", "?") if row["ms"] is None else
                    f"{row['ms']:10.3f} ms" + (f" ({row['ms_b2b']:.3f} back-to-back, host {row['host_ms']:.3f})"
                                               if row["ms_b2b"] else "")), flush=True)
                save()
            del z, t
    if not cuda and not args.no_memory:
        for key, peak in cpu_memory_in_child(shapes, dtypes, methods).items():
            table[key]["peak_bytes"] = peak
    for row in table.values():
        if row["peak_bytes"] is not None:
            row["peak_mb"] = row["peak_bytes"] / 2**20
            print(f"{row['B']}x{row['C']} {row['dtype']} {row['method']:24s} peak {row['peak_mb']:10.1f} MB")
    path = save()
    summary = finish()
    print(f"wrote {path} and {path.with_suffix('.md')}")
    if cuda:
        print("targets:", json.dumps(summary["targets"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
