"""Qwen2 / Qwen2.5: bias on q, k and v projections (always), none elsewhere."""

from deltamoe.architectures.base import COMMON_CONFIG_FIELDS, DENSE_RULES, DROPPED_HF, Architecture

QWEN2 = Architecture(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    config_fields=dict(COMMON_CONFIG_FIELDS),
    rules=DENSE_RULES,
    dropped_hf=DROPPED_HF,
    fixed={"qkv_bias": True},
    moe_format="qwen2_moe",
)
