"""Compile the SAM and loss kernels for a CUDA target without a GPU (``python -m fastsam.kernels._triton_aot``).

Triton's compiler (with the ptxas it ships) lowers a kernel for a given target on any machine, so
a CPU-only CI can still catch kernels that the interpreter accepts but the compiler rejects. Run
it in a process where ``TRITON_INTERPRET`` is unset (under the interpreter ``triton.jit`` returns
interpreted functions). Prints one line per variant and exits non-zero on the first failure.

Two ways to name the variants:

* :func:`variants`: a hand-written list of signatures (``python -m fastsam.kernels._triton_aot``).
* launch-derived (``bench/aot_launches.py``, ``tests/test_aot_launches.py``): :class:`LaunchRecorder`
  runs real launchers under the interpreter with the GPU launch geometry forced and records every
  launch (kernel, each argument as Triton's specializer sees it, constexprs, ``num_warps``)
  without executing it; :func:`compile_records` then compiles each recorded launch for sm_90
  through the kernel's own JIT entry point (a compile-only CUDA driver stands in for the GPU), so
  the specialization (dtypes, 16-byte alignment, integers equal to 1 or divisible by 16,
  ``do_not_specialize``) is Triton's own, and reads registers and spills off Triton's ptxas run.
  Nothing there knows the kernels' argument lists: it keeps working when they change.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _triton_kernels as K

_TL = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}


def _sig(fn: Any, ptrs: dict[str, str], ints: dict[str, str], consts: dict[str, Any]) -> dict[str, str]:
    """The signature of ``fn`` in its own parameter order: pointers and 64-bit integers by name,
    constexprs by ``consts``, any other runtime parameter i32. The names come from the kernel, so
    an added or reordered integer parameter needs no change here; a new pointer or constexpr
    does (the compile then fails and names it). bench/aot_launches.py needs none: it compiles
    what the launchers really pass."""
    import inspect

    names = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
    missing = [n for n in names if n[:1].isupper() and n not in consts]
    if missing:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}: no value here for the constexpr(s) {missing}")
    return {n: ptrs.get(n) or ints.get(n) or ("constexpr" if n in consts else "i32") for n in names}


def variants() -> list[tuple[str, Any, dict[str, str], dict[str, Any], int]]:
    """A representative set: every dtype, every QMODE, each option on and off somewhere."""
    out = []
    for dt in ("fp32", "bf16", "fp16", "fp64"):
        ct = "fp64" if dt == "fp64" else "fp32"
        pt = ct  # the norm partials: float64 when a float64 group is in the step, else float32
        ptrs = {"tab": "*i64", "hyp": f"*{ct}", "scal": f"*{ct}", "blocks": "*i64", "part": f"*{pt}",
                "snap": "*fp32", "ok": "*u8"}
        ints = {"seed_key": "i64", "keep_thr": "i64"}
        vec = _sam_config().vectorize
        base = {"DT": _TL[dt], "CT": _TL[ct], "PT": _TL[pt], "BLOCK": _sam_config().block, "SPLIT": vec,
                "ALIGNED": vec}
        for qmode, fsam, adaptive, gsam, swp in ((2, False, False, False, False), (0, True, True, True, True),
                                                 (1, True, False, False, True)):
            c1 = dict(base, QMODE=qmode, FSAM=fsam, ADAPTIVE=adaptive)
            out.append((f"K1 {dt} q{qmode} fsam={fsam} asam={adaptive}", K.perturb_partials_kernel,
                        _sig(K.perturb_partials_kernel, ptrs, ints, c1), c1))
            c2 = dict(c1, GSAM=gsam, SWP=swp, RNE_BF16=False, PBLOCK=1024)
            out.append((f"K2 {dt} q{qmode} fsam={fsam} asam={adaptive} gsam={gsam} esam={swp}",
                        K.perturb_apply_kernel, _sig(K.perturb_apply_kernel, ptrs, ints, c2), c2))
        out.append((f"KG {dt}", K.gsam_partials_kernel, _sig(K.gsam_partials_kernel, ptrs, ints, base), base))
        # the last two: the cheaper family's mix (WSAM's, written back; LookSAM's reuse, not)
        for mode, gsam, nest, maxi, ams, dec, mix, back in ((0, True, False, False, False, False, False, True),
                                                            (1, True, True, True, False, False, False, True),
                                                            (2, True, False, True, True, False, False, True),
                                                            (2, False, False, False, False, True, False, True),
                                                            (3, True, False, False, False, False, False, True),
                                                            (3, False, False, False, False, False, False, True),
                                                            (2, True, False, False, False, True, True, True),
                                                            (1, True, False, False, False, False, True, False),
                                                            (2, True, False, False, False, True, True, "correct")):
            c4 = dict(base, MODE=mode, GSAM=gsam, NESTEROV=nest, MAXIMIZE=maxi, AMSGRAD=ams, DECOUPLED=dec,
                      RNE_BF16=False, PBLOCK=1 if mix else 1024, MIX=mix, WRITEBACK=bool(back),
                      CORRECT=back == "correct")  # decoupled WSAM: written back and corrected
            # without GSAM's sums the launcher passes the table as `part` (nothing to read there);
            # a mix's coefficients are a float64 tensor
            p4 = dict(ptrs, part="*i64", scal="*fp64") if mix else ptrs if gsam else dict(ptrs, part="*i64")
            out.append((f"K3 {dt} mode={mode} gsam={gsam} nesterov={nest} maximize={maxi} amsgrad={ams} "
                        f"decoupled={dec} mix={mix} writeback={back}", K.second_step_kernel,
                        _sig(K.second_step_kernel, p4, ints, c4), c4))
    # the SAM kernels launch with LaunchConfig's GPU geometry (block in `base` above)
    return [(*v, _sam_config().num_warps) for v in out] + loss_variants()


def _sam_config():
    from .triton_sam import get_config

    return get_config()


def loss_variants() -> list[tuple[str, Any, dict[str, str], dict[str, Any], int]]:
    """The ascent-loss kernels (fastsam/kernels/triton_losses.py): every logits dtype, one-chunk
    and chunked rows at each kernel's largest GPU block (softmax 8192, sigmoid and BiSAM 2048),
    gradient on and off, both BiSAM phi; num_warps as launched (triton_losses._config). The
    variants real launches produce (every width class) are compiled by bench/aot_launches.py."""
    from . import triton_losses as L

    out = []
    floats = ("inv_c", "gamma", "lam", "inv_one_minus_lam", "mu", "inv_mu", "log_c", "alpha")
    cuda = torch.device("cuda")
    for dt in ("fp32", "bf16", "fp16"):
        ptrs = {"z_ptr": f"*{dt}", "y_ptr": "*i64", "loss_ptr": "*fp32", "g_ptr": f"*{dt}"}

        def sig(names: list[str], consts: dict[str, Any], ptrs=ptrs) -> dict[str, str]:
            return {n: ptrs.get(n) or ("fp32" if n in floats else "constexpr" if n in consts else "i32")
                    for n in names}

        obf = ["z_ptr", "y_ptr", "loss_ptr", "g_ptr", "stride_z", "C", "inv_c", "gamma", "lam",
               "inv_one_minus_lam", "ignore_index"]
        for one_chunk, write in ((True, True), (False, True), (False, False)):
            block, _, warps = L._config(L._MAX_BLOCK_GPU["softmax"], cuda, "softmax")
            c = {"BLOCK": block, "ONE_CHUNK": one_chunk, "WRITE_GRAD": write}
            out.append((f"OBF softmax {dt} one_chunk={one_chunk} grad={write}", L._obf_softmax_kernel,
                        sig(obf + list(c), c), c, warps))
            block, _, warps = L._config(L._MAX_BLOCK_GPU["bisam"], cuda, "bisam")
            c = {"BLOCK": block, "ONE_CHUNK": one_chunk, "PHI_TANH": not one_chunk, "WRITE_GRAD": write}
            names = ["z_ptr", "y_ptr", "loss_ptr", "g_ptr", "stride_z", "C", "mu", "inv_mu", "log_c", "alpha",
                     "ignore_index", *c]
            out.append((f"BiSAM {dt} one_chunk={one_chunk} tanh={not one_chunk} grad={write}", L._bisam_kernel,
                        sig(names, c), c, warps))
        block, _, warps = L._config(L._MAX_BLOCK_GPU["sigmoid"], cuda, "sigmoid")
        c = {"BLOCK": block, "WRITE_GRAD": dt != "fp16"}  # the no-gradient variant once (it spilled at 8192)
        out.append((f"OBF sigmoid {dt} grad={c['WRITE_GRAD']}", L._obf_sigmoid_kernel, sig(obf + list(c), c), c,
                    warps))
    for tdt in ("i64", "i32"):  # the mean / sum of the per-row values (one program, as launched)
        for mean in (True, False):
            c = {"MEAN": mean, "BLOCK": 1024}
            names = ["rows_ptr", "y_ptr", "val_ptr", "scale_ptr", "B", "ignore_index", *c]
            types = {"rows_ptr": "*fp32", "y_ptr": f"*{tdt}", "val_ptr": "*fp32", "scale_ptr": "*fp32"}
            out.append((f"reduce rows target={tdt} mean={mean}", L._reduce_rows_kernel,
                        {n: types.get(n) or ("constexpr" if n in c else "i32") for n in names}, c, 4))
    return out


def _ptxas(arch: int) -> str | None:
    """The ptxas Triton itself uses for ``arch`` (it ships several: the PTX version it emits may be
    newer than the plain one accepts), else the one on PATH; None if there is none."""
    try:
        from triton.backends.nvidia import compiler as nvc

        for args in ((arch,), ()):
            try:
                return nvc.get_ptxas(*args).path
            except TypeError:
                continue
    except Exception:  # pragma: no cover - other Triton layouts
        pass
    return shutil.which("ptxas")


def _resources(ptx: str, arch: int, ptxas: str) -> tuple[int, int]:
    """(registers per thread, spill bytes) from ``ptxas -v`` on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}", "-v",
                            src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, timeout=300)
    text = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return (int(regs.group(1)) if regs else -1), sum(spills)


