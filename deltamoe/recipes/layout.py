"""Checks that a recipe's parallel layout fits its model, and a per-GPU memory estimate.

The divisibility rules are megatron-core 0.19.2's own, gathered from where it checks them at start-up:
- world size % (tp × pp × cp) == 0; data parallel = world / (tp × pp × cp)                 (training/arguments.py)
- world size % (etp × ep × pp) == 0; expert data parallel = world / (etp × ep × pp)          (core/parallel_state.py)
- num_attention_heads % tp == 0; num_query_groups % tp == 0 or tp % num_query_groups == 0   (transformer_config.py)
- ffn_hidden_size % tp, moe_ffn_hidden_size % etp: column-parallel linears split their outputs evenly
- num_experts % ep == 0                                                                       (training/arguments.py)
- num_layers % pp == 0 (no uneven pipeline split in our recipes)                              (training/arguments.py)
- global_batch % (micro_batch × dp) == 0                                          (core/num_microbatches_calculator.py)
- seq_length % (2 × cp) == 0 when cp > 1                                                      (training/arguments.py)
- MoE training with tp > 1 needs sequence parallel                                      (core/transformer/moe/moe_layer.py)
- the vocabulary is padded to a multiple of make_vocab_size_divisible_by × tp (core/tokenizers/utils/build_tokenizer.py)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deltamoe.common.errors import DeltaMoEError

if TYPE_CHECKING:
    from deltamoe.recipes.config import Recipe

GB = 1024**3


def _require_divisible(numerator_name: str, numerator: int, divisor_name: str, divisor: int, recipe: str) -> None:
    if numerator % divisor:
        raise DeltaMoEError(f"recipe {recipe}: {numerator_name} ({numerator}) must be divisible by {divisor_name} ({divisor})")


def moe_ffn_hidden_size(recipe: Recipe) -> int:
    return recipe.model.ffn_hidden_size // recipe.upcycle.granularity


def padded_vocab_size(recipe: Recipe) -> int:
    multiple = recipe.make_vocab_size_divisible_by * recipe.parallel.tensor_model_parallel_size
    return math.ceil(recipe.model.vocab_size / multiple) * multiple


def check_layout(recipe: Recipe) -> None:
    """Raise DeltaMoEError naming the field and numbers for the first rule the layout breaks."""
    m, u, p, t, name = recipe.model, recipe.upcycle, recipe.parallel, recipe.train, recipe.name
    tp, etp = p.tensor_model_parallel_size, p.etp
    _require_divisible("model.num_attention_heads", m.num_attention_heads, "parallel.tensor_model_parallel_size", tp, name)
    if m.num_query_groups % tp and tp % m.num_query_groups:
        raise DeltaMoEError(f"recipe {name}: model.num_query_groups ({m.num_query_groups}) must be a multiple or a divisor of "
                            f"parallel.tensor_model_parallel_size ({tp})")
    _require_divisible("model.ffn_hidden_size", m.ffn_hidden_size, "upcycle.granularity", u.granularity, name)
    _require_divisible("model.ffn_hidden_size", m.ffn_hidden_size, "parallel.tensor_model_parallel_size", tp, name)
    _require_divisible("expert FFN size (model.ffn_hidden_size / upcycle.granularity)", moe_ffn_hidden_size(recipe),
                       "parallel.expert_tensor_parallel_size", etp, name)
    _require_divisible("upcycle.num_experts", u.num_experts, "parallel.expert_model_parallel_size",
                       p.expert_model_parallel_size, name)
    _require_divisible("model.num_layers", m.num_layers, "parallel.pipeline_model_parallel_size",
                       p.pipeline_model_parallel_size, name)
    _require_divisible("train.global_batch_size", t.global_batch_size,
                       f"train.micro_batch_size × data-parallel size ({t.micro_batch_size} × {p.data_parallel_size})",
                       t.micro_batch_size * p.data_parallel_size, name)
    if p.context_parallel_size > 1:
        _require_divisible("train.seq_length", t.seq_length, "2 × parallel.context_parallel_size",
                           2 * p.context_parallel_size, name)
    if tp > 1 and not p.sequence_parallel:
        raise DeltaMoEError(f"recipe {name}: parallel.sequence_parallel must be True for MoE training with "
                            f"parallel.tensor_model_parallel_size ({tp}) > 1 (megatron's MoE layer requires it)")
    if t.seq_length > m.max_position_embeddings:
        raise DeltaMoEError(f"recipe {name}: train.seq_length ({t.seq_length}) exceeds model.max_position_embeddings "
                            f"({m.max_position_embeddings})")
    if recipe.precision.preset == "fp8":
        # FP8 GEMMs (Transformer Engine) need every GEMM dimension divisible by 16.
        for field_name, value in (("model.hidden_size", m.hidden_size),
                                  ("expert FFN size per expert-tensor-parallel rank", moe_ffn_hidden_size(recipe) // etp),
                                  ("model.ffn_hidden_size per tensor-parallel rank", m.ffn_hidden_size // tp)):
            _require_divisible(field_name, value, "16 (FP8 GEMM tiles)", 16, name)
    if recipe.device == "cpu" and p.world_size > 8:
        raise DeltaMoEError(f"recipe {name}: device cpu with world size {p.world_size}: CPU recipes are for one machine")


@dataclass(kw_only=True)
class MemoryEstimate:
    """Bytes per GPU on the busiest rank. A planning number (±30 %), not a promise; megatron's own
    `--log-memory-to-tensorboard` and the first iterations tell the truth."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    overhead: float
    params_per_gpu: float
    trainable_per_gpu: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.overhead

    def format(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GB:.1f}" for k in ("weights", "grads", "optimizer", "activations", "overhead"))
        return (f"memory per GPU ≈ {self.total / GB:.1f} GiB ({parts}); {self.params_per_gpu / 1e6:,.0f} M params per GPU, "
                f"{self.trainable_per_gpu / 1e6:,.1f} M trainable")


