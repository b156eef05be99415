"""Loading of the ``csrc/`` extension: ``backend="cpp"`` (CPU) and ``backend="cuda"`` (CUDA).

Two shared libraries, each registering the same op set under its own namespace
(``torch.ops.fastsam_cpu.*`` / ``torch.ops.fastsam_cuda.*``, schemas in ``csrc/ops_common.h``):

========  ==========================================  ============================================
kind      sources                                     built when
========  ==========================================  ============================================
``cpu``   ``ops_cpu.cpp``, ``cpu_kernels.cpp``        a C++ compiler and ninja exist
``cuda``  ``ops_cuda.cpp``, ``cuda_kernels.cu``       also: torch is a CUDA build, nvcc is found,
                                                      and a CUDA device is visible
``host``  ``host.cpp`` (a Python module, not ops:     as ``cpu``; loaded by :mod:`fastsam._host`
          the per-tensor reads of a step's host       for the fused backends (~20 s to build)
          code, issue #16)
========  ==========================================  ============================================

How a kind is loaded, on first use only (``import fastsam`` never builds anything):

1. ``FASTSAM_DISABLE_EXT=1``: never (no warning; the backends report it if asked for).
2. Ahead-of-time build: ``fastsam/_C_<kind>*.so`` made by ``FASTSAM_BUILD_EXT=1 pip install
   --no-build-isolation -e .`` (see ``setup.py``), if it loads into this torch.
3. Just-in-time build with ``torch.utils.cpp_extension.load`` (ninja), cached in torch's
   extensions directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) or
   ``FASTSAM_EXT_DIR``: the first build compiles (~1 min on 2 cores), later processes only
   re-link-check and load (~1 s). The directory name carries a hash of the torch version, the
   compiler flags and, with ``-march=native``, the host CPU, so a shared cache never hands a
   binary to a CPU that cannot run it.

Anything missing (sources, compiler, ninja) or a failed build gives **one** warning per kind
and process, and :func:`load` returns None: ``backend="auto"`` then uses foreach.
:func:`available` answers "is it usable here" and builds at most once per process;
:func:`could_build` answers the cheaper "would a build be attempted" without compiling.

Environment: ``FASTSAM_DISABLE_EXT=1`` off; ``FASTSAM_EXT_VERBOSE=1`` show the build;
``FASTSAM_EXT_MARCH`` (default ``native``; empty for a portable build) for the CPU kind;
``FASTSAM_EXT_DIR`` build directory root.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ENV_DISABLE = "FASTSAM_DISABLE_EXT"
KINDS = ("cpu", "cuda", "host")

_SOURCES = {
    "cpu": ("ops_cpu.cpp", "cpu_kernels.cpp"),
    "cuda": ("ops_cuda.cpp", "cuda_kernels.cu"),
    "host": ("host.cpp",),
}
HOST_CFLAGS = ("-O2", "-Wall", "-Wextra")  # a few loops over Python lists: no vectorizer needed
_HEADERS = ("fastsam_common.h", "kernels.h", "ops_common.h")

# -O3: the kernels rely on the vectorizer. -fno-math-errno: sqrt / pow may not set errno, or
# gcc cannot vectorize loops that call them (results are unchanged). -fopenmp: the threads.
CPU_CFLAGS = ("-O3", "-fno-math-errno", "-fopenmp", "-Wall", "-Wextra")
CPU_LDFLAGS = ("-fopenmp",)
# No --use_fast_math: the kernels promise IEEE float32 (sqrt, division) like the CPU build.
CUDA_CFLAGS = ("-O3", "-Wall", "-Wextra")
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr")


@dataclass
class ExtStatus:
    """Outcome of loading one kind: ``available``, how (``"aot"`` / ``"jit"``), the time the
    load (build included) took, the library path, or the reason it is not available."""

    kind: str
    available: bool = False
    how: str = ""
    seconds: float = 0.0
    path: str | None = None
    reason: str = ""


_LOCK = threading.RLock()
_STATUS: dict[str, ExtStatus] = {}
_WARNED: set[str] = set()
_MODULES: dict[str, Any] = {}  # the "host" kind's Python module


def disabled() -> bool:
    """True when ``FASTSAM_DISABLE_EXT`` is set to a true value."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


