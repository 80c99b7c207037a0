"""The pipeline's progress: "stage k/N" with the recipe's estimate and the elapsed time, what is left after each
stage, and the verbosity setting inherited by every stage's process. Stages here are tiny stand-in commands."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from deltamoe.common import quiet
from deltamoe.recipes import pipeline
from deltamoe.recipes.demo_pipeline import demo
from deltamoe.recipes.pipeline import Stage, run_pipeline


def _stages(tmp_path: Path) -> list[Stage]:
    def make(name: str, code: str) -> Stage:
        out = tmp_path / name.replace(":", "-")
        command = [sys.executable, "-c", f"import os, pathlib; {code}; pathlib.Path({str(out)!r}).mkdir()"]
        return Stage(name, out, command, out.exists)

    done = tmp_path / "import"
    done.mkdir()
    return [make("import", "pass"),
            make("stage1", "print('verbose=' + os.environ.get('DELTAMOE_VERBOSE', 'unset'))"),
            make("eval:base", "pass")]


def test_stage_lines_show_place_estimate_and_what_is_left(tmp_path, monkeypatch, capfd):
    recipe = demo(cache=tmp_path / "cache", workdir=tmp_path / "w", quick=True)
    monkeypatch.setattr(pipeline, "build_stages", lambda p, workdir: _stages(tmp_path))
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")  # what `deltamoe --verbose pipeline ...` sets
    run_pipeline(recipe, tmp_path / "w")
    out = capfd.readouterr().out
    assert recipe.estimate("stage1") and recipe.estimate("eval:base") == recipe.estimates["eval"]
    assert re.search(r"=== import: stage 1/3, estimate \d+s, pipeline at 0s\n    \$ .+\n=== import: complete, skipped", out)
    assert re.search(r"=== stage1: stage 2/3, estimate \d+s, pipeline at \d+s", out)
    assert "verbose=1" in out  # the stage's process inherited the setting
    left = re.search(r"=== stage1: done in [\d.]+s \(estimate \d+s\); stage 2/3, pipeline at \d+s, about (\d+)s left", out)
    assert left and int(left.group(1)) == round(recipe.estimate("eval:base"))
    assert re.search(r"=== eval:base: done in [\d.]+s \(estimate \d+s\); stage 3/3, pipeline at \d+s, last stage", out)


def test_every_demo_stage_has_an_estimate(tmp_path):
    for quick in (False, True):
        recipe = demo(cache=tmp_path / "cache", workdir=tmp_path / "w", quick=quick, expert_allocation="both")
        stages = pipeline.build_stages(recipe, tmp_path / "w")
        assert all(recipe.estimate(s.name) for s in stages), [s.name for s in stages if not recipe.estimate(s.name)]
    bigger = demo(cache=tmp_path / "cache", workdir=tmp_path / "w", scale=3)
    assert bigger.estimate("stage1") > demo(cache=tmp_path / "cache", workdir=tmp_path / "w").estimate("stage1")


def test_training_progress_line_has_tokens_per_second_eta_and_losses_per_language():
    from deltamoe.megatron_ext.training.metrics import LanguageMetrics

    m = LanguageMetrics(languages=["en", "es", "ru"], num_layers=2, probe=None, log_file=None, interval=5, stage=1,
                        train_iters=100, tokens_per_iteration=4 * 256)
    m.start_clock(10, now=1000.0)  # resumed after iteration 10
    record = {"iteration": 15, "tokens": {"en": 0, "es": 2560, "ru": 2560}, "lm_loss": {"en": None, "es": 2.5, "ru": 3.25},
              "expert0_prob": {"en": [None, None], "es": [0.5, 0.3], "ru": [0.2, 0.2]}, "lpr_loss_per_layer": 0.125}
    line = m.progress_line(record, now=1050.0)
    # 5 iterations x 1024 tokens in 50 s; 85 iterations left at 10 s each.
    assert line == ("deltamoe stage 1 | iteration 15/100 | 102 tokens/s | elapsed 0:00:50 | ETA 0:14:10 | "
                    "lm loss es 2.500 ru 3.250 | p(expert 0) es 0.40 ru 0.20 | lpr loss 0.1250")
    later = m.progress_line({**record, "iteration": 20}, now=1060.0)  # tokens/s over the last interval only
    assert "| 512 tokens/s |" in later and "ETA 0:08:00" in later  # the ETA: the mean over the run, 6 s each