def vector_accesses(ptx: str) -> tuple[int, int]:
    """(vector, scalar) global load/store instructions in a kernel's PTX (``ld.global.v4.b32``
    moves 16 bytes; the scalar ones count 8-byte table reads too)."""
    ops = re.findall(r"\b(?:ld|st)\.global(?:\.[a-z0-9]+)*", ptx)
    vec = sum(1 for o in ops if re.search(r"\.v[248]\b", o))
    return vec, len(ops) - vec


# The most spill tolerated where spills are tolerated at all (see _spill_is_a_failure): twice
# the 28 bytes seen with triton 3.6.
MAX_ALLOWED_SPILL = 64


def _spill_is_a_failure(name: str, spill_bytes: int) -> bool:
    """Spills fail the check everywhere but in the perturbation kernels of the non-default norms
    (p != 2: float64 pow, or p = inf), and there above MAX_ALLOWED_SPILL bytes. With every option
    on, ptxas from triton 3.6 keeps K2 fp32 at 128 registers (2 programs of 256 threads per SM)
    and spills 28 bytes; forcing no spill (maxnreg 168) takes 161 registers and leaves 1 program
    per SM, a worse trade. The loss kernels (issue 4: "no register spills for wide rows"), K3, KG
    and the p = 2 paths stay strict."""
    if spill_bytes <= 0:
        return False
    tolerated = name.startswith(("K1 ", "K2 ")) and " q2 " not in name
    return not tolerated or spill_bytes > MAX_ALLOWED_SPILL


