"""Build a megatron-core `GPTModel` from a Hugging Face config (Llama, Qwen2/2.5, Qwen3), dense or upcycled MoE.

The HF config is read through the architecture tables in `deltamoe.architectures`; the resulting
`TransformerConfig` is megatron-core's own (we compose it, never mirror its fields). Fused-kernel switches that need
Transformer Engine or apex are turned off when those are absent, so the same builder serves CPU tests and GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deltamoe.common.errors import DeltaMoEError
from deltamoe.architectures import read_architecture_config
from deltamoe.architectures.base import ArchitectureConfig
from deltamoe.megatron_ext.runtime import specs


@dataclass(kw_only=True)
class MoESettings:
    num_experts: int
    topk: int
    grouped_gemm: bool = False
    ffn_hidden_size: int | None = None
    """Routed expert intermediate size (granular upcycling); default: the dense FFN size."""
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    aux_loss_coeff: float = 0.0
    token_dispatcher: str = "alltoall"
    router_pre_softmax: bool = False
    """Top-k of the softmax over all experts without renormalisation (`--moe-router-pre-softmax`, Qwen-MoE's
    `norm_topk_prob: false`); False: softmax over the top-k logits = renormalised top-k, the upcycle's exact start."""

    def __post_init__(self):
        if self.num_experts < 2:
            raise DeltaMoEError(f"num_experts ({self.num_experts}) must be at least 2")
        if not 1 <= self.topk <= self.num_experts:
            raise DeltaMoEError(f"topk ({self.topk}) must be between 1 and num_experts ({self.num_experts})")


