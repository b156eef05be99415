"""Part (b): every variant on clean and on noisy digits labels, rho chosen on held-out data.

1. Held-out choice (once per variant and label condition, never per seed): one run per value of
   the variant's rho grid, trained on the "fit" part of the training set (its labels noised like
   the condition's) with its own seed (:data:`SELECT_SEED`, none of the reported seeds), scored
   on the clean held-out part. Highest held-out accuracy wins; ties go to the lower held-out
   cross-entropy, then to the smaller rho.
2. Reported runs: every variant at its chosen rho, on the whole training set, for every seed;
   accuracy on the clean test set. The base optimizer of the same seed saw the same
   initialization, batch order and noise draw, so the difference to it is also given paired.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import Any

import torch

import fastsam

from ..models import TinyViT
from .digits import DigitsConfig, DigitsData, load_digits_data, train_digits
from .jobs import Job, Progress, run_jobs
from .variants import VARIANTS, Variant

__all__ = ["SELECT_SEED", "choose_rho", "digits_job", "plan_runs", "run_digits", "runs_per_variant"]

SELECT_SEED = 100  # seed of the held-out runs: not one of the reported seeds (0, 1, 2, ...)
RUN_OVERHEAD_S = 0.3  # per run, beyond its steps: model, optimizer, evaluation (estimate)

_DATA: dict[tuple[str, int, int], DigitsData] = {}


def _data(cfg: DigitsConfig, device: str) -> DigitsData:
    """The splits, loaded once per process."""
    key = (device, cfg.test_size, cfg.held_out)
    if key not in _DATA:
        _DATA[key] = load_digits_data(cfg, device)
    return _DATA[key]


def digits_job(name: str, rho: float | None, seed: int, noise: float, split: str, cfg: DigitsConfig,
               device: str) -> dict[str, Any]:
    """One run by variant name (picklable, for worker processes). ``split="select"``: train on
    fit, score on held-out; ``"report"``: train on the whole training set, score on test."""
    data = _data(cfg, device)
    train, evaluate = (data.fit, data.held_out) if split == "select" else (data.train, data.test)
    out = train_digits(VARIANTS[name], rho, seed, noise, train, evaluate, cfg)
    return {"name": name, "split": split, **out}


def choose_rho(runs: Sequence[dict[str, Any]]) -> float:
    """The held-out choice among ``runs`` (one per rho): highest accuracy, then lowest
    cross-entropy, then smallest rho."""
    if not runs:
        raise ValueError("no held-out runs to choose rho from")
    return min(runs, key=lambda r: (-r["acc"], r["eval_loss"], r["rho"]))["rho"]


def _steps(n: int, cfg: DigitsConfig) -> int:
    per_epoch = n // cfg.batch_size
    return per_epoch * cfg.epochs if cfg.max_steps is None else min(per_epoch * cfg.epochs, cfg.max_steps)


def runs_per_variant(v: Variant, n_seeds: int, n_noise: int, select: bool) -> int:
    """How many runs ``v`` needs: the held-out grid per condition, then one per seed and condition."""
    grid = len(v.rho_grid) if (select and not v.is_base) else 0
    return n_noise * (grid + n_seeds)


def plan_runs(names: Sequence[str], seeds: Sequence[int], noises: Sequence[float], cfg: DigitsConfig,
              device: str, select: bool, step_s: float) -> tuple[list[Job], dict[str, int]]:
    """The held-out jobs (all of them: they do not depend on each other) and the step counts of
    one run per split; ``step_s`` is the base optimizer's seconds per step (estimates only)."""
    sizes = {"select": _steps(_split_size(cfg, "fit"), cfg), "report": _steps(_split_size(cfg, "train"), cfg)}
    jobs = []
    if select:
        for name in names:
            v = VARIANTS[name]
            if v.is_base:
                continue
            for noise in noises:
                for rho in v.rho_grid:
                    cost = sizes["select"] * step_s * v.cost + RUN_OVERHEAD_S
                    jobs.append(Job(digits_job, (name, rho, SELECT_SEED, noise, "select", cfg, device), cost))
    return jobs, sizes


def _split_size(cfg: DigitsConfig, split: str) -> int:
    total = 1797 - cfg.test_size  # scikit-learn's digits: 1,797 images
    return total if split == "train" else total - cfg.held_out


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _loss_backend(device: torch.device) -> str:
    """Backend of ``fastsam.losses`` with ``backend="auto"`` (its documented rule): triton for
    CUDA tensors when triton imports, else the PyTorch reference."""
    if device.type != "cuda":
        return "reference"
    try:
        import triton  # noqa: F401
    except Exception:
        return "reference"
    return "triton"