def csrc_dir() -> Path | None:
    """Directory holding the C++/CUDA sources (a source checkout or an editable install), or None."""
    cands = []
    if os.environ.get("FASTSAM_CSRC_DIR"):
        cands.append(Path(os.environ["FASTSAM_CSRC_DIR"]))
    pkg = Path(__file__).resolve().parents[1]  # .../fastsam
    cands += [pkg.parent / "csrc", pkg / "csrc"]
    for c in cands:
        if all((c / f).is_file() for f in _SOURCES["cpu"] + _HEADERS):
            return c
    return None


def _march() -> str:
    return os.environ.get("FASTSAM_EXT_MARCH", "native").strip()


def cpu_cflags() -> list[str]:
    """Compiler flags of the CPU kind (``-march=<FASTSAM_EXT_MARCH>`` when set)."""
    m = _march()
    return list(CPU_CFLAGS) + ([f"-march={m}"] if m and m != "none" else [])


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _sources_digest(kind: str) -> str:
    """A hash of the kind's sources and headers: two checkouts with different sources (an upgrade,
    a second worktree) build into different directories instead of rebuilding over each other."""
    src = csrc_dir()
    h = hashlib.sha1()
    for f in (_SOURCES[kind] + _HEADERS) if src is not None else ():
        p = src / f
        h.update(p.read_bytes() if p.is_file() else b"")
    return h.hexdigest()


