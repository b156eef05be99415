"""Bytes moved, kernels launched and peak memory per step, counted on a CPU (no timing).

The GPU targets of issues 3 and 4 are times, and a bandwidth-bound GPU step takes about
``bytes / achieved bandwidth + launches x a few us``. This script counts the bytes, the launches
and the memory from the same code that runs on a GPU (:mod:`bench.traffic`: ATen ops under a
traffic model, Triton kernels exactly from the interpreter's loads and stores), so a CPU machine
can check the part of each target that does not depend on the achieved bandwidth:

* ``optim`` (issue 3): one SAM step, ``first_step()`` + ``second_step()`` with an AdamW base,
  for the per-parameter loop (davda54/sam style, ``bench.bench_optim.LoopSAM``),
  ``pytorch_optimizer.SAM`` (if installed), fastsam foreach, fastsam triton and plain AdamW,
  on the timm ViT-B/16 tensor list (152 tensors) at 1/16 of the width (the passes do not depend
  on the width; the interpreter would need ~an hour for the full 86.6M parameters). torch's
  AdamW runs with ``foreach=True``, its default on CUDA. Passes = bytes / (parameters x itemsize);
  the floor of docs/design.md section 4 is 12. A second table: the triton step with each option.
* ``losses`` (issue 4): ``loss(logits, target).backward()`` with ``reduction="mean"`` for
  F.cross_entropy, the fused OBF / BiSAM losses and their eager PyTorch formula; passes = bytes /
  (B x C x itemsize), peak = most tensor memory alive at once during the step (the logits'
  gradient included) in the same unit. The issue's shapes are (256, 1000), (4096, 1000),
  (1024, 21843), (8192, 32000), (4096, 128256); both counts are per row, so a few rows of each
  width stand for them. The target-range check that runs on CPU tensors only (6 small ops, a
  GPU skips it: it would sync) is measured alone and subtracted.

Usage::

    python -m bench.bench_traffic              # both parts, results in bench/results/traffic_cpu.*
    python -m bench.bench_traffic --quick      # smoke run (tiny sizes)
    python -m bench.bench_traffic --part losses --out /tmp/res

The counts are deterministic: a rerun gives the same numbers on any machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on CPU

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._env import write_result  # noqa: E402
from bench.bench_optim import PRESETS, build, make_params, numel, vit_shapes  # noqa: E402
from bench.make_tables import render_traffic  # noqa: E402
from bench.traffic import Counts, Meter  # noqa: E402

OPTIM_METHODS = ["loop", "pytorch_optimizer", "fastsam_foreach", "fastsam_triton", "adamw_only"]
# triton step with one option at a time (SAM options of docs/design.md section 4 and their byte cost)
OPTIONS = {
    "plain": {},
    "asam": {"adaptive": True},
    "fsam": {"fsam_sigma": 0.5},
    "gsam": {"gsam_alpha": 0.1},
    "esam_masks": {"swp_keep": 0.5},
    "p=3": {"p": 3.0},
    "all": {"adaptive": True, "fsam_sigma": 0.5, "gsam_alpha": 0.1, "swp_keep": 0.5},
}
LOSS_WIDTHS = [(16, 1000), (4, 21843), (4, 32000), (2, 128256), (1, 262144)]  # (rows, C)
LOSS_WIDTHS_QUICK = [(4, 1000), (1, 32000)]


def _vit(scale: int) -> list[tuple[int, ...]]:
    cfg = dict(PRESETS["vit_b16"])
    cfg.update(dim=cfg["dim"] // scale, mlp=cfg["mlp"] // scale)
    return vit_shapes(**cfg)


def measure_sam_step(name: str, shapes: list[tuple[int, ...]], dtype: torch.dtype,
                     options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts of first_step and second_step, in steady state (after two warm-up steps)."""
    params = make_params(shapes, dtype)
    opt = build(name, params, lr=1e-4, sam_options=options, foreach=True)  # foreach: the CUDA default
    for _ in range(2):  # state allocated, tables uploaded, F-SAM / Adam first-step branches passed
        opt.first_step()
        opt.second_step()
    with Meter() as m1:
        opt.first_step()
    with Meter() as m2:
        opt.second_step()
    per_pass = numel(shapes) * torch.empty((), dtype=dtype).element_size()
    c1, c2 = m1.counts, m2.counts
    return {
        "kernels_first": c1.kernels, "kernels_second": c2.kernels,
        "passes_first": c1.data_bytes / per_pass, "passes_second": c2.data_bytes / per_pass,
        "passes": (c1.data_bytes + c2.data_bytes) / per_pass,
        "index_passes": (c1.triton_index_bytes + c2.triton_index_bytes) / per_pass,
        "peak_first": c1.peak_bytes / per_pass, "peak_second": c2.peak_bytes / per_pass,
    }