def main(arch: int = 90, limit: int | None = None) -> int:
    """Compile every variant as it is launched (BLOCK, num_warps); with Triton's ptxas also
    report registers and fail on any register spill (issue: "no register spills for wide rows").
    Also counts vector accesses and fails when a SAM kernel launched with ``vectorize`` has none
    (the full-block path must compile to 16-byte loads/stores)."""
    target = GPUTarget("cuda", arch, 32)
    todo = variants()[:limit]
    ptxas = _ptxas(arch)
    spilled: list[str] = []
    allowed: list[str] = []
    unvectorized: list[str] = []
    for name, fn, sig, consts, warps in todo:
        t0 = time.perf_counter()
        k = triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": warps})
        nvec, nscalar = vector_accesses(k.asm["ptx"])
        if consts.get("SPLIT") and consts.get("ALIGNED") and nvec == 0:
            unvectorized.append(name)
        info = f"  vector/scalar global accesses {nvec}/{nscalar}"
        if ptxas is not None:
            regs, spill = _resources(k.asm["ptx"], arch, ptxas)
            info += f", {regs} regs x {32 * warps} threads, spills {spill} B"
            if _spill_is_a_failure(name, spill):
                spilled.append(name)
            elif spill:
                allowed.append(name)
                info += " (allowed: general-p perturbation, see _spill_is_a_failure)"
        print(f"ok {time.perf_counter() - t0:5.2f}s  {name}{info}", flush=True)
    print(f"compiled {len(todo)} variants for sm_{arch}")
    if unvectorized:
        print(f"no vector access in {len(unvectorized)} vectorized SAM variants: {unvectorized}")
        return 1
    if ptxas is None:
        print("ptxas not found: registers and spills not checked")
    elif spilled:
        print(f"register spills in {len(spilled)} variants: {spilled}")
        return 1
    else:
        print("register spills: none" + (f" (allowed, general-p perturbation: {allowed})" if allowed else ""))
    return 0


