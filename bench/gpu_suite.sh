#!/usr/bin/env bash
# The first GPU run in ONE device call (<= 9 minutes on a bare machine): every result that comes
# back is written as soon as it exists, and no stage can eat the time of the ones after it.
#
#   bash bench/gpu_suite.sh [all|optim|losses|msam] [--dry]     # from anywhere; default: all
#   GPU_SUITE_DRY=1 bash bench/gpu_suite.sh                     # same as --dry
#
# Results: $OUT (else bench/results/gpu), at most 8 files, flat:
#   env.txt           versions, GPU, tools; then one timeline line per stage (start, cap, exit, seconds)
#   tests.log         full pytest output of the GPU tests (no tail), one section per pytest run
#   bench.log         stdout of the benchmarks (SAM step, sweep, losses)
#   bench_optim.json/.md   SAM step per implementation (rewritten after every row), then the sweep
#   losses_cuda.json/.md   ascent losses vs F.cross_entropy (rewritten after every row)
#   ext.log           background build of the csrc extension (cpu + cuda + host kinds), then its GPU tests
#
# Stages of `all`, in order of value, each capped: SIGINT at the cap (pytest prints its summary,
# Python runs its finally blocks and the benchmarks have already saved their rows), SIGKILL 10 s
# later if that did not end it. Caps are cut further so the whole script ends by the deadline
# (GPU_SUITE_BUDGET, default 510 s: 30 s of margin under 9 minutes); a stage with < 20 s left is
# skipped and says so; GPU_SUITE_CAP_<ENV|SAM|LOSSES|OPTIM|BLOSSES|EXT|SWEEP> overrides a cap. Budget, seconds (cap / expected on an H200 machine with 16 cores):
#   a  env            20 /  5   versions, nvidia-smi, which tools exist (xdist, pytest-timeout, nvcc)
#      ext build       -        background from t=0, own log, nice'd, fresh FASTSAM_EXT_DIR and
#                               TORCH_EXTENSIONS_DIR under /tmp (a stale build lock cannot hang a stage)
#   b1 tests_sam     150 / 80   tests/test_triton_sam.py (SAM kernels K1/K2/KG/K3; ~180 variants to
#                               compile, spread over 8 pytest-xdist workers when xdist is there),
#                               then tests/test_numerics_extremes.py (not in --dry)
#   b2 tests_losses   90 / 50   tests/test_losses.py + tests/test_loss_bf16_store.py (loss kernels)
#                               + tests/test_accumulate.py (m-SAM restore + accumulate)
#   c  bench_optim   100 / 60   SAM step, ViT-B/16 + ViT-L/16 x fp32/bf16 x loop / pytorch_optimizer /
#                               foreach / triton / AdamW: device ms (events), host ms, back-to-back ms
#   d  bench_losses   75 / 45   OBF / BiSAM fused vs eager vs F.cross_entropy at 256x1000, 8192x32000,
#                               4096x128256, bf16 + fp32
#   e  ext_tests      45 / 20   csrc CUDA backend: tests/test_cpp_sam.py + test_accumulate.py -m gpu,
#                               only if the background build has finished (else skipped, said in ext.log)
#   f  sweep          90 / 80   triton launch geometry sweep (ViT-B fp32), added to bench_optim.json
#   total caps       480 (+10 s kill grace at most once in practice) <= 510 budget < 540 (9 min)
#
# Profiles (the stage names of the earlier per-issue script still work, each in one call):
#   all (default)  a, build, b1, b2, c, d, e, f
#   optim          a, b1, c, f            (was: gpu_tests.log + bench_optim; now tests.log)
#   losses         a, b2, d               (was: losses_tests.log + bench_losses; now tests.log)
#   msam           a, build, b2 (accumulate only), wait for the build, e, bench_msam + bench_base_step
#                  on cuda (was: msam_tests.log + bench_msam.log; now tests.log, ext.log, bench.log)
#
# --dry / GPU_SUITE_DRY=1: the same plumbing on a CPU in < 1 minute (tests/test_gpu_suite.py runs
# it): each stage runs its CPU fallback (a few quick tests under the Triton interpreter, the tiny
# benchmark presets, a disabled extension build), with the same caps, logs and files.
set -u
cd "$(dirname "$0")/.."

