"""Production recipes: Llama-3.1-8B, Qwen2.5-7B and Qwen3-8B × stage 1 / stage 2 × 8 / 16 H100 × bf16 / fp8.

Each recipe is a typed function named for what it is, built from a model base and a stage base and changed field by
field. Settings from MoE-LPR (Zhou et al. 2024, arXiv:2408.11396): 6 experts, top-2, copy upcycling with the original
FFN as the frozen expert 0, stage 2 (review) trains only the routers with γ = 0.1 on a replay of the original
languages (the paper's γ: the LPR loss is a mean over MoE layers and original-language tokens, as in MoE-LPR's code); its language setting is kept too (new: Greek, Hungarian, Turkish; original: English, Chinese, Spanish).
Token budgets, learning rates and batch sizes are our defaults, not the paper's.

Layouts: 6 experts only split over 1, 2, 3 or 6 ranks, and on 8 or 16 GPUs only 1 or 2 of those divide the expert
grid, so expert parallelism is 2 and the experts are further split by expert tensor parallelism 2. A 36 B-parameter
MoE (8 B dense upcycled ×6 FFNs) training 5/6 of its experts needs pipeline parallelism 2 on one 8-GPU node
(`python -m deltamoe.recipes.launch.local NAME --dry-run` prints the memory estimate). Stage 2 trains routers only
and fits without pipeline parallelism.

Data prefixes are relative to the recipe's data_root (`deltamoe prepare-data` outputs, one per language).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from deltamoe.common.errors import DeltaMoEError
from deltamoe.recipes.config import DataSource, ModelRecipe, ParallelRecipe, PrecisionRecipe, Recipe, TrainRecipe, UpcycleRecipe

ORIGINAL_LANGUAGES = ["en", "zh", "es"]
NEW_LANGUAGES = ["el", "hu", "tr"]

# Published architectures (config.json of each model on the Hugging Face hub).
LLAMA3_1_8B = ModelRecipe(hf_model="meta-llama/Llama-3.1-8B", architecture="llama", num_layers=32, hidden_size=4096,
                          ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8, vocab_size=128256,
                          max_position_embeddings=131072, rope_theta=500000.0, norm_epsilon=1e-5,
                          llama3_rope_scaling_factor=8.0)
QWEN2_5_7B = ModelRecipe(hf_model="Qwen/Qwen2.5-7B", architecture="qwen2", num_layers=28, hidden_size=3584,
                         ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4, vocab_size=152064,
                         max_position_embeddings=131072, rope_theta=1000000.0, norm_epsilon=1e-6, qkv_bias=True)
QWEN3_8B = ModelRecipe(hf_model="Qwen/Qwen3-8B-Base", architecture="qwen3", num_layers=36, hidden_size=4096,
                       ffn_hidden_size=12288, num_attention_heads=32, num_query_groups=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=32768, rope_theta=1000000.0, norm_epsilon=1e-6, qk_layernorm=True)

PAPER_UPCYCLE = UpcycleRecipe(num_experts=6, topk=2, variant="copy", granularity=1)

H100_8 = ParallelRecipe(num_nodes=1, gpus_per_node=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                        expert_model_parallel_size=2, expert_tensor_parallel_size=2, sequence_parallel=True,
                        use_distributed_optimizer=True, gpu_memory_gib=80)
BF16 = PrecisionRecipe(preset="bf16")
FP8 = PrecisionRecipe(preset="fp8", fp8_format="hybrid", fp8_recipe="tensorwise")


def _stage1_blend() -> list[DataSource]:
    return [DataSource(prefix=f"{lang}/cpt_text_document", weight=1.0, lang=lang) for lang in NEW_LANGUAGES]


def _stage2_blend() -> list[DataSource]:
    # Review: mostly new-language text, plus a replay of the original languages for the LPR loss.
    return ([DataSource(prefix=f"{lang}/review_text_document", weight=1.0, lang=lang) for lang in NEW_LANGUAGES]
            + [DataSource(prefix=f"{lang}/replay_text_document", weight=0.5, lang=lang) for lang in ORIGINAL_LANGUAGES])


def _stage1(name: str, model: ModelRecipe, model_key: str) -> Recipe:
    """Stage 1 base: new-language CPT of the new experts and routers, one 8×H100 node, bf16."""
    return Recipe(
        name=name, model=model, upcycle=PAPER_UPCYCLE, parallel=H100_8, precision=BF16,
        train=TrainRecipe(stage=1, seq_length=4096, micro_batch_size=1, global_batch_size=256, lr=2e-4, min_lr=2e-5,
                          lr_warmup_iters=100, lr_decay_style="cosine", train_tokens=4_000_000_000,
                          moe_aux_loss_coeff=0.01, data_blend=_stage1_blend(), original_languages=ORIGINAL_LANGUAGES,
                          save_interval=500, eval_interval=500,
                          # One node keeps a whole copy of the Adam states of 30 B trainable expert parameters
                          # (expert data parallel 1): full recomputation frees ~16 GiB of activations to fit 80 GiB.
                          recompute="full"),
        init_checkpoint=f"{model_key}-upcycled")


def _stage2(name: str, stage1: Recipe) -> Recipe:
    """Stage 2 base: routers only with the LPR loss and no load-balancing loss (the language prior decides routing);
    starts from stage 1's checkpoint (resharded on load)."""
    return dataclasses.replace(
        stage1, name=name,
        parallel=dataclasses.replace(stage1.parallel, pipeline_model_parallel_size=1),
        train=dataclasses.replace(stage1.train, stage=2, lr=1e-4, min_lr=1e-5, lr_warmup_iters=10, train_tokens=200_000_000,
                                  lpr_loss_coeff=0.1, moe_aux_loss_coeff=0.0, data_blend=_stage2_blend(), save_interval=100, eval_interval=100,
                                  recompute="none"),
        init_checkpoint=stage1.name)


