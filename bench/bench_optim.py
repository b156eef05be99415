"""Optimizer-side cost of one SAM step (first_step + second_step, AdamW base), side by side.

Implementations, all over the same parameter set with gradients already in ``.grad`` (the two
forward/backward passes are not timed; they are the same for every implementation):

- ``loop``: a per-parameter Python loop SAM in the style of davda54/sam (written here):
  ``torch.stack`` of per-tensor norms, per tensor ``clone`` + ``add_``, ``p.data = old_p``,
  then the torch AdamW step (torch's default implementation for the device);
- ``pytorch_optimizer``: ``pytorch_optimizer.SAM`` (if installed);
- ``fastsam_foreach``: ``fastsam.SAM(backend="foreach")`` (restore, then torch AdamW);
- ``fastsam_triton``: ``fastsam.SAM(backend="triton")`` (K1 + K2, then the fused restore + AdamW);
- ``adamw_only``: a plain torch AdamW step, for scale (7 passes).

Parameter sets: timm ViT-B/16 and ViT-L/16 (224 px, 1000 classes) shapes, defined here (timm is
not needed, nothing is downloaded): 86,567,656 and 304,326,632 parameters.

Reported per implementation: median ms per step, effective GB/s = floor bytes / time where the
floor is 12 parameter-sized passes (K1 reads g; K2 reads w, g, writes w, w_old; K3 reads w_old,
g, m, v, writes w, m, v), the fraction of the measured device copy bandwidth that this is,
CUDA kernels + memcpys per step (torch.profiler), host syncs per step
(``torch.cuda.set_sync_debug_mode("warn")``; fastsam triton is also run under ``"error"``),
peak extra memory, and the fraction of the copy bandwidth each implementation reaches on the bytes
it really moves (its passes per step as counted on CPU by ``bench.bench_traffic``, with torch's
CUDA-default foreach AdamW: loop 28, foreach 34, triton 12).
Run ``python -m bench.bench_optim --help``; ``bash bench/gpu_suite.sh`` runs
it on a GPU with the GPU tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._env import write_result, write_text_atomic

# ------------------------------------------------------------------------------ parameter sets
PRESETS: dict[str, dict[str, int]] = {
    "vit_b16": {"dim": 768, "depth": 12, "mlp": 3072, "patch": 16, "img": 224, "classes": 1000},
    "vit_l16": {"dim": 1024, "depth": 24, "mlp": 4096, "patch": 16, "img": 224, "classes": 1000},
    "tiny": {"dim": 32, "depth": 2, "mlp": 64, "patch": 8, "img": 32, "classes": 10},  # CPU smoke test
}
EXPECTED_NUMEL = {"vit_b16": 86_567_656, "vit_l16": 304_326_632}


def vit_shapes(dim: int, depth: int, mlp: int, patch: int, img: int, classes: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a timm VisionTransformer (class token, learned pos embed, pre-norm blocks)."""
    tokens = (img // patch) ** 2 + 1
    shapes: list[tuple[int, ...]] = [(1, 1, dim), (1, tokens, dim), (dim, 3, patch, patch), (dim,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,),  # norm1
                   (3 * dim, dim), (3 * dim,),  # attn.qkv
                   (dim, dim), (dim,),  # attn.proj
                   (dim,), (dim,),  # norm2
                   (mlp, dim), (mlp,),  # mlp.fc1
                   (dim, mlp), (dim,)]  # mlp.fc2
    shapes += [(dim,), (dim,), (classes, dim), (classes,)]  # final norm, head
    return shapes


def numel(shapes: list[tuple[int, ...]]) -> int:
    return sum(int(torch.Size(s).numel()) for s in shapes)


# ------------------------------------------------------------------------------ implementations
class LoopSAM:
    """SAM as in davda54/sam: one Python iteration and several ops per parameter (written here)."""

    def __init__(self, params: list[torch.Tensor], base: type, rho: float = 0.05, **kw: Any) -> None:
        self.params = params
        self.rho = rho
        self.base_optimizer = base(params, **kw)
        self.old: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def first_step(self) -> None:
        norms = [p.grad.norm(p=2).to(self.params[0].device) for p in self.params if p.grad is not None]
        grad_norm = torch.norm(torch.stack(norms), p=2)
        scale = self.rho / (grad_norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.old[p] = p.data.clone()
            p.add_(p.grad * scale.to(p))

    @torch.no_grad()
    def restore(self) -> None:
        for p in self.params:
            if p in self.old:
                p.data = self.old[p]  # davda54: the parameter's storage becomes the saved copy
        self.old.clear()

    @property
    def is_perturbed(self) -> bool:
        return bool(self.old)

    def second_step(self) -> None:
        self.restore()
        self.base_optimizer.step()


class AdamWOnly:
    def __init__(self, params: list[torch.Tensor], **kw: Any) -> None:
        self.opt = torch.optim.AdamW(params, **kw)

    def first_step(self) -> None:
        pass

    def second_step(self) -> None:
        self.opt.step()


def build(name: str, params: list[torch.Tensor], lr: float, sam_options: dict[str, Any] | None = None,
          **base_kw: Any) -> Any:
    """The implementation ``name`` over ``params``: AdamW(lr, weight_decay=0.05, **base_kw) base,
    rho 0.05; ``sam_options`` go to ``fastsam.SAM`` (fastsam backends only)."""
    import fastsam

    kw = {"lr": lr, "weight_decay": 0.05, **base_kw}
    if name == "loop":
        return LoopSAM(params, torch.optim.AdamW, **kw)
    if name == "pytorch_optimizer":
        from pytorch_optimizer import SAM as PSAM

        return PSAM(params, torch.optim.AdamW, rho=0.05, **kw)
    if name in ("fastsam_foreach", "fastsam_triton"):
        backend = name.removeprefix("fastsam_")
        return fastsam.SAM(params, torch.optim.AdamW, rho=0.05, backend=backend, **(sam_options or {}), **kw)
    if name == "adamw_only":
        return AdamWOnly(params, **kw)
    raise ValueError(name)


IMPLS = ["loop", "pytorch_optimizer", "fastsam_foreach", "fastsam_triton", "adamw_only"]


# ------------------------------------------------------------------------------ measurement
def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in GB/s (read + write bytes / time), median of 10 copies."""
    n = nbytes // 4
    x = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    times = [_timed(device, lambda: y.copy_(x)) for _ in range(12)]
    return 2 * nbytes / statistics.median(times[2:]) / 1e9


def _timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Seconds for one call (CUDA events on GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def count_kernels(device: torch.device, step: Callable[[], None]) -> dict[str, int]:
    """CUDA kernels and memcpy/memset per call of ``step`` (torch.profiler)."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = copies = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        low = e.name.lower()
        if "memcpy" in low or "memset" in low:
            copies += 1
        else:
            kernels += 1
    return {"kernels": kernels, "memcpy_memset": copies}


def count_syncs(device: torch.device, step: Callable[[], None]) -> int | None:
    """Host syncs per call of ``step`` (sync debug mode "warn" counts them as warnings)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in rec)


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype,
                device: torch.device | str = "cpu") -> list[torch.nn.Parameter]:
    """Parameters ~ N(0, 0.02^2) with gradients ~ N(0, 1e-6) already in ``.grad``, seed 0."""
    gen = torch.Generator(device=device).manual_seed(0)  # generated on the device: ViT-L is 304M values
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device).mul_(0.02).to(dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device).mul_(1e-3).to(dtype)
    return params


def _restore(opt: Any) -> str | None:
    """Put the weights back after a step that raised between ``first_step`` and ``second_step``
    (a diagnostic run must not leave the optimizer perturbed for the next one); says what it did."""
    try:
        if getattr(opt, "is_perturbed", False):
            opt.restore()
            return "restored"
    except Exception as e:  # the recovery itself failing is reported, never raised
        return f"restore failed: {type(e).__name__}: {e}"[:200]
    return None


def host_times(device: torch.device, step: Callable[[], None], n: int) -> list[float]:
    """Seconds of host (Python) time per call of ``step``: wall time of the call with the device
    idle at its start (synchronized before, not after), so launches are only queued: the cost a
    training loop pays on the CPU whatever the GPU does, as opposed to ``_timed``'s device time."""
    out = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def back_to_back(device: torch.device, step: Callable[[], None], n: int) -> float:
    """Seconds per step for ``n`` steps issued with no sync in between (as in training: the host
    runs ahead, so a step costs max(host, device) once the queue is full)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        step()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / n


def bench_impl(name: str, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device,
               steps: int, warmup: int, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time one implementation; fills and returns ``out``. The timings come first; every later
    diagnostic (host syncs, sync-debug "error" mode, profiler kernel count, peak memory) is
    guarded on its own: one that raises is recorded under ``errors`` and the optimizer is
    restored (a step that raised after ``first_step`` leaves the weights perturbed), so it never
    loses the measured times nor disturbs the next diagnostic."""
    out = {} if out is None else out
    params = make_params(shapes, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    mem0 = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    opt = build(name, params, lr=1e-4)

    def step() -> None:
        opt.first_step()
        opt.second_step()

    for _ in range(warmup):
        step()
    # timed before any profiling: torch.profiler leaves CUPTI attached unless TEARDOWN_CUPTI=1,
    # which would slow every later launch (most for the many-launch loop and foreach)
    times = [_timed(device, step) for _ in range(steps)]
    out["ms"] = 1e3 * statistics.median(times)  # device time per step (CUDA events, synchronized)
    out["ms_min"] = 1e3 * min(times)

    def guarded(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:
            err = f"{type(e).__name__}: {e}"[:300]
            fix = _restore(opt)
            out.setdefault("errors", {})[what] = err + (f" ({fix})" if fix else "")
            return None

    hosts = guarded("host_ms", lambda: host_times(device, step, max(1, min(steps, 10))))
    if hosts:
        out["host_ms"] = 1e3 * statistics.median(hosts)  # Python time per step, launches only queued
        out["host_ms_min"] = 1e3 * min(hosts)
    b2b = guarded("b2b_ms", lambda: back_to_back(device, step, steps))
    if b2b is not None:
        out["b2b_ms"] = 1e3 * b2b
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["syncs_per_step"] = guarded("syncs_per_step", lambda: count_syncs(device, step))
        if name == "fastsam_triton":  # the claim: no host sync at all
            def sync_error_mode() -> str:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    step()
                    return "passed"
                except RuntimeError as e:
                    fix = _restore(opt)
                    return f"FAILED: {e}"[:300] + (f" ({fix})" if fix else "")
                finally:
                    torch.cuda.set_sync_debug_mode("default")

            out["sync_debug_error_mode"] = guarded("sync_debug_error_mode", sync_error_mode)
        out.update(guarded("kernels", lambda: count_kernels(device, step)) or {})
        out["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - mem0) / 2**20
    return out  # params, optimizer state: freed with this frame (the caller collects)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# Launch geometries of the sweep, in the order they are measured (the stage may be cut by its time
# cap): the default geometry and its scalar-access twin first, then 8, 4 and 16 fp32 per thread,
# each at 2, 4 and 8 programs per SM (a cap: fewer run when the registers do not let that many
# stay resident), last 32 per thread (4096 x 4 warps) once: its K3 needs 254 registers with
# triton 3.9's ptxas (sm_90), the 255 cap, and spilled 312 B with an earlier one (bench/NOTES.md).
# (block, num_warps, programs_per_sm cap, vectorize)
SWEEP_DEFAULT: list[tuple[int, int, int, bool]] = [(2048, 8, 4, True), (2048, 8, 4, False)] + [
    (block, warps, pps, True) for block, warps in ((1024, 4), (1024, 8), (2048, 4), (4096, 8), (2048, 8))
    for pps in (2, 4, 8) if (block, warps, pps) != (2048, 8, 4)] + [(4096, 4, 4, True)]


def parse_sweep(spec: str) -> list[tuple[int, int, int, bool]]:
    """``"2048x8x4,2048x8x4:scalar"`` -> [(2048, 8, 4, True), (2048, 8, 4, False)]."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        geo, _, mode = item.partition(":")
        block, warps, pps = (int(v) for v in geo.split("x"))
        out.append((block, warps, pps, mode != "scalar"))
    return out


def sweep_triton(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, steps: int,
                 configs: list[tuple[int, int, int, bool]] | None = None,
                 on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """fastsam triton over launch geometries (block, warps, programs per SM, vectorize); ``on_row``
    gets the rows so far after each geometry (the caller saves them: a time cap loses one row)."""
    from fastsam.kernels import triton_sam as TS

    rows: list[dict] = []
    for block, warps, pps, vec in configs or SWEEP_DEFAULT:
        row: dict[str, Any] = {"block": block, "num_warps": warps, "programs_per_sm": pps, "vectorize": vec}
        try:
            with TS.configure(block=block, num_warps=warps, programs_per_sm=pps, vectorize=vec):
                r = bench_impl("fastsam_triton", shapes, dtype, device, steps, warmup=2)
            row.update({k: r[k] for k in ("ms", "host_ms", "b2b_ms", "kernels", "errors") if k in r})
        except Exception as e:  # one geometry failing must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        _free(device)
        rows.append(row)
        print(f"  sweep block={block} warps={warps} pps={pps} vectorize={vec}: "
              + (f"{row['ms']:.3f} ms" if "ms" in row else row["error"]), flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def counted_passes() -> dict[str, dict[str, float]]:
    """{dtype: {impl: parameter-sized passes per step}} as counted on CPU by ``bench.bench_traffic``
    (``bench/results/traffic_cpu.json``; empty when it is missing): with them the table shows the
    bandwidth each implementation achieves on the bytes it really moves, not only on the floor."""
    try:
        rows = json.loads((Path(__file__).resolve().parent / "results" / "traffic_cpu.json").read_text())
        return {d: {r["method"]: r["passes"] for r in rows["results"]["optim"]["rows"] if r["dtype"] == d}
                for d in {r["dtype"] for r in rows["results"]["optim"]["rows"]}}
    except (OSError, KeyError, ValueError, TypeError):
        return {}


def _f(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"copy bandwidth: {_f(results.get('copy_gbps'), '.0f')} GB/s on {results.get('device')}", "",
             "ms/step: device time (CUDA events around one synchronized step); host ms: wall time of the "
             "Python call with the device idle at its start (launches only queued); b2b: steps issued back to "
             "back with no sync (what training pays: about max(host, device)).", "",
             "| params | dtype | impl | ms/step | host ms | b2b ms | GB/s (12-pass floor / time) | % of copy BW | "
             "x vs loop | x vs foreach | kernels | memcpy | syncs | % of copy BW on counted bytes | errors |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    passes = results.get("counted_passes", {})
    copy = results.get("copy_gbps") or float("nan")
    for case in results.get("cases", []):
        rows = case["impls"]
        loop = rows.get("loop", {}).get("ms")
        fe = rows.get("fastsam_foreach", {}).get("ms")
        for name, r in rows.items():
            errs = "; ".join(f"{k}: {v}" for k, v in r.get("errors", {}).items())
            if "ms" in r and r.get("error"):  # failed after its timing: the time stays, the error is shown
                errs = "; ".join(filter(None, [errs, r["error"]]))
            if r.get("sync_debug_error_mode", "passed") != "passed":
                errs = "; ".join(filter(None, [errs, f"sync debug error mode: {r['sync_debug_error_mode']}"]))
            if "ms" not in r:
                lines.append(f"| {case['preset']} | {case['dtype']} | {name} | {r.get('error', 'n/a')} | | | | | | | | "
                             f"| | | {errs} |")
                continue
            gbps = case["floor_bytes"] / (r["ms"] / 1e3) / 1e9
            counted = passes.get(case["dtype"], {}).get(name)
            real = f"{100 * gbps * counted / case['floor_passes'] / copy:.0f}" if counted else ""
            lines.append(
                f"| {case['preset']} | {case['dtype']} | {name} | {r['ms']:.3f} | {_f(r.get('host_ms'), '.3f')} | "
                f"{_f(r.get('b2b_ms'), '.3f')} | {gbps:.0f} | {100 * gbps / copy:.0f} | "
                f"{loop / r['ms'] if loop else float('nan'):.2f} | {fe / r['ms'] if fe else float('nan'):.2f} | "
                f"{r.get('kernels', '')} | {r.get('memcpy_memset', '')} | {_f(r.get('syncs_per_step'), 'd')} | "
                f"{real} | {errs} |")
    if results.get("sweep_vit_b16_fp32"):
        lines += ["", f"Launch geometry sweep, fastsam triton, {results.get('sweep_case', 'vit_b16 float32')}:", "",
                  "| BLOCK | num_warps | programs/SM (cap) | vectorize | ms/step | host ms | b2b ms |",
                  "|---:|---:|---:|---|---:|---:|---:|"]
        for r in results["sweep_vit_b16_fp32"]:
            ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "")
            lines.append(f"| {r['block']} | {r['num_warps']} | {r['programs_per_sm']} | {r.get('vectorize', True)} | "
                         f"{ms} | {_f(r.get('host_ms'), '.3f')} | {_f(r.get('b2b_ms'), '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default=None, help="comma list (default: vit_b16,vit_l16 on GPU, tiny on CPU)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="also sweep the triton launch geometry (ViT-B fp32)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the sweep, added to an existing <out>/bench_optim.json (a separate, capped stage)")
    ap.add_argument("--sweep-configs", default=None,
                    help="BLOCKxWARPSxPPS[:scalar],... (default: the 20 geometries of SWEEP_DEFAULT); on CPU the "
                         "interpreter ignores the geometry: a plumbing check only")
    ap.add_argument("--sweep-preset", default=None, help="parameter set of the sweep (default vit_b16; tiny on CPU)")
    ap.add_argument("--sweep-steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="directory for bench_optim.json / .md (default bench/results)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    presets = (args.presets or ("vit_b16,vit_l16" if device.type == "cuda" else "tiny")).split(",")
    impls = args.impls.split(",")
    if device.type == "cpu" and "fastsam_triton" in impls:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            impls.remove("fastsam_triton")  # needs the interpreter on CPU (set before triton is imported)

    def save() -> None:
        # after every row: a stage cut by its time cap keeps everything measured before the cut
        path = write_result("bench_optim", results, args.out)
        write_text_atomic(Path(path).with_suffix(".md"), markdown(results))

    prior = Path(args.out or Path(__file__).resolve().parent / "results") / "bench_optim.json"
    if args.sweep_only and prior.is_file():
        try:
            results = json.loads(prior.read_text())["results"]
        except (ValueError, KeyError):
            results = {}
    else:
        results = {}
    if "copy_gbps" not in results:
        results["copy_gbps"] = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)
        results.update({"device": str(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"),
                        "steps": args.steps, "counted_passes": counted_passes(), "cases": []})
        print(f"copy bandwidth {results['copy_gbps']:.0f} GB/s", flush=True)
    if not args.sweep_only:
        results["cases"] = []
        save()
        for preset in presets:
            shapes = vit_shapes(**PRESETS[preset])
            n = numel(shapes)
            if preset in EXPECTED_NUMEL:
                assert n == EXPECTED_NUMEL[preset], (preset, n)
            for dt_name in args.dtypes.split(","):
                dtype = getattr(torch, dt_name)
                item = torch.finfo(dtype).bits // 8
                case = {"preset": preset, "dtype": dt_name, "numel": n, "tensors": len(shapes),
                        "floor_passes": 12, "floor_bytes": 12 * n * item, "impls": {}}
                results["cases"].append(case)
                for name in impls:
                    r: dict[str, Any] = {}
                    case["impls"][name] = r
                    try:
                        bench_impl(name, shapes, dtype, device, args.steps, args.warmup, out=r)
                    except Exception as e:  # a missing peer library must not stop the run
                        r["error"] = f"{type(e).__name__}: {e}"[:300]  # what was measured before stays
                    _free(device)
                    save()
                    if "ms" in r:
                        gbps = case["floor_bytes"] / (r["ms"] / 1e3) / 1e9
                        print(f"{preset} {dt_name} {name}: {r['ms']:.3f} ms (host {_f(r.get('host_ms'), '.3f')}, "
                              f"b2b {_f(r.get('b2b_ms'), '.3f')}), {gbps:.0f} GB/s "
                              f"({100 * gbps / results['copy_gbps']:.0f}% of copy), {r.get('kernels', '?')} kernels, "
                              f"{r.get('syncs_per_step', '?')} syncs"
                              + (f", errors {r['errors']}" if r.get("errors") else ""), flush=True)
                    else:
                        print(f"{preset} {dt_name} {name}: {r['error']}", flush=True)
    # the main table is on disk before the sweep (a timeout there loses only the sweep)
    if (args.sweep or args.sweep_only) and (device.type == "cuda" or args.sweep_configs):
        configs = parse_sweep(args.sweep_configs) if args.sweep_configs else SWEEP_DEFAULT
        preset = args.sweep_preset or ("vit_b16" if device.type == "cuda" else "tiny")
        results["sweep_case"] = f"{preset} float32, {args.sweep_steps} steps"

        def on_row(rows: list[dict]) -> None:
            results["sweep_vit_b16_fp32"] = rows
            save()

        sweep_triton(vit_shapes(**PRESETS[preset]), torch.float32, device, args.sweep_steps, configs, on_row)
    save()
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
