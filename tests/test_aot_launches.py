"""Every Triton kernel variant that real launches produce compiles for sm_90 without a GPU, with
no register spill outside the allowance (bench/aot_launches.py; fastsam/kernels/_triton_aot.py).

The variants are derived from launches, not from hand-written signatures: the public API runs
under the interpreter with the GPU launch geometry forced, each launch is recorded (kernel, every
argument as Triton's specializer sees it, constexprs, num_warps) and compiled through the kernel's
own JIT entry point for a compile-only sm_90 driver. So a kernel whose arguments change needs no
change here, and a new ``*_kernel`` that no scenario launches fails the check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")
needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(),
                                    reason="on a GPU the tests compile and run every variant for real")


def _env(interpret: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


@needs_cpu_only
def test_every_launched_variant_compiles_for_sm90_without_spills(tmp_path):
    """~210 variants of the 8 kernels (the benchmark's ViT-B/L steps, every option, dtype and
    base optimizer, the ascent losses at the benchmark's widths): no compile error, no spill
    (but the general-p / p=inf perturbation ones, <= 64 B), 16-byte accesses in every vectorized
    SAM variant, every ``*_kernel`` of the package launched. ~35-60 s on 2 cores."""
    out = tmp_path / "aot.json"
    r = subprocess.run([sys.executable, "-m", "bench.aot_launches", "--jobs", "2", "--json", str(out)],
                       cwd=str(ROOT), env=_env(False), capture_output=True, text=True, timeout=900)
    tail = r.stdout[-4000:] + r.stderr[-4000:]
    assert out.is_file(), tail
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["errors"] == [], s["errors"]
    assert s["spills"] == [], s["spills"]
    assert s["unvectorized"] == [], s["unvectorized"]
    assert s["kernels_not_launched"] == [], s["kernels_not_launched"]
    assert r.returncode == 0, tail
    assert s["variants"] >= 150, s  # the scenarios really produced the variety (214 at triton 3.9)

    from fastsam.kernels import triton_losses as L
    from fastsam.kernels import triton_sam as TS
    from fastsam.kernels._triton_aot import launch_spill_is_a_failure

    cfg = TS.get_config()
    consts = [{k: next(iter(v.values())) for k, v in rec["kwargs"].items()} for rec in res["records"]]
    sam = [(rec, c) for rec, c in zip(res["records"], consts) if rec["module"].endswith("_triton_kernels")]
    assert sam and all(c["BLOCK"] == cfg.block and c["num_warps"] == cfg.num_warps for _, c in sam)  # GPU geometry
    assert not any(c.get("RNE_BF16") for _, c in sam)  # the GPU's conversion rounds: never the interpreter path
    npart = [a["int"] for rec, _ in sam for n, a in zip(rec["arg_names"], rec["args"]) if n == "npart"]
    assert any(v % 16 == 0 for v in npart) and any(v % 16 for v in npart)  # both grid-size classes
    assert {c["BLOCK"] for rec, c in zip(res["records"], consts) if rec["kernel"] == "_obf_sigmoid_kernel"
            and not c["WRITE_GRAD"]} >= {L._MAX_BLOCK_GPU["sigmoid"]}  # the variant that used to spill
    for rec, c, got in zip(res["records"], consts, res["results"]):
        if got.get("spill", 0) > 0:  # only what the policy allows
            assert not launch_spill_is_a_failure(rec["kernel"], c, got["spill"]), (rec["kernel"], c, got)


# A stand-alone script (no interpreter): a stand-in argument (_decode(_encode(x))) must give the
# kernel variant that x itself gives, for every kind of argument the launchers pass.
_SPEC_SCRIPT = r"""
import torch
from triton.runtime.driver import driver
from fastsam.kernels import triton_losses as L
from fastsam.kernels._triton_aot import _CompileOnlyCudaDriver, _decode, _encode

driver.set_active(_CompileOnlyCudaDriver(90))
buf32, buf64 = torch.zeros(4096), torch.zeros(4096, dtype=torch.int64)
cases = 0
for off in (0, 1, 4):  # 16-byte aligned, not, aligned again
    for B in (1, 7, 16, 2**31 + 5):
        for ii in (-100, 0):
            for tgt in (buf64[off:], buf64.to(torch.int32)[off:]):
                args = [buf32[off:], tgt, buf32[1:], buf32, B, ii]
                kw = {"MEAN": bool(off % 2), "BLOCK": 64}
                real = L._reduce_rows_kernel.warmup(*args, grid=(1,), num_warps=4, **kw)
                stand = L._reduce_rows_kernel.warmup(*[_decode(_encode(a)) for a in args], grid=(1,), num_warps=4,
                                                     **{k: _decode(_encode(v)) for k, v in kw.items()})
                assert real.hash == stand.hash, (off, B, ii, tgt.dtype)
                cases += 1
z = torch.zeros(8, 100, dtype=torch.bfloat16)
for zz, C in ((z, 100), (z[:, 1:], 99)):
    args = [zz, buf64[:8], buf32[:8], torch.empty_like(zz), zz.stride(0), C, 0.01, 1.0, 0.01, 1.5, -100]
    real = L._obf_softmax_kernel.warmup(*args, grid=(1,), BLOCK=128, ONE_CHUNK=True, WRITE_GRAD=True, num_warps=4)
    stand = L._obf_softmax_kernel.warmup(*[_decode(_encode(a)) for a in args], grid=(1,), BLOCK=128,
                                         ONE_CHUNK=True, WRITE_GRAD=True, num_warps=4)
    assert real.hash == stand.hash
    cases += 1
print("same variant in", cases, "cases")
"""


@needs_cpu_only
def test_stand_in_arguments_specialize_like_the_real_ones():
    r = subprocess.run([sys.executable, "-c", _SPEC_SCRIPT], cwd=str(ROOT), env=_env(False), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "same variant in 50 cases" in r.stdout


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records interpreter launches")
def test_recorder_forces_the_gpu_geometry_and_runs_nothing():
    import fastsam
    from fastsam.kernels import triton_launch as TS
    from fastsam.kernels import triton_losses as L
    from fastsam.kernels._triton_aot import LaunchRecorder
    from fastsam.losses import obf_loss

    geometry, config = TS._geometry, L._config
    params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(3, 7).to(torch.bfloat16))]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    opt = fastsam.SAM(params, torch.optim.AdamW, backend="triton", lr=1e-3)
    with LaunchRecorder(sms=100) as rec:
        rec.tag = "step"
        opt.first_step()
        opt.second_step()
        rec.tag = "loss"
        obf_loss(torch.randn(4, 3000), torch.tensor([0, 1, 2, 3]), backend="triton")
    assert TS._geometry is geometry and L._config is config  # patches undone
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # nothing ran
    recs = rec.dump()
    cfg = TS.get_config()
    sam = [r for r in recs if r["tag"] == "step"]
    assert len(sam) == 3 * 2 and rec.launches >= 8  # K1, K2, K3 per dtype group; + loss row kernel + reduction
    for r in sam:
        kw = {k: next(iter(v.values())) for k, v in r["kwargs"].items()}
        assert kw["BLOCK"] == cfg.block and kw["num_warps"] == cfg.num_warps and not kw.get("RNE_BF16", False)
        assert r["grid"][0] <= 100 * cfg.programs_per_sm
    row = next(r for r in recs if r["kernel"] == "_obf_softmax_kernel")
    assert row["kwargs"]["BLOCK"]["int"] == L._config(3000, torch.device("cuda"))[0] == 4096  # not the CPU's 16384
    assert {r["kwargs"]["DT"]["tl_dtype"] for r in sam} == {"fp32", "bf16"}  # one launch family per dtype group


def test_spill_policy_for_launched_variants():
    from fastsam.kernels._triton_aot import MAX_ALLOWED_SPILL, launch_spill_is_a_failure

    for qmode in (0, 1):
        for k in ("perturb_partials_kernel", "perturb_apply_kernel"):
            assert not launch_spill_is_a_failure(k, {"QMODE": qmode}, MAX_ALLOWED_SPILL)
            assert launch_spill_is_a_failure(k, {"QMODE": qmode}, MAX_ALLOWED_SPILL + 1)
    assert launch_spill_is_a_failure("perturb_apply_kernel", {"QMODE": 2}, 4)  # p = 2 stays strict
    for k in ("second_step_kernel", "gsam_partials_kernel", "_obf_sigmoid_kernel", "_bisam_kernel",
              "_obf_softmax_kernel", "_reduce_rows_kernel"):
        assert launch_spill_is_a_failure(k, {"QMODE": 0}, 4) and not launch_spill_is_a_failure(k, {}, 0)
