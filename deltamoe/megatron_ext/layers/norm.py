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

Where Transformer Engine's spec has a norm of its own (a `TENorm`: q/k norms, the MoE layer's pre-MLP norm, the
final norm) rather than one fused into the next linear, `StandaloneFastNorm` also carries an (empty) `_extra_state`
entry, because TE's RMSNorm is a `transformer_engine.pytorch.ops` BasicOperation whose `get_extra_state` puts one in
its state dict (TransformerEngine `transformer_engine/pytorch/ops/op.py`, `BasicOperation.get_extra_state`), and
megatron's `sharded_state_dict_default` turns it into a `ShardedObject` the TE model requests on load. The entry is
what megatron's own local linears write for the same reason (`ColumnParallelLinear.get_extra_state` returns None,
"Keep compatibility with TE state dict", megatron/core/tensor_parallel/layers.py).
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


class _TEExtraState:
    """An `_extra_state` state-dict entry holding nothing, where TE's norm module keeps its quantizer state."""

    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state) -> None:
        """TE's state (FP8 scaling metadata, or an empty tensor) has no meaning for a torch norm."""


class StandaloneRMSNorm(_TEExtraState, SequenceParallelRMSNorm):
    """`SequenceParallelRMSNorm` at a place where TE's spec has a `TENorm` of its own."""


class StandaloneLayerNorm(_TEExtraState, SequenceParallelLayerNorm):
    """`SequenceParallelLayerNorm` at a place where TE's spec has a `TENorm` of its own."""


def _build(classes, config, hidden_size, eps, kwargs):
    if config.normalization not in classes:
        raise DeltaMoEError(f"fast spec norm: normalization must be RMSNorm or LayerNorm, got {config.normalization!r}")
    return classes[config.normalization](config, hidden_size, eps, **kwargs)


def FastNorm(config, hidden_size: int, eps: float = 1e-5, **kwargs):
    """The megatron `LayerNormBuilder` for a norm TE fuses into the next linear (input and dense pre-MLP norms)."""
    return _build({"RMSNorm": SequenceParallelRMSNorm, "LayerNorm": SequenceParallelLayerNorm}, config, hidden_size,
                  eps, kwargs)


def StandaloneFastNorm(config, hidden_size: int, eps: float = 1e-5, **kwargs):
    """The `LayerNormBuilder` for a norm TE keeps as a module of its own (q/k norms, MoE pre-MLP norm, final norm)."""
    return _build({"RMSNorm": StandaloneRMSNorm, "LayerNorm": StandaloneLayerNorm}, config, hidden_size, eps, kwargs)
