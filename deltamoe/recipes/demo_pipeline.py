"""The embedded default as a pipeline recipe: SmolLM2-135M-Instruct learns Spanish and Russian experts, offline.

Original language English (KJV replay in review), new languages Spanish (Reina-Valera 1909) and Russian
(fortunes-ru). The post-training delta is made by a short SFT on English Debian-FAQ Q/A (I − B). Evaluation:
held-out bits per byte per language, the English capitals quiz, English→Spanish verse translation chrF, and Q/A
answer likelihood on held-out FAQ sections in English and Russian; routing shares per language for the MoE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from deltamoe.recipes.demo import smollm2_135m_demo_stage1_cpu, smollm2_135m_demo_stage2_cpu
from deltamoe.recipes.demo_assets import MODEL_NAME, default_cache
from deltamoe.recipes.pipeline import PipelineRecipe, PreparedData

QUICK_ITERS = 2
"""--quick: training steps per stage, for CI's end-to-end check (a real run of every stage, not a useful model)."""
QUICK_EVAL_LIMIT = 4


def demo_suite(data_root: Path, *, quick: bool) -> Path:
    """The demo suite (recipes/demo_suite.yaml, copied next to the demo data by fetch-demo-assets); --quick writes a
    copy that scores a handful of examples per task."""
    suite_path = data_root / "demo_suite.yaml"
    if not quick:
        return suite_path
    suite = yaml.safe_load((Path(__file__).parent / "demo_suite.yaml").read_text())
    suite["defaults"] = {**suite.get("defaults", {}), "limit": QUICK_EVAL_LIMIT}
    for task in suite["tasks"]:
        task["limit"] = min(task.get("limit", QUICK_EVAL_LIMIT), QUICK_EVAL_LIMIT)
        if "max_new_tokens" in task:
            task["max_new_tokens"] = min(task["max_new_tokens"], 16)
    quick_path = data_root / "demo_suite.quick.yaml"
    quick_path.write_text(yaml.safe_dump(suite, sort_keys=False, allow_unicode=True))
    return quick_path


def demo(*, scale: float = 1.0, quick: bool = False, cache: Path | None = None, workdir: Path = Path("runs/demo")) -> PipelineRecipe:
    cache = Path(cache) if cache else default_cache()
    data_root = cache / "demo-data"
    stage1 = smollm2_135m_demo_stage1_cpu(scale, cache, workdir)
    stage2 = smollm2_135m_demo_stage2_cpu(scale, cache, workdir)
    if quick:
        stage1 = dataclasses.replace(stage1, train=dataclasses.replace(
            stage1.train, train_iters=QUICK_ITERS, save_interval=1, eval_interval=QUICK_ITERS, eval_iters=1, seq_length=64))
        stage2 = dataclasses.replace(stage2, train=dataclasses.replace(
            stage2.train, train_iters=QUICK_ITERS, save_interval=1, eval_interval=QUICK_ITERS, eval_iters=1, seq_length=64))
    prepare = [PreparedData(jsonl=f"{stem}.train.jsonl", lang=lang, prefix=f"indexed/{stem}.train")
               for stem, lang in (("es-rv1909", "es"), ("ru-fortunes", "ru"), ("en-kjv", "en"))]
    return PipelineRecipe(
        name="demo-quick" if quick else "demo",
        base_model=str(cache / "models" / MODEL_NAME),
        sft_data="faq-sft.en.train.jsonl",
        sft_steps=2 if quick else max(1, round(40 * scale)),
        data_root=str(data_root),
        prepare=prepare,
        stage1=stage1,
        stage2=stage2,
        fetch_assets=True,
        suite=str(demo_suite(data_root, quick=quick)) if data_root.exists() else str(data_root / "demo_suite.yaml"),
    )


PIPELINES = {"demo": demo}
