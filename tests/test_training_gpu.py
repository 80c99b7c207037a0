"""Stage 1 for 20 iterations on one CUDA GPU with NCCL, through Megatron-LM's trainer (run with `pytest -m gpu`).

Self-contained: builds the tiny upcycled Llama and its datasets like tests/test_training.py, then checks what stage 1
promises on the GPU path (TE spec when Transformer Engine is installed, otherwise the fast spec): frozen tensors
bit-identical, experts 1..E-1 and routers trained, loss falling. Takes well under a minute on an H100.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_training import check_stage1_changes, lm_losses, train, weights, workspace  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu


def test_stage1_twenty_iterations_on_gpu(workspace):  # noqa: F811
    assert torch.cuda.is_available(), "gpu-marked test needs CUDA: run it on a GPU machine (make test-gpu)"
    out = workspace["root"] / "stage1_gpu"
    records = train(workspace, out, iters=20)  # float32: frozen tensors are compared bit for bit
    assert [r["iteration"] for r in records] == list(range(1, 21))
    losses = lm_losses(records)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    check_stage1_changes(weights(workspace["moe"]), weights(out))
