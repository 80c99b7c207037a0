# DeltaMoE on NVIDIA's PyTorch container: CUDA, NCCL, PyTorch, Transformer Engine and apex come from the base image
# (built against each other), so the image keeps its torch and installs only megatron-core and our pure-Python deps.
# pyproject.toml's torch pin is for the pip/CPU path; tests/test_recipes.py checks every other pin here matches it.
#
#   docker build -t deltamoe:latest .
#   enroot import -o $HOME/deltamoe.sqsh dockerd://deltamoe:latest        # for Slurm + pyxis (--container-image)
#   docker run --gpus all --rm deltamoe:latest python -m deltamoe.recipes.launch.local smollm2_135m_demo_stage1_cpu --dry-run
#
# 25.12-py3: Ubuntu 24.04, Python 3.12 (pyproject: requires-python >= 3.12), torch 2.10 (megatron-core needs >= 2.6).
FROM nvcr.io/nvidia/pytorch:25.12-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1

# --no-deps keeps the image's torch: the base image's pip constraints (PIP_CONSTRAINT) pin it, and TE/apex are
# compiled against it. megatron-core's own runtime deps (numpy, packaging) are already in the image.
RUN pip install --no-deps "megatron-core==0.19.2" && \
    pip install \
        "transformers>=5.0,<6" \
        "safetensors>=0.4" \
        "numpy>=1.26" \
        "nltk>=3.8" \
        "psutil>=5.9" \
        "tqdm>=4.66" \
        "sacrebleu>=2.4" \
        "matplotlib>=3.8" \
        "pyyaml>=6" \
        "gguf>=0.10" \
        "accelerate>=1.0" \
        "pytest>=8" \
        "lm-eval>=0.4.13"

WORKDIR /workspace/deltamoe
COPY pyproject.toml README.md ./
COPY deltamoe ./deltamoe
COPY tests ./tests
COPY bench ./bench
RUN pip install --no-deps -e . && \
    python -c "import deltamoe, megatron.core, transformer_engine; print('deltamoe image ok')"
