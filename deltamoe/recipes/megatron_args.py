"""Expand a recipe into trainer flags: Megatron-LM's own plus DeltaMoE's.

The Megatron flags are exactly what megatron-core 0.19.2's `megatron.training.arguments` parses (a test parses them
with its parser). DeltaMoE's flags, added by the trainer entry (`deltamoe train`, module `deltamoe.megatron_ext.training.train`):
    --deltamoe-stage {1,2}             which parameters train (1: new experts + routers, 2: routers only)
    --lpr-loss-coeff G                 γ of the language-prior routing loss (stage 2), mean over MoE layers
    --router-loss-layer-reduction R    mean (the paper's γ) or sum over MoE layers
    --original-languages en,zh         language tags whose tokens the LPR loss routes to expert 0
    --expert-allocation learned|by-language
    --allocation-loss-coeff C
    --expert-allocation-map JSON       language -> experts, e.g. {"experts":{"es":[1,2]},"shared_experts":[0]}
    --routing-log-interval N           log per-language routing statistics every N iterations
    --routing-log-file PATH            ... as JSON lines into PATH
Language tags travel with the datasets (`deltamoe prepare-data --lang`), so `--data-path` stays Megatron's.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from deltamoe.recipes.layout import moe_ffn_hidden_size

if TYPE_CHECKING:
    from deltamoe.recipes.config import Recipe

# Megatron's fused kernels are CUDA (or Transformer Engine) code: the CPU path turns them off.
CPU_FLAGS = ["--distributed-backend", "gloo", "--use-cpu-initialization", "--transformer-impl", "local",
             "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
             "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm"]


def _path(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def checkpoint_dir(recipe: Recipe) -> str:
    return os.path.join(recipe.workdir, recipe.name)


def routing_log_file(recipe: Recipe) -> str:
    return os.path.join(checkpoint_dir(recipe), "deltamoe_routing.jsonl")


def model_args(recipe: Recipe) -> list[str]:
    m = recipe.model
    args = ["--num-layers", m.num_layers, "--hidden-size", m.hidden_size, "--ffn-hidden-size", m.ffn_hidden_size,
            "--num-attention-heads", m.num_attention_heads, "--kv-channels", m.kv_channels,
            "--max-position-embeddings", m.max_position_embeddings,
            "--position-embedding-type", "rope", "--rotary-base", int(m.rope_theta),
            "--normalization", "RMSNorm", "--norm-epsilon", m.norm_epsilon, "--swiglu", "--disable-bias-linear",
            "--attention-dropout", 0.0, "--hidden-dropout", 0.0,
            "--make-vocab-size-divisible-by", recipe.make_vocab_size_divisible_by]
    if m.num_query_groups != m.num_attention_heads:
        args += ["--group-query-attention", "--num-query-groups", m.num_query_groups]
    if m.llama3_rope_scaling_factor:
        args += ["--use-rope-scaling", "--rope-scaling-factor", m.llama3_rope_scaling_factor]
    if m.qkv_bias:
        args += ["--add-qkv-bias"]
    if m.qk_layernorm:
        args += ["--qk-layernorm"]
    if not m.tie_word_embeddings:
        args += ["--untie-embeddings-and-output-weights"]
    return args


def moe_args(recipe: Recipe) -> list[str]:
    if recipe.train.stage == 0:  # dense continued pre-training: no experts
        return []
    u = recipe.upcycle
    args = ["--num-experts", u.num_experts, "--moe-router-topk", u.topk, "--moe-ffn-hidden-size", moe_ffn_hidden_size(recipe),
            "--moe-router-load-balancing-type", "aux_loss" if recipe.train.moe_aux_loss_coeff > 0 else "none",
            "--moe-aux-loss-coeff", recipe.train.moe_aux_loss_coeff,
            "--moe-token-dispatcher-type", "alltoall", "--moe-grouped-gemm", "--moe-router-dtype", "fp32"]
    if u.variant == "shared":
        args += ["--moe-shared-expert-intermediate-size", recipe.model.ffn_hidden_size]
    return args


def parallel_args(recipe: Recipe) -> list[str]:
    p = recipe.parallel
    args = ["--tensor-model-parallel-size", p.tensor_model_parallel_size,
            "--pipeline-model-parallel-size", p.pipeline_model_parallel_size,
            "--expert-model-parallel-size", p.expert_model_parallel_size,
            "--expert-tensor-parallel-size", p.etp,
            "--context-parallel-size", p.context_parallel_size]
    if p.sequence_parallel and p.tensor_model_parallel_size > 1:
        args += ["--sequence-parallel"]
    if p.use_distributed_optimizer:
        args += ["--use-distributed-optimizer"]
        if recipe.device == "cuda":
            args += ["--overlap-grad-reduce", "--overlap-param-gather"]
    return args


def precision_args(recipe: Recipe) -> list[str]:
    prec = recipe.precision
    if prec.preset == "fp32":
        return []
    args = ["--bf16"]
    if prec.preset == "fp8":
        args += ["--fp8-format", prec.fp8_format, "--fp8-recipe", prec.fp8_recipe, "--transformer-impl", "transformer_engine"]
    return args


def train_args(recipe: Recipe) -> list[str]:
    t = recipe.train
    args = ["--seq-length", t.seq_length, "--micro-batch-size", t.micro_batch_size, "--global-batch-size", t.global_batch_size,
            "--train-iters", t.iterations, "--lr", t.lr, "--min-lr", t.min_lr, "--lr-decay-style", t.lr_decay_style,
            "--lr-warmup-iters", t.lr_warmup_iters, "--weight-decay", t.weight_decay, "--clip-grad", t.clip_grad,
            "--adam-beta1", 0.9, "--adam-beta2", 0.95, "--seed", t.seed,
            "--log-interval", t.log_interval, "--save-interval", t.save_interval,
            "--eval-interval", t.eval_interval, "--eval-iters", t.eval_iters]
    if t.recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 1]
    elif t.recompute == "selective":
        args += ["--recompute-granularity", "selective"]
    return args


def data_and_checkpoint_args(recipe: Recipe) -> list[str]:
    t = recipe.train
    data_path = [x for d in t.data_blend for x in (d.weight, _path(recipe.data_root, d.prefix))]
    return ["--data-path", *data_path, "--split", "98,2,0",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", recipe.model.hf_model,
            "--pretrained-checkpoint", _path(recipe.workdir, recipe.init_checkpoint),
            "--load", checkpoint_dir(recipe), "--save", checkpoint_dir(recipe), "--ckpt-format", "torch_dist"]


def deltamoe_args(recipe: Recipe) -> list[str]:
    t = recipe.train
    args = ["--deltamoe-stage", t.stage, "--router-loss-layer-reduction", t.router_loss_layer_reduction,
            "--original-languages", ",".join(t.original_languages),
            "--languages", ",".join(t.declared_languages),
            "--expert-allocation", t.expert_allocation, "--allocation-loss-coeff", t.allocation_loss_coeff,
            "--routing-log-interval", t.routing_log_interval, "--routing-log-file", routing_log_file(recipe)]
    if t.lpr_loss_coeff is not None:
        args += ["--lpr-loss-coeff", t.lpr_loss_coeff]
    if t.expert_allocation_map is not None:
        # One argv element (no shell quoting needed in a list); the trainer reads inline JSON or a file path.
        args += ["--expert-allocation-map", json.dumps(t.expert_allocation_map, sort_keys=True, separators=(",", ":"))]
    return args


def to_megatron_args(recipe: Recipe) -> list[str]:
    """All trainer flags for one stage, Megatron's first, DeltaMoE's last (see the module docstring)."""
    args = (model_args(recipe) + moe_args(recipe) + parallel_args(recipe) + precision_args(recipe) + train_args(recipe)
            + data_and_checkpoint_args(recipe) + (CPU_FLAGS if recipe.device == "cpu" else []) + deltamoe_args(recipe))
    return [str(a) for a in args]


DELTAMOE_FLAGS = ("--deltamoe-stage", "--lpr-loss-coeff", "--router-loss-layer-reduction", "--original-languages", "--languages", "--expert-allocation",
                  "--expert-allocation-map", "--allocation-loss-coeff", "--routing-log-interval", "--routing-log-file")
