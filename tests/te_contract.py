"""The torch_dist keys a megatron-core model built with the Transformer Engine spec requests, derived without TE.

megatron-core builds its TE layer spec from `TESpecProvider` (megatron/core/extensions/transformer_engine_spec_provider.py);
without TE installed every TE class in megatron/core/extensions/transformer_engine.py is a placeholder, so the spec
*structure* is still megatron's own code: `te_layer_spec` below calls `get_gpt_layer_with_transformer_engine_spec` with
the provider enabled, and `requested_keys` walks the result. What each TE module puts in its sharded state dict is the
one table here, read from the source:

| module | entries | source |
|---|---|---|
| TELayerNormColumnParallelLinear | layer_norm_weight, weight, [bias], _extra_state | te LayerNormLinear params; megatron `sharded_state_dict` = its state_dict |
| TEColumnParallelLinear / TERowParallelLinear | weight, [bias], _extra_state | te Linear; TransformerEngineBaseModule.get_extra_state |
| TENorm (RMSNorm) | weight, _extra_state | te.pytorch.ops BasicOperation.get_extra_state (TE ops/op.py) |
| TEDotProductAttention | (none; softmax_offset only with learnable softmax) | megatron TEDotProductAttention.sharded_state_dict |
| SequentialMLP / TEGroupedMLP | experts.linear_fc{1,2}.{weight,_extra_state} (global expert axis) | megatron experts.py sharded_state_dict |
| TopKRouter | weight | megatron router.py |
| GPTModel | embedding.word_embeddings.weight, decoder.final_layernorm (TENorm), output_layer.weight (its _extra_state popped) | gpt_model.py, transformer_block.py LayerNormImpl |
"""

from __future__ import annotations

import contextlib
from functools import partial


@contextlib.contextmanager
def te_spec_provider():
    """megatron's TE spec functions with the TE provider enabled (TE classes stay megatron's placeholders)."""
    from unittest import mock

    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs

    with mock.patch.object(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider), \
            mock.patch.object(provider, "is_te_min_version", lambda *a, **k: True):
        yield


def te_layer_spec(*, num_experts, qk_layernorm, frozen_aware_experts=False):
    """megatron's TE layer spec (or DeltaMoE's, runtime/specs.py te_layer_spec) under `te_spec_provider`."""
    from megatron.core.models.gpt import gpt_layer_specs

    from deltamoe.megatron_ext.runtime import specs

    with te_spec_provider():
        if frozen_aware_experts:
            return specs.te_layer_spec(num_experts=num_experts, moe_grouped_gemm=True, qk_layernorm=qk_layernorm)
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=True, qk_layernorm=qk_layernorm)


def _te_name(cls) -> str:
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.transformer.identity_op import IdentityOp

    if cls is IdentityOp:
        return "IdentityOp"
    if cls is te_ext.TENorm or cls is provider._TENormWithResidual:
        return "TENorm"
    for name in ("TELayerNormColumnParallelLinear", "TEColumnParallelLinear", "TERowParallelLinear",
                 "TEDotProductAttention"):
        if cls is getattr(te_ext, name):
            return name
    raise AssertionError(f"no key table entry for {cls!r}")


def _module_keys(cls, *, bias: bool = False) -> list[str]:
    name = _te_name(cls)
    return {
        "IdentityOp": [],
        "TEDotProductAttention": [],
        "TENorm": ["weight", "_extra_state"],
        "TELayerNormColumnParallelLinear": ["layer_norm_weight", "weight", *(["bias"] if bias else []), "_extra_state"],
        "TEColumnParallelLinear": ["weight", *(["bias"] if bias else []), "_extra_state"],
        "TERowParallelLinear": ["weight", "_extra_state"],
    }[name]


def requested_keys(layer_spec, *, qkv_bias: bool, tied: bool, shared_expert: bool = False,
                   shared_expert_gate: bool = False) -> set[str]:
    """Every torch_dist key (without shard suffixes) a GPTModel of `layer_spec` layers requests."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.router import TopKRouter

    sub = layer_spec.submodules
    keys = []
    keys += [f"input_layernorm.{k}" for k in _module_keys(sub.input_layernorm)]
    att = sub.self_attention.submodules
    keys += [f"self_attention.linear_qkv.{k}" for k in _module_keys(att.linear_qkv, bias=qkv_bias)]
    keys += [f"self_attention.core_attention.{k}" for k in _module_keys(att.core_attention)]
    keys += [f"self_attention.linear_proj.{k}" for k in _module_keys(att.linear_proj)]
    keys += [f"self_attention.q_layernorm.{k}" for k in _module_keys(att.q_layernorm)]
    keys += [f"self_attention.k_layernorm.{k}" for k in _module_keys(att.k_layernorm)]
    keys += [f"pre_mlp_layernorm.{k}" for k in _module_keys(sub.pre_mlp_layernorm)]
    mlp = sub.mlp
    assert isinstance(mlp, partial), mlp
    moe = mlp.keywords["submodules"]
    if hasattr(moe, "router"):
        assert moe.router is TopKRouter
        keys.append("mlp.router.weight")
        experts = moe.experts
        assert isinstance(experts, partial) and issubclass(experts.func, SequentialMLP), experts
        linears = experts.keywords["submodules"]
        keys += [f"mlp.experts.experts.linear_fc1.{k}" for k in _module_keys(linears.linear_fc1)]
        keys += [f"mlp.experts.experts.linear_fc2.{k}" for k in _module_keys(linears.linear_fc2)]
        if shared_expert:
            keys += ["mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc1._extra_state",
                     "mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.linear_fc2._extra_state"]
            if shared_expert_gate:
                keys.append("mlp.shared_experts.gate_weight")
    else:
        keys += [f"mlp.linear_fc1.{k}" for k in _module_keys(moe.linear_fc1)]
        keys += [f"mlp.linear_fc2.{k}" for k in _module_keys(moe.linear_fc2)]
    keys = [f"decoder.layers.{k}" for k in keys]
    # The spec's keys map (op-fuser names only in the TE spec) applies to the layer's keys.
    for old, new in sub.sharded_state_dict_keys_map.items():
        keys = [f"decoder.layers.{new}{k[len('decoder.layers.') + len(old):]}"
                if k.startswith(f"decoder.layers.{old}") else k for k in keys]
    keys += ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "decoder.final_layernorm._extra_state"]
    if not tied:  # GPTModel.sharded_state_dict pops output_layer._extra_state (gpt_model.py l. 890-897)
        keys += ["output_layer.weight"]
    return set(keys)


def checkpoint_model_keys(torch_dist_dir) -> set[str]:
    """The model keys a torch_dist checkpoint holds (no optimizer, RNG or megatron common state)."""
    from deltamoe.megatron_ext.runtime.checkpoint_layout import checkpoint_keys

    return {k for k in checkpoint_keys(torch_dist_dir)
            if k.startswith(("embedding.", "decoder.", "output_layer."))}
