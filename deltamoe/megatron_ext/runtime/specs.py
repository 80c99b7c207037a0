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

try:  # optional at import time, as megatron-core itself does
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:  # ImportError, or a TE build that fails to load its CUDA libraries
    HAVE_TE = False

SPEC_CHOICES = ("auto", "te", "fast", "local")


def resolve_spec_name(requested: str = "auto") -> str:
    """The concrete spec ("te", "fast" or "local") that `requested` means on this machine."""
    if requested not in SPEC_CHOICES:
        raise ValueError(f"layer spec must be one of {SPEC_CHOICES}, got {requested!r}")
    te_usable = HAVE_TE and torch.cuda.is_available()
    if requested == "auto":
        return "te" if te_usable else "fast"
    if requested == "te" and not te_usable:
        raise RuntimeError("layer spec 'te' needs Transformer Engine and CUDA; use 'fast', 'local' or 'auto'")
    return requested


def layer_spec(*, num_experts: int | None, moe_grouped_gemm: bool, qk_layernorm: bool, spec: str = "auto"):
    """A `ModuleSpec` for every decoder layer of a GPT model."""
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
