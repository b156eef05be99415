"""Test configuration.

The Triton interpreter must be switched on before triton is imported anywhere, so this runs
first: with no CUDA device, Triton kernels execute on CPU tensors under TRITON_INTERPRET=1.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing means nothing below can run anyway
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    """Under the interpreter, fail fast with the fix when this triton/numpy pair cannot run the
    kernels' loops (instead of ~200 obscure InterpreterErrors)."""
    if _HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
    except ImportError:
        return
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from _triton_probes import interpreter_problem

    problem = interpreter_problem()
    if problem is not None:
        import numpy

        pytest.exit(f"the Triton interpreter (triton {triton.__version__}, numpy {numpy.__version__}) cannot run "
                    f"fastsam's kernels: {problem}. Use a newer triton (3.9 works) or, with triton 3.6 or older, "
                    "numpy < 2.3: pip install 'numpy<2.3'", returncode=3)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
