"""Qwen2 / Qwen2.5: bias on q, k and v projections (always), none elsewhere; optional sliding windows per layer.

CONFIG is every field of transformers' Qwen2Config (5.x, and what 4.x wrote), accounted for: fields.py explains the
roles, rope.py the RoPE outcomes, sliding_window.py the windows. Defaults are Qwen2Config's.
"""

from deltamoe.architectures.base import DENSE_RULES, DROPPED_HF, Architecture
from deltamoe.architectures.fields import PRETRAINED_FIELDS, mapped, refused
from deltamoe.architectures.llama import GATED_ACTIVATIONS
from deltamoe.architectures.rope import ROPE_FIELDS
from deltamoe.architectures.sliding_window import SLIDING_WINDOW_FIELDS

CONFIG = (
    #      config.json field           megatron-core setting / reason                                   transformers default
    mapped("vocab_size",               "vocab_size (padded to --make-vocab-size-divisible-by)",         target="vocab_size", default=151936),
    mapped("hidden_size",              "hidden_size",                                                   target="hidden_size", default=4096),
    mapped("intermediate_size",        "ffn_hidden_size",                                               target="ffn_hidden_size", default=22016),
    mapped("num_hidden_layers",        "num_layers",                                                    target="num_layers", default=32),
    mapped("num_attention_heads",      "num_attention_heads",                                           target="num_attention_heads", default=32),
    # Qwen2Config's default is 32 when the field is absent, num_attention_heads when it is null.
    mapped("num_key_value_heads",      "num_query_groups (GQA)",                                        target="num_query_groups", default=32, null=lambda v: v["num_attention_heads"]),
    # Not a Qwen2Config field, but Qwen2Attention and its rotary embedding read getattr(config, "head_dim").
    mapped("head_dim",                 "kv_channels (may differ from hidden_size / heads)",             target="kv_channels", default=lambda v: v["hidden_size"] // v["num_attention_heads"]),
    mapped("hidden_act",               "SwiGLU: gated_linear_unit with F.silu (--swiglu)",              default="silu", accepts=GATED_ACTIVATIONS),
    mapped("max_position_embeddings",  "GPTModel max_sequence_length",                                  target="max_position_embeddings", default=32768),
    mapped("rms_norm_eps",             "layernorm_epsilon (RMSNorm)",                                   target="norm_epsilon", default=1e-6),
    mapped("tie_word_embeddings",      "share_embeddings_and_output_weights",                           target="tie_word_embeddings", default=False),
    mapped("attention_dropout",        "attention_dropout (training only; eval logits unaffected)",     target="attention_dropout", default=0.0),
    *ROPE_FIELDS,
    *SLIDING_WINDOW_FIELDS,
    refused("use_mrope",               "multimodal RoPE (Qwen2-VL); transformers' Qwen2ForCausalLM has none", accepts=(False,)),
    *PRETRAINED_FIELDS,
)

QWEN2 = Architecture(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    config_table=CONFIG,
    rules=DENSE_RULES,
    dropped_hf=DROPPED_HF,
    fixed={"qkv_bias": True},
    moe_format="qwen2_moe",
    sliding_window=True,
)
