"""What the demo needs to know about the machine: its name, its load, the fastsam commit, how
fast one training step is (for the up-front time estimate), and whether the first SAM step will
have to build the C++ extension (about a minute on two cores, once)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import fastsam

from ..models import TinyViT

__all__ = ["device_name", "environment", "extension_build_pending", "load_average", "step_seconds",
           "warm_up_sam"]


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model from /proc/cpuinfo (platform's processor string elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _commit() -> str | None:
    """The git commit of the fastsam source tree (``-dirty`` with uncommitted changes), if any."""
    root = Path(fastsam.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    return {"fastsam": fastsam.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "device_name": device_name(device), "cpu_count": os.cpu_count(),
            "commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def extension_build_pending(device: torch.device) -> bool:
    """True when the first SAM step on ``device`` will compile fastsam's C++ extension: a CPU run,
    the extension enabled and buildable, no ahead-of-time library, and no JIT build in the cache
    that is newer than every source file.

    Reads the loader's (``fastsam.kernels._ext``) naming of the cache directory; if that ever
    changes, a stale answer only costs a missing or needless message.
    """
    if device.type != "cpu":
        return False
    from ..kernels import _ext

    try:
        if _ext.disabled() or _ext._aot_library("cpu") is not None or not _ext.could_build("cpu")[0]:
            return False
        name = _ext._build_name("cpu")
        if os.environ.get("FASTSAM_EXT_DIR"):
            root = Path(os.environ["FASTSAM_EXT_DIR"])
        elif os.environ.get("TORCH_EXTENSIONS_DIR"):
            root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
        else:  # torch.utils.cpp_extension's default: <cache>/torch_extensions/py311_cpu
            from torch.utils.cpp_extension import get_default_build_root

            acc = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
            abi = getattr(sys, "abiflags", "")
            root = Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}{abi}_{acc}"
        lib = root / name / f"{name}.so"
        src = _ext.csrc_dir()
        if not lib.is_file() or src is None:
            return True
        newest = max(p.stat().st_mtime for p in src.iterdir() if p.suffix in (".h", ".cpp", ".cu"))
        return newest > lib.stat().st_mtime
    except (AttributeError, OSError, TypeError, ValueError):
        return False


def warm_up_sam(device: torch.device) -> float:
    """One SAM step on a one-parameter model, in this process: loads (or first builds) the
    extension that backend ``"auto"`` picks, before any worker process needs it. Returns seconds."""
    t0 = time.perf_counter()
    w = torch.nn.Parameter(torch.ones(1, device=device))
    opt = fastsam.SAM([w], torch.optim.SGD, rho=0.05, lr=0.1)
    (w * w).sum().backward()
    opt.first_step(zero_grad=True)
    (w * w).sum().backward()
    opt.second_step(zero_grad=True)
    return time.perf_counter() - t0


def step_seconds(device: torch.device, batch_size: int = 64, steps: int = 12) -> float:
    """Seconds per AdamW training step of the demo's TinyViT here and now (after 3 untimed steps):
    the unit of the up-front time estimate."""
    torch.manual_seed(0)
    model = TinyViT().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 64, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    for i in range(3 + steps):
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps
