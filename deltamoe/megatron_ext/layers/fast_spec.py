"""The torch-native fast layer spec: megatron-core's local spec with three modules replaced.

| piece | local spec (reference) | fast spec |
|---|---|---|
| core attention | `DotProductAttention` (S x S scores) | `SDPAttention` (flash / memory-efficient SDPA) |
| norms | `WrappedTorchNorm` (refuses sequence parallel) | `FastNorm` (same maths, sequence-parallel flag) |
| MoE experts | `SequentialMLP` (loop, weight grads for all) | `FrozenAwareGroupedMLP` (grouped GEMM, frozen-aware) |

Linear layers, router, token dispatcher and rotary embeddings are megatron-core's own. Module names (`state_dict`
keys) are the local spec's, and `torch_dist` keys are the Transformer Engine spec's (runtime/checkpoint_layout.py),
as for DeltaMoE's local spec, so checkpoints move between the specs in every direction.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from deltamoe.megatron_ext.layers.grouped_experts import FrozenAwareGroupedMLP
from deltamoe.megatron_ext.layers.norm import FastNorm
from deltamoe.megatron_ext.layers.sdpa_attention import SDPAttention
from deltamoe.megatron_ext.runtime.checkpoint_layout import te_layout_submodules


class FastSpecProvider(LocalSpecProvider):
    """megatron's `BackendSpecProvider` protocol, answering with the fast modules."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return FastNorm

    def core_attention(self):
        return SDPAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        # moe_grouped_gemm chooses torch._grouped_mm inside the module; frozen-aware either way.
        return partial(FrozenAwareGroupedMLP, submodules=MLPSubmodules(
            linear_fc1=self.column_parallel_linear(), linear_fc2=self.row_parallel_linear()))


def fast_layer_spec(*, num_experts: int | None, moe_grouped_gemm: bool, qk_layernorm: bool) -> ModuleSpec:
    """A `TransformerLayer` spec for GPT decoders (dense when `num_experts` is None, MoE otherwise)."""
    backend = FastSpecProvider()
    norm = backend.layer_norm(rms_norm=True)
    mlp = get_mlp_module_spec_for_backend(backend=backend, num_experts=num_experts,
                                          moe_grouped_gemm=moe_grouped_gemm)
    submodules = TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=backend.column_parallel_linear(),
                core_attention=backend.core_attention(),
                linear_proj=backend.row_parallel_linear(),
                q_layernorm=norm if qk_layernorm else IdentityOp,
                k_layernorm=norm if qk_layernorm else IdentityOp,
            ),
        ),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=norm,
        mlp=mlp,
        mlp_bda=get_bias_dropout_add,
    )
    return ModuleSpec(module=TransformerLayer,
                      submodules=te_layout_submodules(submodules, is_moe=num_experts is not None))
