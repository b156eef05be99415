"""Every Triton kernel variant that real launches produce, compiled for sm_90 on a CPU (no GPU).

``python -m bench.aot_launches [--jobs 2] [--sweep] [--json FILE]`` (``tests/test_aot_launches.py``
runs it in CI):

1. record (a child process under ``TRITON_INTERPRET=1``): the scenarios below call the public
   API (``fastsam.SAM`` steps, ``accumulate`` / ``base_step`` / ``restore``, the ascent losses)
   with the GPU launch geometry forced, and :class:`fastsam.kernels._triton_aot.LaunchRecorder`
   keeps one record per distinct specialization of each launch, without executing it;
2. compile (``--jobs`` child processes without the interpreter): each record through its
   kernel's own JIT entry point for sm_90 (:func:`~fastsam.kernels._triton_aot.compile_records`);
3. report one line per compiled variant (registers, spills, vector / scalar accesses) and fail
   on a compile error, on a spill outside the allowance of
   :func:`~fastsam.kernels._triton_aot.launch_spill_is_a_failure`, on a vectorized (SPLIT +
   ALIGNED) SAM variant with no 16-byte access, or when a kernel of the package (a module-level
   ``@triton.jit`` function named ``*_kernel`` in ``fastsam.kernels``) was launched by no scenario.

Scenarios (what the GPU suite and a user launch, at the default LaunchConfig):
- the benchmark's parameter sets (bench_optim: ViT-B/16 and ViT-L/16, fp32 and bf16, AdamW),
  each with the configured programs per SM (4: 528 programs, a multiple of 16) and with 3 (396:
  not one), because after a family's first launch the grid shrinks to what its registers let stay
  resident, and the grid size reaches the kernels as integer arguments;
- every perturbation option (ASAM, F-SAM, GSAM, ESAM masks, p = 2 / 3 / inf, all at once) in
  every dtype (fp32, bf16, fp16, fp64) with SGD (momentum, nesterov, maximize), Adam (amsgrad)
  and AdamW bases; m-SAM accumulate + base_step, restore, mixed-dtype groups;
- the ascent losses (OBF softmax / sigmoid, BiSAM log / tanh) at the benchmark's widths
  (bench_losses.GPU_SHAPES) and a test width, with and without a gradient, every reduction;
  the row kernels see only C (a few rows suffice), the reduction only B (a narrow row suffices);
- ``--sweep``: also the launch-geometry sweep of ``bench_optim --sweep`` (not in CI: ~100 more
  variants).

Registers and spills are those of the installed Triton's ptxas (CI: triton 3.9); the GPU machine's
triton 3.6 may differ by a few registers (NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ scenarios
# option sets, as in tests/_harness.OPTIONS (values are host scalars: only their presence and p's
# class reach the kernels as constexprs)
OPTIONS: dict[str, dict[str, Any]] = {
    "sam": {},
    "asam": {"adaptive": True, "eta": 0.01, "rho": 0.5},
    "fsam": {"fsam_sigma": 1.0, "fsam_lambda": 0.6},
    "gsam": {"gsam_alpha": 0.3},
    "esam": {"swp_keep": 0.6, "seed": 7},
    "p_3": {"p": 3.0},
    "p_inf+fsam": {"p": math.inf, "rho": 0.01, "fsam_sigma": 1.0},
    "all": {"adaptive": True, "eta": 0.02, "rho": 0.3, "fsam_sigma": 0.5, "gsam_alpha": 0.4, "swp_keep": 0.7,
            "p": 2.5, "seed": 12345},
}


def _bases() -> dict[str, tuple[Any, dict[str, Any]]]:
    import torch

    return {
        "adamw": (torch.optim.AdamW, {"lr": 1e-4, "weight_decay": 0.05}),
        "adam_amsgrad": (torch.optim.Adam, {"lr": 1e-3, "weight_decay": 0.01, "amsgrad": True}),
        "sgd_nesterov": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
        "sgd_maximize": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "maximize": True}),
        "sgd_plain": (torch.optim.SGD, {"lr": 0.1}),
    }


def _params(shapes: list[tuple[int, ...]], dtypes: Any) -> list[Any]:
    """Parameters and gradients that are never read (nothing runs): torch.empty keeps even a
    ViT-L's gigabytes unbacked (untouched pages)."""
    import torch

    dts = dtypes if isinstance(dtypes, (list, tuple)) else [dtypes] * len(shapes)
    ps = [torch.nn.Parameter(torch.empty(s, dtype=d)) for s, d in zip(shapes, dts)]
    for p in ps:
        p.grad = torch.empty_like(p)
    return ps


