"""Packaging: a wheel carries the csrc/ sources, so backend="cpp" can be JIT-built after a plain
``pip install fastsam-*.whl`` (fastsam/kernels/_ext.py finds them inside the package)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_csrc_and_the_loader_finds_it(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("fastsam", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".",
                        "-w", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fastsam-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    want = {f"fastsam/csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".h", ".cpp", ".cu")}
    assert want and want <= set(names), sorted(want - set(names))
    # unpacked as site-packages would hold it (no csrc/ beside the package): the loader finds the copy
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "from fastsam.kernels import _ext; print(_ext.csrc_dir())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.strip()) == site / "fastsam" / "csrc"