def _on_two_nodes(recipe: Recipe, name: str) -> Recipe:
    """The same model layout on 2×8 H100: twice the data parallelism (Adam states halve), same global batch, and
    no recomputation."""
    return dataclasses.replace(recipe, name=name, parallel=dataclasses.replace(recipe.parallel, num_nodes=2),
                               train=dataclasses.replace(recipe.train, recompute="none"))


def _fp8(recipe: Recipe, name: str) -> Recipe:
    return dataclasses.replace(recipe, name=name, precision=FP8)


def _stage2_from(stage1: Recipe, name: str) -> Recipe:
    return _stage2(name, stage1)


# ---- Llama-3.1-8B ------------------------------------------------------------------------------------------------
def llama3_1_8b_stage1_cpt_8gpu_h100_bf16() -> Recipe:
    return _stage1("llama3_1_8b_stage1_cpt_8gpu_h100_bf16", LLAMA3_1_8B, "llama3_1_8b")


def llama3_1_8b_stage1_cpt_8gpu_h100_fp8() -> Recipe:
    return _fp8(llama3_1_8b_stage1_cpt_8gpu_h100_bf16(), "llama3_1_8b_stage1_cpt_8gpu_h100_fp8")


def llama3_1_8b_stage1_cpt_16gpu_h100_bf16() -> Recipe:
    return _on_two_nodes(llama3_1_8b_stage1_cpt_8gpu_h100_bf16(), "llama3_1_8b_stage1_cpt_16gpu_h100_bf16")


def llama3_1_8b_stage1_cpt_16gpu_h100_fp8() -> Recipe:
    return _fp8(llama3_1_8b_stage1_cpt_16gpu_h100_bf16(), "llama3_1_8b_stage1_cpt_16gpu_h100_fp8")


def llama3_1_8b_stage2_review_8gpu_h100_bf16() -> Recipe:
    return _stage2_from(llama3_1_8b_stage1_cpt_8gpu_h100_bf16(), "llama3_1_8b_stage2_review_8gpu_h100_bf16")


def llama3_1_8b_stage2_review_8gpu_h100_fp8() -> Recipe:
    return _stage2_from(llama3_1_8b_stage1_cpt_8gpu_h100_fp8(), "llama3_1_8b_stage2_review_8gpu_h100_fp8")


def llama3_1_8b_stage2_review_16gpu_h100_bf16() -> Recipe:
    return _stage2_from(llama3_1_8b_stage1_cpt_16gpu_h100_bf16(), "llama3_1_8b_stage2_review_16gpu_h100_bf16")


def llama3_1_8b_stage2_review_16gpu_h100_fp8() -> Recipe:
    return _stage2_from(llama3_1_8b_stage1_cpt_16gpu_h100_fp8(), "llama3_1_8b_stage2_review_16gpu_h100_fp8")


# ---- Qwen2.5-7B --------------------------------------------------------------------------------------------------
# 28 attention heads and 4 KV heads: tensor parallelism 1, 2 or 4 (never 8).
def qwen2_5_7b_stage1_cpt_8gpu_h100_bf16() -> Recipe:
    return _stage1("qwen2_5_7b_stage1_cpt_8gpu_h100_bf16", QWEN2_5_7B, "qwen2_5_7b")


def qwen2_5_7b_stage1_cpt_8gpu_h100_fp8() -> Recipe:
    return _fp8(qwen2_5_7b_stage1_cpt_8gpu_h100_bf16(), "qwen2_5_7b_stage1_cpt_8gpu_h100_fp8")