# ------------------------------------------------------------------------------ launch-derived variants
def _is_fastsam_kernel(fn: Any) -> bool:
    return getattr(fn, "__module__", "").startswith("fastsam.")


def _encode(v: Any) -> dict[str, Any]:
    """One launch argument as JSON: what Triton's specializer reads of it, nothing more (a
    tensor's dtype and whether its address is a multiple of 16; a scalar's exact value)."""
    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).removeprefix("torch."), "aligned": v.data_ptr() % 16 == 0}
    if isinstance(v, tl.constexpr):
        return _encode(v.value)
    if isinstance(v, tl.dtype):
        return {"tl_dtype": v.name}
    if isinstance(v, bool):
        return {"bool": v}
    if isinstance(v, int):
        return {"int": v}
    if isinstance(v, float):
        return {"float": repr(v)}  # repr keeps nan / inf through JSON
    if v is None:
        return {"none": True}
    if isinstance(v, str):
        return {"str": v}
    raise TypeError(f"cannot record a launch argument of type {type(v).__name__}")


def _decode(d: dict[str, Any]) -> Any:
    """A stand-in with the same specialization: a CPU tensor of that dtype (16-byte aligned or
    not; never read: nothing is launched), the same scalar."""
    if "tensor" in d:
        t = torch.empty(64, dtype=getattr(torch, d["tensor"]))
        return t if d["aligned"] else t[1:]
    if "tl_dtype" in d:
        return tl.dtype(d["tl_dtype"])
    if "float" in d:
        return float(d["float"])
    if "none" in d:
        return None
    return next(iter(d.values()))


def _spec_key(d: dict[str, Any], constexpr: bool, specialize: bool = True) -> tuple:
    """What decides the compiled variant: an integer runtime argument only by (== 1, divisible
    by 16, 32/64-bit range), or by its range alone when it is in the kernel's
    ``do_not_specialize``; a float not at all; constexprs and everything else by value."""
    if "int" in d and not constexpr:
        v = d["int"]
        rng = (-2**31 <= v < 2**31, v >= 2**63)
        return ("int", v == 1, v % 16 == 0, *rng) if specialize else ("int", *rng)
    if "float" in d and not constexpr:
        return ("float",)
    return tuple(sorted(d.items()))


def _constexpr_params(fn: Any) -> set[str]:
    import inspect

    out = set()
    for name, prm in inspect.signature(fn).parameters.items():
        ann = prm.annotation
        if ann is not inspect.Parameter.empty and "constexpr" in str(getattr(ann, "__name__", ann)):
            out.add(name)
    return out


