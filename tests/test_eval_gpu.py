"""The evaluation backend on a CUDA GPU: bf16 by default, log-likelihoods close to fp32 on CPU, the example suite
runs end to end (dense and Mixtral, routing included). Run on a GPU machine: `pytest -m gpu tests/test_eval_gpu.py`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deltamoe.evaluation.backends import HFBackend
from deltamoe.evaluation.runner import evaluate_model
from deltamoe.evaluation.suite import load_suite
from tests.fixtures_eval import make_tiny_eval_model, make_tiny_mixtral

pytestmark = pytest.mark.gpu
SUITE = Path(__file__).resolve().parents[1] / "deltamoe" / "evaluation" / "example_suite.yaml"
PAIRS = [("Question: What is frozen water called?\nAnswer:", " ice"), ("Столица Франции —", " Париж."),
         ("The cat sleeps on the ", "warm mat near the door.")]


def test_gpu_defaults_to_bf16_and_matches_cpu_fp32(tmp_path):
    assert torch.cuda.is_available(), "this test is for a CUDA machine (pytest -m gpu)"
    model = make_tiny_eval_model(tmp_path / "llama", arch="qwen3", seed=4)
    gpu = HFBackend(model, batch_size=2, max_length=64)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    assert next(gpu.model.parameters()).dtype == torch.bfloat16
    cpu = HFBackend(model, device="cpu", batch_size=2, max_length=64)
    for (pair, (lp_gpu, _)), (lp_cpu, _) in zip(zip(PAIRS, gpu.loglikelihood(PAIRS)), cpu.loglikelihood(PAIRS)):
        n = len(cpu.encode_pair(*pair)[1])
        assert abs(lp_gpu - lp_cpu) / n < 0.1, (pair, lp_gpu, lp_cpu)  # bf16 rounding per token, not a bug-sized gap
    fp32 = HFBackend(model, dtype="float32", batch_size=2, max_length=64)
    for (lp32, g32), (lp_cpu, g_cpu) in zip(fp32.loglikelihood(PAIRS), cpu.loglikelihood(PAIRS)):
        assert math.isclose(lp32, lp_cpu, rel_tol=1e-4, abs_tol=1e-3) and g32 == g_cpu


def test_example_suite_runs_on_gpu(tmp_path):
    assert torch.cuda.is_available(), "this test is for a CUDA machine (pytest -m gpu)"
    for folder in (make_tiny_eval_model(tmp_path / "dense", arch="llama"), make_tiny_mixtral(tmp_path / "moe")):
        doc = evaluate_model(folder, load_suite(SUITE), batch_size=4)
        assert doc["backend"]["device"].startswith("cuda") and doc["backend"]["dtype"] == "bfloat16"
        assert len(doc["results"]) == len(load_suite(SUITE).tasks)
        for r in doc["results"]:
            assert all(math.isfinite(v) for v in r["metrics"].values()), r["task"]
        routing = [r for r in doc["results"] if r["type"] == "routing"]
        if folder.name == "moe":
            for r in routing:
                for row in r["details"]["shares"]:
                    assert math.isclose(sum(row), 1.0, rel_tol=1e-9)
        else:
            assert all(r["metrics"] == {} for r in routing)
