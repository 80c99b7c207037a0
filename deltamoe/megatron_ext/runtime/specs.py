"""The one place that chooses the transformer layer spec from what is installed.

- "te": Transformer Engine, when TE imports and CUDA is present (FP8 needs it). Dense layers are megatron's TE spec.
  MoE layers are megatron's TE spec with DeltaMoE's frozen-aware experts on TE linears (below, "why not
  TEGroupedMLP");
- "fast": our torch-native spec (`deltamoe.megatron_ext.layers.fast_spec`: SDPA attention, sequence-parallel
  RMSNorm, frozen-aware grouped experts), the default without TE, on GPU and CPU;
- "local": megatron-core's local spec with DeltaMoE's norms, kept as the reference the fast spec is tested against
  and the module tree every conversion builds (`CONVERSION_SPEC`).
"auto" means "te" when usable, else "fast". All three write the same torch_dist keys, the TE spec's
(runtime/checkpoint_layout.py), so a checkpoint written under one loads under the others. Conversion never depends
on what is installed: import, upcycle and export always build `CONVERSION_SPEC`, whose modules exist everywhere.

Why not TEGroupedMLP for MoE layers: TE's GroupedLinear decides whether to compute weight gradients for all its
GEMMs from the first weight alone (`_GroupedLinear.forward`: `weight_requires_grad = weights[0].requires_grad`,
`ctx.weights_requires_grad = weights[0].requires_grad`; backward skips every wgrad otherwise; TransformerEngine
transformer_engine/pytorch/module/grouped_linear.py, unchanged from v2.2 to v2.20). With expert 0 frozen, the other
experts on its expert-parallel rank would get no gradient: an assertion under `--overlap-grad-reduce` (megatron DDP
"param.grad being None is not safe"), or, without it, experts that never train while weight decay shrinks them.
A `SequentialMLP` of TE linears gates each expert on its own weight, so DeltaMoE's `FrozenAwareGroupedMLP` (a
SequentialMLP with the same checkpoint keys) runs on TE linears: grouped GEMMs without weight gradients for frozen
experts in bf16, TE's per-expert FP8 linears otherwise.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial

import torch

from deltamoe.common.errors import DeltaMoEError

try:  # optional at import time, as megatron-core itself does
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:  # noqa: BLE001 - ImportError, or a TE build that fails to load its CUDA libraries
    HAVE_TE = False

SPEC_CHOICES = ("auto", "te", "fast", "local")
CONVERSION_SPEC = "local"
"""The module tree import, upcycle and export build: megatron's local modules and DeltaMoE's norms, on any machine."""


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


def spec_reason(requested: str = "auto") -> str:
    """One sentence on why `requested` resolves as it does here (for `deltamoe env` and logs)."""
    name = resolve_spec_name(requested)
    if requested != "auto":
        return f"{name}: requested explicitly"
    if name == "te":
        return "te: Transformer Engine imports and CUDA is available"
    missing = [what for what, ok in (("Transformer Engine", HAVE_TE), ("CUDA", torch.cuda.is_available())) if not ok]
    return f"fast: {' and '.join(missing)} not available"


def layer_spec(*, num_experts: int | None, moe_grouped_gemm: bool, qk_layernorm: bool, spec: str = "auto"):
    """A `ModuleSpec` for every decoder layer of a GPT model."""
    name = resolve_spec_name(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if name == "fast":
            from deltamoe.megatron_ext.layers.fast_spec import fast_layer_spec

            return fast_layer_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                   qk_layernorm=qk_layernorm)
        if name == "te":
            return te_layer_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                 qk_layernorm=qk_layernorm)
        return local_layer_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm)


def local_layer_spec(*, num_experts: int | None, moe_grouped_gemm: bool, qk_layernorm: bool):
    """megatron-core's local spec with DeltaMoE's norms (no apex or TE norm, whatever is installed) and TE keys."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.spec_utils import ModuleSpec

    from deltamoe.megatron_ext.runtime.checkpoint_layout import te_layout_submodules

    spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                                    qk_layernorm=qk_layernorm, normalization="RMSNorm")
    return ModuleSpec(module=spec.module,
                      submodules=te_layout_submodules(spec.submodules, is_moe=num_experts is not None))


def te_layer_spec(*, num_experts: int | None, moe_grouped_gemm: bool, qk_layernorm: bool):
    """megatron-core's TE spec; MoE layers get DeltaMoE's frozen-aware experts on TE linears (module docstring)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
        num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm)
    if num_experts is None:
        return spec
    return ModuleSpec(module=spec.module, submodules=dataclasses.replace(
        spec.submodules, mlp=with_frozen_aware_experts(spec.submodules.mlp)))


def with_frozen_aware_experts(moe_mlp):
    """An MoE layer builder (`partial(MoELayer, submodules=MoESubmodules(...))`) whose experts are DeltaMoE's
    `FrozenAwareGroupedMLP` on the linears the builder's experts used (or, for TEGroupedMLP, TE's column/row linears)."""
    from megatron.core.transformer.mlp import MLPSubmodules

    from deltamoe.megatron_ext.layers.grouped_experts import FrozenAwareGroupedMLP

    if not isinstance(moe_mlp, partial) or "submodules" not in moe_mlp.keywords:
        raise DeltaMoEError(f"layer spec: expected megatron's MoE layer builder, got {moe_mlp!r}")
    moe_submodules = moe_mlp.keywords["submodules"]
    fc1, fc2 = _expert_linears(moe_submodules.experts)
    experts = partial(FrozenAwareGroupedMLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))
    return partial(moe_mlp.func, *moe_mlp.args,
                   **{**moe_mlp.keywords, "submodules": dataclasses.replace(moe_submodules, experts=experts)})


def _expert_linears(experts):
    from megatron.core.transformer.moe.experts import SequentialMLP

    if isinstance(experts, partial) and experts.func is SequentialMLP:
        return experts.keywords["submodules"].linear_fc1, experts.keywords["submodules"].linear_fc2
    # TEGroupedMLP (TE spec with --moe-grouped-gemm): its per-expert counterparts are TE's column/row linears.
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    return TEColumnParallelLinear, TERowParallelLinear


def decoder_spec(transformer_config, *, qk_layernorm: bool, spec: str = "auto", vp_stage: int | None = None):
    """What `GPTModel(transformer_layer_spec=...)` should receive: whole-block submodules with the final norm.

    Given a bare layer spec, megatron builds the decoder's final norm from what is installed (`LayerNormImpl`:
    TENorm with TE, apex's FusedLayerNorm with apex, else `WrappedTorchNorm`, which refuses sequence parallel); the
    fast and local specs therefore name theirs (`StandaloneFastNorm`, with TE's checkpoint keys). The TE spec keeps
    megatron's TENorm. Needs the parallel state (pipeline stage sizes), like `GPTModel` itself.
    """
    layer = layer_spec(num_experts=transformer_config.num_moe_experts,
                       moe_grouped_gemm=transformer_config.moe_grouped_gemm, qk_layernorm=qk_layernorm, spec=spec)
    if resolve_spec_name(spec) == "te":
        return layer
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from deltamoe.megatron_ext.layers.norm import StandaloneFastNorm

    num_layers = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=StandaloneFastNorm)
