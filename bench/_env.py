"""Environment header recorded with every benchmark result (bench/NOTES.md)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
            timeout=5, cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """CPU/GPU model, library versions, commit and date of this run."""
    import torch

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    return env


_ENV_CACHE: dict[str, Any] = {}


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a hidden temporary file in the same folder and a rename:
    a benchmark stopped by its time cap (SIGINT, then SIGKILL) while saving leaves the previous
    complete file, never a truncated one (the temporary is removed on an exception)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_result(name: str, results: Any, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``{"env": environment(), "results": results}`` to ``<out_dir>/<name>.json``
    (atomically: the benchmarks rewrite it after every row). The environment is read once per
    process (git and /proc calls: not after every row)."""
    d = Path(out_dir) if out_dir else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    if "env" not in _ENV_CACHE:
        _ENV_CACHE["env"] = environment()
    return write_text_atomic(d / f"{name}.json",
                             json.dumps({"env": _ENV_CACHE["env"], "results": results}, indent=2) + "\n")