def run_digits(
    names: Sequence[str], seeds: Sequence[int], noises: Sequence[float], cfg: DigitsConfig, device: torch.device,
    pool: ProcessPoolExecutor | None = None, progress: Progress | None = None, select: bool = True,
    step_s: float = 3e-3,
) -> dict[str, Any]:
    """Part (b) for the variants ``names`` (unavailable ones are listed under ``"skipped"``).

    ``noises``: label noise rates of the training labels (0 = clean); ``select=False`` uses each
    variant's default rho instead of the held-out choice.
    """
    dev = str(device)
    skipped = [{"name": n, "label": VARIANTS[n].label, "reason": VARIANTS[n].unavailable()}
               for n in names if VARIANTS[n].unavailable()]
    names = [n for n in names if not VARIANTS[n].unavailable()]
    sel_jobs, steps = plan_runs(names, seeds, noises, cfg, dev, select, step_s)
    if progress is not None:
        progress.phase(f"(b) digits: held-out choice of rho, {len(sel_jobs)} runs")
    sel_runs = run_jobs(sel_jobs, pool, progress)
    chosen: dict[tuple[str, float], float | None] = {}
    for name in names:
        v = VARIANTS[name]
        for noise in noises:
            grid = [r for r in sel_runs if r["name"] == name and r["noise"] == noise]
            chosen[(name, noise)] = choose_rho(grid) if grid else v.rho

    jobs = [Job(digits_job, (name, chosen[(name, noise)], seed, noise, "report", cfg, dev),
                steps["report"] * step_s * VARIANTS[name].cost + RUN_OVERHEAD_S)
            for name in names for noise in noises for seed in seeds]
    if progress is not None:
        progress.phase(f"(b) digits: {len(jobs)} reported runs")
    runs = run_jobs(jobs, pool, progress)

    sam_backend = fastsam.functional.resolve_backend("auto", device)
    base_name = next((n for n in names if VARIANTS[n].is_base), None)
    by = {(r["name"], r["noise"], r["seed"]): r for r in runs}
    rows = []
    for name in names:
        v = VARIANTS[name]
        conds = []
        for noise in noises:
            rs = [by[(name, noise, s)] for s in seeds]
            acc = [r["acc"] for r in rs]
            m, sd = _mean_std(acc)
            cond: dict[str, Any] = {"noise": noise, "rho": chosen[(name, noise)],
                                    "rho_from": "held-out" if select and not v.is_base else "default",
                                    "acc": acc, "acc_mean": m, "acc_std": sd}
            if base_name is not None and name != base_name:
                diffs = [a - by[(base_name, noise, s)]["acc"] for a, s in zip(acc, seeds)]
                dm, dsd = _mean_std(diffs)
                cond["vs_base_mean"], cond["vs_base_sem"] = dm, dsd / math.sqrt(len(diffs))
            if select and not v.is_base:
                cond["held_out"] = [{"rho": r["rho"], "acc": r["acc"], "eval_loss": r["eval_loss"]}
                                    for r in sel_runs if r["name"] == name and r["noise"] == noise]
            conds.append(cond)
        mine = [r for r in runs if r["name"] == name]
        backend = "torch" if v.is_base else sam_backend
        if v.step.get("ascent_loss"):
            backend += f" + {_loss_backend(device)} loss"
        rows.append({
            "name": name, "label": cfg.base().name if v.is_base else v.label, "paper": v.paper, "backend": backend,
            "conditions": conds,
            "ms_per_step": statistics.median(r["ms_per_step"] for r in mine),
            "forward_per_step": statistics.fmean(r["forward_per_step"] for r in mine),
            "backward_per_step": statistics.fmean(r["backward_per_step"] for r in mine),
            "skipped_steps": sum(r["skipped_steps"] for r in mine),
            "runs": [{k: x for k, x in r.items() if k not in ("name", "split")} for r in mine],
        })
    base_ms = next((r["ms_per_step"] for r in rows if r["name"] == base_name), None)
    for r in rows:
        r["x_base"] = r["ms_per_step"] / base_ms if base_ms else None
    sizes = _data(cfg, dev).sizes()
    return {"dataset": "scikit-learn digits 8x8", "splits": sizes, "model": "TinyViT",
            "params": TinyViT().num_parameters(), "seeds": list(seeds), "noise_rates": list(noises),
            "config": asdict(cfg), "base": {"name": cfg.base().name, "kwargs": dict(cfg.base().kwargs)},
            "steps": steps, "select": select, "select_seed": SELECT_SEED if select else None,
            "variants": rows, "skipped": skipped}