def padded_vocab_size(vocab_size: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary so every tensor-parallel shard is equal; we pad once, independent of TP."""
    return int(math.ceil(vocab_size / divisible_by) * divisible_by)


def check_tensor_parallel(config: ArchitectureConfig, tp: int, padded_vocab: int, source: str = "model") -> None:
    checks = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads (query groups)": config.num_query_groups,
        "intermediate_size (FFN)": config.ffn_hidden_size,
        "padded vocabulary": padded_vocab,
    }
    for field_name, value in checks.items():
        if value % tp:
            raise DeltaMoEError(f"{source}: tensor-parallel size {tp} does not divide {field_name} ({value})")


def transformer_config(
    config: ArchitectureConfig,
    *,
    moe: MoESettings | None = None,
    params_dtype: torch.dtype = torch.float32,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    **overrides,
):
    from megatron.core.transformer.transformer_config import TransformerConfig

    gpu = torch.cuda.is_available()
    yarn = config.yarn.megatron_attributes() if config.yarn is not None else {}
    kwargs = dict(
        **{k: v for k, v in architecture_settings(config).items() if k not in yarn},
        hidden_dropout=0.0,
        attention_dropout=config.attention_dropout,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        pipeline_dtype=params_dtype,  # what activations travel between pipeline stages in
        expert_model_parallel_size=expert_model_parallel_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not gpu,
        # Fusions that need Transformer Engine / apex kernels; torch fallbacks otherwise.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    if moe is not None:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.topk,
            moe_ffn_hidden_size=moe.ffn_hidden_size or config.ffn_hidden_size,
            moe_grouped_gemm=moe.grouped_gemm,
            moe_shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
            moe_shared_expert_gate=moe.shared_expert_gate,
            moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_token_dispatcher_type=moe.token_dispatcher,
            # softmax over all experts -> top-k -> renormalise (equivalently softmax over the top-k logits), or without
            # the renormalisation when the checkpoint records router_pre_softmax.
            moe_router_score_function="softmax",
            moe_router_pre_softmax=moe.router_pre_softmax,
            moe_router_dtype="fp32",
            moe_permute_fusion=False,
        )
    kwargs.update(overrides)
    cfg = TransformerConfig(**kwargs)
    # GPTModel's yarn branch reads these as attributes of the config, as Megatron-LM's trainer sets them
    # (megatron.training.argument_utils._apply_yarn_config_from_args).
    for name, value in yarn.items():
        setattr(cfg, name, value)
    return cfg


def architecture_settings(config: ArchitectureConfig) -> dict:
    """The TransformerConfig settings that make the function the HF config describes: model_builder sets them, the
    trainer gets them from `checkpoint_model_flags`, and `build_gpt_model` refuses a config that differs."""
    settings = dict(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.num_query_groups,
        kv_channels=config.kv_channels, normalization="RMSNorm", layernorm_epsilon=config.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=config.qkv_bias,
        qk_layernorm=config.qk_layernorm, rotary_interleaved=False, window_size=config.window_size,
        window_attn_skip_freq=list(config.sliding_window_layers) if config.sliding_window_layers else None,
    )
    if config.yarn is not None:
        settings.update(config.yarn.megatron_attributes())
    return settings


def _same_setting(actual, expected) -> bool:
    """Equal, with floats compared as the float32 scalars the kernels use: an epsilon of 1e-05 and the float32 value
    9.999999747378752e-06 (a config written from a float32 field, e.g. one converted from GGUF) are the same number
    once RMSNorm adds it to its float32 (or bf16, computed in float32) variance."""
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        # On CPU explicitly: under a meta-device build (StreamedCheckpoint) the default device would give meta tensors.
        return (torch.tensor(actual, dtype=torch.float32, device="cpu").item()
                == torch.tensor(expected, dtype=torch.float32, device="cpu").item())
    return actual == expected


def check_architecture_settings(config: ArchitectureConfig, transformer_cfg, source: str = "model") -> None:
    """Refuse a TransformerConfig (e.g. the trainer's, from flags the user overrode) that computes another function."""
    for name, expected in architecture_settings(config).items():
        actual = getattr(transformer_cfg, name, None)
        if isinstance(expected, tuple) and actual is not None:
            actual = tuple(actual)
        if not _same_setting(actual, expected):
            raise DeltaMoEError(f"{source}: TransformerConfig.{name} is {actual!r}, the checkpoint's architecture needs "
                                f"{expected!r}; leave architecture flags to the checkpoint")
    if config.sliding_window is not None and transformer_cfg.masked_softmax_fusion:
        # FusedScaleMaskSoftmax.forward_fused_softmax (fusions/fused_softmax.py) takes the causal kernel whenever it
        # is available and never applies window_size: the local and fast specs need the unfused softmax.
        raise DeltaMoEError(f"{source}: sliding-window attention needs --no-masked-softmax-fusion (megatron's fused "
                            "causal softmax ignores window_size)")


def build_gpt_model(
    config: ArchitectureConfig,
    transformer_cfg,
    *,
    padded_vocab: int,
    spec: str = "auto",
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
):
    """A `GPTModel` for the current parallel state (call `init_distributed` first)."""
    from megatron.core.models.gpt import GPTModel

    check_architecture_settings(config, transformer_cfg)
    layer = specs.decoder_spec(transformer_cfg, qk_layernorm=config.qk_layernorm, spec=spec, vp_stage=vp_stage)
    model = GPTModel(
        config=transformer_cfg,
        transformer_layer_spec=layer,
        vocab_size=padded_vocab,
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type=config.position_embedding_type,
        rotary_base=int(config.rope_theta) if float(config.rope_theta).is_integer() else config.rope_theta,
        rope_scaling=config.rope_scaling_factor is not None,
        rope_scaling_factor=config.rope_scaling_factor or 8.0,
        seq_len_interpolation_factor=config.rope_linear_factor,
        vp_stage=vp_stage,
    )
    if specs.resolve_spec_name(spec) == "fast":
        from deltamoe.megatron_ext.internals import use_chunked_loss

        # float32 logits of a 150k vocabulary would dominate activation memory; same loss, same state dict.
        use_chunked_loss(model)
    if torch.cuda.is_available() and not transformer_cfg.use_cpu_initialization:
        model = model.cuda()
    return model


def model_from_hf_config(hf_config: dict, *, moe: MoESettings | None = None, params_dtype=torch.float32,
                         spec: str = "auto", source: str = "config.json", ignored_fields=(), **parallel):
    """Convenience: HF config dict -> (ArchitectureConfig, GPTModel) in the current parallel state."""
    _, arch_config = read_architecture_config(hf_config, source, ignored_fields=ignored_fields)
    cfg = transformer_config(arch_config, moe=moe, params_dtype=params_dtype, **parallel)
    return arch_config, build_gpt_model(arch_config, cfg, padded_vocab=padded_vocab_size(arch_config.vocab_size), spec=spec)