DRY=${GPU_SUITE_DRY:-0}
PROFILE=all
for arg in "$@"; do
  case "$arg" in
  --dry) DRY=1 ;;
  all | optim | losses | msam) PROFILE=$arg ;;
  *) echo "usage: bash bench/gpu_suite.sh [all|optim|losses|msam] [--dry]" >&2; exit 2 ;;
  esac
done
[ "$DRY" = 1 ] || DRY=0

# the GPU machine's torch lives in python3 (a venv); PYTHON=... overrides (the dry-mode test passes its own)
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# torch.profiler (kernel counts) leaves CUPTI attached unless told otherwise, slowing later launches
export TEARDOWN_CUPTI=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1  # the CPU fallback of every Triton stage
else
  unset TRITON_INTERPRET
fi

T0=$(date +%s)
BUDGET=${GPU_SUITE_BUDGET:-510}
DEADLINE=$((T0 + BUDGET))
GRACE=10   # SIGKILL this long after the SIGINT of a cap
MIN_LEFT=20 # a stage with less time than this left before the deadline is skipped, not started
[ "$DRY" = 1 ] && MIN_LEFT=5
ENV_LOG="$OUT/env.txt"
TESTS_LOG="$OUT/tests.log"
BENCH_LOG="$OUT/bench.log"
EXT_LOG="$OUT/ext.log"
: > "$ENV_LOG"
: > "$TESTS_LOG"
: > "$BENCH_LOG"
: > "$EXT_LOG"

elapsed() { echo $(($(date +%s) - T0)); }
note() { echo "[t=$(elapsed)s] $*" | tee -a "$ENV_LOG"; }

# stage NAME NOMINAL_CAP LOG CMD...: CMD with all output appended to LOG, capped at
# min(NOMINAL_CAP, time left before the deadline); timeline lines in env.txt and LOG.
stage() {
  local name=$1 nominal=$2 log=$3
  shift 3
  local left=$((DEADLINE - $(date +%s) - GRACE))
  local cap=$((nominal < left ? nominal : left))
  if [ "$left" -lt "$MIN_LEFT" ]; then
    note "stage $name: SKIPPED, ${left}s left of the ${BUDGET}s budget"
    echo "== [t=$(elapsed)s] $name: skipped (time budget)" >> "$log"
    return 0
  fi
  note "stage $name: start, cap ${cap}s"
  local shown="$*"
  echo "== [t=$(elapsed)s] $name (cap ${cap}s): ${shown:0:300}" >> "$log"
  local t=$(date +%s)
  timeout -s INT -k "$GRACE" "$cap" "$@" >> "$log" 2>&1
  local rc=$? why=""
  [ "$rc" -eq 124 ] && why=", cap reached (SIGINT)"
  [ "$rc" -eq 137 ] && why=", killed ${GRACE}s after the SIGINT"
  echo "== [t=$(elapsed)s] $name: exit $rc after $(($(date +%s) - t))s$why" >> "$log"
  note "stage $name: exit $rc after $(($(date +%s) - t))s$why"
}

# ------------------------------------------------------------------------------ a: environment
env_report() {
  echo "profile $PROFILE, dry $DRY, budget ${BUDGET}s, out $OUT, started $(date -u +%FT%TZ)"
  echo "host $(uname -n) cpus $(nproc) $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2)"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv 2>&1
  command -v nvcc > /dev/null && nvcc --version 2>&1 | tail -2
  git rev-parse HEAD 2>/dev/null && git status --porcelain --untracked-files=no 2>/dev/null | head -20
  "$PY" - <<'EOF_PY'
import os, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, p.multi_processor_count, "SMs", p.total_memory >> 30, "GiB",
          "L2", getattr(p, "L2_cache_size", 0) >> 20, "MiB", "capability", f"{p.major}.{p.minor}")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton missing:", e)
