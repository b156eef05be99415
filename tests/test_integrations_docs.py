"""docs/integrations.md: every ```python block is a complete program and runs (issue #14); the
integrations stay optional: ``import fastsam`` imports no framework, and a missing framework
gives an ImportError that says what to install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "integrations.md"
FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate")


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)


def _env() -> dict[str, str]:
    # the examples' models are tiny: one thread each, so that the examples can run side by side
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# Runs the examples of one framework one after the other in one process (each in its own folder
# and namespace, as `python example.py` would), the frameworks side by side: importing a
# framework costs seconds, and the examples need only that once.
_DRIVER = """
import os, runpy, sys
for path in sys.argv[1:]:
    os.chdir(os.path.dirname(path))
    print("running", path, flush=True)
    runpy.run_path(path, run_name="__main__")
"""


def test_every_python_example_runs(tmp_path):
    blocks = _blocks()
    assert len(blocks) >= 6, "the fence pattern no longer finds the examples"
    for name in ("lightning.pytorch", "transformers", "accelerate"):
        pytest.importorskip(name, reason="the [dev] extra installs the frameworks the examples use")
    groups: dict[str, list[str]] = {}
    for i, code in enumerate(blocks):
        work = tmp_path / f"example{i}"
        work.mkdir()
        (work / "example.py").write_text(code)
        key = next((k for k in ("lightning", "transformers") if f"import {k}" in code), "other")
        groups.setdefault(key, []).append(str(work / "example.py"))
    procs = [(key, subprocess.Popen([sys.executable, "-c", _DRIVER, *paths], cwd=tmp_path, env=_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
             for key, paths in groups.items()]
    deadline = time.monotonic() + 300
    failures = []
    for key, p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            failures.append(f"{key} examples timed out after {out.splitlines()[-1:]}:\n{err[-2000:]}")
            continue
        if p.returncode != 0:
            failures.append(f"{key} examples, exit {p.returncode} after {out.splitlines()[-1:]}:\n{err[-3000:]}")
    assert not failures, "\n\n".join(failures)
    assert sum(len(paths) for paths in groups.values()) == len(blocks)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=_env(), cwd=ROOT)


def test_frameworks_stay_optional():
    """``import fastsam`` (and a sam_step, a ProportionalRho) imports no framework; with a
    framework missing, its integration module raises an ImportError that says what to install."""
    r = _run(f"""
        import sys
        import torch, torch.nn.functional as F
        import fastsam, fastsam.integrations, fastsam.integrations._wrappers
        model = torch.nn.Linear(4, 2)
        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        fastsam.sam_step(model, opt, torch.randn(8, 4), torch.randint(0, 2, (8,)), F.cross_entropy)
        fastsam.ProportionalRho(opt).step()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r})
        assert not loaded, loaded
        # a None entry in sys.modules makes `import name` fail as if it were not installed
        for module, blocked in [("transformers", ["transformers"]), ("lightning", ["lightning", "pytorch_lightning"])]:
            for name in blocked:
                sys.modules[name] = None
            try:
                __import__("fastsam.integrations." + module)
            except ImportError as e:
                print("ImportError:", e)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    errors = [line for line in r.stdout.splitlines() if line.startswith("ImportError:")]
    assert len(errors) == 2, r.stdout
    assert "pip install transformers" in errors[0] and "pip install lightning" in errors[1], errors
