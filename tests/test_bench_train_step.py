"""bench/train_step.py runs on CPU at --tiny size: every row gives a number and --profile writes the operator table
(the GPU run of the same script is bench/gpu_check.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.megatron_helpers import REPO

pytestmark = pytest.mark.slow


def test_tiny_benchmark_prints_the_table_and_profiles(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/train_step.py", "--tiny", "--rows", "transformers,fast stage 1",
                           "--micro-batches", "2", "--warmup", "1", "--iters", "2", "--json", str(out),
                           "--profile", str(tmp_path / "prof")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["row"], r["status"]) for r in results] == [("transformers", "ok"), ("fast stage 1", "ok")]
    assert all(r["tokens_per_s"] > 0 for r in results)
    assert "| fast stage 1 | 2 |" in proc.stdout
    for r in results:
        table = open(r["profile"]).read()
        assert "sorted by self_cpu_time_total" in table and "aten::" in table, r["row"]
