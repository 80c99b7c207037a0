"""RMSNorm / LayerNorm that work under sequence parallelism, for the torch-native fast spec.

megatron-core's local spec uses `WrappedTorchNorm`, which asserts `not config.sequence_parallel`; megatron in turn
requires sequence parallel for MoE with tensor parallel > 1 in training, so without Transformer Engine or apex there
was no way to train an MoE with TP > 1 (../shared/notes/megatron-on-cpu.md).

Under sequence parallelism each tensor-parallel rank normalises a different slice of the sequence, so each rank's
norm-weight gradient is a partial sum. Flagging the parameters `sequence_parallel = True` is how megatron's
`finalize_model_grads` finds them and all-reduces their gradients over the tensor-parallel group (TE's `TENorm` and
apex's `FusedLayerNorm` set the same flag). The computation is `torch.nn.functional.rms_norm`, i.e. exactly
`torch.nn.RMSNorm` (RMSNorm: Zhang & Sennrich, 2019, arXiv:1910.07467), so logits equal the local spec's, and
state-dict keys (`weight`, `bias`) are the same.
"""

from __future__ import annotations

import torch

from deltamoe.common.errors import DeltaMoEError


def _check_config(config) -> None:
    if config.layernorm_zero_centered_gamma:
        raise DeltaMoEError("fast spec norm: layernorm_zero_centered_gamma is not supported (use the te spec)")
    if getattr(config, "memory_efficient_layer_norm", False):
        raise DeltaMoEError("fast spec norm: memory_efficient_layer_norm is not supported (use the te spec)")


def _flag_sequence_parallel(module: torch.nn.Module, config) -> None:
    for param in module.parameters():
        # Read by megatron.core.distributed.finalize_model_grads (all-reduce over the TP group).
        param.sequence_parallel = bool(config.sequence_parallel)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` built from a megatron `TransformerConfig`, usable with sequence parallel."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        _check_config(config)
        super().__init__(hidden_size, eps=eps)
        _flag_sequence_parallel(self, config)


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """`torch.nn.LayerNorm` built from a megatron `TransformerConfig`, usable with sequence parallel."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        _check_config(config)
        super().__init__(hidden_size, eps=eps)
        _flag_sequence_parallel(self, config)


def FastNorm(config, hidden_size: int, eps: float = 1e-5, **kwargs):
    """The megatron `LayerNormBuilder` for the fast spec: picks RMSNorm or LayerNorm from `config.normalization`."""
    if config.normalization == "RMSNorm":
        return SequenceParallelRMSNorm(config, hidden_size, eps, **kwargs)
    if config.normalization == "LayerNorm":
        return SequenceParallelLayerNorm(config, hidden_size, eps, **kwargs)
    raise DeltaMoEError(f"fast spec norm: normalization must be RMSNorm or LayerNorm, got {config.normalization!r}")
