"""Part (a): the LSAM rho sweep on the two-feature toy (:mod:`fastsam.demo.toy`), summarized.

Each run is a pure function of (rho, seed, config), so the sweep gives the same numbers in
worker processes as here. The summary pairs every LSAM run with the SGD run of the same seed
(same data, initialization and batch order): the effect is a few points of error against a
seed-to-seed spread several times larger, which the paired difference resolves.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import Any

from .jobs import Job, Progress, run_jobs
from .toy import ToyConfig, train_toy

__all__ = ["QUICK_TOY_RHOS", "TOY_KEYS", "TOY_RHOS", "plan_toy", "run_toy"]

TOY_RHOS = (0.0, 0.25, 0.5, 1.0)  # rho = 0 is SGD
QUICK_TOY_RHOS = (0.0, 0.5)
TOY_KEYS = ("hard_sign_error", "hard_probe_error", "easy_sign_error", "easy_probe_error", "test_error")
# seconds per toy step relative to one AdamW step of the digits TinyViT (estimates for the
# progress bar: measured 0.27 for SGD and 0.95 for LSAM on this project's 2-core machine)
SGD_STEP_COST, LSAM_STEP_COST = 0.27, 0.95


def plan_toy(rhos: Sequence[float], seeds: Sequence[int], cfg: ToyConfig, device: str, step_s: float) -> list[Job]:
    """One job per (rho, seed); ``step_s``: seconds per digits AdamW step (estimates only)."""
    steps = cfg.epochs * math.ceil(cfg.n_train / cfg.batch_size)
    return [Job(train_toy, (float(r), int(s), cfg, device),
                steps * step_s * (SGD_STEP_COST if r == 0 else LSAM_STEP_COST) + 0.05)
            for r in rhos for s in seeds]


def run_toy(
    rhos: Sequence[float], seeds: Sequence[int], cfg: ToyConfig, device: str = "cpu",
    pool: ProcessPoolExecutor | None = None, progress: Progress | None = None, step_s: float = 3e-3,
) -> dict[str, Any]:
    """The sweep and its summary: per rho, mean / std / s.e.m. of every probing error, and the
    mean paired difference with SGD (rho = 0) and its standard error."""
    jobs = plan_toy(rhos, seeds, cfg, str(device), step_s)
    if progress is not None:
        progress.phase(f"(a) LSAM toy, {len(jobs)} runs")
    results = sorted(run_jobs(jobs, pool, progress), key=lambda d: (d["rho"], d["seed"]))
    summary = []
    sgd = {d["seed"]: d for d in results if d["rho"] == 0}
    for r in sorted({float(x) for x in rhos}):
        rs = [d for d in results if d["rho"] == r]
        row: dict[str, Any] = {"rho": r, "method": "SGD" if r == 0 else "LSAM", "n": len(rs)}
        for key in TOY_KEYS:
            xs = [d[key] for d in rs]
            row[key + "_mean"] = statistics.fmean(xs)
            row[key + "_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
            row[key + "_sem"] = row[key + "_std"] / math.sqrt(len(rs))
            diffs = [d[key] - sgd[d["seed"]][key] for d in rs if d["seed"] in sgd]
            if r != 0 and len(diffs) > 1:
                row[key + "_vs_sgd_mean"] = statistics.fmean(diffs)
                row[key + "_vs_sgd_sem"] = statistics.stdev(diffs) / math.sqrt(len(diffs))
        summary.append(row)
    for d in results:
        d.pop("config", None)
    return {"config": asdict(cfg), "rhos": sorted({float(x) for x in rhos}), "seeds": list(seeds),
            "summary": summary, "runs": results}
