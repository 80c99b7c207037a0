"""The pipeline's MoE arms: learned routing and experts allocated by language from one upcycled model, each with its
own training, export, graft and evaluation, one report over all (issue: experts allocated to languages).

The stage list and commands are checked here without running anything; tests/test_pipeline_demo.py runs both arms
for real."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from deltamoe.common.errors import DeltaMoEError
from deltamoe.recipes.demo_pipeline import demo
from deltamoe.recipes.pipeline import MoEArm, _report_current, _select, build_stages


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.fixture
def both(tmp_path):
    workdir = tmp_path / "w"
    recipe = demo(cache=tmp_path / "cache", workdir=workdir, expert_allocation="both")
    return recipe, workdir, {s.name: s for s in build_stages(recipe, workdir)}


def test_both_arms_share_the_upcycled_model_and_train_apart(both):
    recipe, workdir, stages = both
    names = list(stages)
    arm_stages = ["stage1", "stage2", "export", "graft"]
    assert names.index("upcycle") < names.index("stage1")
    assert [n for n in names if n.split(":")[0] in arm_stages] == arm_stages + [f"{n}:by-language" for n in arm_stages]
    assert [n for n in names if n.startswith("eval:")] == ["eval:base", "eval:post", "eval:deltamoe", "eval:deltamoe-by-language",
                                                         "eval:dense-cpt+paramdelta"]
    assert names.count("upcycle") == 1 and names[-1] == "report"

    upcycled = str(stages["upcycle"].output)
    # Every upcycle setting of the recipe reaches the command (the shared variant's granularity included).
    upcycle = recipe.arms[0].stage1.upcycle
    command = stages["upcycle"].command
    assert [_flag(command, f) for f in ("--num-experts", "--topk", "--variant", "--granularity", "--expert-parallel-size")] \
        == [str(upcycle.num_experts), str(upcycle.topk), upcycle.variant, str(upcycle.granularity),
            str(recipe.arms[0].stage1.parallel.expert_model_parallel_size)]
    learned, by_language = stages["stage1"].command, stages["stage1:by-language"].command
    assert _flag(learned, "--pretrained-checkpoint") == _flag(by_language, "--pretrained-checkpoint") == upcycled
    assert _flag(learned, "--expert-allocation") == "learned" and _flag(by_language, "--expert-allocation") == "by-language"
    assert _flag(by_language, "--save") != _flag(learned, "--save")
    # Stage 2 of each arm continues its own stage 1; the by-language review uses the allocation loss, not LPR.
    review = stages["stage2:by-language"].command
    assert _flag(review, "--pretrained-checkpoint") == _flag(by_language, "--save")
    assert _flag(review, "--allocation-loss-coeff") == "0.1" and _flag(review, "--lpr-loss-coeff") == "0.0"
    assert _flag(stages["stage2"].command, "--lpr-loss-coeff") == "0.1"
    # Export -> graft -> eval follow each arm's own outputs.
    assert _flag(stages["export:by-language"].command, "--megatron") == _flag(review, "--save")
    assert _flag(stages["graft:by-language"].command, "--moe") == str(stages["export:by-language"].output)
    assert _flag(stages["eval:deltamoe-by-language"].command, "--model") == str(workdir / "deltamoe-by-language")
    assert len({str(stages[s].output) for s in stages if s.split(":")[0] in arm_stages}) == 8

    report = stages["report"].command
    evals = [str(stages[n].output) for n in names if n.startswith("eval:")]
    assert report[report.index("report") + 1: report.index("--out")] == evals
    assert json.loads(_flag(report, "--expert-allocation-map")) == recipe.arms[1].stage1.train.expert_allocation_map


def test_default_demo_trains_the_learned_arm_only(tmp_path):
    recipe = demo(cache=tmp_path / "cache", workdir=tmp_path / "w")
    stages = [s.name for s in build_stages(recipe, tmp_path / "w")]
    assert not any("by-language" in s for s in stages) and "stage1" in stages
    report = build_stages(recipe, tmp_path / "w")[-1].command
    assert "--expert-allocation-map" not in report
    only = demo(cache=tmp_path / "cache", workdir=tmp_path / "w", expert_allocation="by-language")
    assert [a.label for a in only.arms] == ["deltamoe-by-language"]
    with pytest.raises(DeltaMoEError, match=r"expert_allocation must be one of learned, by-language, both, got 'mixed'"):
        demo(cache=tmp_path / "cache", expert_allocation="mixed")


def test_stage_selection_spans_arms(both):
    _, _, stages = both
    chosen = [s.name for s in _select(list(stages.values()), "stage2", "graft")]
    assert chosen == ["stage2", "export", "graft", "stage1:by-language", "stage2:by-language", "export:by-language",
                      "graft:by-language"]
    assert [s.name for s in _select(list(stages.values()), "stage1:by-language", "stage1:by-language")] == ["stage1:by-language"]


def test_arms_that_do_not_fit_together_are_refused(tmp_path):
    recipe = demo(cache=tmp_path / "cache", workdir=tmp_path / "w", expert_allocation="both")
    learned, by_language = recipe.arms
    fields = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}

    def rebuild(arms):
        return type(recipe)(**{**fields, "arms": arms})

    with pytest.raises(DeltaMoEError, match=r"arms repeat a label"):
        rebuild([learned, dataclasses.replace(by_language, label="deltamoe")])
    eight = dataclasses.replace(learned.stage1, name="eight", upcycle=dataclasses.replace(learned.stage1.upcycle, num_experts=8))
    with pytest.raises(DeltaMoEError, match=r"arm 'eight' starts from .* must share the first arm's upcycled"):
        rebuild([learned, MoEArm(label="eight", tag="eight", stage1=eight,
                                 stage2=dataclasses.replace(learned.stage2, name="eight2", init_checkpoint="eight"))])
    with pytest.raises(DeltaMoEError, match=r"stage 2 starts from 'smollm2_135m_demo_stage1_cpu', not its stage 1"):
        rebuild([learned, dataclasses.replace(by_language, stage2=learned.stage2)])
    with pytest.raises(DeltaMoEError, match=r"arm label\(s\) \['base'\] name another model or folder"):
        rebuild([dataclasses.replace(learned, label="base")])
    with pytest.raises(DeltaMoEError, match=r"no MoE arm"):
        rebuild([])


def test_a_report_of_other_models_is_rerun(tmp_path):
    results = [tmp_path / "eval" / name for name in ("base", "deltamoe")]
    report = tmp_path / "report"
    assert not _report_current(report, results)
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"inputs": [{"results": str(r / "results.json")} for r in results]}))
    assert _report_current(report, results)
    assert not _report_current(report, [*results, tmp_path / "eval" / "deltamoe-by-language"])