class LaunchRecorder:
    """Record every launch of a fastsam Triton kernel, as it would be launched on a GPU, without
    running it (under ``TRITON_INTERPRET=1``, on CPU tensors).

    The launchers' device-dependent choices are made for a CUDA device of ``sms`` SMs: the SAM
    kernels' geometry (``triton_launch._geometry`` asked for ``cuda:0``; ``_rne_bf16`` off, as on a
    GPU, whose conversion rounds), the loss kernels' row blocks (``triton_losses._config`` for
    CUDA). Skipping the execution is safe because the launchers never read a kernel's output on
    the host (no host sync anywhere in these paths); it lets ViT-sized scenarios record in
    milliseconds. ``records`` holds one entry per distinct specialization, in first-seen order,
    with how many launches it had and the first scenario (``tag``) that produced it.
    """

    def __init__(self, sms: int = 132, execute: bool = False) -> None:
        self.sms = sms
        self.execute = execute
        self.tag = ""
        self.records: dict[tuple, dict[str, Any]] = {}
        self.launches = 0
        self._undo: list[tuple[Any, str, Any]] = []

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def __enter__(self) -> LaunchRecorder:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("LaunchRecorder needs TRITON_INTERPRET=1 set before triton is imported")
        from triton.runtime.interpreter import InterpretedFunction

        from . import triton_launch as TS  # the SAM kernels' launch geometry
        from . import triton_losses as L
        from . import triton_plan

        triton_plan.clear()  # plans made under the interpreter's geometry must not be reused
        rec, orig_run = self, InterpretedFunction.run

        def run(kernel: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            if not warmup and _is_fastsam_kernel(kernel.fn):
                rec._record(kernel, args, kwargs, grid)
                if not rec.execute:
                    return None
            return orig_run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        self._patch(InterpretedFunction, "run", run)
        # patch points of the launchers (fastsam internals, not kernel signatures): if one is
        # renamed, this fails here, loudly, instead of recording interpreter-geometry launches
        for mod, name in ((TS, "_geometry"), (TS, "_SM_COUNT"), (TS, "_rne_bf16"), (L, "_config")):
            if not hasattr(mod, name):
                raise RuntimeError(f"LaunchRecorder: {mod.__name__}.{name} is gone; update its GPU-geometry patch")
        geometry, config = TS._geometry, L._config
        self._patch(TS, "_SM_COUNT", {**TS._SM_COUNT, 0: self.sms})
        self._patch(TS, "_geometry", lambda device, *a, **k: geometry(torch.device("cuda", 0), *a, **k))
        self._patch(TS, "_rne_bf16", lambda g: False)
        self._patch(L, "_config", lambda C, device, *a, **k: config(C, torch.device("cuda"), *a, **k))
        return self

    def __exit__(self, *exc: Any) -> None:
        from . import triton_plan

        while self._undo:
            obj, name, value = self._undo.pop()
            setattr(obj, name, value)
        triton_plan.clear()  # nor the plans made under the GPU geometry outside

    def _record(self, kernel: Any, args: tuple, kwargs: dict[str, Any], grid: Any) -> None:
        self.launches += 1
        fn = kernel.fn
        names = list(getattr(kernel, "arg_names", [])) or list(__import__("inspect").signature(fn).parameters)
        cexpr = _constexpr_params(fn)
        dns = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
        dns = {names[i] if isinstance(i, int) else i for i in dns}
        enc_args = [_encode(a) for a in args]
        enc_kw = {k: _encode(v) for k, v in kwargs.items()}
        key = (fn.__module__, fn.__name__,
               tuple(_spec_key(a, n in cexpr, n not in dns) for a, n in zip(enc_args, names)),
               tuple(sorted((k, _spec_key(v, k in cexpr or k not in names, k not in dns)) for k, v in enc_kw.items())))
        r = self.records.get(key)
        if r is None:
            r = self.records[key] = {
                "module": fn.__module__, "kernel": fn.__name__, "args": enc_args, "kwargs": enc_kw,
                "arg_names": names[:len(args)], "grid": list(grid) if isinstance(grid, (tuple, list)) else repr(grid),
                "tag": self.tag, "launches": 0}
        r["launches"] += 1

    def dump(self) -> list[dict[str, Any]]:
        return list(self.records.values())


class _CompileOnlyCudaDriver:
    """The parts of a Triton CUDA driver that a JIT warmup (compile, no launch) touches."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


def _ptxas_log_resources(log: str) -> tuple[int, int] | None:
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        return None
    return int(regs.group(1)), sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def compile_records(records: list[dict[str, Any]], arch: int = 90) -> list[dict[str, Any]]:
    """Compile each recorded launch for ``sm_<arch>`` through its kernel's JIT warmup (Triton's
    own binder specializes the stand-in arguments exactly as the real ones) in this process
    (``TRITON_INTERPRET`` must be unset). Registers and spills come from the ``ptxas -v`` log of
    Triton's own cubin step (its flags, e.g. ``--regAllocOptLevel``, included), else from a
    separate ``ptxas -v`` on the PTX. One result per record: ``error`` or ``regs``, ``spill``,
    vector / scalar global accesses, ``num_warps``, shared memory, seconds, and the compiled
    kernel's ``hash`` (records that compile to the same kernel share it)."""
    import contextlib
    import importlib
    import io

    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_records: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its own ptxas -v log (triton >= 3.4)
    ptxas = _ptxas(arch)
    driver.set_active(_CompileOnlyCudaDriver(arch))
    out = []
    try:
        for r in records:
            res: dict[str, Any] = {"kernel": r["kernel"], "tag": r.get("tag", "")}
            t0 = time.perf_counter()
            try:
                fn = getattr(importlib.import_module(r["module"]), r["kernel"])
                args = [_decode(a) for a in r["args"]]
                kw = {k: _decode(v) for k, v in r["kwargs"].items()}
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    k = fn.warmup(*args, grid=(1,), **kw)
                res["seconds"] = time.perf_counter() - t0
                ptx = k.asm["ptx"]
                got = _ptxas_log_resources(buf.getvalue())
                if got is None and ptxas is not None:  # a cache hit, or a Triton without the log
                    got = _resources(ptx, arch, ptxas)
                if got is not None:
                    res["regs"], res["spill"] = got
                res["vector"], res["scalar"] = vector_accesses(ptx)
                res["num_warps"] = k.metadata.num_warps
                res["shared"] = k.metadata.shared
                res["hash"] = k.hash
            except Exception as e:  # a compile error is a result, reported with its variant
                res["seconds"] = time.perf_counter() - t0
                res["error"] = f"{type(e).__name__}: {e}"[-3000:]
            out.append(res)
    finally:
        try:
            driver.reset_active()
        except RuntimeError:  # no real driver on a machine without a GPU: the fake one stays
            pass
    return out


def launch_spill_is_a_failure(kernel: str, consts: dict[str, Any], spill_bytes: int) -> bool:
    """The spill policy of :func:`_spill_is_a_failure` for a recorded launch: spills are tolerated
    (up to MAX_ALLOWED_SPILL bytes) only in the perturbation kernels of the non-default norms
    (``QMODE`` 0 = general p, 1 = p = inf); the loss kernels, K3, KG and p = 2 must not spill. A
    renamed kernel or constexpr loses the allowance (the check gets stricter, never looser)."""
    if spill_bytes <= 0:
        return False
    tolerated = kernel in ("perturb_partials_kernel", "perturb_apply_kernel") and consts.get("QMODE") in (0, 1)
    return not tolerated or spill_bytes > MAX_ALLOWED_SPILL


def _compile_records_main(argv: list[str]) -> int:
    """``--compile-records IN.json OUT.json [ARCH]``: the worker of bench/aot_launches.py."""
    import json

    src, dst = argv[0], argv[1]
    arch = int(argv[2]) if len(argv) > 2 else 90
    with open(src) as f:
        records = json.load(f)
    res = compile_records(records, arch)
    with open(dst, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--compile-records":
        sys.exit(_compile_records_main(sys.argv[2:]))
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
