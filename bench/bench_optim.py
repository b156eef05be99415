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

from ._env import write_result

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
    def second_step(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            p.data = self.old[p]  # davda54: the parameter's storage becomes the saved copy
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


def bench_impl(name: str, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device,
               steps: int, warmup: int) -> dict[str, Any]:
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
    out: dict[str, Any] = {}
    # timed before any profiling: torch.profiler leaves CUPTI attached unless TEARDOWN_CUPTI=1,
    # which would slow every later launch (most for the many-launch loop and foreach)
    times = [_timed(device, step) for _ in range(steps)]
    out["ms"] = 1e3 * statistics.median(times)
    out["ms_min"] = 1e3 * min(times)
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["syncs_per_step"] = count_syncs(device, step)
        if name == "fastsam_triton":  # the claim: no host sync at all
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
                out["sync_debug_error_mode"] = "passed"
            except RuntimeError as e:
                out["sync_debug_error_mode"] = f"FAILED: {e}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out.update(count_kernels(device, step))
    if device.type == "cuda":
        out["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - mem0) / 2**20
    return out  # params, optimizer state: freed with this frame (the caller collects)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep_triton(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, steps: int) -> list[dict]:
    """fastsam triton over a few launch geometries (block, warps, programs per SM)."""
    from fastsam.kernels import triton_sam as TS

    rows = []
    # programs_per_sm is a cap: fewer run when the registers do not let that many stay resident
    configs = [(block, warps, pps, True) for block in (1024, 2048, 4096) for warps in (4, 8) for pps in (2, 4, 8)]
    configs.append((2048, 8, 4, False))  # the default geometry with scalar accesses (no full-block split)
    for block, warps, pps, vec in configs:
        row: dict[str, Any] = {"block": block, "num_warps": warps, "programs_per_sm": pps, "vectorize": vec}
        try:
            with TS.configure(block=block, num_warps=warps, programs_per_sm=pps, vectorize=vec):
                row["ms"] = bench_impl("fastsam_triton", shapes, dtype, device, steps, warmup=2)["ms"]
        except Exception as e:  # one geometry failing must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        _free(device)
        rows.append(row)
        print(f"  sweep block={block} warps={warps} pps={pps} vectorize={vec}: "
              + (f"{row['ms']:.3f} ms" if "ms" in row else row["error"]), flush=True)
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


def markdown(results: dict[str, Any]) -> str:
    lines = [f"copy bandwidth: {results['copy_gbps']:.0f} GB/s on {results['device']}", "",
             "| params | dtype | impl | ms/step | GB/s (12-pass floor / time) | % of copy BW | x vs loop | "
             "x vs foreach | kernels | memcpy | syncs | % of copy BW on counted bytes |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    passes = results.get("counted_passes", {})
    for case in results["cases"]:
        rows = case["impls"]
        loop = rows.get("loop", {}).get("ms")
        fe = rows.get("fastsam_foreach", {}).get("ms")
        for name, r in rows.items():
            if "ms" not in r:
                lines.append(f"| {case['preset']} | {case['dtype']} | {name} | {r.get('error', 'n/a')} |")
                continue
            gbps = case["floor_bytes"] / (r["ms"] / 1e3) / 1e9
            counted = passes.get(case["dtype"], {}).get(name)
            real = f"{100 * gbps * counted / case['floor_passes'] / results['copy_gbps']:.0f}" if counted else ""
            lines.append(
                f"| {case['preset']} | {case['dtype']} | {name} | {r['ms']:.3f} | {gbps:.0f} | "
                f"{100 * gbps / results['copy_gbps']:.0f} | {loop / r['ms'] if loop else float('nan'):.2f} | "
                f"{fe / r['ms'] if fe else float('nan'):.2f} | {r.get('kernels', '')} | {r.get('memcpy_memset', '')} | "
                f"{r.get('syncs_per_step', '')} | {real} |")
    if results.get("sweep_vit_b16_fp32"):
        lines += ["", "Launch geometry sweep, fastsam triton, vit_b16 float32:", "",
                  "| BLOCK | num_warps | programs/SM (cap) | vectorize | ms/step |", "|---:|---:|---:|---|---:|"]
        for r in results["sweep_vit_b16_fp32"]:
            ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "")
            lines.append(f"| {r['block']} | {r['num_warps']} | {r['programs_per_sm']} | {r.get('vectorize', True)} | "
                         f"{ms} |")
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
    ap.add_argument("--out", default=None, help="directory for bench_optim.json / .md (default bench/results)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    presets = (args.presets or ("vit_b16,vit_l16" if device.type == "cuda" else "tiny")).split(",")
    impls = args.impls.split(",")
    if device.type == "cpu" and "fastsam_triton" in impls:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            impls.remove("fastsam_triton")  # needs the interpreter on CPU (set before triton is imported)
    copy_gbps = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)
    results: dict[str, Any] = {"device": str(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"),
                               "copy_gbps": copy_gbps, "steps": args.steps, "counted_passes": counted_passes(),
                               "cases": []}
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
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
            for name in impls:
                try:
                    r = bench_impl(name, shapes, dtype, device, args.steps, args.warmup)
                except Exception as e:  # a missing peer library must not stop the run
                    r = {"error": f"{type(e).__name__}: {e}"[:300]}
                _free(device)
                case["impls"][name] = r
                if "ms" in r:
                    gbps = case["floor_bytes"] / (r["ms"] / 1e3) / 1e9
                    print(f"{preset} {dt_name} {name}: {r['ms']:.3f} ms, {gbps:.0f} GB/s "
                          f"({100 * gbps / copy_gbps:.0f}% of copy), {r.get('kernels', '?')} kernels, "
                          f"{r.get('syncs_per_step', '?')} syncs", flush=True)
                else:
                    print(f"{preset} {dt_name} {name}: {r['error']}", flush=True)
            results["cases"].append(case)
    def save() -> None:
        path = write_result("bench_optim", results, args.out)
        Path(path).with_suffix(".md").write_text(markdown(results))

    save()  # the main table is on disk before the sweep (a timeout there loses only the sweep)
    if args.sweep and device.type == "cuda":
        results["sweep_vit_b16_fp32"] = sweep_triton(vit_shapes(**PRESETS["vit_b16"]), torch.float32, device, 10)
        save()
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
