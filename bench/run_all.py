"""Run every benchmark available on this machine, then regenerate the README performance tables.

::

    python -m bench.run_all                 # everything; results in bench/results/
    python -m bench.run_all --quick         # smoke run (modules that have --quick use it)
    python -m bench.run_all --only losses   # modules whose name contains "losses"

Steps, each in its own subprocess (a crash or a timeout in one never stops the others):

1. with CUDA: ``bash bench/gpu_suite.sh`` first when it exists (the GPU tests and GPU benchmarks
   of the kernel issues, results in ``<out>/gpu/``); the bench modules that the suite runs
   itself are not run again in step 2;
2. every ``bench/bench_*.py`` module: ``python -m bench.<module> --out <out>`` (plus ``--quick``
   when asked for and the module accepts it, read from its ``--help``);
3. the pytest-benchmark CPU micro-benchmarks (``bench/test_bench_cpu.py``), converted to
   ``<out>/cpu_micro.json`` with the environment header of :mod:`bench._env`;
4. :mod:`bench.make_tables`: the README "Performance" block from every ``bench/results`` JSON.

The exit status is 0 when every step succeeded, else 1 (the summary lists what failed).
Everything runs from the repository root with that root on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(cmd: list[str], timeout: float, extra_env: dict[str, str] | None = None) -> tuple[int, float]:
    """Run ``cmd`` from the repository root, output streamed to ours; (exit status, seconds).
    A timeout kills the whole process group and reports status 124 (what ``timeout(1)`` uses)."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    env = _env()
    env.update(extra_env or {})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the group we created: the module and any workers it started
        proc.wait()
        rc = 124
        print(f"timed out after {timeout:.0f} s", flush=True)
    return rc, time.perf_counter() - t0


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def bench_modules() -> list[str]:
    """Names of the ``bench/bench_*.py`` modules, sorted."""
    return sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))


def _accepts(module: str, flag: str) -> bool:
    """Whether ``python -m bench.<module> --help`` lists ``flag``."""
    try:
        out = subprocess.run([sys.executable, "-m", f"bench.{module}", "--help"], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return re.search(rf"(^|\s|\[){re.escape(flag)}(\s|\]|=|,|$)", out.stdout, re.M) is not None


def _run_by_gpu_suite(script: Path) -> set[str]:
    """The bench modules that ``gpu_suite.sh`` runs itself (``bench.<m>`` or ``bench/<m>.py``)."""
    text = script.read_text()
    return set(re.findall(r"bench[./](bench_\w+)", text))


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def convert_pytest_benchmark(raw: dict[str, Any]) -> dict[str, Any]:
    """pytest-benchmark's JSON -> ``{"rows": [...], "pytest_benchmark": version}`` with times in ms."""
    rows = []
    for b in raw.get("benchmarks", []):
        st = b["stats"]
        rows.append({
            "group": b.get("group"), "name": b["name"], **(b.get("extra_info") or {}),
            "median_ms": st["median"] * 1e3, "mean_ms": st["mean"] * 1e3, "stddev_ms": st["stddev"] * 1e3,
            "min_ms": st["min"] * 1e3, "iqr_ms": st["iqr"] * 1e3, "rounds": st["rounds"],
            "iterations": st.get("iterations"),
        })
    return {"rows": rows, "pytest_benchmark": raw.get("version"), "threads": 1}


def run_micro(out_dir: Path, timeout: float) -> tuple[int, float]:
    """Step 3: pytest-benchmark on bench/test_bench_cpu.py, then ``cpu_micro.json``."""
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        load_before = _loadavg()
        rc, secs = _run([sys.executable, "-m", "pytest", str(BENCH_DIR / "test_bench_cpu.py"), "-q",
                         "-p", "no:cacheprovider", "--benchmark-only", "--benchmark-disable-gc",
                         f"--benchmark-json={raw_path}", "--benchmark-columns=median,iqr,rounds",
                         "--benchmark-sort=name"], timeout)
        if rc == 0 and raw_path.exists():
            import torch

            sys.path.insert(0, str(ROOT))
            from bench._env import write_result

            torch.set_num_threads(1)  # the header records this process's threads: the benchmarks' value

            res = convert_pytest_benchmark(json.loads(raw_path.read_text()))
            # other processes on the machine change CPU timings: record the 1-minute load average
            res["loadavg_1min"] = {"before": load_before, "after": _loadavg()}
            path = write_result("cpu_micro", res, out_dir)
            print(f"wrote {path}")
        elif rc == 0:
            rc = 1
    return rc, secs


def main(argv: list[str] | None = None) -> int:
    """Run the steps in the module docstring; returns 0 when all succeeded."""
    p = argparse.ArgumentParser(description="Run every benchmark available here; regenerate README tables.")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results directory (default bench/results)")
    p.add_argument("--quick", action="store_true", help="pass --quick to the modules that accept it")
    p.add_argument("--only", default=None, help="comma list: run only steps whose name contains one of these")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per step (default 600)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU suite even with CUDA")
    p.add_argument("--no-tables", action="store_true", help="do not regenerate the README tables")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    wanted = lambda name: only is None or any(s in name for s in only)

    status: list[tuple[str, int, float]] = []
    skip_modules: set[str] = set()
    suite = BENCH_DIR / "gpu_suite.sh"
    cuda = _cuda_available()
    if cuda and not args.no_gpu and suite.exists() and wanted("gpu_suite") and shutil.which("bash"):
        rc, secs = _run(["bash", str(suite)], args.timeout, {"OUT": str(out / "gpu")})
        status.append(("gpu_suite.sh", rc, secs))
        skip_modules = _run_by_gpu_suite(suite)
    elif not cuda:
        print("no CUDA device: GPU suite skipped", flush=True)

    for mod in bench_modules():
        if not wanted(mod) or mod in skip_modules:
            continue
        cmd = [sys.executable, "-m", f"bench.{mod}", "--out", str(out)]
        if args.quick and _accepts(mod, "--quick"):
            cmd.append("--quick")
        rc, secs = _run(cmd, args.timeout)
        status.append((mod, rc, secs))

    if wanted("cpu_micro"):
        rc, secs = run_micro(out, args.timeout)
        status.append(("cpu_micro (pytest-benchmark)", rc, secs))

    if not args.no_tables:
        from bench import make_tables

        rc = make_tables.main(["--results", str(out)] if out != DEFAULT_OUT.resolve() else [])
        status.append(("make_tables", rc, 0.0))

    print("\nsummary:")
    for name, rc, secs in status:
        print(f"  {'ok  ' if rc == 0 else 'FAIL'} {name} ({secs:.0f} s)" + ("" if rc == 0 else f", exit {rc}"))
    return 0 if all(rc == 0 for _, rc, _ in status) else 1


if __name__ == "__main__":
    sys.exit(main())
