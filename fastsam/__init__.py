"""fastsam: fast Sharpness-Aware Minimization and its family for PyTorch.

Public names are resolved lazily so that ``import fastsam`` stays cheap and a missing optional
dependency (triton, a C++ toolchain) never breaks the import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SAM": "fastsam.optim",
    "ASAM": "fastsam.optim",
    "GSAM": "fastsam.optim",
    "ESAM": "fastsam.optim",
    "FriendlySAM": "fastsam.optim",
    "LookSAM": "fastsam.optim",
    "AESAM": "fastsam.optim",
    "MSAM": "fastsam.optim",
    "WSAM": "fastsam.optim",
    "AESAMPolicy": "fastsam.optim",
    "ProportionalRho": "fastsam.schedulers",
    "disable_running_stats": "fastsam.bn",
    "enable_running_stats": "fastsam.bn",
    "frozen_running_stats": "fastsam.bn",
    "sam_step": "fastsam.train",
    "SAMStepResult": "fastsam.train",
    "checkpoint": None,
    "losses": None,
    "functional": None,
    "reference": None,
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fastsam' has no attribute {name!r}")
    mod = _LAZY[name]
    if mod is None:
        return importlib.import_module(f"fastsam.{name}")
    return getattr(importlib.import_module(mod), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
