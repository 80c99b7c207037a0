"""The one place that chooses the transformer layer spec from what is installed.

- "te": Transformer Engine spec, when TE imports and CUDA is present (FP8 needs it);
- "fast": our torch-native spec (`deltamoe.megatron_ext.layers.fast_spec`: SDPA attention, sequence-parallel
  RMSNorm, frozen-aware grouped experts), the default without TE, on GPU and CPU;
- "local": megatron-core's local spec, kept as the reference the fast spec is tested against.
"auto" means "te" when usable, else "fast". Module names are the same in all three, so HF converters and state dicts
do not depend on the spec.
"""

from __future__ import annotations

import warnings

import torch

from deltamoe.common.errors import DeltaMoEError

try:  # optional at import time, as megatron-core itself does
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:  # noqa: BLE001 - ImportError, or a TE build that fails to load its CUDA libraries
    HAVE_TE = False

SPEC_CHOICES = ("auto", "te", "fast", "local")


def resolve_spec_name(requested: str = "auto") -> str:
    """The concrete spec ("te", "fast" or "local") that `requested` means on this machine."""
    if requested not in SPEC_CHOICES:
        raise DeltaMoEError(f"layer spec must be one of {SPEC_CHOICES}, got {requested!r}")
    te_usable = HAVE_TE and torch.cuda.is_available()
    if requested == "auto":
        return "te" if te_usable else "fast"
    if requested == "te" and not te_usable:
        raise DeltaMoEError("layer spec 'te' needs Transformer Engine and CUDA; use 'fast', 'local' or 'auto'")
    return requested


def layer_spec(*, num_experts: int | None, moe_grouped_gemm: bool, qk_layernorm: bool, spec: str = "auto"):
    """A `ModuleSpec` for every decoder layer of a GPT model."""
    return _layer_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm,
                       spec=spec)


def _layer_spec(*, num_experts, moe_grouped_gemm, qk_layernorm, spec):
    from megatron.core.models.gpt import gpt_layer_specs

    name = resolve_spec_name(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if name == "fast":
            from deltamoe.megatron_ext.layers.fast_spec import fast_layer_spec

            return fast_layer_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                   qk_layernorm=qk_layernorm)
        if name == "te":
            return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
                num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm
            )
        return gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm,
            normalization="RMSNorm",
        )


def decoder_spec(transformer_config, *, qk_layernorm: bool, spec: str = "auto", vp_stage: int | None = None):
    """What `GPTModel(transformer_layer_spec=...)` should receive: the layer spec, plus the final norm for "fast".

    A bare layer `ModuleSpec` makes megatron build the decoder's final norm with its default (`WrappedTorchNorm`
    without apex), which refuses sequence parallel; the fast spec therefore returns whole-block submodules with
    `FastNorm` as the final norm. Needs the parallel state (pipeline stage sizes), like `GPTModel` itself.
    """
    layer = _layer_spec(num_experts=transformer_config.num_moe_experts,
                       moe_grouped_gemm=transformer_config.moe_grouped_gemm, qk_layernorm=qk_layernorm, spec=spec)
    if resolve_spec_name(spec) != "fast":
        return layer
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from deltamoe.megatron_ext.layers.norm import FastNorm

    num_layers = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=FastNorm)
