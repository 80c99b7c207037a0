"""The embedded default as a pipeline recipe: SmolLM2-135M-Instruct learns Spanish and Russian experts, offline.

Original language English (KJV replay in review), new languages Spanish (Reina-Valera 1909 + fortunes-es) and Russian
(fortunes-ru). The post-training delta is made by a short SFT on English Debian-FAQ Q/A (I − B). Evaluation:
held-out bits per byte per language in domain (the training genres) and out of domain (aptitude's manual), the
English capitals quiz, English→Spanish verse translation chrF, and Q/A answer likelihood on held-out FAQ sections
in English and Russian; routing shares per language for the MoE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError
from deltamoe.recipes.demo import (smollm2_135m_demo_dense_cpt_cpu, smollm2_135m_demo_stage1_by_language_cpu,
                                   smollm2_135m_demo_stage1_cpu, smollm2_135m_demo_stage2_allocation_cpu,
                                   smollm2_135m_demo_stage2_cpu)
from deltamoe.recipes.demo_assets import MODEL_NAME, default_cache
from deltamoe.recipes.pipeline import MoEArm, PipelineRecipe, PreparedData

QUICK_ITERS = 2
"""--quick: training steps per stage, for CI's end-to-end check (a real run of every stage, not a useful model)."""
QUICK_EVAL_LIMIT = 4
SFT_STEPS = 6
"""Default-size SFT steps (batch 4, up to 256 tokens): enough to give I - B a measurable effect on FAQ answers."""
EVAL_LIMIT = 6
"""Examples per task at the default size (CPU: ~45 s per dense model, ~100 s for the MoE); --scale raises it."""

# Stage times on the reference 2-core CPU machine (README "Measured", default size), as (fixed seconds, seconds per
# unit) so that --scale and --quick get estimates too. Units: a training iteration of 4 x 256 tokens (scaled by the
# recipe's tokens per iteration), an SFT step, an evaluation example per task; the fixed part is start-up, loading
# and saving. Estimates, not promises: a busy machine is slower.
STAGE_TIMES = {
    "assets": (90.0, 0.0), "post-train": (5.0, 8.0), "prepare-data": (10.0, 0.0), "import": (10.0, 0.0),
    "upcycle": (17.0, 0.0), "stage1": (40.0, 18.0), "stage2": (30.0, 13.0), "dense-cpt": (30.0, 10.0),
    "export": (13.0, 0.0), "graft": (10.0, 0.0), "dense-cpt-export": (8.0, 0.0), "param-delta": (7.0, 0.0),
    "eval-dense": (16.0, 9.0), "eval-moe": (23.0, 21.0), "report": (3.0, 0.0),
}
REFERENCE_TOKENS_PER_ITERATION = 4 * 256


def _estimates(arms: list[MoEArm], dense_cpt, *, sft_steps: int, eval_limit: int) -> dict[str, float]:
    """Expected seconds per stage name (pipeline.PipelineRecipe.estimates) for this size of the demo."""
    def fixed(kind: str) -> float:
        return STAGE_TIMES[kind][0]

    def training(kind: str, recipe) -> float:
        t = recipe.train
        units = t.iterations * t.global_batch_size * t.seq_length / REFERENCE_TOKENS_PER_ITERATION
        return STAGE_TIMES[kind][0] + STAGE_TIMES[kind][1] * units

    def evaluation(kind: str) -> float:
        return STAGE_TIMES[kind][0] + STAGE_TIMES[kind][1] * eval_limit

    out = {kind: fixed(kind) for kind in ("assets", "prepare-data", "import", "upcycle", "dense-cpt-export",
                                          "param-delta", "report")}
    out["post-train"] = STAGE_TIMES["post-train"][0] + STAGE_TIMES["post-train"][1] * sft_steps
    for arm in arms:
        out[arm.stage("stage1")] = training("stage1", arm.stage1)
        out[arm.stage("stage2")] = training("stage2", arm.stage2)
        out[arm.stage("export")], out[arm.stage("graft")] = fixed("export"), fixed("graft")
        out[f"eval:{arm.label}"] = evaluation("eval-moe")
    out["dense-cpt"] = training("dense-cpt", dense_cpt)
    out["eval"] = evaluation("eval-dense")  # base, post, dense-cpt+paramdelta
    return out


