"""Hugging Face MoE formats the upcycled model exports to: Mixtral (Llama family), Qwen2-MoE, Qwen3-MoE.

Each format is a rule table for the MoE block (attention and embeddings keep the dense tables) plus the config that
makes transformers compute the same function as the Megatron model, and the list of what the format cannot hold
(DESIGN.md decision 12, "exact or refused"). What transformers 5 builds (models/*/modeling_*.py, 5.24):

| format    | attention                                     | routing                                   | shared expert            |
|-----------|-----------------------------------------------|-------------------------------------------|--------------------------|
| mixtral   | no biases, no q/k norm, `head_dim`            | softmax -> top-k -> always renormalised   | none                     |
| qwen2_moe | q/k/v bias iff `qkv_bias`, no o_proj bias, no q/k norm, `head_dim` | softmax -> top-k -> renormalised iff `norm_topk_prob` | always: sigmoid(gate(x)) * shared(x) |
| qwen3_moe | always q/k RMSNorm per head; `attention_bias` biases q, k, v *and* o_proj; `head_dim` | as qwen2_moe | none |

The Megatron model (megatron-core GPTModel as `model_builder` builds it) has q/k/v biases only (`add_qkv_bias`, no
`linear_proj` bias), q/k norms only for Qwen3, and routes softmax -> top-k -> renormalise (softmax over the top-k
logits), or without the renormalisation when trained with `--moe-router-pre-softmax` (recorded in the checkpoint
as `router_pre_softmax`). Hence:
- Llama -> Mixtral exact (refused with attention_bias); Llama -> Qwen2-MoE exact with `qkv_bias` = the Llama's
  attention_bias; Llama -> Qwen3-MoE refused (its q/k norms are not optional: unit weights still normalise).
- Qwen2 -> Qwen2-MoE exact; -> Mixtral refused (qkv bias); -> Qwen3-MoE refused (q/k norm).
- Qwen3 -> Qwen3-MoE exact (refused with attention_bias: Qwen3-MoE would add an o_proj bias); -> Mixtral / Qwen2-MoE
  refused (q/k norm).
- The shared variant needs Qwen2-MoE (the only format with a shared expert); a Qwen3 shared variant has no format.
- No top-k renormalisation needs Qwen2-MoE / Qwen3-MoE (`norm_topk_prob: false`).
Routing at inference is the router alone: a by-language mask used in training is not part of any HF format.
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
    has_qkv_bias: bool = False
    """Can hold q/k/v biases without an o_proj bias (Qwen2-MoE's `qkv_bias`)."""
    no_qkv_bias_reason: str = "{name} has no attention biases"
    """Why a model with q/k/v biases cannot be written ({name}: the format's name)."""
    has_qk_layernorm: bool = False
    """Always applies RMSNorm to each query and key head (Qwen3-MoE): a model without it cannot be written."""
    always_renormalises: bool = False
    """Top-k weights always renormalised (Mixtral); otherwise `norm_topk_prob` decides."""


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
    always_renormalises=True,
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
    has_qkv_bias=True,
)
QWEN3_MOE = MoEFormat(
    name="qwen3_moe",
    hf_architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    rules=EMBEDDING_RULES + ATTENTION_RULES
    + _expert_rules("mlp.experts", "gate_proj.weight", "up_proj.weight", "down_proj.weight", "mlp.gate.weight"),
    has_shared_expert=False,
    has_qk_layernorm=True,
    no_qkv_bias_reason="{name}'s attention_bias biases o_proj as well as q/k/v (the Megatron model has no o_proj bias)",
)
MOE_FORMATS = {f.name: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE)}
DEFAULT_FORMAT = {"llama": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
"""`--format auto`: the source architecture's own MoE format, when it can hold the model."""

# Qwen2-MoE always builds a shared expert. For the copy variant (no shared expert) we give it the smallest possible
# one with a zero down-projection: its output is exactly zero, so the function is the copy variant's exactly.
ZERO_SHARED_EXPERT_SIZE = 1

_PRETTY = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE",
           "qwen3_moe": "Qwen3-MoE"}


def format_problems(fmt: MoEFormat, config, moe: dict) -> list[str]:
    """What `fmt` cannot hold of a Megatron MoE (its `ArchitectureConfig`-like `config` and the checkpoint's `moe`
    settings); empty when the export is exact. `config` needs `architecture`, `qkv_bias` and `qk_layernorm`."""
    arch, name = _PRETTY.get(config.architecture, config.architecture), _PRETTY[fmt.name]
    problems = []
    if config.qkv_bias and not fmt.has_qkv_bias:
        problems.append(f"{fmt.no_qkv_bias_reason.format(name=name)}, and this {arch} model has q/k/v biases")
    if config.qk_layernorm and not fmt.has_qk_layernorm:
        problems.append(f"{name} has no q/k norms, and this {arch} model normalises queries and keys (q_norm/k_norm)")
    if fmt.has_qk_layernorm and not config.qk_layernorm:
        problems.append(f"{name} always applies RMSNorm to queries and keys (q_norm/k_norm), which this {arch} model "
                        "does not have (unit norm weights would still normalise)")
    if moe.get("shared_expert_intermediate_size") and not fmt.has_shared_expert:
        problems.append(f"{name} has no shared expert, and this MoE is the shared variant")
    if getattr(config, "sliding_window", None) is not None:
        # Each format places windows its own way (Mixtral: every layer; Qwen2-MoE: from max_window_layers; Qwen3-MoE:
        # every layer), none per layer as the dense model's layer_types may: not carried over yet.
        problems.append(f"{name} export does not carry per-layer sliding windows, and this {arch} model uses a "
                        f"sliding window of {config.sliding_window} tokens")
    if moe.get("router_pre_softmax") and fmt.always_renormalises:
        problems.append(f"{name} always renormalises the top-k routing weights, and this MoE was trained without "
                        "renormalisation (--moe-router-pre-softmax)")
    return problems


