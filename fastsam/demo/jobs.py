"""Running the demo's independent training runs: in worker processes or here, with one progress bar.

Every run is a pure function of its arguments (seeded), so the numbers do not depend on where or
in which order it ran; only the measured milliseconds do (each worker has one thread).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Job", "Progress", "default_workers", "init_worker", "make_pool", "run_jobs"]


@dataclass(frozen=True)
class Job:
    """``fn(*args)``; ``cost`` is its estimated seconds (for ordering and the progress bar)."""

    fn: Callable[..., dict[str, Any]]
    args: tuple[Any, ...]
    cost: float = 1.0


class Progress:
    """One tqdm bar on stderr over the whole demo, advanced by the estimated seconds of each
    finished run (so its remaining-time estimate covers runs of unequal length)."""

    def __init__(self, total: float, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc="fastsam demo", file=sys.stderr, disable=not enabled, leave=False,
                         dynamic_ncols=True,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def phase(self, desc: str) -> None:
        """Name what runs now."""
        self._bar.set_description_str(desc)

    def advance(self, cost: float) -> None:
        """One run of estimated ``cost`` seconds finished."""
        # the total is the same estimates summed in another order: keep rounding from passing it
        self._bar.update(min(cost, self._bar.total - self._bar.n))

    def write(self, text: str) -> None:
        """A line above the bar."""
        self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        """Remove the bar."""
        self._bar.close()


def default_workers() -> int:
    """Cores that are idle now, at least 1: the CPU count minus the cores that the 1-minute load
    average says are busy, a core counting as busy from 0.75 of its time.

    Worker processes only pay off on idle cores: on this project's shared 2-core machine, with
    another process busy, two workers took longer than one process (each worker also pays a few
    seconds of imports). A core busy half the time is still worth a worker: at a load average of
    about 0.5, the default run took 166 s in one process and 99 s in two."""
    n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on every platform
        busy = 0.0
    return max(1, min(n, n - int(busy + 0.25)))


def init_worker() -> None:
    """Worker process setup: one torch thread (the runs are tiny and latency-bound)."""
    torch.set_num_threads(1)


def make_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` processes of one thread each."""
    # spawn, not fork: forking a process whose torch thread pools are running can hang
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker)


def run_jobs(jobs: Sequence[Job], pool: ProcessPoolExecutor | None, progress: Progress | None = None
             ) -> list[dict[str, Any]]:
    """Every job, longest first (fewer idle workers at the end); results in the order of ``jobs``."""
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)
    out: list[dict[str, Any] | None] = [None] * len(jobs)
    if pool is None:
        for i in order:
            out[i] = jobs[i].fn(*jobs[i].args)
            if progress is not None:
                progress.advance(jobs[i].cost)
        return out  # type: ignore[return-value]
    futs = {pool.submit(jobs[i].fn, *jobs[i].args): i for i in order}
    try:
        for fut in as_completed(futs):
            i = futs[fut]
            out[i] = fut.result()
            if progress is not None:
                progress.advance(jobs[i].cost)
    except BaseException:
        for f in futs:
            f.cancel()
        raise
    return out  # type: ignore[return-value]
