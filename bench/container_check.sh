#!/usr/bin/env bash
# The Transformer Engine path, inside the project's container on one GPU (none of this can run on CPU CI):
#   docker build -t deltamoe:latest . && docker run --gpus all --rm -v "$PWD/out:/out" deltamoe:latest \
#       bash bench/container_check.sh /out
#   (Slurm + pyxis: srun --gpus 1 --container-image ~/deltamoe.sqsh --container-mounts $PWD/out:/out \
#       bash bench/container_check.sh /out)
# Checks, on a tiny Llama built in-process: the TE-spec model loads what `deltamoe upcycle` wrote and computes what the
# local spec computes; stage 1 for 3 iterations with the TE spec in bf16 and, on GPUs with FP8 tensor cores
# (compute capability >= 8.9), in FP8: expert 0 and every frozen tensor stay bit-identical and every other expert
# trains; the trained checkpoint exports and the HF model's logits equal the TE model's. Then the gpu-marked tests
# (NCCL conversion parity, fast spec on CUDA). Logs and a summary go to OUT_DIR; the exit status is non-zero if any
# check failed.
set -uo pipefail
out=${1:?usage: bench/container_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 - <<'PY' 2>&1 | tee -a "$out/gpu.txt"
import importlib.metadata as md, torch
for name in ("torch", "transformer_engine", "megatron-core", "transformers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
print("cuda", torch.version.cuda, "capability", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
PY
deselect=()
cap=$(python3 -c "import torch; print(int(torch.cuda.get_device_capability() >= (8, 9)))" 2>/dev/null || echo 0)
[ "$cap" = 1 ] || { deselect=(-k "not fp8"); echo "no FP8 tensor cores: FP8 stage 1 not checked" | tee -a "$out/gpu.txt"; }
timeout 900 python3 -m pytest -v -p no:cacheprovider -m te "${deselect[@]}" tests/test_te.py 2>&1 | tee "$out/pytest_te.log"
te_rc=${PIPESTATUS[0]}
timeout 600 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/pytest_gpu.log"
gpu_rc=${PIPESTATUS[0]}
echo "te tests exit $te_rc, gpu tests exit $gpu_rc" | tee "$out/summary.txt"
[ "$te_rc" = 0 ] && [ "$gpu_rc" = 0 ]
