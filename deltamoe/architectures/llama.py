"""Llama 2 / 3.x (and SmolLM2, which is a Llama): tied or untied embeddings, RoPE default / linear / llama3 / yarn.

CONFIG is every field of transformers' LlamaConfig (5.x, and what 4.x wrote), accounted for: fields.py explains the
roles, rope.py the RoPE outcomes. Defaults are LlamaConfig's.
"""

from deltamoe.architectures.base import DENSE_RULES, DROPPED_HF, Architecture
from deltamoe.architectures.fields import PRETRAINED_FIELDS, mapped, neutral, refused
from deltamoe.architectures.rope import ROPE_FIELDS

GATED_ACTIVATIONS = ("silu", "swish")
"""hidden_act values megatron computes exactly in the gated MLP act(gate) * up: silu (= swish, transformers' nn.SiLU)
as SwiGLU. Megatron-LM's trainer flags offer one other gated activation, --quick-geglu, whose megatron function is
torch-compiled (fused_bias_geglu.quick_gelu); no published Llama/Qwen uses quick_gelu, so it is refused with the rest."""

CONFIG = (
    #      config.json field           megatron-core setting / reason                                   transformers default
    mapped("vocab_size",               "vocab_size (padded to --make-vocab-size-divisible-by)",         target="vocab_size", default=32000),
    mapped("hidden_size",              "hidden_size",                                                   target="hidden_size", default=4096),
    mapped("intermediate_size",        "ffn_hidden_size",                                               target="ffn_hidden_size", default=11008),
    mapped("num_hidden_layers",        "num_layers",                                                    target="num_layers", default=32),
    mapped("num_attention_heads",      "num_attention_heads",                                           target="num_attention_heads", default=32),
    mapped("num_key_value_heads",      "num_query_groups (GQA)",                                        target="num_query_groups", default=lambda v: v["num_attention_heads"]),
    mapped("head_dim",                 "kv_channels (may differ from hidden_size / heads)",             target="kv_channels", default=lambda v: v["hidden_size"] // v["num_attention_heads"]),
    mapped("hidden_act",               "SwiGLU: gated_linear_unit with F.silu (--swiglu)",              default="silu", accepts=GATED_ACTIVATIONS),
    mapped("max_position_embeddings",  "GPTModel max_sequence_length",                                  target="max_position_embeddings", default=2048),
    mapped("rms_norm_eps",             "layernorm_epsilon (RMSNorm)",                                   target="norm_epsilon", default=1e-6),
    mapped("tie_word_embeddings",      "share_embeddings_and_output_weights",                           target="tie_word_embeddings", default=False),
    mapped("attention_dropout",        "attention_dropout (training only; eval logits unaffected)",     target="attention_dropout", default=0.0),
    *ROPE_FIELDS,
    refused("attention_bias",          "bias on q, k, v and o_proj: megatron-core biases q/k/v only (add_qkv_bias) or every linear layer (add_bias_linear)", accepts=(False,)),
    refused("mlp_bias",                "bias on gate/up/down: megatron-core's add_bias_linear also biases the attention", accepts=(False,)),
    neutral("pretraining_tp",          "4.x split of the same matmuls into slices (rounding only); unused by transformers 5"),
    *PRETRAINED_FIELDS,
)

LLAMA = Architecture(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    config_table=CONFIG,
    rules=DENSE_RULES,
    dropped_hf=DROPPED_HF,
    moe_format="mixtral",
)