def _quick(recipe, *, save_interval: int = QUICK_ITERS):
    return dataclasses.replace(recipe, train=dataclasses.replace(
        recipe.train, train_iters=QUICK_ITERS, lr_warmup_iters=0, save_interval=save_interval, eval_interval=QUICK_ITERS,
        eval_iters=1, seq_length=64, routing_log_interval=1))


def demo(*, scale: float = 1.0, quick: bool = False, cache: Path | None = None, workdir: Path = Path("runs/demo"),
         expert_allocation: str = "learned") -> PipelineRecipe:
    """`expert_allocation`: learned (MoE-LPR routing, the default), by-language (experts allocated per language in
    stage 1, allocation loss in review; docs/allocation.md) or both (two arms from one upcycled model, one report)."""
    cache = Path(cache) if cache else default_cache()
    data_root = cache / "demo-data"
    learned = MoEArm(label="deltamoe", stage1=smollm2_135m_demo_stage1_cpu(scale, cache, workdir),
                     stage2=smollm2_135m_demo_stage2_cpu(scale, cache, workdir))
    by_language = MoEArm(label="deltamoe-by-language", tag="by-language",
                         stage1=smollm2_135m_demo_stage1_by_language_cpu(scale, cache, workdir),
                         stage2=smollm2_135m_demo_stage2_allocation_cpu(scale, cache, workdir))
    choices = {"learned": [learned], "by-language": [by_language], "both": [learned, by_language]}
    if expert_allocation not in choices:
        raise DeltaMoEError(f"demo: expert_allocation must be one of {', '.join(choices)}, got {expert_allocation!r}")
    arms = choices[expert_allocation]
    dense_cpt = smollm2_135m_demo_dense_cpt_cpu(scale, cache, workdir)
    if quick:
        # Only the first arm's stage 1 saves every iteration (the resume test kills it after its first checkpoint): a
        # checkpoint with optimizer state is ~7 GB on disk for this MoE.
        arms = [dataclasses.replace(arm, stage1=_quick(arm.stage1, save_interval=1 if i == 0 else QUICK_ITERS),
                                    stage2=_quick(arm.stage2)) for i, arm in enumerate(arms)]
        dense_cpt = _quick(dense_cpt)
    prepare = [PreparedData(jsonl=f"{stem}.train.jsonl", lang=lang, prefix=f"indexed/{stem}.train")
               for stem, lang in (("es-rv1909", "es"), ("es-fortunes", "es"), ("ru-fortunes", "ru"), ("en-kjv", "en"))]
    sft_steps = 2 if quick else max(1, round(SFT_STEPS * scale))
    eval_limit = QUICK_EVAL_LIMIT if quick else max(1, round(EVAL_LIMIT * min(scale, 6)))
    return PipelineRecipe(
        name=("demo-quick" if quick else "demo") + ("" if expert_allocation == "learned" else f"-{expert_allocation}"),
        base_model=str(cache / "models" / MODEL_NAME),
        sft_data="faq-sft.en.train.jsonl",
        sft_steps=sft_steps,
        data_root=str(data_root),
        prepare=prepare,
        arms=arms,
        dense_baseline=dense_cpt,
        fetch_assets=True,
        # fetch-demo-assets copies recipes/demo_suite.yaml next to the data files it names.
        suite=str(data_root / "demo_suite.yaml"),
        eval_args=["--limit", str(eval_limit)],
        estimates=_estimates(arms, dense_cpt, sft_steps=sft_steps, eval_limit=eval_limit),
        report_note=_budget_note(arms[0].stage1, eval_limit),
    )


def _budget_note(stage1, eval_limit: int) -> str:
    """The report's one sentence on what this size of the demo can and cannot show."""
    t = stage1.train
    tokens = t.iterations * t.global_batch_size * t.seq_length
    return (f"Budget: {tokens:,} stage-1 tokens, {eval_limit} examples per task, one seed: enough to run every stage "
            "and to see the training genres fitted (in domain), not to show the languages learned beyond them or "
            "DeltaMoE ahead of dense CPT + ParamΔ unless the out-of-domain rows' paired intervals exclude 0.")


PIPELINES = {"demo": demo}