def estimate_memory(recipe: Recipe) -> MemoryEstimate:
    """Per-GPU memory of one training stage, documented term by term.

    Parameters per GPU (the first pipeline stage, which also holds the embedding; the output layer is counted too
    when pp = 1 and the embeddings are untied):
        dense  = L/pp × (attention + shared expert) / tp + L/pp × (norms + router) + embeddings / tp + final norm
        expert = L/pp × E × 3·h·f_e / (ep × etp)
    Trainable: stage 1 = routers + the routed experts that are not frozen (all but expert 0 for the copy variant);
    stage 2 = routers only; stage 0 (dense continued pre-training, the baseline) = every parameter of the dense model. Frozen parameters get no gradient buffer and no optimizer state.
    Bytes: weights 2 (bf16, also for fp8 whose GEMMs cast on the fly) or 4 (fp32); gradients 4 (megatron accumulates
    bf16 gradients in fp32); Adam 12 (fp32 master copy + two moments; 8 in fp32 where no master copy is kept),
    divided by the data-parallel size (expert data-parallel size for expert parameters) with the distributed optimizer.
    Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    arXiv:2205.05198, 16-bit, no recomputation, flash attention so no s² term), per layer and micro-batch:
        s·b·(15·h + k·(4·h + 6·f_e) + shared·(4·h + 6·f)) bytes, / (tp × cp) with sequence parallel
    (attention + norms ≈ 15·h per token; each of the top-k routed SwiGLU experts keeps its input, gate, up, product and
    output), × L layers in flight on the first pipeline stage (1F1B keeps pp micro-batches of L/pp layers), plus fp32
    logits s·b·V·4/tp. Full recomputation keeps 2·s·b·h per layer plus one layer's activations. Overhead: 4 GiB for the
    CUDA context, NCCL buffers and allocator fragmentation (0 on CPU).
    """
    m, u, p, t, prec = recipe.model, recipe.upcycle, recipe.parallel, recipe.train, recipe.precision
    h, kv_ch, L = m.hidden_size, m.kv_channels, m.num_layers
    tp, pp, ep, etp, cp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size,
                           p.etp, p.context_parallel_size)
    f, f_e, E, k = m.ffn_hidden_size, moe_ffn_hidden_size(recipe), u.num_experts, u.topk
    if t.stage == 0:  # the dense model: its FFN counts like an always-on shared expert, no routed experts
        E, k = 0, 0
    V = padded_vocab_size(recipe)
    layers = L / pp

    attention = h * m.num_attention_heads * kv_ch * 2 + 2 * h * m.num_query_groups * kv_ch
    attention += (m.num_attention_heads + 2 * m.num_query_groups) * kv_ch if m.qkv_bias else 0
    shared = 3 * h * f if (u.variant == "shared" or t.stage == 0) else 0
    norms = 2 * h + (2 * kv_ch if m.qk_layernorm else 0)
    router = h * E
    embeddings = V * h * (2 if (pp == 1 and not m.tie_word_embeddings) else 1)
    final_norm = h
    dense = layers * (attention + shared) / tp + layers * (norms + router) + embeddings / tp + final_norm
    experts = layers * E * 3 * h * f_e / (ep * etp)

    routers = layers * router
    if t.stage == 0:
        routers = dense  # every dense parameter trains (counted with the non-expert optimizer terms below)
        trainable_experts = 0.0
    elif t.stage == 1:
        trainable_experts = experts * ((E - 1) / E if u.variant == "copy" else 1.0)
    else:
        trainable_experts = 0.0

    weight_bytes = 4 if prec.preset == "fp32" else 2
    adam_bytes = 8 if prec.preset == "fp32" else 12
    dp_dense = p.data_parallel_size if p.use_distributed_optimizer else 1
    dp_expert = p.expert_data_parallel_size if p.use_distributed_optimizer else 1

    s, b = t.seq_length, t.micro_batch_size
    act_bytes = 2 if weight_bytes == 2 else 4
    per_layer = s * b * (15 * h + k * (4 * h + 6 * f_e) + (4 * h + 6 * f if shared else 0)) * act_bytes / 2 / (tp * cp)
    if t.recompute == "full":
        activations = L * 2 * s * b * h * act_bytes / 2 / (tp * cp) + per_layer
    else:
        activations = L * per_layer
    activations += s * b * V * 4 / (tp * cp)

    return MemoryEstimate(
        weights=(dense + experts) * weight_bytes,
        grads=(routers + trainable_experts) * 4,
        optimizer=routers * adam_bytes / dp_dense + trainable_experts * adam_bytes / dp_expert,
        activations=activations,
        overhead=4 * GB if recipe.device == "cuda" else 0,
        params_per_gpu=dense + experts,
        trainable_per_gpu=routers + trainable_experts,
    )
