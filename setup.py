# Minimal shim: all metadata lives in pyproject.toml.
#
# Optional ahead-of-time build of the csrc/ extension (otherwise it is built just in time, on
# first use, and cached; see fastsam/kernels/_ext.py):
#
#     FASTSAM_BUILD_EXT=1 pip install --no-build-isolation -e .
#
# builds fastsam/_C_cpu*.so (backend="cpp"), fastsam/_C_host*.so (fastsam._host), and
# fastsam/_C_cuda*.so (backend="cuda") when torch is a CUDA build and nvcc is found.
# --no-build-isolation: the build needs the installed torch (an isolated build environment would
# download another one). Without the flag nothing is
# compiled and torch is not imported here, so a plain `pip install -e .` stays as fast as before.
# FASTSAM_EXT_MARCH=native tunes the CPU library for this machine (default: portable, no -march).
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC_SUFFIXES = (".h", ".cpp", ".cu")


class _BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as fastsam/csrc/, so a wheel can JIT-build backend="cpp"
    (and "cuda") on first use: fastsam/kernels/_ext.py looks for the sources next to the package
    (source checkout, editable install) and inside it (wheel)."""

    def run(self) -> None:
        super().run()
        src = os.path.join(_HERE, "csrc")
        if self.editable_mode or not os.path.isdir(src):
            return  # editable installs read csrc/ from the checkout itself
        dst = os.path.join(self.build_lib, "fastsam", "csrc")
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            if name.endswith(_CSRC_SUFFIXES):
                shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _extension_kwargs() -> dict:
    if os.environ.get("FASTSAM_BUILD_EXT", "").strip().lower() in ("", "0", "false", "no", "off"):
        return {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, include_paths

    csrc = os.path.join(_HERE, "csrc")
    march = os.environ.get("FASTSAM_EXT_MARCH", "").strip()
    # same flags as the JIT build (fastsam/kernels/_ext.py CPU_CFLAGS / CUDA_CFLAGS / NVCC_FLAGS)
    cflags = ["-O3", "-fno-math-errno", "-fopenmp", "-Wall", "-Wextra"] + ([f"-march={march}"] if march else [])
    # torch's headers as system headers (setuptools passes them with -I): -Wextra then reports
    # only our own code, as in the JIT build
    cflags += [arg for p in include_paths() for arg in ("-isystem", p)]
    exts = [
        CppExtension(
            "fastsam._C_cpu",
            ["csrc/ops_cpu.cpp", "csrc/cpu_kernels.cpp"],
            include_dirs=[csrc],
            extra_compile_args=cflags,
            extra_link_args=["-fopenmp"],
        ),
        # the host helpers (a Python module: fastsam._host; same flags as the JIT build, _ext.HOST_CFLAGS)
        CppExtension(
            "fastsam._C_host",
            ["csrc/host.cpp"],
            include_dirs=[csrc],
            extra_compile_args=["-O2", "-Wall", "-Wextra"] + [arg for p in include_paths() for arg in ("-isystem", p)],
        ),
    ]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        exts.append(
            CUDAExtension(
                "fastsam._C_cuda",
                ["csrc/ops_cuda.cpp", "csrc/cuda_kernels.cu"],
                include_dirs=[csrc],
                extra_compile_args={"cxx": ["-O3", "-Wall", "-Wextra"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            )
        )
    return {"ext_modules": exts, "cmdclass": {"build_ext": BuildExtension}}


_kwargs = _extension_kwargs()
_kwargs["cmdclass"] = {**_kwargs.get("cmdclass", {}), "build_py": _BuildPyWithSources}
setup(**_kwargs)