def run_optim(quick: bool) -> dict[str, Any]:
    scale = 64 if quick else 16  # the width does not change the passes: 1/8 gave the same to 0.01
    shapes = _vit(scale)
    out: dict[str, Any] = {"set": f"ViT-B/16 tensors at 1/{scale} width", "tensors": len(shapes),
                           "numel": numel(shapes), "rows": [], "options": []}
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for name in OPTIM_METHODS:
            t0 = time.perf_counter()
            try:
                r = measure_sam_step(name, shapes, dtype)
            except ImportError as e:  # pytorch_optimizer not installed
                print(f"optim {name}: skipped ({e})", flush=True)
                continue
            row = {"dtype": str(dtype).removeprefix("torch."), "method": name, **r}
            out["rows"].append(row)
            print(f"optim {row['dtype']} {name}: kernels {r['kernels_first']} + {r['kernels_second']}, "
                  f"passes {r['passes_first']:.2f} + {r['passes_second']:.2f} = {r['passes']:.2f}, allocated "
                  f"{r['peak_first']:.2f} / {r['peak_second']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    opt_shapes = _vit(2 * scale) if not quick else shapes
    out["options_set"] = f"ViT-B/16 tensors at 1/{2 * scale if not quick else scale} width, float32, fastsam triton"
    for label, options in OPTIONS.items():
        if quick and label not in ("plain", "all"):
            continue
        r = measure_sam_step("fastsam_triton", opt_shapes, torch.float32, options)
        out["options"].append({"options": label, **r})
        print(f"optim triton {label}: kernels {r['kernels_first']} + {r['kernels_second']}, passes "
              f"{r['passes_first']:.2f} + {r['passes_second']:.2f}", flush=True)
    return out


def _loss_fns() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    from fastsam import losses as L

    fns: dict[str, Callable] = {"F.cross_entropy": lambda z, t: F.cross_entropy(z, t)}
    for label, fn, kw in [("obf", L.obf_loss, {}), ("obf_sigmoid", L.obf_loss, {"sigmoid": True}),
                          ("bisam_log", L.bisam_loss, {}), ("bisam_tanh", L.bisam_loss, {"phi": "tanh"})]:
        for kind, backend in (("fused", "triton"), ("eager", "reference")):
            fns[f"{label}/{kind}"] = lambda z, t, fn=fn, kw=kw, backend=backend: fn(z, t, backend=backend, **kw)
    return fns


def _minus(c: Counts, check: Counts) -> tuple[int, int]:
    """(kernels, bytes) of ``c`` without the CPU-only target check's ops."""
    return c.kernels - check.kernels, c.data_bytes - check.torch_read - check.torch_written


def run_losses(quick: bool) -> dict[str, Any]:
    from fastsam import losses as L

    out: dict[str, Any] = {"rows": []}
    fns = _loss_fns()
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for B, C in LOSS_WIDTHS_QUICK if quick else LOSS_WIDTHS:
            g = torch.Generator().manual_seed(B * 7 + C)
            z = torch.randn(B, C, generator=g).mul_(3).to(dtype).requires_grad_()
            t = torch.randint(0, C, (B,), generator=g)
            with Meter() as chk:
                L._check_common(z, t, "mean", "triton", -100)
            per_pass = B * C * z.element_size()
            ce = None
            for name, fn in fns.items():
                z.grad = None
                fn(z, t).backward()  # warm: kernels compiled, nothing lazily allocated later
                z.grad = None
                with Meter() as m:
                    fn(z, t).backward()
                c = m.counts
                check = chk.counts if name != "F.cross_entropy" else Counts()
                kernels, nbytes = _minus(c, check)
                row = {"dtype": str(dtype).removeprefix("torch."), "C": C, "method": name, "kernels": kernels,
                       "passes": nbytes / per_pass, "peak_passes": c.peak_bytes / per_pass,
                       "triton_launches": sum(c.triton_launches.values())}
                if ce is None:
                    ce = row
                row["bytes_vs_ce"] = row["passes"] / ce["passes"]
                row["peak_vs_ce"] = row["peak_passes"] / ce["peak_passes"]
                out["rows"].append(row)
            print(f"losses {dtype} C={C}: " + ", ".join(
                f"{r['method']} {r['kernels']}k {r['passes']:.2f}p peak {r['peak_passes']:.2f}"
                for r in out["rows"] if r["C"] == C and r["dtype"] == str(dtype).removeprefix("torch.")), flush=True)
    out["cpu_only_check_ops_subtracted"] = chk.counts.kernels
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="optim,losses", help="comma list of optim, losses")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, fp32 only")
    ap.add_argument("--out", default=None, help="directory for traffic_cpu.json / .md (default bench/results)")
    args = ap.parse_args(argv)
    parts = args.part.split(",")
    bad = [p for p in parts if p not in ("optim", "losses")]
    if bad:
        ap.error(f"--part: unknown {bad}; allowed: optim, losses")
    torch.set_num_threads(1)  # counts do not depend on it; the interpreter is single-threaded anyway
    results: dict[str, Any] = {"quick": args.quick}
    if "losses" in parts:
        results["losses"] = run_losses(args.quick)
    if "optim" in parts:
        results["optim"] = run_optim(args.quick)
    path = write_result("traffic_cpu", results, args.out)
    Path(path).with_suffix(".md").write_text(render_traffic(results, full=True))
    print(render_traffic(results, full=True))
    return results


if __name__ == "__main__":
    main()
