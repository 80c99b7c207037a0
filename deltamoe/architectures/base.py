"""What an architecture mapping is: a config-field table (fields.py), parameter-name rules with typed transforms,
dropped names.

One table per Hugging Face architecture (llama.py, qwen2.py, qwen3.py), in the shape of Megatron-Bridge's bridges and
torchtitan's state-dict adapters. Megatron names are those of a megatron-core `GPTModel` built with the local spec at
tensor-parallel size 1 (whole tensors); `torch_dist` checkpoints map them to spec-independent keys on save.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from deltamoe.architectures.fields import Field
from deltamoe.architectures.rope import YarnRope


class Transform(Enum):
    DIRECT = "direct"          # same tensor
    VOCAB = "vocab"            # same rows, padded with zeros to megatron's padded vocabulary
    QKV = "qkv"                # q, k, v stacked per query group: [g0: q heads, k, v][g1: ...]
    GATED_FC1 = "gated_fc1"    # gate and up stacked: [gate; up]


@dataclass(frozen=True)
class Rule:
    megatron: str
    """Megatron parameter name; `{i}` is the layer index, `{e}` the expert index."""
    hf: tuple[str, ...]
    transform: Transform = Transform.DIRECT
    when: str | None = None
    """Name of an `ArchitectureConfig` flag that must be true for the rule to apply (e.g. "qkv_bias")."""


@dataclass(kw_only=True)
class ArchitectureConfig:
    """The model facts every converter needs, read from a HF config.json through an architecture's field table.

    Everything here reaches megatron-core twice, the same way: `model_builder.transformer_config` /
    `build_gpt_model` (import, export, upcycle) and the trainer's flags (`training/flags.checkpoint_model_flags`).
    """

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rope_theta: float
    position_embedding_type: str = "rope"
    """GPTModel's: "rope", or "yarn" (with `yarn`)."""
    rope_scaling_factor: float | None = None
    """llama3 RoPE scaling factor (GPTModel rope_scaling); None: no llama3 scaling."""
    rope_linear_factor: float | None = None
    """Linear RoPE scaling (GPTModel seq_len_interpolation_factor); None: none."""
    yarn: YarnRope | None = None
    attention_dropout: float = 0.0
    sliding_window: int | None = None
    """Tokens a sliding-window layer attends to, itself included (HF's sliding_window); None: full attention."""
    sliding_window_layers: tuple[int, ...] | None = None
    """Per layer: 1 = sliding window, 0 = full attention (megatron's window_attn_skip_freq list)."""
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False

    @property
    def window_size(self) -> tuple[int, int] | None:
        """megatron-core's (left, right) window: HF's window of W tokens is the W - 1 before the query and itself."""
        return None if self.sliding_window is None else (self.sliding_window - 1, 0)


@dataclass(frozen=True)
class Architecture:
    name: str
    hf_architectures: tuple[str, ...]
    """HF `architectures` / `model_type` values this mapping reads."""
    model_types: tuple[str, ...]
    config_table: tuple[Field, ...] = field(repr=False)
    """Every config.json field, accounted for (fields.py): mapped, neutral or refused."""
    rules: tuple[Rule, ...] = field(repr=False)
    dropped_hf: tuple[str, ...] = ()
    """HF tensors that carry no weights megatron needs (regex patterns), dropped explicitly."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """ArchitectureConfig fields fixed by the architecture (e.g. Qwen2 always has qkv bias)."""
    moe_format: str = ""
    """The HF MoE format this dense architecture exports to (mixtral, qwen2_moe, qwen3_moe)."""
    sliding_window: bool = False
    """Whether the HF model reads use_sliding_window / sliding_window / max_window_layers / layer_types."""


ATTENTION_RULES = (
    Rule("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    Rule(
        "decoder.layers.{i}.self_attention.linear_qkv.weight",
        ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
         "model.layers.{i}.self_attn.v_proj.weight"),
        Transform.QKV,
    ),
    Rule(
        "decoder.layers.{i}.self_attention.linear_qkv.bias",
        ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
         "model.layers.{i}.self_attn.v_proj.bias"),
        Transform.QKV,
        when="qkv_bias",
    ),
    Rule("decoder.layers.{i}.self_attention.q_layernorm.weight", ("model.layers.{i}.self_attn.q_norm.weight",), when="qk_layernorm"),
    Rule("decoder.layers.{i}.self_attention.k_layernorm.weight", ("model.layers.{i}.self_attn.k_norm.weight",), when="qk_layernorm"),
    Rule("decoder.layers.{i}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",)),
    Rule("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
)

DENSE_MLP_RULES = (
    Rule(
        "decoder.layers.{i}.mlp.linear_fc1.weight",
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
        Transform.GATED_FC1,
    ),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
)

EMBEDDING_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Transform.VOCAB),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), Transform.VOCAB, when="untied"),
)

DENSE_RULES = EMBEDDING_RULES + ATTENTION_RULES + DENSE_MLP_RULES

DROPPED_HF = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def rule_applies(rule: Rule, config: ArchitectureConfig) -> bool:
    if rule.when is None:
        return True
    if rule.when == "untied":
        return not config.tie_word_embeddings
    return bool(getattr(config, rule.when))


def expand(pattern: str, **indices: int) -> str:
    return pattern.format(**indices)


def is_dropped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)