def _build_name(kind: str) -> str:
    key = [torch.__version__, sys.version, platform.machine(), kind, _sources_digest(kind)]
    if kind == "cpu":
        key += cpu_cflags() + list(CPU_LDFLAGS)
        if _march() == "native":
            key.append(_cpu_signature())
    elif kind == "host":
        key += list(HOST_CFLAGS)
    else:
        key += list(CUDA_CFLAGS) + list(NVCC_FLAGS) + [str(torch.version.cuda),
                                                       os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
    tag = hashlib.sha1("\n".join(key).encode()).hexdigest()[:10]
    return f"fastsam_{kind}_{tag}"


def could_build(kind: str = "cpu") -> tuple[bool, str]:
    """Whether a JIT build of ``kind`` would be attempted here, and if not, why (no compiling)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if disabled():
        return False, f"{ENV_DISABLE} is set"
    src = csrc_dir()
    if src is None:
        return False, "the csrc/ sources are not found (a wheel without them; set FASTSAM_CSRC_DIR)"
    if kind == "cuda":
        if torch.version.cuda is None:
            return False, "torch is a CPU build"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        if not all((src / f).is_file() for f in _SOURCES["cuda"]):
            return False, "the CUDA sources are not found"
    if kind == "host" and not (src / _SOURCES["host"][0]).is_file():
        return False, "csrc/host.cpp is not found"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False, f"no C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)"
    from torch.utils import cpp_extension as ce

    if not ce.is_ninja_available():
        return False, "ninja is not installed (pip install ninja)"
    if kind == "cuda" and ce.CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found (install the CUDA toolkit matching torch.version.cuda)"
    return True, ""


def _aot_library(kind: str) -> str | None:
    pkg = Path(__file__).resolve().parents[1]
    libs = sorted(glob.glob(str(pkg / f"_C_{kind}*.so"))) + sorted(glob.glob(str(pkg / f"_C_{kind}*.pyd")))
    return libs[0] if libs else None


def _jit_build(kind: str, verbose: bool) -> str:
    from torch.utils import cpp_extension as ce

    src = csrc_dir()
    assert src is not None
    name = _build_name(kind)
    build_dir = None
    if os.environ.get("FASTSAM_EXT_DIR"):
        build_dir = Path(os.environ["FASTSAM_EXT_DIR"]) / name
        build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(src / f) for f in _SOURCES[kind]]
    kw: dict[str, Any] = dict(
        name=name, sources=sources, extra_include_paths=[str(src)], is_python_module=kind == "host",
        verbose=verbose, build_directory=None if build_dir is None else str(build_dir),
    )
    if kind == "cpu":
        kw.update(extra_cflags=cpu_cflags(), extra_ldflags=list(CPU_LDFLAGS))
    elif kind == "host":
        kw.update(extra_cflags=list(HOST_CFLAGS))
    else:
        kw.update(extra_cflags=list(CUDA_CFLAGS), extra_cuda_cflags=list(NVCC_FLAGS))
    out = ce.load(**kw)  # builds if needed and loads the library (torch.ops.load_library) / the module
    if kind == "host":
        _MODULES[kind] = out
        return str(getattr(out, "__file__", name))
    if isinstance(out, str):  # the library path (is_python_module=False)
        return out
    try:  # older torch returned None: report the build directory instead
        return str(build_dir or ce._get_build_directory(name, verbose=False))
    except Exception:
        return name


def _built_before(kind: str) -> bool:
    """Whether the JIT build directory of ``kind`` already holds a built library (a load, not a
    build, then follows)."""
    name = _build_name(kind)
    try:
        if os.environ.get("FASTSAM_EXT_DIR"):
            d = Path(os.environ["FASTSAM_EXT_DIR"]) / name
        else:
            from torch.utils import cpp_extension as ce

            d = Path(ce._get_build_directory(name, verbose=False))
        return any(d.glob(f"{name}*.so")) or any(d.glob(f"{name}*.pyd"))
    except Exception:
        return True  # unknown: no message


def _summary(err: BaseException) -> str:
    """One line out of a (possibly very long) build error."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.lower().startswith("ninja: build stopped"):
            return ln[:300]
    return (lines[-1] if lines else type(err).__name__)[:300]


def _warn_once(kind: str, reason: str) -> None:
    if kind in _WARNED:
        return
    _WARNED.add(kind)
    fallback = {"cpu": "foreach backend", "cuda": "triton/foreach backend",
                "host": "Python twins of the host helpers (same results, more host time per step)"}[kind]
    what = {"cpu": "C++ (CPU)", "cuda": "CUDA", "host": "C++ host-helper"}[kind]
    warnings.warn(
        f"fastsam: the {what} extension is not available ({reason}); using the {fallback}. "
        f"Set {ENV_DISABLE}=1 to silence this, FASTSAM_EXT_VERBOSE=1 to see the build.",
        RuntimeWarning,
        stacklevel=3,
    )


def load(kind: str = "cpu") -> Any | None:
    """The op namespace of ``kind`` (``torch.ops.fastsam_cpu`` / ``torch.ops.fastsam_cuda``),
    building it on the first call of the process; None (and one warning) when unavailable."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    with _LOCK:
        st = _STATUS.get(kind)
        if st is None:
            st = _STATUS[kind] = _load_uncached(kind)
        if st.available:
            return _MODULES[kind] if kind == "host" else getattr(torch.ops, f"fastsam_{kind}")
        return None


def _load_uncached(kind: str) -> ExtStatus:
    st = ExtStatus(kind)
    if disabled():
        st.reason = f"{ENV_DISABLE} is set"
        return st
    if kind == "cuda" and (torch.version.cuda is None or not torch.cuda.is_available()):
        st.reason = "torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
        return st  # nothing to warn about: CUDA tensors cannot exist here
    t0 = time.perf_counter()
    aot = _aot_library(kind)
    if aot is not None:
        try:
            if kind == "host":
                import importlib

                _MODULES[kind] = importlib.import_module("fastsam._C_host")
            else:
                torch.ops.load_library(aot)
            st.available, st.how, st.path = True, "aot", aot
            st.seconds = time.perf_counter() - t0
            return st
        except Exception as err:  # built for another torch: try the JIT build
            st.reason = f"AOT library {Path(aot).name} does not load: {_summary(err)}"
    ok, why = could_build(kind)
    if not ok:
        st.reason = why
        _warn_once(kind, why)
        return st
    verbose = os.environ.get("FASTSAM_EXT_VERBOSE", "") not in ("", "0")
    if not verbose and not _built_before(kind):  # a one-time wait of 20 s to minutes: say so
        what = {"cpu": "C++ (CPU) backend", "cuda": "CUDA backend", "host": "C++ host helpers"}[kind]
        print(f"fastsam: building the {what} (once per machine and torch version, cached; "
              f"{ENV_DISABLE}=1 skips it)...", file=sys.stderr, flush=True)
    try:
        st.path = _jit_build(kind, verbose)
    except Exception as err:
        st.reason = f"the build failed: {_summary(err)}"
        _warn_once(kind, st.reason)
        return st
    st.available, st.how, st.reason = True, "jit", ""
    st.seconds = time.perf_counter() - t0
    return st


def available(kind: str = "cpu") -> bool:
    """True if ``kind`` is usable in this process (builds on the first call, at most once)."""
    return load(kind) is not None


def status(kind: str = "cpu") -> ExtStatus:
    """The :class:`ExtStatus` of ``kind`` (loading it first if that was not tried yet)."""
    load(kind)
    return _STATUS[kind]


def ops(kind: str = "cpu") -> Any:
    """Like :func:`load`, but an unavailable extension is a RuntimeError that says why."""
    ns = load(kind)
    if ns is None:
        raise RuntimeError(f"fastsam: the {kind} extension is not available: {_STATUS[kind].reason}")
    return ns