for mod in ("pytest", "xdist", "pytest_timeout", "pytorch_optimizer", "ninja", "numpy", "timm"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "ok"))
    except Exception as e:
        print(mod, "missing:", type(e).__name__)
EOF_PY
}

# ------------------------------------------------------------------------------ build: csrc extension
EXT_DIR=$(mktemp -d /tmp/fastsam_ext.XXXXXX)
EXT_PID=""
start_ext_build() {
  # both kinds in parallel (the csrc tests need the cpu kind too), one log each, joined into
  # ext.log at the end; a dry run builds nothing (FASTSAM_DISABLE_EXT=1) but keeps the plumbing
  (
    t=$(date +%s)
    echo "== [t=$(elapsed)s] ext build start: FASTSAM_EXT_DIR=$EXT_DIR"
    for kind in cpu cuda host; do
      ( [ "$DRY" = 1 ] && export FASTSAM_DISABLE_EXT=1
        FASTSAM_EXT_DIR="$EXT_DIR" TORCH_EXTENSIONS_DIR="$EXT_DIR/torch" MAX_JOBS=4 TORCH_CUDA_ARCH_LIST=9.0 \
          FASTSAM_EXT_VERBOSE=1 nice -n 10 "$PY" -c "from fastsam.kernels import _ext; s = _ext.status('$kind'); \
print('ext $kind:', 'available' if s.available else 'NOT available', s.how, round(s.seconds, 1), 's', s.reason)" \
          > "$EXT_DIR/build_$kind.log" 2>&1 ) &
    done
    wait
    for kind in cpu cuda host; do
      echo "-- build log, kind $kind"
      cat "$EXT_DIR/build_$kind.log"
    done
    echo "== [t=$(elapsed)s] ext build end after $(($(date +%s) - t))s"
  ) >> "$EXT_LOG" 2>&1 &
  EXT_PID=$!
}

ext_stage() {
  local wait_s=$1
  while [ -n "$EXT_PID" ] && kill -0 "$EXT_PID" 2> /dev/null && [ "$wait_s" -gt 0 ]; do
    sleep 1
    wait_s=$((wait_s - 1))
  done
  if [ -z "$EXT_PID" ] || kill -0 "$EXT_PID" 2> /dev/null; then
    note "stage ext_tests: SKIPPED, the extension build has not finished"
    echo "== [t=$(elapsed)s] ext_tests: skipped, the build is still running" >> "$EXT_LOG"
    return 0
  fi
  local dis=()
  [ "$DRY" = 1 ] && dis=(FASTSAM_DISABLE_EXT=1)
  stage ext_tests "$CAP_EXT" "$EXT_LOG" env "${dis[@]}" FASTSAM_EXT_DIR="$EXT_DIR" TORCH_EXTENSIONS_DIR="$EXT_DIR/torch" \
    "$PY" -m pytest "${PYTEST_COMMON[@]}" tests/test_cpp_sam.py tests/test_accumulate.py -m gpu
  # the C++ host helpers (kind "host", built above): their Python twins give the same values
  stage host_tests "$CAP_EXT" "$EXT_LOG" env "${dis[@]}" FASTSAM_EXT_DIR="$EXT_DIR" \
    TORCH_EXTENSIONS_DIR="$EXT_DIR/torch" "$PY" -m pytest "${PYTEST_COMMON[@]}" tests/test_host_ext.py
}

