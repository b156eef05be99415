"""The ``fastsam-demo`` command line: parse, say what will run and for how long, run both parts,
write ``results.json`` and ``demo.png``, print the tables."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .digits import DigitsConfig
from .jobs import Progress, default_workers, make_pool
from .labelnoise import RUN_OVERHEAD_S, SELECT_SEED, plan_runs, run_digits, runs_per_variant
from .lsam import QUICK_TOY_RHOS, TOY_RHOS, plan_toy, run_toy
from .machine import environment, extension_build_pending, load_average, step_seconds, warm_up_sam
from .plot import save_plot
from .report import format_report
from .toy import ToyConfig
from .variants import VARIANTS

__all__ = ["DEFAULTS", "RunPlan", "build_parser", "main", "plan_from_args", "run_spec"]

WORKER_START_S = 4.0  # a spawned worker imports torch, fastsam and scikit-learn (estimate)
EXT_BUILD_S = 60.0  # the C++ extension's first build on 2 cores (estimate)


@dataclass(frozen=True)
class RunPlan:
    """Everything that determines the demo's numbers (not where or how fast they are computed)."""

    toy: ToyConfig
    toy_rhos: tuple[float, ...]
    toy_seeds: tuple[int, ...]
    digits: DigitsConfig
    seeds: tuple[int, ...]
    noises: tuple[float, ...]
    variants: tuple[str, ...]
    select: bool
    parts: tuple[str, ...]


DEFAULTS = RunPlan(toy=ToyConfig(), toy_rhos=TOY_RHOS, toy_seeds=tuple(range(12)), digits=DigitsConfig(),
                   seeds=(0, 1, 2), noises=(0.0, 0.4), variants=tuple(VARIANTS), select=True,
                   parts=("toy", "digits"))


def run_spec(plan: RunPlan) -> dict[str, Any]:
    """The plan as JSON, with every registry entry of its variants: stored in results.json and
    compared with the current code's defaults by ``python -m fastsam.demo.readme --check``."""
    d = asdict(plan)
    d["variants"] = [VARIANTS[n].spec() for n in plan.variants]
    d["select_seed"] = SELECT_SEED if plan.select else None
    return json.loads(json.dumps(d))  # tuples as lists, as they come back from the file


# ----------------------------------------------------------------------------------- parsing
def _parse_seeds(text: str) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"0,5,7"`` -> [0, 5, 7]."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: a count (3) or a comma list (0,5,7), got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds: at least one seed, all >= 0, got {text!r}")
    return seeds


