"""Compile the SAM kernels for a CUDA target without a GPU (``python -m fastsam.kernels._triton_aot``).

Triton's compiler (with the ptxas it ships) lowers a kernel for a given target on any machine, so
a CPU-only CI can still catch kernels that the interpreter accepts but the compiler rejects. Run
it in a process where ``TRITON_INTERPRET`` is unset (under the interpreter ``triton.jit`` returns
interpreted functions). Prints one line per variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _triton_kernels as K

_TL = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}


def _sig(names: list[str], ptrs: dict[str, str], ints: dict[str, str], consts: dict[str, Any]) -> dict[str, str]:
    return {n: ptrs.get(n) or ints.get(n) or ("constexpr" if n in consts else "i32") for n in names}


def variants() -> list[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """A representative set: every dtype, every QMODE, each option on and off somewhere."""
    out = []
    for dt in ("fp32", "bf16", "fp16", "fp64"):
        ct = "fp64" if dt == "fp64" else "fp32"
        ptrs = {"tab": "*i64", "hyp": f"*{ct}", "scal": f"*{ct}", "blocks": "*i64", "part": f"*{ct}",
                "snap": "*fp32", "ok": "*u8"}
        ints = {"seed_key": "i64", "keep_thr": "i64"}
        base = {"DT": _TL[dt], "CT": _TL[ct], "BLOCK": 2048}
        for qmode, fsam, adaptive, gsam, swp in ((2, False, False, False, False), (0, True, True, True, True),
                                                 (1, True, False, False, True)):
            c1 = dict(base, QMODE=qmode, FSAM=fsam, ADAPTIVE=adaptive)
            names1 = ["tab", "ntab", "hyp", "scal", "blocks", "nblk", "part", "part_base", "snap", *c1]
            out.append((f"K1 {dt} q{qmode} fsam={fsam} asam={adaptive}", K.perturb_partials_kernel,
                        _sig(names1, ptrs, ints, c1), c1))
            c2 = dict(c1, GSAM=gsam, SWP=swp, RNE_BF16=False, PBLOCK=1024)
            names2 = ["tab", "ntab", "hyp", "scal", "blocks", "nblk", "part", "npart", "snap", "ok", "seed_key",
                      "step_key", "keep_thr", *c2]
            out.append((f"K2 {dt} q{qmode} fsam={fsam} asam={adaptive} gsam={gsam} esam={swp}",
                        K.perturb_apply_kernel, _sig(names2, ptrs, ints, c2), c2))
        names3 = ["tab", "ntab", "blocks", "nblk", "part", "part_base", "part_stride", *base]
        out.append((f"KG {dt}", K.gsam_partials_kernel, _sig(names3, ptrs, ints, base), base))
        for mode, gsam, nest, maxi, ams, dec in ((0, True, False, False, False, False),
                                                 (1, True, True, True, False, False),
                                                 (2, True, False, True, True, False),
                                                 (2, False, False, False, False, True),
                                                 (3, True, False, False, False, False),
                                                 (3, False, False, False, False, False)):
            c4 = dict(base, MODE=mode, GSAM=gsam, NESTEROV=nest, MAXIMIZE=maxi, AMSGRAD=ams, DECOUPLED=dec,
                      RNE_BF16=False, PBLOCK=1024)
            names4 = ["tab", "ntab", "hyp", "scal", "blocks", "nblk", "part", "npart", "part_stride", *c4]
            out.append((f"K3 {dt} mode={mode} gsam={gsam} nesterov={nest} maximize={maxi} amsgrad={ams} "
                        f"decoupled={dec}", K.second_step_kernel, _sig(names4, ptrs, ints, c4), c4))
    return out


def main(arch: int = 90, limit: int | None = None) -> int:
    target = GPUTarget("cuda", arch, 32)
    todo = variants()[:limit]
    for name, fn, sig, consts in todo:
        t0 = time.perf_counter()
        triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": 4})
        print(f"ok {time.perf_counter() - t0:5.2f}s  {name}", flush=True)
    print(f"compiled {len(todo)} variants for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