# ------------------------------------------------------------------------------ b: tests
PYTEST_COMMON=(-q -rfEs -p no:cacheprovider --durations=15)
if [ "$DRY" = 0 ] && [ "${GPU_SUITE_XDIST:-1}" = 1 ] && "$PY" -c "import xdist" 2> /dev/null; then
  PYTEST_PAR=(-n "${GPU_SUITE_WORKERS:-8}")  # the compile of ~180 kernel variants, spread over CPU cores
  # a hung kernel costs its test, not the stage: the worker is ended (thread method) and replaced
  "$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST_PAR+=(--timeout 120 --timeout-method thread)
else
  PYTEST_PAR=()
fi

if [ "$DRY" = 1 ]; then
  CAP_ENV=30 CAP_SAM=60 CAP_LOSSES=60 CAP_OPTIM=60 CAP_BLOSSES=60 CAP_EXT=60 CAP_SWEEP=60
  K_SAM=(-k "resolution or resident_programs or spill_allowance")
  NUMERICS=()
  K_LOSSES=(-k "fused_reduction_matches_torch_formula or bf16_gradient_store or obf_strength or accumulate_errors")
  OPTIM_ARGS=(--device cpu --presets tiny --dtypes float32 --impls loop,fastsam_foreach,fastsam_triton,adamw_only
    --steps 1 --warmup 0)
  SWEEP_ARGS=(--device cpu --sweep-preset tiny --sweep-configs 2048x8x4 --sweep-steps 1)
  LOSSES_ARGS=(--cpu --shapes 64x100 32x1000 16x3000 --dtypes fp32 --iters 1 --warmup 0 --no-memory)
  MSAM_ARGS=(--device cpu --quick)
else
  CAP_ENV=20 CAP_SAM=150 CAP_LOSSES=90 CAP_OPTIM=100 CAP_BLOSSES=75 CAP_EXT=45 CAP_SWEEP=90
  K_SAM=()
  # after the kernel tests: the scaled-norm edge cases (p -> 1, ASAM / F-SAM overflow, tiny
  # gradients) against 60-digit decimals, where GPU exp2/log2 and subnormal flushing could differ
  # from the interpreter (~30 more Triton variants to compile; the CPU backends' cases are quick)
  NUMERICS=(tests/test_numerics_extremes.py)
  K_LOSSES=()
  OPTIM_ARGS=()
  SWEEP_ARGS=()
  LOSSES_ARGS=(--shapes 256x1000 8192x32000 4096x128256 --dtypes bf16 fp32)
  MSAM_ARGS=(--device cuda)
fi
# GPU_SUITE_CAP_<STAGE>=seconds overrides one nominal cap (tests/test_gpu_suite.py cuts one short)
CAP_ENV=${GPU_SUITE_CAP_ENV:-$CAP_ENV} CAP_SAM=${GPU_SUITE_CAP_SAM:-$CAP_SAM}
CAP_LOSSES=${GPU_SUITE_CAP_LOSSES:-$CAP_LOSSES} CAP_OPTIM=${GPU_SUITE_CAP_OPTIM:-$CAP_OPTIM}
CAP_BLOSSES=${GPU_SUITE_CAP_BLOSSES:-$CAP_BLOSSES} CAP_EXT=${GPU_SUITE_CAP_EXT:-$CAP_EXT}
CAP_SWEEP=${GPU_SUITE_CAP_SWEEP:-$CAP_SWEEP}

tests_sam() {
  # the csrc extension is tested in stage e: here it stays off, so no test builds it in the way of
  # the background build
  stage tests_sam "$CAP_SAM" "$TESTS_LOG" env FASTSAM_DISABLE_EXT=1 \
    "$PY" -m pytest "${PYTEST_COMMON[@]}" "${PYTEST_PAR[@]}" "${K_SAM[@]}" tests/test_triton_sam.py "${NUMERICS[@]}"
}
tests_losses() {
  stage tests_losses "$CAP_LOSSES" "$TESTS_LOG" env FASTSAM_DISABLE_EXT=1 \
    "$PY" -m pytest "${PYTEST_COMMON[@]}" "${PYTEST_PAR[@]}" "${K_LOSSES[@]}" tests/test_losses.py \
    tests/test_loss_bf16_store.py tests/test_accumulate.py
}
tests_accumulate() {
  stage tests_accumulate "$CAP_LOSSES" "$TESTS_LOG" env FASTSAM_DISABLE_EXT=1 \
    "$PY" -m pytest "${PYTEST_COMMON[@]}" "${PYTEST_PAR[@]}" "${K_LOSSES[@]}" tests/test_accumulate.py
}

