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
