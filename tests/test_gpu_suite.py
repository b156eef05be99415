"""bench/gpu_suite.sh and the benchmarks it runs, checked on a CPU.

A first GPU run may get one device call: the script's plumbing (stages, caps, logs, the files that
come back, the background extension build) and the benchmarks' bookkeeping (rows saved as they are
measured, a failing diagnostic that must not lose the measured times) are tested here, through the
script's dry mode (every stage's CPU fallback, < 1 minute on 2 cores) and on the benchmark
functions directly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_suite.sh"
STAGES_ALL = ["env", "tests_sam", "tests_losses", "bench_optim", "bench_losses", "ext_tests", "sweep"]
FILES_ALL = {"env.txt", "tests.log", "bench.log", "ext.log", "bench_optim.json", "bench_optim.md",
             "losses_cpu.json", "losses_cpu.md"}

pytest.importorskip("triton")


def _run_suite(out: Path, *args: str, timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SUITE_")}
    e.update({"OUT": str(out), "GPU_SUITE_DRY": "1", "PYTHON": sys.executable, **env})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=str(out.parent), env=e, capture_output=True, text=True,
                          timeout=timeout)


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", str(SCRIPT), "nonsense"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


def test_dry_run_writes_every_file_flat(tmp_path):
    """The whole one-call run in dry mode: every stage runs (exit 0) in order, within its cap, and
    the 8 files under $OUT hold what the GPU run's files will hold."""
    out = tmp_path / "out"
    r = _run_suite(out)  # from another working directory: the script finds the repository itself
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    entries = sorted(p.name for p in out.iterdir())
    assert set(entries) == FILES_ALL, entries  # 8 files, no folder, no temporary left behind
    assert all((out / n).is_file() for n in entries)

    env = (out / "env.txt").read_text()
    assert "torch" in env and "triton" in env and "profile all, dry 1" in env
    pos = [env.index(f"stage {s}: exit 0 after") for s in STAGES_ALL]
    assert pos == sorted(pos), env  # in order of value, each exited 0
    done = env.split("done after ")[1]
    assert int(done.split("s;")[0]) < 120 and "8 entries" in done

    tests = (out / "tests.log").read_text()
    assert tests.count(" passed") >= 2 and " failed" not in tests and not re.search(r"\d+ errors?\b", tests), tests
    assert "== [t=" in tests and "tests_sam: exit 0" in tests and "tests_losses: exit 0" in tests

    optim = json.loads((out / "bench_optim.json").read_text())["results"]
    rows = optim["cases"][0]["impls"]
    assert set(rows) == {"loop", "fastsam_foreach", "fastsam_triton", "adamw_only"}
    for name, row in rows.items():  # device time, host time and back-to-back time, apart
        assert all(row.get(k, 0) > 0 for k in ("ms", "host_ms", "b2b_ms")) and "errors" not in row, (name, row)
    sweep = optim.get("sweep_vit_b16_fp32")
    assert sweep and len(sweep) == 1 and sweep[0].get("ms", 0) > 0, sweep
    md = (out / "bench_optim.md").read_text()
    assert "host ms" in md and "fastsam_triton" in md and "Launch geometry sweep" in md

    losses = json.loads((out / "losses_cpu.json").read_text())["results"]
    assert losses["complete"] and len(losses["rows"]) == 3 * 5 and all(r["ms"] for r in losses["rows"]), losses

    ext = (out / "ext.log").read_text()
    assert "ext build start" in ext and "ext build end" in ext and "ext cpu:" in ext and "ext cuda:" in ext
    assert ext.index("ext build end") < ext.index("ext_tests (cap")  # the tests ran after the build
    bench = (out / "bench.log").read_text()
    assert "bench_optim: exit 0" in bench and "bench_losses: exit 0" in bench and "sweep: exit 0" in bench


