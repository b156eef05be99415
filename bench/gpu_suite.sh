#!/usr/bin/env bash
# GPU session, one command: GPU tests of the triton SAM backend + the optimizer benchmark.
#
#   bash bench/gpu_suite.sh            # from the repository root; results under $OUT (else bench/results/gpu)
#
# Writes (at most 6 files, flat, so a device run can bring them all back):
#   env.txt             torch / triton / CUDA / GPU versions
#   gpu_tests.log       pytest tests/test_triton_sam.py on CUDA (all cases + the gpu-marked ones:
#                       no host sync under torch.cuda.set_sync_debug_mode("error"), profiler kernel count)
#   bench_optim.json    ViT-B/16 + ViT-L/16, fp32 + bf16: loop / pytorch_optimizer / fastsam foreach /
#                       fastsam triton / AdamW alone; ms, GB/s vs measured copy bandwidth, kernels, syncs,
#                       plus a launch-geometry sweep of the triton kernels (ViT-B fp32)
#   bench_optim.md      the same as a table
#   bench_optim.log     benchmark progress
# Budget: the device tool allows 10 minutes per command; each stage has its own timeout so the
# benchmark runs (and the JSON is written) even if the tests hang or fail.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

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

echo "== GPU tests" | tee "$OUT/gpu_tests.log"
timeout 300 python -m pytest tests/test_triton_sam.py -q -rfE -p no:cacheprovider 2>&1 | tail -60 >> "$OUT/gpu_tests.log"
echo "pytest exit: ${PIPESTATUS[0]}" >> "$OUT/gpu_tests.log"
tail -5 "$OUT/gpu_tests.log"

echo "== benchmark" | tee "$OUT/bench_optim.log"
timeout 270 python -m bench.bench_optim --out "$OUT" --sweep 2>&1 | tee -a "$OUT/bench_optim.log" | tail -30
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_optim.log"
ls -la "$OUT"
