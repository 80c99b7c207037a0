"""A tiny production-shaped pipeline built in-process (nothing downloaded), for the Slurm launcher's tests.

Base B: a random 2-layer Llama of tests/tiny_models.py with the evaluation tests' BPE tokenizer (384 tokens); post I:
B with every weight nudged (so Δ = I − B is not zero); data: English and Spanish sentences of tests/fixtures_eval.py
tokenized by `prepare_dataset` with language tags; stage 1 and stage 2 recipes of the production shape (copy
upcycling, 4 experts, top-2, γ = 0.1 with English replay) on one CPU process, 2 iterations each; a suite of
perplexity and routing tasks. `pipeline_from_recipes` turns it into the same pipeline a production recipe pair makes:
import -> upcycle -> stage1 -> stage2 -> export -> graft -> eval (base, post, deltamoe) -> report.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deltamoe.recipes.config import DataSource, ModelRecipe, ParallelRecipe, PrecisionRecipe, Recipe, TrainRecipe, UpcycleRecipe
from tests.fixtures_eval import TEXT, VOCAB_SIZE, make_tokenizer, write_jsonl
from tests.tiny_models import make_tiny_hf

NUM_LAYERS = 2
ITERATIONS = 2


def tiny_stage_recipes(base_model: Path) -> tuple[Recipe, Recipe]:
    model = ModelRecipe(hf_model=str(base_model), architecture="llama", num_layers=NUM_LAYERS, hidden_size=64,
                        ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB_SIZE,
                        max_position_embeddings=256, rope_theta=5000.0, norm_epsilon=1e-5)
    stage1 = Recipe(
        name="tiny_stage1_cpt_cpu", model=model, upcycle=UpcycleRecipe(num_experts=4, topk=2, variant="copy"),
        parallel=ParallelRecipe(num_nodes=1, gpus_per_node=1, sequence_parallel=False, use_distributed_optimizer=False),
        precision=PrecisionRecipe(preset="fp32"),
        train=TrainRecipe(stage=1, seq_length=32, micro_batch_size=2, global_batch_size=2, lr=1e-3, min_lr=1e-4,
                          train_iters=ITERATIONS, data_blend=[DataSource(prefix="es", weight=1.0, lang="es")],
                          original_languages=["en"], save_interval=ITERATIONS, eval_interval=ITERATIONS, eval_iters=1,
                          log_interval=1, routing_log_interval=1),
        init_checkpoint="tiny-upcycled", device="cpu")
    stage2 = Recipe(
        name="tiny_stage2_review_cpu", model=model, upcycle=stage1.upcycle, parallel=stage1.parallel,
        precision=stage1.precision,
        train=TrainRecipe(stage=2, seq_length=32, micro_batch_size=2, global_batch_size=2, lr=1e-3, min_lr=1e-4,
                          train_iters=ITERATIONS, lpr_loss_coeff=0.1, moe_aux_loss_coeff=0.0,
                          data_blend=[DataSource(prefix="es", weight=1.0, lang="es"),
                                      DataSource(prefix="en", weight=1.0, lang="en")],
                          original_languages=["en"], save_interval=ITERATIONS, eval_interval=ITERATIONS, eval_iters=1,
                          log_interval=1, routing_log_interval=1),
        init_checkpoint=stage1.name, device="cpu")
    return stage1, stage2


def make_tiny_inputs(root: Path) -> dict[str, Path]:
    """Base and post models, tagged datasets and a suite under `root`; returns their paths."""
    from transformers import AutoModelForCausalLM

    from deltamoe.megatron_ext.data.prepare import prepare_dataset

    base = make_tiny_hf("llama", root / "models" / "base", vocab_size=VOCAB_SIZE, num_hidden_layers=NUM_LAYERS)
    make_tokenizer(base)
    post_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in post_model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    post = root / "models" / "post"
    post_model.save_pretrained(post)
    make_tokenizer(post)

    data = root / "data"
    data.mkdir(parents=True)
    for lang in ("en", "es"):
        sentences = TEXT[lang]
        docs = [{"text": " ".join(sentences[(i + k) % len(sentences)] for k in range(3))} for i in range(60)]
        write_jsonl(data / f"{lang}.jsonl", docs)
        prepare_dataset(inputs=[data / f"{lang}.jsonl"], tokenizer_dir=base, language=lang, out_prefix=data / lang)

    suite_dir = root / "suite"
    suite_dir.mkdir()
    for lang in ("en", "es"):
        write_jsonl(suite_dir / f"{lang}.jsonl", [{"text": s} for s in TEXT[lang][:4]])
    suite = suite_dir / "suite.json"
    suite.write_text(json.dumps({
        "name": "tiny", "seed": 1234, "max_length": 128, "batch_size": 4,
        "languages": {"original": ["en"], "new": ["es"]},
        "tasks": [{"type": "perplexity", "language": "en", "data": "en.jsonl"},
                  {"type": "perplexity", "language": "es", "data": "es.jsonl"},
                  {"type": "routing", "language": "es", "data": "es.jsonl"}]}))
    return {"base": base, "post": post, "data": data, "suite": suite}


def tiny_pipeline(inputs: dict[str, Path], workdir: Path):
    from deltamoe.recipes.production_pipeline import pipeline_from_recipes

    stage1, stage2 = tiny_stage_recipes(inputs["base"])
    return pipeline_from_recipes("tiny_cpu", stage1, stage2, base_model=inputs["base"], post_model=inputs["post"],
                                 data_root=inputs["data"], suite=inputs["suite"], workdir=workdir,
                                 eval_args=["--limit", "4"])