def _sam_steps(shapes: list[tuple[int, ...]], dtype: Any, base: str, options: dict[str, Any],
               steps: int = 3) -> None:
    import fastsam

    cls, kw = _bases()[base]
    opt = fastsam.SAM(_params(shapes, dtype), cls, backend="triton", **{"rho": 0.05, **options}, **kw)
    for _ in range(steps):  # the first steps differ (fresh momentum buffers, F-SAM EMA start)
        opt.first_step()
        opt.second_step()


def _msam(shapes: list[tuple[int, ...]], dtype: Any, base: str, options: dict[str, Any]) -> None:
    import fastsam

    cls, kw = _bases()[base]
    opt = fastsam.SAM(_params(shapes, dtype), cls, backend="triton", **options, **kw)
    for _ in range(2):
        for w in (0.25, 0.75):  # two micro-batches: restore + GSAM + accumulate, fused
            opt.first_step()
            opt.accumulate(w)
        opt.load_accumulated()
        opt.base_step()
    opt.first_step()
    opt.restore()


# a small set: tensors of 1 and of many blocks, a non-multiple of 16 and a multiple
SMALL = [(7, 5), (33,), (1,), (3000,), (2048 * 3 + 16,), (64, 65)]


def sam_scenarios(sweep: bool = False) -> Iterator[tuple[str, Callable[[], None]]]:
    import torch

    from bench.bench_optim import PRESETS, SWEEP_DEFAULT, vit_shapes
    from fastsam.kernels import triton_sam as TS

    for preset in ("vit_b16", "vit_l16"):  # bench_optim's main table
        for dtype in (torch.float32, torch.bfloat16):
            for pps in (TS.get_config().programs_per_sm, 3):
                def run(preset=preset, dtype=dtype, pps=pps) -> None:
                    with TS.configure(programs_per_sm=pps):
                        _sam_steps(vit_shapes(**PRESETS[preset]), dtype, "adamw", {}, steps=2)
                yield f"bench {preset} {dtype} AdamW pps={pps}", run
    bases = ["adamw", "sgd_nesterov", "adam_amsgrad", "sgd_maximize", "adamw", "sgd_plain", "adamw", "sgd_nesterov"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for (name, opts), base in zip(OPTIONS.items(), bases):
            yield f"{name} {base} {dtype}", lambda d=dtype, o=opts, b=base: _sam_steps(SMALL, d, b, o)
        if dtype in (torch.float32, torch.bfloat16):
            for name in ("sam", "gsam"):
                yield f"m-SAM {name} {dtype}", lambda d=dtype, n=name: _msam(SMALL, d, "adamw", OPTIONS[n])
            yield f"m-SAM sgd {dtype}", lambda d=dtype: _msam(SMALL, d, "sgd_nesterov", OPTIONS["gsam"])
    mixed = [torch.float32, torch.bfloat16] * (len(SMALL) // 2)
    yield "mixed fp32+bf16 all", lambda: _sam_steps(SMALL, mixed, "adamw", OPTIONS["all"])
    if sweep:  # bench_optim --sweep: ViT-B fp32 at every geometry, both grid-size classes
        for block, warps, pps, vec in SWEEP_DEFAULT:
            for p in sorted({pps, 3}):
                def run(block=block, warps=warps, pps=p, vec=vec) -> None:
                    with TS.configure(block=block, num_warps=warps, programs_per_sm=pps, vectorize=vec):
                        _sam_steps(vit_shapes(**PRESETS["vit_b16"]), torch.float32, "adamw", {}, steps=2)
                yield f"sweep block={block} warps={warps} pps={p} vectorize={vec}", run


def loss_scenarios() -> Iterator[tuple[str, Callable[[], None]]]:
    import torch

    from bench.bench_losses import GPU_SHAPES
    from fastsam import losses as LS

    variants = {"obf": (LS.obf_loss, {}), "obf_sigmoid": (LS.obf_loss, {"sigmoid": True}),
                "bisam_log": (LS.bisam_loss, {}), "bisam_tanh": (LS.bisam_loss, {"phi": "tanh"})}

    def run(B: int, C: int, dtype: Any, reductions: tuple[str, ...]) -> None:
        z = torch.empty(B, C, dtype=dtype)
        t = torch.zeros(B, dtype=torch.int64)
        for fn, kw in variants.values():
            zz = z.detach().requires_grad_()
            for red in reductions:
                fn(zz, t, backend="triton", reduction=red, **kw).sum().backward()  # with the gradient
                with torch.no_grad():
                    fn(z, t, backend="triton", reduction=red, **kw)  # logits that need none: no gradient

    widths = sorted({c for _, c in GPU_SHAPES} | {10, 8192})  # 8192: the widest one-chunk row
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for C in widths:  # the row kernels see C (and the logits' stride), never B
            yield f"losses C={C} {dtype}", lambda C=C, dtype=dtype: run(4, C, dtype, ("mean",))
    for B in sorted({b for b, _ in GPU_SHAPES} | {1, 7}):  # the reduction sees B, never C
        yield f"losses B={B} reductions", lambda B=B: run(B, 10, torch.float32, ("mean", "sum", "none"))


def record(out: str, sweep: bool) -> int:
    """Child process (TRITON_INTERPRET=1): run every scenario under the recorder, write the records."""
    import torch

    from fastsam.kernels._triton_aot import LaunchRecorder

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with LaunchRecorder() as rec:
        for tag, fn in [*sam_scenarios(sweep), *loss_scenarios()]:
            rec.tag = tag
            fn()
    records = rec.dump()
    with open(out, "w") as f:
        json.dump(records, f)
    print(f"recorded {rec.launches} launches, {len(records)} distinct specializations in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    return 0


def kernels_of_package() -> list[str]:
    """Module-level @triton.jit functions named ``*_kernel`` in fastsam.kernels (every launchable
    kernel of the package: the helpers are ``_*_block``, ``_store_grad`` ...)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import fastsam.kernels as pkg

    names = set()
    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name in ("_triton_aot",):
            continue
        try:
            mod = importlib.import_module(f"fastsam.kernels.{m.name}")
        except Exception:  # a backend that cannot import here (no compiler, ...) has no Triton kernel
            continue
        for k, v in vars(mod).items():
            if isinstance(v, JITFunction) and k.endswith("_kernel") and v.fn.__module__ == mod.__name__:
                names.add(k)
    return sorted(names)


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sweep", action="store_true", help="also the geometries of bench_optim --sweep")
    ap.add_argument("--json", default=None, help="write records and results here")
    ap.add_argument("--record", default=None, help=argparse.SUPPRESS)  # the recording child
    args = ap.parse_args(argv)
    if args.record:
        return record(args.record, args.sweep)

    t0 = time.perf_counter()
    base_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base_env["PYTHONPATH"] = str(ROOT) + os.pathsep + base_env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        rec_path = os.path.join(tmp, "records.json")
        cmd = [sys.executable, "-m", "bench.aot_launches", "--record", rec_path] + (["--sweep"] if args.sweep else [])
        r = _run(cmd, {**base_env, "TRITON_INTERPRET": "1"}, 900)
        print(r.stdout.strip(), flush=True)
        if r.returncode != 0:
            print(f"recording failed:\n{r.stderr[-6000:]}")
            return 1
        records = json.loads(Path(rec_path).read_text())
        t_rec = time.perf_counter() - t0
        # one kernel's records in one worker (its duplicates then hit Triton's in-process cache);
        # the biggest kernels spread first (longest-processing-time order over the workers)
        by_kernel: dict[str, list[int]] = {}
        for i, rr in enumerate(records):
            by_kernel.setdefault(rr["kernel"], []).append(i)
        shards: list[list[int]] = [[] for _ in range(max(1, args.jobs))]
        for idx in sorted(by_kernel.values(), key=len, reverse=True):
            for i in idx:  # round-robin inside a kernel: its variants are the expensive part
                min(shards, key=len).append(i)
        procs = []
        for j, shard in enumerate(shards):
            if not shard:
                continue
            src, dst = os.path.join(tmp, f"in{j}.json"), os.path.join(tmp, f"out{j}.json")
            Path(src).write_text(json.dumps([records[i] for i in shard]))
            env = {**base_env, "TRITON_CACHE_DIR": os.path.join(tmp, f"cache{j}")}  # fresh: Triton logs its ptxas
            procs.append((shard, dst, subprocess.Popen(
                [sys.executable, "-m", "fastsam.kernels._triton_aot", "--compile-records", src, dst, str(args.arch)],
                cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        results: list[dict[str, Any] | None] = [None] * len(records)
        failed_workers = []
        for shard, dst, p in procs:
            _, err = p.communicate(timeout=1800)
            if p.returncode != 0 or not Path(dst).is_file():
                failed_workers.append(err[-4000:])
                continue
            for i, res in zip(shard, json.loads(Path(dst).read_text())):
                results[i] = res
    if failed_workers:
        print("compile worker failed:\n" + "\n".join(failed_workers))
        return 1
    return report(records, results, time.perf_counter() - t0, t_rec, args)


def report(records: list[dict[str, Any]], results: list[dict[str, Any] | None], seconds: float, t_rec: float,
           args: argparse.Namespace) -> int:
    from fastsam.kernels._triton_aot import launch_spill_is_a_failure

    def consts(rr: dict[str, Any]) -> dict[str, Any]:
        return {k: next(iter(v.values())) for k, v in rr["kwargs"].items()}

    def ints(rr: dict[str, Any]) -> str:
        return ",".join(f"{n}={a['int']}" for n, a in zip(rr["arg_names"], rr["args"]) if "int" in a)

    errors, spills, allowed, unvectorized, seen = [], [], [], [], {}
    for rr, res in zip(records, results):
        assert res is not None
        c = consts(rr)
        cs = " ".join(f"{k}={v}" for k, v in c.items() if k not in ("num_warps",))
        what = f"{rr['kernel']} [{cs}] warps={c.get('num_warps', 4)} ints({ints(rr)})"
        if "error" in res:
            errors.append(f"{what} from '{rr['tag']}': {res['error'][-1500:]}")
            print(f"ERROR {what}\n      {res['error'][-600:]}", flush=True)
            continue
        dup = res["hash"] in seen
        seen.setdefault(res["hash"], what)
        regs, spill = res.get("regs", -1), res.get("spill", -1)
        flag = ""
        if spill > 0:
            if launch_spill_is_a_failure(rr["kernel"], c, spill):
                spills.append(f"{what} from '{rr['tag']}': {spill} B spilled, {regs} registers")
                flag = "  SPILL (not allowed)"
            else:
                allowed.append(f"{what}: {spill} B")
                flag = "  spill allowed (general-p / p=inf perturbation)"
        if c.get("SPLIT") and c.get("ALIGNED") and res["vector"] == 0:
            unvectorized.append(what)
            flag += "  NO VECTOR ACCESS"
        if not dup:
            print(f"ok {res['seconds']:5.2f}s regs={regs:3d} spill={spill:3d}B vec/scalar={res['vector']}/"
                  f"{res['scalar']} smem={res['shared']} {what}  <- {rr['tag']}{flag}", flush=True)
    kinds = sorted({rr["kernel"] for rr in records})
    missing = [k for k in kernels_of_package() if k not in kinds]
    compile_s = sum(r["seconds"] for r in results if r)
    summary = {"records": len(records), "variants": len(seen), "kernels": kinds, "errors": errors, "spills": spills,
               "allowed_spills": allowed, "unvectorized": unvectorized, "kernels_not_launched": missing,
               "seconds": round(seconds, 1), "record_seconds": round(t_rec, 1), "compile_seconds": round(compile_s, 1)}
    print(f"launch-derived sm_{args.arch}: {len(records)} recorded specializations -> {len(seen)} distinct compiled "
          f"variants of {len(kinds)} kernels in {seconds:.1f}s (record {t_rec:.1f}s, compile {compile_s:.1f}s "
          f"over {args.jobs} processes)")
    print(f"compile errors: {len(errors)}; spills not allowed: {len(spills)}; allowed spills: {len(allowed)}; "
          f"vectorized variants without a vector access: {len(unvectorized)}; kernels never launched: {missing}")
    for line in spills:
        print("  SPILL", line)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "records": records, "results": results}, indent=1))
    return 1 if errors or spills or unvectorized or missing else 0


if __name__ == "__main__":
    sys.exit(main())
