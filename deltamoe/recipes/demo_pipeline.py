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


def demo_suite(data_root: Path, *, limit: int) -> Path:
    """Write the demo's eval suite next to the demo data (paths in a suite are relative to the suite file)."""
    suite = {
        "name": "deltamoe-demo",
        "seed": 1234,
        "max_length": 256,
        "batch_size": 4,
        "languages": {"original": ["en"], "new": ["es", "ru"]},
        "language_names": {"en": "English", "es": "Spanish", "ru": "Russian"},
        "defaults": {"limit": limit},
        "tasks": [
            {"type": "perplexity", "language": "en", "data": "en-kjv.heldout.jsonl"},
            {"type": "perplexity", "language": "es", "data": "es-rv1909.heldout.jsonl"},
            {"type": "perplexity", "language": "ru", "data": "ru-fortunes.heldout.jsonl"},
            {"name": "capitals", "type": "multiple_choice", "format": "arc", "language": "en", "data": "capitals-mc.en.jsonl"},
            {"name": "verse-translation", "type": "translation", "source_language": "en", "language": "es",
             "data": "translation.en-es.heldout.jsonl", "num_fewshot": 1, "max_new_tokens": 48},
            {"name": "faq-qa", "type": "qa_loglik", "language": "en", "data": "faq-qa.en.heldout.jsonl", "chat_template": True},
            {"name": "faq-qa", "type": "qa_loglik", "language": "ru", "data": "faq-qa.ru.heldout.jsonl", "chat_template": True},
            {"type": "routing", "language": "en", "data": "en-kjv.heldout.jsonl"},
            {"type": "routing", "language": "es", "data": "es-rv1909.heldout.jsonl"},
            {"type": "routing", "language": "ru", "data": "ru-fortunes.heldout.jsonl"},
        ],
    }
    path = data_root / ("demo_suite.quick.yaml" if limit < 20 else "demo_suite.yaml")
    path.write_text(yaml.safe_dump(suite, sort_keys=False, allow_unicode=True))
    return path


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
        suite=str(demo_suite(data_root, limit=4 if quick else 60)) if data_root.exists() else str(data_root / "demo_suite.yaml"),
    )


PIPELINES = {"demo": demo}