def exportable_formats(config, moe: dict) -> list[str]:
    """The formats that hold the model exactly, the architecture's own format first."""
    first = DEFAULT_FORMAT[config.architecture]
    order = [first, *(f for f in MOE_FORMATS if f != first)]
    return [f for f in order if not format_problems(MOE_FORMATS[f], config, moe)]


def choose_format(requested: str, config, moe: dict) -> str:
    """`--format`: the requested format if it holds the model exactly, or for "auto" the architecture's own format,
    else the first that does (e.g. a Llama shared variant -> Qwen2-MoE); a DeltaMoEError naming what is lost otherwise."""
    if requested != "auto":
        if requested not in MOE_FORMATS:
            raise DeltaMoEError(f"--format {requested!r}: expected auto or one of {sorted(MOE_FORMATS)}")
        problems = format_problems(MOE_FORMATS[requested], config, moe)
        if problems:
            others = exportable_formats(config, moe)
            hint = f"; use --format {others[0]}" if others else "; no HF MoE format holds this model"
            raise DeltaMoEError(f"--format {requested}: the export would not compute the trained model: "
                                f"{'; '.join(problems)}{hint}")
        return requested
    formats = exportable_formats(config, moe)
    if not formats:
        own = MOE_FORMATS[DEFAULT_FORMAT[config.architecture]]
        raise DeltaMoEError(f"no HF MoE format holds this model: {'; '.join(format_problems(own, config, moe))}")
    return formats[0]


def check_exportable(config, moe: dict, what: str) -> None:
    """Refuse, before any training, a model that no HF MoE format can hold (e.g. the shared variant of Qwen3)."""
    if not exportable_formats(config, moe):
        own = MOE_FORMATS[DEFAULT_FORMAT[config.architecture]]
        raise DeltaMoEError(f"{what}: no Hugging Face MoE format could hold the result ("
                            f"{'; '.join(format_problems(own, config, moe))}), so it could never be exported")


# Dense config fields that mean something else (or nothing) in the MoE formats; the formats' own fields are set below.
_DROPPED_DENSE_FIELDS = ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "attention_bias",
                         "mlp_bias", "qkv_bias", "use_sliding_window", "sliding_window", "max_window_layers",
                         "layer_types", "pretraining_tp", "head_dim", "hidden_act")


def moe_hf_config(dense_hf_config: dict, fmt: MoEFormat, moe: dict, *, ignored_fields=()) -> dict:
    """config.json of the exported MoE: the dense config's neutral fields (sizes, RoPE, norms' epsilon, token ids) plus
    every field of the target format that changes the function, set to what the Megatron model computes."""
    from deltamoe.architectures import read_architecture_config

    _, config = read_architecture_config(dense_hf_config, ignored_fields=ignored_fields)
    problems = format_problems(fmt, config, moe)
    if problems:
        raise DeltaMoEError(f"format {fmt.name}: {'; '.join(problems)}")
    num_experts, topk = moe["num_experts"], moe["topk"]
    expert_ffn = moe.get("ffn_hidden_size") or config.ffn_hidden_size
    keep = {k: v for k, v in dense_hf_config.items() if k not in _DROPPED_DENSE_FIELDS}
    out = {**keep, "architectures": [fmt.hf_architecture], "model_type": fmt.model_type,
           "dtype": dense_hf_config.get("dtype") or dense_hf_config.get("torch_dtype") or "float32",
           # Megatron's gated MLP is SwiGLU with SiLU; heads of kv_channels (which may differ from hidden / heads).
           "hidden_act": "silu", "head_dim": config.kv_channels, "tie_word_embeddings": config.tie_word_embeddings,
           "attention_dropout": 0.0, "num_experts_per_tok": topk, "router_aux_loss_coef": 0.0,
           "output_router_logits": False}
    if fmt.name == "mixtral":
        out.update(num_local_experts=num_experts, intermediate_size=expert_ffn, router_jitter_noise=0.0,
                   sliding_window=None)
        return out
    out.update(num_experts=num_experts, moe_intermediate_size=expert_ffn,
               # megatron renormalises the top-k probabilities unless trained with --moe-router-pre-softmax
               norm_topk_prob=not moe.get("router_pre_softmax", False),
               decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False, sliding_window=None)
    if fmt.name == "qwen2_moe":
        out.update(qkv_bias=config.qkv_bias, max_window_layers=config.num_layers,
                   layer_types=["full_attention"] * config.num_layers,
                   shared_expert_intermediate_size=moe.get("shared_expert_intermediate_size") or ZERO_SHARED_EXPERT_SIZE)
    else:
        out["attention_bias"] = False
    return out