def _parse_rhos(text: str) -> list[float]:
    try:
        rhos = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--toy-rhos: a comma list of floats, got {text!r}") from None
    if not rhos or any(not (math.isfinite(r) and r >= 0) for r in rhos):
        raise argparse.ArgumentTypeError(f"--toy-rhos: finite values >= 0, got {text!r}")
    return rhos


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def _noise_rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 <= v < 0.9:  # at 0.9 of the labels wrong, the wrong classes outnumber the right one
        raise argparse.ArgumentTypeError(f"--noise: a fraction in [0, 0.9), got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``fastsam-demo``."""
    names = ", ".join(VARIANTS)
    p = argparse.ArgumentParser(
        prog="fastsam-demo",
        description="Train (a) the LSAM two-feature toy and (b) a tiny ViT on 8x8 digits with clean and noisy "
                    "labels with every SAM variant; print tables, save results.json and demo.png. "
                    "Nothing is downloaded.",
    )
    p.add_argument("--quick", action="store_true",
                   help="smaller run: 1 seed, each variant's default rho (no held-out choice), 4 toy seeds")
    p.add_argument("--variants", default="all",
                   help=f"comma list of part (b) variants, or 'all' (default) or 'none'. Names: {names}")
    p.add_argument("--parts", default="toy,digits", help="comma list of parts to run: toy, digits (default both)")
    p.add_argument("--noise", type=_noise_rate, default=None,
                   help="part (b): fraction of training labels replaced by a wrong class in the second "
                        "condition (default 0.4; 0: clean labels only). Test labels are never noised")
    p.add_argument("--no-select", action="store_true",
                   help="part (b): each variant's default rho instead of the held-out choice (--quick does this)")
    p.add_argument("--seeds", type=_parse_seeds, default=None,
                   help="part (b) seeds: a count or a comma list (default 3; --quick: 1)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="part (b) epochs (default 15)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="part (b): stop each run after this many steps (default: all steps of --epochs)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="base optimizer of every variant")
    p.add_argument("--toy-seeds", type=_parse_seeds, default=None, help="part (a) seeds (default 12; --quick: 4)")
    p.add_argument("--toy-epochs", type=_positive_int, default=None, help="part (a) epochs (default 25)")
    p.add_argument("--toy-rhos", type=_parse_rhos, default=None,
                   help=f"part (a) LSAM rho grid, 0 = SGD (default {','.join(f'{r:g}' for r in TOY_RHOS)}; "
                        f"--quick: {','.join(f'{r:g}' for r in QUICK_TOY_RHOS)})")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=None,
                   help="CPU only: worker processes, one thread each (default: the cores not busy now, i.e. "
                        "CPU count minus the cores the 1-minute load average shows busy, at least 1; 0 or 1: all "
                        "in this process)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="CPU only: torch threads when running in this process (default 1: the models are "
                        "tiny, and one thread does not collapse when other processes compete for the cores)")
    p.add_argument("--out", default="fastsam_demo_out", help="output directory (default fastsam_demo_out/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _select_variants(p: argparse.ArgumentParser, text: str) -> list[str]:
    if text.strip() == "all":
        return list(VARIANTS)
    if text.strip() == "none":
        return []
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        p.error(f"--variants: unknown {', '.join(repr(b) for b in bad) or 'empty list'}; "
                f"choose from: {', '.join(VARIANTS)} (or 'all', 'none')")
    return list(dict.fromkeys(names))


def plan_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> RunPlan:
    """The run the command line asks for (the defaults are :data:`DEFAULTS`)."""
    parts = tuple(s.strip() for s in args.parts.split(",") if s.strip())
    if not parts or set(parts) - {"toy", "digits"}:
        p.error(f"--parts: a comma list of toy, digits; got {args.parts!r}")
    q = args.quick
    noise = DEFAULTS.noises[-1] if args.noise is None else args.noise
    return RunPlan(
        toy=replace(DEFAULTS.toy, epochs=args.toy_epochs or DEFAULTS.toy.epochs),
        toy_rhos=tuple(args.toy_rhos or (QUICK_TOY_RHOS if q else DEFAULTS.toy_rhos)),
        toy_seeds=tuple(args.toy_seeds or (range(4) if q else DEFAULTS.toy_seeds)),
        digits=replace(DEFAULTS.digits, epochs=args.epochs or DEFAULTS.digits.epochs, optimizer=args.optimizer,
                       max_steps=args.steps),
        seeds=tuple(args.seeds or ((0,) if q else DEFAULTS.seeds)),
        noises=(0.0, noise) if noise > 0 else (0.0,),
        variants=tuple(_select_variants(p, args.variants)) if "digits" in parts else (),
        select=not (q or args.no_select),
        parts=tuple(x for x in ("toy", "digits") if x in parts),
    )


def _device(p: argparse.ArgumentParser, text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        p.error(f"--device: not a torch device: {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here (use --device cpu)")
    return device


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _announce(plan: RunPlan, workers: int, device: torch.device, estimate: float, build: bool) -> str:
    """The up-front line: what will run, where, and about how long."""
    what = []
    if "toy" in plan.parts:
        what.append(f"(a) LSAM toy: {len(plan.toy_rhos)} rho x {_n(len(plan.toy_seeds), 'seed')}")
    avail = [n for n in plan.variants if not VARIANTS[n].unavailable()]
    if avail:
        n_sel = sum(runs_per_variant(VARIANTS[n], 0, len(plan.noises), plan.select) for n in avail)
        conds = " and ".join("clean" if r == 0 else f"{r:.0%} noisy" for r in plan.noises)
        b = (f"(b) digits: {_n(len(avail), 'variant')} x {conds} labels x {_n(len(plan.seeds), 'seed')}"
             + (f", after {n_sel} held-out runs choosing rho" if n_sel else ", default rho"))
        missing = len(plan.variants) - len(avail)
        if missing:
            b += f" ({missing} not in this fastsam yet: skipped)"
        what.append(b)
    where = f"{device}" + (f", {workers} worker processes" if workers > 1 else ", 1 process")
    extra = " (the C++ extension's first build included)" if build else ""
    return f"fastsam demo: {'; '.join(what)}. On {where}: about {_duration(estimate)}{extra}."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit status (0 on success)."""
    p = build_parser()
    args = p.parse_args(argv)
    plan = plan_from_args(p, args)
    device = _device(p, args.device)
    workers = args.workers if args.workers is not None else default_workers()
    if workers < 0:
        p.error(f"--workers: expected >= 0, got {workers}")
    if device.type != "cpu":
        workers = 0  # one accelerator: runs go one after the other in this process
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    load_before = load_average()
    build = extension_build_pending(device)
    step_s = step_seconds(device)
    work = _work(plan, step_s, str(device))
    estimate = work / max(1, workers) + (WORKER_START_S if workers > 1 else 0.0)
    print(_announce(plan, workers, device, estimate + (EXT_BUILD_S if build else 0.0), build), flush=True)
    if build:
        print("Building fastsam's C++ extension for backend 'cpp' first (about a minute on 2 cores, once; "
              "later runs load it in about a second)...", flush=True)
    built_s = warm_up_sam(device)  # here, before any worker process would need the extension
    if build:
        print(f"Built in {built_s:.0f} s.", flush=True)

    res: dict[str, Any] = {"spec": run_spec(plan), "env": environment(device), "quick": args.quick,
                           "argv": list(argv) if argv is not None else sys.argv[1:],
                           "workers": workers if workers > 1 else 1,
                           "torch_threads": 1 if workers > 1 else torch.get_num_threads(),
                           "estimate_s": estimate, "load_before": load_before}
    progress = Progress(work, enabled=not args.no_progress)
    pool = make_pool(workers) if workers > 1 else None
    try:
        if "toy" in plan.parts:
            res["toy"] = run_toy(plan.toy_rhos, plan.toy_seeds, plan.toy, str(device), pool=pool, progress=progress,
                                 step_s=step_s)
        if plan.variants:
            res["digits"] = run_digits(plan.variants, plan.seeds, plan.noises, plan.digits, device, pool=pool,
                                       progress=progress, select=plan.select, step_s=step_s)
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    res["elapsed_s"] = time.perf_counter() - t0
    res["load_after"] = load_average()

    (out_dir / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    plotted = save_plot(res, out_dir / "demo.png")
    print(format_report(res))
    print(f"\nwrote {out_dir / 'results.json'}" + (f" and {out_dir / 'demo.png'}" if plotted else
                                                     " (no plot: pip install matplotlib)"))
    return 0


def _work(plan: RunPlan, step_s: float, device: str) -> float:
    """Estimated seconds of all runs together, in one process (from one measured AdamW step)."""
    cost = 0.0
    if "toy" in plan.parts:
        cost += sum(j.cost for j in plan_toy(plan.toy_rhos, plan.toy_seeds, plan.toy, device, step_s))
    avail = [n for n in plan.variants if not VARIANTS[n].unavailable()]
    if avail:
        sel, steps = plan_runs(avail, plan.seeds, plan.noises, plan.digits, device, plan.select, step_s)
        cost += sum(j.cost for j in sel)
        cost += sum(len(plan.seeds) * len(plan.noises) * (steps["report"] * step_s * VARIANTS[n].cost
                                                          + RUN_OVERHEAD_S) for n in avail)
    return cost

