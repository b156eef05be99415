#!/usr/bin/env bash
# GPU session: the GPU tests and GPU benchmarks, one stage per device call (each < 10 minutes).
#
#   bash bench/gpu_suite.sh [optim|losses|msam]    # from the repository root; default: optim
#                                                  # results under $OUT (else bench/results/gpu)
#
# optim  (issue 3) env.txt; gpu_tests.log: pytest tests/test_triton_sam.py on CUDA (all cases + the
#        gpu-marked ones: no host sync under torch.cuda.set_sync_debug_mode("error"), profiler kernel
#        count); bench_optim.{json,md,log}: ViT-B/16 + ViT-L/16, fp32 + bf16: loop / pytorch_optimizer /
#        fastsam foreach / fastsam triton / AdamW alone; ms, GB/s vs measured copy bandwidth, kernels,
#        syncs, plus a launch-geometry sweep of the triton kernels (ViT-B fp32)
# losses (issue 4) env.txt; losses_tests.log: tests/test_losses.py on CUDA; losses_cuda.{json,md} +
#        bench_losses.log: fused OBF / BiSAM vs F.cross_entropy and the eager formula, 5 shapes
# msam   (issue 6) env.txt; msam_tests.log: tests/test_accumulate.py and the gpu-marked csrc CUDA tests
#        (builds the CUDA extension, ~1-2 min; the CPU csrc tests ran in CI); msam_cuda.json + base_step_cuda.json + bench_msam.log:
#        per-micro-batch restore + accumulate fused vs unfused, and SAM.base_step vs torch AdamW, ViT-B fp32
# Each stage's steps have their own timeouts so the benchmark JSON is written even if tests hang.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
# torch.profiler (kernel counts) leaves CUPTI attached unless told otherwise, slowing later launches
export TEARDOWN_CUPTI=1

python - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton missing:", e)
for mod in ("pytest", "pytorch_optimizer"):
    try:
        __import__(mod)
        print(mod, "ok")
    except Exception as e:
        print(mod, "missing:", e)
PY

STAGE="${1:-optim}"
case "$STAGE" in
optim)
  # no csrc build in this stage (~1 min of a 5 min budget): "auto" resolves to triton/foreach
  export FASTSAM_DISABLE_EXT=1
  echo "== GPU tests" | tee "$OUT/gpu_tests.log"
  timeout 300 python -m pytest tests/test_triton_sam.py -q -rfE -p no:cacheprovider 2>&1 | tail -60 >> "$OUT/gpu_tests.log"
  echo "pytest exit: ${PIPESTATUS[0]}" >> "$OUT/gpu_tests.log"
  tail -5 "$OUT/gpu_tests.log"
  echo "== benchmark" | tee "$OUT/bench_optim.log"
  timeout 270 python -m bench.bench_optim --out "$OUT" --sweep 2>&1 | tee -a "$OUT/bench_optim.log" | tail -30
  echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_optim.log"
  ;;
losses)
  export FASTSAM_DISABLE_EXT=1
  echo "== loss tests" | tee "$OUT/losses_tests.log"
  timeout 240 python -m pytest tests/test_losses.py -q -rfE -p no:cacheprovider 2>&1 | tail -60 >> "$OUT/losses_tests.log"
  echo "pytest exit: ${PIPESTATUS[0]}" >> "$OUT/losses_tests.log"
  tail -5 "$OUT/losses_tests.log"
  echo "== loss benchmark" | tee "$OUT/bench_losses.log"
  timeout 300 python -m bench.bench_losses --out "$OUT" 2>&1 | tee -a "$OUT/bench_losses.log" | tail -30
  echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_losses.log"
  ;;
msam)
  echo "== m-SAM + csrc CUDA tests" | tee "$OUT/msam_tests.log"
  timeout 150 python -m pytest tests/test_accumulate.py -q -rfE -p no:cacheprovider 2>&1 | tail -40 >> "$OUT/msam_tests.log"
  echo "pytest exit: ${PIPESTATUS[0]}" >> "$OUT/msam_tests.log"
  timeout 200 python -m pytest tests/test_cpp_sam.py -m gpu -q -rfE -p no:cacheprovider 2>&1 | tail -40 >> "$OUT/msam_tests.log"
  echo "pytest exit: ${PIPESTATUS[0]}" >> "$OUT/msam_tests.log"
  tail -5 "$OUT/msam_tests.log"
  echo "== m-SAM benchmark" | tee "$OUT/bench_msam.log"
  timeout 150 python -m bench.bench_msam --device cuda --out "$OUT" 2>&1 | tee -a "$OUT/bench_msam.log" | tail -20
  echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_msam.log"
  timeout 60 python -m bench.bench_base_step --device cuda --out "$OUT" 2>&1 | tee -a "$OUT/bench_msam.log" | tail -8
  echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_msam.log"
  ;;
*)
  echo "unknown stage $STAGE (optim | losses | msam)"; exit 2 ;;
esac
ls -la "$OUT"