def qwen2_5_7b_stage1_cpt_16gpu_h100_bf16() -> Recipe:
    return _on_two_nodes(qwen2_5_7b_stage1_cpt_8gpu_h100_bf16(), "qwen2_5_7b_stage1_cpt_16gpu_h100_bf16")


def qwen2_5_7b_stage1_cpt_16gpu_h100_fp8() -> Recipe:
    return _fp8(qwen2_5_7b_stage1_cpt_16gpu_h100_bf16(), "qwen2_5_7b_stage1_cpt_16gpu_h100_fp8")


def qwen2_5_7b_stage2_review_8gpu_h100_bf16() -> Recipe:
    return _stage2_from(qwen2_5_7b_stage1_cpt_8gpu_h100_bf16(), "qwen2_5_7b_stage2_review_8gpu_h100_bf16")


def qwen2_5_7b_stage2_review_8gpu_h100_fp8() -> Recipe:
    return _stage2_from(qwen2_5_7b_stage1_cpt_8gpu_h100_fp8(), "qwen2_5_7b_stage2_review_8gpu_h100_fp8")


def qwen2_5_7b_stage2_review_16gpu_h100_bf16() -> Recipe:
    return _stage2_from(qwen2_5_7b_stage1_cpt_16gpu_h100_bf16(), "qwen2_5_7b_stage2_review_16gpu_h100_bf16")


def qwen2_5_7b_stage2_review_16gpu_h100_fp8() -> Recipe:
    return _stage2_from(qwen2_5_7b_stage1_cpt_16gpu_h100_fp8(), "qwen2_5_7b_stage2_review_16gpu_h100_fp8")


# ---- Qwen3-8B ----------------------------------------------------------------------------------------------------
def qwen3_8b_stage1_cpt_8gpu_h100_bf16() -> Recipe:
    return _stage1("qwen3_8b_stage1_cpt_8gpu_h100_bf16", QWEN3_8B, "qwen3_8b")


def qwen3_8b_stage1_cpt_8gpu_h100_fp8() -> Recipe:
    return _fp8(qwen3_8b_stage1_cpt_8gpu_h100_bf16(), "qwen3_8b_stage1_cpt_8gpu_h100_fp8")


def qwen3_8b_stage1_cpt_16gpu_h100_bf16() -> Recipe:
    return _on_two_nodes(qwen3_8b_stage1_cpt_8gpu_h100_bf16(), "qwen3_8b_stage1_cpt_16gpu_h100_bf16")


def qwen3_8b_stage1_cpt_16gpu_h100_fp8() -> Recipe:
    return _fp8(qwen3_8b_stage1_cpt_16gpu_h100_bf16(), "qwen3_8b_stage1_cpt_16gpu_h100_fp8")


def qwen3_8b_stage2_review_8gpu_h100_bf16() -> Recipe:
    return _stage2_from(qwen3_8b_stage1_cpt_8gpu_h100_bf16(), "qwen3_8b_stage2_review_8gpu_h100_bf16")


def qwen3_8b_stage2_review_8gpu_h100_fp8() -> Recipe:
    return _stage2_from(qwen3_8b_stage1_cpt_8gpu_h100_fp8(), "qwen3_8b_stage2_review_8gpu_h100_fp8")


def qwen3_8b_stage2_review_16gpu_h100_bf16() -> Recipe:
    return _stage2_from(qwen3_8b_stage1_cpt_16gpu_h100_bf16(), "qwen3_8b_stage2_review_16gpu_h100_bf16")


def qwen3_8b_stage2_review_16gpu_h100_fp8() -> Recipe:
    return _stage2_from(qwen3_8b_stage1_cpt_16gpu_h100_fp8(), "qwen3_8b_stage2_review_16gpu_h100_fp8")


def _registry() -> dict[str, Callable[..., Recipe]]:
    from deltamoe.recipes import demo

    functions = [f for f in globals().values() if callable(f) and getattr(f, "__module__", None) == __name__
                 and not f.__name__.startswith("_") and f.__name__ not in ("get_recipe",)]
    registry = {f.__name__: f for f in functions}
    registry.update(demo.RECIPES)
    return registry


RECIPES: dict[str, Callable[..., Recipe]] = _registry()


def get_recipe(name: str, **kwargs) -> Recipe:
    """Build a registered recipe by name (keyword arguments go to the recipe function, e.g. the demo's `scale`)."""
    if name not in RECIPES:
        close = [n for n in RECIPES if name.split("_")[0] in n][:5]
        raise DeltaMoEError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES)) if not close else ', '.join(close) + ', ...'}")
    recipe = RECIPES[name](**kwargs)
    if recipe.name != name:
        raise DeltaMoEError(f"recipe function {name} returned a recipe named {recipe.name!r}")
    return recipe