def test_cap_interrupts_a_stage_and_the_next_still_runs(tmp_path):
    """A stage that reaches its cap is interrupted (SIGINT) and recorded as such; the stage after
    it still runs. A budget that is already spent skips stages instead of starting them."""
    out = tmp_path / "capped"
    r = _run_suite(out, "losses", GPU_SUITE_CAP_LOSSES="2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    env = (out / "env.txt").read_text()
    assert "stage tests_losses: exit 124 after" in env and "cap reached (SIGINT)" in env, env
    assert "stage bench_losses: exit 0 after" in env, env
    assert json.loads((out / "losses_cpu.json").read_text())["results"]["complete"]

    out = tmp_path / "spent"
    r = _run_suite(out, "optim", GPU_SUITE_BUDGET="1", timeout=60)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    env = (out / "env.txt").read_text()
    for s in ("env", "tests_sam", "bench_optim", "sweep"):
        assert f"stage {s}: SKIPPED" in env, env
    assert "bench_optim.json" not in os.listdir(out)


# ------------------------------------------------------------------------------ the benchmarks
def test_bench_optim_keeps_measured_times_when_a_diagnostic_raises(monkeypatch):
    """A diagnostic step that raises between first_step and second_step is recorded under
    ``errors``, the optimizer is restored (not left perturbed) and the timings stay."""
    from bench import bench_optim as B

    built = {}
    real_build = B.build

    def build(name, params, lr, **kw):
        opt = real_build(name, params, lr, **kw)
        second = opt.second_step
        calls = [0]

        def second_step(*a, **k):
            calls[0] += 1
            if calls[0] == 4:  # warmup 1 + 2 timed steps, then the first host-time step fails
                raise RuntimeError("synthetic failure after first_step")
            return second(*a, **k)

        opt.second_step = second_step
        built[name] = opt
        return opt

    monkeypatch.setattr(B, "build", build)
    shapes = [(5, 3), (7,), (1,)]
    for name in ("fastsam_foreach", "loop"):
        r = B.bench_impl(name, shapes, torch.float32, torch.device("cpu"), steps=2, warmup=1)
        assert r["ms"] > 0 and r["ms_min"] > 0, r  # measured before the failure: kept
        assert "synthetic failure" in r["errors"]["host_ms"] and "(restored)" in r["errors"]["host_ms"], r
        assert not built[name].is_perturbed
        assert r["b2b_ms"] > 0  # the diagnostics after the failing one still ran


def test_bench_optim_saves_each_row_as_it_is_measured(tmp_path, monkeypatch):
    """bench_optim.json holds every finished row while the next one is measured (a capped stage
    keeps them), and an implementation that fails keeps its measured part and its error."""
    from bench import bench_optim as B

    seen = []
    real = B.bench_impl

    def bench_impl(name, shapes, dtype, device, steps, warmup, out=None):
        if name == "adamw_only":
            saved = json.loads((tmp_path / "bench_optim.json").read_text())["results"]
            seen.append(sorted(saved["cases"][0]["impls"]))
            out["ms"] = 1.0
            raise RuntimeError("synthetic failure after the timing")
        return real(name, shapes, dtype, device, steps, warmup, out=out)

    monkeypatch.setattr(B, "bench_impl", bench_impl)
    B.main(["--device", "cpu", "--presets", "tiny", "--dtypes", "float32", "--impls", "fastsam_foreach,adamw_only",
            "--steps", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert seen == [["fastsam_foreach"]]  # the foreach row was on disk while adamw_only was measured
    rows = json.loads((tmp_path / "bench_optim.json").read_text())["results"]["cases"][0]["impls"]
    assert rows["fastsam_foreach"]["ms"] > 0
    assert rows["adamw_only"]["ms"] == 1.0 and "synthetic failure" in rows["adamw_only"]["error"]
    assert "synthetic failure" in (tmp_path / "bench_optim.md").read_text()


def test_bench_losses_saves_each_row_as_it_is_measured(tmp_path, monkeypatch):
    from bench import bench_losses as BL

    seen = []
    real = BL.make_fn

    def make_fn(method):
        fn = real(method)
        if method == "obf/eager":
            def spy(z, t):
                saved = json.loads((tmp_path / "losses_cpu.json").read_text())["results"]
                seen.append([r["method"] for r in saved["rows"] if r["ms"] is not None])
                return fn(z, t)
            return spy
        return fn

    monkeypatch.setattr(BL, "make_fn", make_fn)
    assert BL.main(["--cpu", "--shapes", "8x10", "--dtypes", "fp32", "--losses", "obf", "--iters", "1",
                    "--warmup", "0", "--no-memory", "--out", str(tmp_path)]) == 0
    assert seen and seen[0] == ["F.cross_entropy"]  # the first row was saved before the second ran
    res = json.loads((tmp_path / "losses_cpu.json").read_text())["results"]
    assert res["complete"] and [r["method"] for r in res["rows"]] == ["F.cross_entropy", "obf/eager"]


def test_atomic_write_leaves_no_temporary(tmp_path):
    from bench._env import write_text_atomic

    p = write_text_atomic(tmp_path / "a.json", "{}")
    assert p.read_text() == "{}" and os.listdir(tmp_path) == ["a.json"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
