#!/usr/bin/env bash
# The test suite against the edges of the supported range, each in its own virtual environment
# (CI covers the newest: torch 2.13 CPU + triton 3.9). Not part of CI: "old" downloads ~5 GB.
#
#   bash tools/compat_matrix.sh old       # torch 2.4.0 + triton 3.0.0 (the oldest supported; PyPI's CUDA build,
#                                         # run on the CPU), numpy < 2: whole suite + sm_90 AOT compile of every kernel
#   bash tools/compat_matrix.sh triton36  # triton 3.6.0 (the GPU machine's) beside the installed torch, numpy < 2.3:
#                                         # Triton tests + sm_90 AOT compile
#   bash tools/compat_matrix.sh all
#
# Environments live under ${COMPAT_DIR:-/tmp/fastsam-compat} and are reused; logs go to $COMPAT_DIR/<name>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${COMPAT_DIR:-/tmp/fastsam-compat}"
mkdir -p "$DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

old() {
  local v="$DIR/torch24"
  [ -x "$v/bin/python" ] || python -m venv "$v"
  "$v/bin/pip" install -q "torch==2.4.0" "numpy<2" pytest hypothesis "pytorch-optimizer>=3.0" pytest-benchmark \
    scikit-learn matplotlib ninja tqdm wheel "setuptools>=64" 2>&1 | grep -v "is ignored" | tail -3
  "$v/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
  "$v/bin/python" -m pytest -q -p no:cacheprovider 2>&1 | tail -15
  "$v/bin/python" -m fastsam.kernels._triton_aot 2>&1 | tail -2
}

triton36() {
  local v="$DIR/triton36"
  [ -x "$v/bin/python" ] || python -m venv --system-site-packages "$v"
  "$v/bin/pip" install -q "triton==3.6.0" "numpy<2.3" 2>&1 | grep -v "is ignored" | tail -3
  "$v/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
  "$v/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton_sam.py tests/test_losses.py tests/test_accumulate.py \
    tests/test_philox.py tests/test_compat.py 2>&1 | tail -15
  "$v/bin/python" -m fastsam.kernels._triton_aot 2>&1 | tail -2
}

case "${1:-all}" in
old) old 2>&1 | tee "$DIR/old.log" ;;
triton36) triton36 2>&1 | tee "$DIR/triton36.log" ;;
all) old 2>&1 | tee "$DIR/old.log"; triton36 2>&1 | tee "$DIR/triton36.log" ;;
*) echo "unknown: $1 (old | triton36 | all)"; exit 2 ;;
esac
