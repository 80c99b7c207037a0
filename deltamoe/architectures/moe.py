"""Hugging Face MoE formats the upcycled model exports to: Mixtral (Llama family), Qwen2-MoE, Qwen3-MoE.

Each format is a rule table for the MoE block (attention and embeddings keep the dense tables) plus the config that
makes transformers compute the same function as megatron-core: softmax over all experts -> top-k -> renormalise.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltamoe.common.errors import DeltaMoEError
from deltamoe.architectures.base import ATTENTION_RULES, EMBEDDING_RULES, Rule, Transform


@dataclass(frozen=True)
class MoEFormat:
    name: str
    hf_architecture: str
    model_type: str
    rules: tuple[Rule, ...]
    has_shared_expert: bool
    always_has_shared_expert: bool = False


def _expert_rules(prefix: str, gate: str, up: str, down: str, router: str) -> tuple[Rule, ...]:
    return (
        Rule("decoder.layers.{i}.mlp.router.weight", (f"model.layers.{{i}}.{router}",)),
        Rule(
            "decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight",
            (f"model.layers.{{i}}.{prefix}.{{e}}.{gate}", f"model.layers.{{i}}.{prefix}.{{e}}.{up}"),
            Transform.GATED_FC1,
        ),
        Rule("decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight", (f"model.layers.{{i}}.{prefix}.{{e}}.{down}",)),
    )


_SHARED_RULES = (
    Rule(
        "decoder.layers.{i}.mlp.shared_experts.linear_fc1.weight",
        ("model.layers.{i}.mlp.shared_expert.gate_proj.weight", "model.layers.{i}.mlp.shared_expert.up_proj.weight"),
        Transform.GATED_FC1,
        when="shared_expert",
    ),
    Rule("decoder.layers.{i}.mlp.shared_experts.linear_fc2.weight", ("model.layers.{i}.mlp.shared_expert.down_proj.weight",), when="shared_expert"),
    Rule("decoder.layers.{i}.mlp.shared_experts.gate_weight", ("model.layers.{i}.mlp.shared_expert_gate.weight",), when="shared_expert_gate"),
)

MIXTRAL = MoEFormat(
    name="mixtral",
    hf_architecture="MixtralForCausalLM",
    model_type="mixtral",
    rules=EMBEDDING_RULES + ATTENTION_RULES
    + _expert_rules("block_sparse_moe.experts", "w1.weight", "w3.weight", "w2.weight", "block_sparse_moe.gate.weight"),
    has_shared_expert=False,
)
QWEN2_MOE = MoEFormat(
    name="qwen2_moe",
    hf_architecture="Qwen2MoeForCausalLM",
    model_type="qwen2_moe",
    rules=EMBEDDING_RULES + ATTENTION_RULES
    + _expert_rules("mlp.experts", "gate_proj.weight", "up_proj.weight", "down_proj.weight", "mlp.gate.weight")
    + _SHARED_RULES,
    has_shared_expert=True,
    always_has_shared_expert=True,
)
QWEN3_MOE = MoEFormat(
    name="qwen3_moe",
    hf_architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    rules=EMBEDDING_RULES + ATTENTION_RULES
    + _expert_rules("mlp.experts", "gate_proj.weight", "up_proj.weight", "down_proj.weight", "mlp.gate.weight"),
    has_shared_expert=False,
)
MOE_FORMATS = {f.name: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE)}

# Qwen2-MoE always builds a shared expert. For the copy variant (no shared expert) we give it the smallest possible
# one with a zero down-projection: its output is exactly zero, so the function is the copy variant's exactly.
ZERO_SHARED_EXPERT_SIZE = 1


def moe_hf_config(dense_hf_config: dict, fmt: MoEFormat, moe: dict) -> dict:
    """config.json of the exported MoE: the dense config's fields plus the MoE fields of the target format."""
    num_experts, topk = moe["num_experts"], moe["topk"]
    expert_ffn = moe.get("ffn_hidden_size") or dense_hf_config["intermediate_size"]
    shared = moe.get("shared_expert_intermediate_size")
    if shared and not fmt.has_shared_expert:
        raise DeltaMoEError(f"format {fmt.name} has no shared expert; the shared variant exports to qwen2_moe")
    if dense_hf_config.get("attention_bias") and fmt.name == "mixtral":
        raise DeltaMoEError("Mixtral has no attention bias; this Llama model has attention_bias=true")
    keep = {k: v for k, v in dense_hf_config.items() if k not in ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype")}
    config = {**keep, "architectures": [fmt.hf_architecture], "model_type": fmt.model_type, "dtype": dense_hf_config.get("dtype") or dense_hf_config.get("torch_dtype") or "float32"}
    if fmt.name == "mixtral":
        config.update(num_local_experts=num_experts, num_experts_per_tok=topk, intermediate_size=expert_ffn,
                      router_aux_loss_coef=0.0, output_router_logits=False, router_jitter_noise=0.0)
    else:
        config.update(
            num_experts=num_experts, num_experts_per_tok=topk, moe_intermediate_size=expert_ffn,
            norm_topk_prob=True,  # megatron renormalises the top-k probabilities
            decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.0, output_router_logits=False,
        )
        if fmt.name == "qwen2_moe":
            config["shared_expert_intermediate_size"] = shared or ZERO_SHARED_EXPERT_SIZE
    return config
