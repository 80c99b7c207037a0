"""A process that runs several commands (the test suite, a notebook) keeps one set of process groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.megatron_helpers import REPO

SCRIPT = """
import json, os
from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
from megatron.core import parallel_state
counts = []
for _ in range(3):
    init_distributed(ParallelLayout())
    counts.append(len(os.listdir('/proc/self/task')))
assert parallel_state.get_tensor_model_parallel_world_size() == 1 and parallel_state.model_parallel_is_initialized()
print(json.dumps(counts))
"""


def test_init_distributed_again_reuses_its_groups_and_their_threads():
    # Before: every call left megatron's ~20 gloo groups (3 threads each) alive; 90 calls in one pytest process made
    # 5,400 polling threads and a load of 700 on 2 cores.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts[0] == counts[1] == counts[2], counts
