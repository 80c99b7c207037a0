"""Helpers for tests that run megatron-core in the pytest process (one gloo rank) or in torchrun subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def megatron_logits(model, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits [batch, seq, vocab] of a megatron GPTModel, without the vocabulary padding."""
    model.eval()
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    with torch.no_grad():
        logits = model(input_ids, positions, None)
    return logits[..., :vocab_size].float()


def load_hf_strict(folder, *, dtype: torch.dtype = torch.float32, **kwargs):
    """AutoModelForCausalLM.from_pretrained that fails on any missing, unexpected or mismatched tensor.

    transformers only logs those and initialises what is missing (a zero bias, a unit norm), which can hide a
    conversion that dropped or invented a tensor; every test loads HF models through here.
    """
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True, **kwargs)
    problems = {key: sorted(map(str, value))[:5] for key, value in info.items() if value}
    assert not problems, f"{folder}: loading is not strict: {problems}"
    return model.eval()


def hf_logits(folder, input_ids: torch.Tensor, **config_overrides) -> torch.Tensor:
    """float32 logits of an HF folder, loaded strictly (load_hf_strict)."""
    model = load_hf_strict(folder, **config_overrides)
    with torch.no_grad():
        return model(input_ids).logits.float()


def run_torchrun(nproc: int, script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` (a python file) under torchrun with `nproc` gloo processes; raise with its output on failure."""
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", "0",
           script, *args]
    # --master-port 0 is not accepted by every torchrun; use a free port instead.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd[cmd.index("--master-port") + 1] = str(port)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
