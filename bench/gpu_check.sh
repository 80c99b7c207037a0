#!/usr/bin/env bash
# The GPU checks, as one script for a GPU machine whose image has torch + transformers but not megatron-core:
#   bash bench/gpu_check.sh OUT_DIR        (wheels in .whl/: megatron-core 0.19.2 cp312, nltk)
# Runs every gpu-marked test, then the train-step benchmark; logs, the benchmark JSON and per-row profiles
# (top kernels by GPU time, OUT_DIR/profiles/) go to OUT_DIR.
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, megatron.core; print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', megatron.core.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests} 2>&1 | tee "$out/pytest_gpu.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$out/pytest_gpu.log"
timeout ${BENCH_TIMEOUT:-270} python3 bench/train_step.py --budget-s ${BENCH_BUDGET:-200} --json "$out/train_step.json" --profile "$out/profiles" 2>&1 | tee "$out/train_step.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$out/train_step.log"
