"""The main job end to end: `deltamoe pipeline demo --quick` on the embedded default (SmolLM2-135M-Instruct, public
texts from Debian packages), every stage real (a few steps each), killed during stage 1 and rerun with both MoE
arms (learned routing and experts allocated by language), one report over all models.

This is CI's end-to-end check (marked slow; it runs in `make test`). The first run also fetches the offline assets
into the cache when they are not there yet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.megatron_helpers import REPO

pytestmark = pytest.mark.slow

STAGE1 = "smollm2_135m_demo_stage1_cpu"


def _pipeline(workdir: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.Popen([sys.executable, "-m", "deltamoe", "pipeline", "demo", "--quick", "--workdir", str(workdir), *extra],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the pipeline and everything under it (torchrun puts its workers in sessions of their own)."""
    import psutil

    parent = psutil.Process(proc.pid)
    family = [parent, *parent.children(recursive=True)]
    for p in family:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=60)
    proc.wait()


def _tracker(folder: Path) -> str | None:
    path = folder / "latest_checkpointed_iteration.txt"
    return path.read_text().strip() if path.exists() else None


def test_demo_pipeline_end_to_end_killed_in_stage1_and_resumed(tmp_path):
    workdir = tmp_path / "demo"
    stage1 = workdir / STAGE1

    # 1. Run until stage 1 has saved its first checkpoint (save interval 1 in --quick), then kill everything.
    first = _pipeline(workdir, tmp_path / "first.log")
    deadline = time.time() + 1800
    while _tracker(stage1) != "1":
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
        assert time.time() < deadline, "stage 1 saved no checkpoint within 30 minutes"
        time.sleep(0.5)
    _kill_tree(first)
    assert _tracker(stage1) == "1"
    assert not (workdir / "hf-moe").exists()

    # 2. Rerun it, now with both MoE arms (learned routing, experts allocated by language): finished stages are
    # skipped, stage 1 resumes from iteration 1, the rest runs, the by-language arm from the same upcycled model.
    second = _pipeline(workdir, tmp_path / "second.log", "--expert-allocation", "both")
    assert second.wait(timeout=3600) == 0, (tmp_path / "second.log").read_text()[-8000:]
    log = (tmp_path / "second.log").read_text()
    assert "=== import: complete, skipped" in log and "=== upcycle: complete, skipped" in log
    stage1_log = log[log.index("=== stage1:"): log.index("=== stage2:")]
    assert f"successfully loaded checkpoint from {stage1}" in stage1_log and "at iteration 1" in stage1_log
    assert "iteration        1/       2" not in stage1_log and "iteration        2/       2" in stage1_log
    assert _tracker(stage1) == "2"

    # 3. Every stage's output is valid: manifest complete, models load, metrics present, report written.
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["stages"] and all(s.get("status") == "complete" for s in manifest["stages"].values())
    for name in ("stage1", "stage2", "stage1:by-language", "stage2:by-language"):
        assert manifest["stages"][name]["metrics"]["log_rows"] >= 1, name
    by_language_log = log[log.index("=== stage1:by-language:"): log.index("=== stage2:by-language:")]
    assert "--expert-allocation by-language" in by_language_log and "iteration        2/       2" in by_language_log
    from transformers import AutoConfig

    from tests.megatron_helpers import load_hf_strict

    moes = ("deltamoe", "deltamoe-by-language")
    for label in moes:
        moe_config = AutoConfig.from_pretrained(workdir / label)
        assert moe_config.architectures == ["MixtralForCausalLM"] and moe_config.num_local_experts == 6
        model = load_hf_strict(workdir / label)
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
        graft = json.loads((workdir / label / "deltamoe_graft.json").read_text())
        assert graft["inputs"]["post"]["path"].endswith("post-sft")
    for label in ("base", "post", *moes, "dense-cpt+paramdelta"):
        results = json.loads((workdir / "eval" / label / "results.json").read_text())
        scored = [r for r in results["results"] if r["task"] != "routing"]  # routing applies to the MoE only
        assert scored and all(r["metrics"] for r in scored), label
        routing = [r for r in results["results"] if r["task"] == "routing"]
        assert all(bool(r["metrics"]) == (label in moes) for r in routing), label
        assert manifest["stages"][f"eval:{label}"]["metrics"]
    # One report covers both arms side by side.
    report = workdir / "report"
    doc = json.loads((report / "report.json").read_text())
    assert doc["models"] == ["base", "post", *moes, "dense-cpt+paramdelta"]
    assert set(doc["allocation"]["share"]) == set(moes) and set(doc["allocation"]["share"]["deltamoe"]) == {"en", "es", "ru"}
    assert "## Routing on the allocated experts" in (report / "report.md").read_text()
    plots = list(report.rglob("*.png"))
    assert report / "plots" / "routing_compare.png" in plots and all(p.stat().st_size > 5000 for p in plots)
