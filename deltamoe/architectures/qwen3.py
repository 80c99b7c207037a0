"""Qwen3: RMSNorm on each query and key head (q_norm / k_norm), explicit head_dim, optional attention bias."""

from deltamoe.architectures.base import COMMON_CONFIG_FIELDS, DENSE_RULES, DROPPED_HF, Architecture

QWEN3 = Architecture(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    config_fields={**COMMON_CONFIG_FIELDS, "attention_bias": "qkv_bias", "head_dim": "kv_channels"},
    rules=DENSE_RULES,
    dropped_hf=DROPPED_HF,
    fixed={"qk_layernorm": True},
    moe_format="qwen3_moe",
)