# ------------------------------------------------------------------------------ c, d, f: benchmarks
bench_optim() {
  stage bench_optim "$CAP_OPTIM" "$BENCH_LOG" env FASTSAM_DISABLE_EXT=1 \
    "$PY" -m bench.bench_optim --out "$OUT" "${OPTIM_ARGS[@]}"
}
bench_losses() {
  stage bench_losses "$CAP_BLOSSES" "$BENCH_LOG" env FASTSAM_DISABLE_EXT=1 \
    "$PY" -m bench.bench_losses --out "$OUT" "${LOSSES_ARGS[@]}"
}
sweep() {
  stage sweep "$CAP_SWEEP" "$BENCH_LOG" env FASTSAM_DISABLE_EXT=1 \
    "$PY" -m bench.bench_optim --out "$OUT" --sweep-only "${SWEEP_ARGS[@]}"
}
bench_msam() {
  local dis=()
  [ "$DRY" = 1 ] && dis=(FASTSAM_DISABLE_EXT=1)
  stage bench_msam "$CAP_OPTIM" "$BENCH_LOG" env "${dis[@]}" FASTSAM_EXT_DIR="$EXT_DIR" \
    TORCH_EXTENSIONS_DIR="$EXT_DIR/torch" "$PY" -m bench.bench_msam --out "$OUT" "${MSAM_ARGS[@]}"
  stage bench_base_step "$CAP_EXT" "$BENCH_LOG" env "${dis[@]}" FASTSAM_EXT_DIR="$EXT_DIR" \
    TORCH_EXTENSIONS_DIR="$EXT_DIR/torch" "$PY" -m bench.bench_base_step --out "$OUT" "${MSAM_ARGS[@]}"
}

# ------------------------------------------------------------------------------ run
note "gpu_suite $PROFILE (dry=$DRY) start"
export PROFILE DRY BUDGET OUT PY  # env_report runs in a child bash (timeout needs a command)
stage env "$CAP_ENV" "$ENV_LOG" bash -c "$(declare -f env_report); env_report"
case "$PROFILE" in
all)
  start_ext_build
  tests_sam
  tests_losses
  bench_optim
  bench_losses
  # GPU: no waiting for the build (the sweep is worth more); dry: the stub "build" only imports
  # fastsam, but nice'd on a busy CPU (the test suite beside it) it was seen still running at t=22 s
  ext_stage "$([ "$DRY" = 1 ] && echo 60 || echo 0)"
  sweep
  ;;
optim)
  tests_sam
  bench_optim
  sweep
  ;;
losses)
  tests_losses
  bench_losses
  ;;
msam)
  start_ext_build
  tests_accumulate
  ext_stage 180
  bench_msam
  ;;
esac
if [ -n "$EXT_PID" ] && kill -0 "$EXT_PID" 2> /dev/null; then
  echo "== [t=$(elapsed)s] suite end: ext build still running, left behind" >> "$EXT_LOG"
fi
nfiles=$(find "$OUT" -mindepth 1 -maxdepth 1 | wc -l)
nested=$(find "$OUT" -mindepth 1 -type d | wc -l)
note "gpu_suite $PROFILE done after $(elapsed)s; $nfiles entries under \$OUT (limit 8), $nested folders"
ls -la "$OUT" >> "$ENV_LOG"
