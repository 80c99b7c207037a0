"""Llama 2 / 3.x (and SmolLM2, which is a Llama): optional attention bias, tied or untied embeddings, llama3 RoPE scaling."""

from deltamoe.architectures.base import COMMON_CONFIG_FIELDS, DENSE_RULES, DROPPED_HF, Architecture

LLAMA = Architecture(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    config_fields={**COMMON_CONFIG_FIELDS, "attention_bias": "qkv_bias", "head_dim": "kv_channels"},
    rules=DENSE_RULES,
    dropped_hf=DROPPED_HF,
    moe_format="mixtral",
)
