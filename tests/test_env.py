"""`deltamoe env` on this machine (CPU in CI): versions, devices, the spec `auto` picks and why, kernel usability."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import torch

from deltamoe.megatron_ext.runtime.specs import HAVE_TE, resolve_spec_name
from tests.megatron_helpers import REPO


def _env(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("DELTAMOE_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "deltamoe", "env", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def test_env_json_reports_this_machine():
    result = _env("--json")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout)
    v = info["versions"]
    assert v["torch"] == importlib.metadata.version("torch") and v["megatron-core"] == "0.19.2"
    assert v["transformers"] == importlib.metadata.version("transformers") and v["python"] == sys.version.split()[0]
    assert info["torch_build"]["cuda"] == torch.version.cuda
    assert info["transformer_engine"]["importable"] == HAVE_TE
    assert info["layer_spec"]["auto"] == resolve_spec_name("auto")
    assert info["devices"]["cuda_available"] == torch.cuda.is_available()
    assert len(info["devices"]["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert set(info["sdpa"]) >= {"device", "dtype", "flash", "memory_efficient"}
    if not torch.cuda.is_available():
        assert info["layer_spec"]["auto"] == "fast"
        assert "Transformer Engine" in info["layer_spec"]["why"]
        assert info["grouped_gemm"]["usable"] is False and "no CUDA device" in info["grouped_gemm"]["why"]
        assert info["sdpa"]["device"] == "cpu"
    assert "Warning" not in result.stderr and "WARNING" not in result.stderr


def test_env_report_is_readable():
    result = _env()
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("DeltaMoE environment")
    for label in ("torch", "transformer engine", "apex", "megatron-core", "transformers", "python", "devices",
                  f"layer spec auto -> {resolve_spec_name('auto')}: ", "grouped GEMM (torch._grouped_mm)", "SDPA flash kernel"):
        assert label in out, label
