"""The one torch_dist key layout DeltaMoE writes: the one megatron-core's Transformer Engine spec loads.

DESIGN.md decision 11. Module names differ between layer specs, so what is fixed is the `torch_dist` key of every
tensor. The names below are read from megatron-core 0.19.2 (megatron/core/models/gpt/gpt_layer_specs.py,
`get_gpt_layer_with_transformer_engine_submodules`, the non-MLA branch, lines 317-345):

| tensor | TE spec module | torch_dist key |
|---|---|---|
| attention input norm | fused into `linear_qkv = TELayerNormColumnParallelLinear` (l. 324; `input_layernorm` stays IdentityOp) | `self_attention.linear_qkv.layer_norm_weight` |
| q / k norms | `TENorm` (l. 318 `backend.layer_norm(for_qk=True)`) | `self_attention.{q,k}_layernorm.weight`, `._extra_state` |
| dense pre-MLP norm | fused into `mlp.linear_fc1 = TELayerNormColumnParallelLinear` (l. 336 IdentityOp; l. 542-543 `fuse_layernorm_and_linear`) | `mlp.linear_fc1.layer_norm_weight` |
| MoE pre-MLP norm | a `TENorm` of its own (l. 336 `backend.layer_norm(has_residual=True) if num_experts`); the spec's keys map (l. 339) renames only op-fuser names | `pre_mlp_layernorm.weight`, `._extra_state` |
| final norm | `TENorm` (transformer_block.py l. 53-56, `LayerNormImpl = TENorm` when TE imports) | `decoder.final_layernorm.weight`, `._extra_state` |
| experts | `TEGroupedMLP` or `SequentialMLP` of TE linears | `mlp.experts.experts.linear_fc{1,2}.weight` with a global expert axis (experts.py l. 951 "Add prefix here to match sequential's keys"; l. 1395) |

`_extra_state` of the TE norms: TE's RMSNorm is a `transformer_engine.pytorch.ops` BasicOperation whose
`get_extra_state` puts an entry in its state dict (TransformerEngine `transformer_engine/pytorch/ops/op.py`), and
megatron's `sharded_state_dict_default` makes it a ShardedObject the TE model requests on load; without it the load
stops with "Missing key in checkpoint state_dict: ...q_layernorm._extra_state" (reported e.g. in NVIDIA/cosmos#69).
Keys a checkpoint holds that a model does not request are ignored by megatron's default load strictness
(`assume_ok_unexpected`), so writing them is harmless for TE versions whose norms have none.

Megatron's local spec maps both norms to TE's fused names in every layer, MoE layers included (l. 459-462), and has
no `_extra_state` for its norms: DeltaMoE's checkpoints before this layout came from it ("legacy"). They are read
(`fit_request_to_checkpoint`), never written.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError

FUSED_INPUT_NORM = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
FUSED_PRE_MLP_NORM = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}

# Legacy MoE layers: the pre-MLP norm under the dense layer's fused name.
_LEGACY_MOE_NORM = ("decoder.layers.pre_mlp_layernorm.", "decoder.layers.mlp.linear_fc1.layer_norm_")
_EXTRA_STATE = "_extra_state"


def keys_map(*, is_moe: bool) -> dict[str, str]:
    """`TransformerLayerSubmodules.sharded_state_dict_keys_map` that gives a non-TE layer the TE spec's keys."""
    return dict(FUSED_INPUT_NORM) if is_moe else {**FUSED_INPUT_NORM, **FUSED_PRE_MLP_NORM}


def te_layout_submodules(submodules, *, is_moe: bool):
    """A non-TE `TransformerLayerSubmodules` with DeltaMoE's norms and the TE spec's checkpoint keys.

    Norms TE fuses into the next linear are plain sequence-parallel norms under a keys map; norms TE keeps as modules
    of their own (q/k, MoE pre-MLP) carry TE's `_extra_state` entry (layers/norm.py).
    """
    from megatron.core.transformer.identity_op import IdentityOp

    from deltamoe.megatron_ext.layers.norm import FastNorm, StandaloneFastNorm

    attention = submodules.self_attention
    attn_sub = attention.submodules
    qk = {name: (StandaloneFastNorm if getattr(attn_sub, name) is not IdentityOp else IdentityOp)
          for name in ("q_layernorm", "k_layernorm")}
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(attn_sub, **qk))
    return dataclasses.replace(
        submodules,
        input_layernorm=FastNorm,
        self_attention=attention,
        pre_mlp_layernorm=StandaloneFastNorm if is_moe else FastNorm,
        sharded_state_dict_keys_map=keys_map(is_moe=is_moe),
    )


def checkpoint_keys(torch_dist_dir: str | os.PathLike) -> set[str]:
    """The keys a torch_dist checkpoint holds (ShardedObject entries without their `/shard_...` suffix)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(torch_dist_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is the same problem for the user
        raise DeltaMoEError(f"{torch_dist_dir}: torch_dist metadata unreadable: {e}") from None
    return {key.split("/shard_")[0] for key in metadata.state_dict_metadata}


def legacy_layout_reasons(keys: set[str], *, is_moe: bool) -> list[str]:
    """Why a checkpoint with these keys is in a layout DeltaMoE no longer writes (empty: the current layout)."""
    reasons = []
    old, new = _LEGACY_MOE_NORM
    if is_moe and f"{new}weight" in keys and f"{old}weight" not in keys:
        reasons.append(f"the MoE pre-MLP norm is stored as {new}weight, not {old}weight")
    if "decoder.final_layernorm.weight" in keys and f"decoder.final_layernorm.{_EXTRA_STATE}" not in keys:
        reasons.append(f"the norms have no {_EXTRA_STATE} entries (decoder.final_layernorm.{_EXTRA_STATE})")
    return reasons


def fit_request_to_checkpoint(sharded_state_dict: dict, available: set[str], source: str) -> list[str]:
    """Make a load request for the current layout read a checkpoint in the legacy layout, in place.

    Renames the MoE pre-MLP norm to its legacy key when only that one is stored, and drops requested `_extra_state`
    entries the checkpoint lacks (they hold no weights). Returns the state-dict names whose extra state was dropped;
    any other requested key that is absent is an error naming it.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    old, new = _LEGACY_MOE_NORM
    dropped = []
    for name, entry in list(sharded_state_dict.items()):
        key = entry.key
        if key in available:
            continue
        if key.startswith(old) and f"{new}{key[len(old):]}" in available:
            entry.key = f"{new}{key[len(old):]}"
            continue
        if isinstance(entry, ShardedObject) and key.endswith(_EXTRA_STATE):
            del sharded_state_dict[name]
            dropped.append(name)
            continue
        raise DeltaMoEError(f"{source}: tensor {key!r} is not in the checkpoint (the model needs it)")
    return dropped


def check_trainer_can_load(folder: str | os.PathLike, *, is_moe: bool, flag: str) -> None:
    """Refuse, before Megatron starts, a checkpoint the trainer would fail to load for its key layout.

    Megatron-LM's loader requests every key of the current layout (default strictness `assume_ok_unexpected`), so a
    legacy checkpoint would stop deep inside torch.distributed.checkpoint with "Missing key in checkpoint".
    """
    from deltamoe.megatron_ext.runtime.checkpoint import TRACKER_FILE, checkpoint_dir

    folder = Path(folder)
    if not (folder / TRACKER_FILE).exists():
        return
    reasons = legacy_layout_reasons(checkpoint_keys(checkpoint_dir(folder)), is_moe=is_moe)
    if reasons:
        raise DeltaMoEError(
            f"{flag} {folder}: written in DeltaMoE's legacy torch_dist key layout ({'; '.join(reasons)}); the trainer "
            "loads only the Transformer Engine spec's layout. `deltamoe export` still reads it. To train from it, "
            f"rewrite its weights once: `deltamoe rewrite-checkpoint --megatron {folder} --out NEW`, then pass "
            "--pretrained-checkpoint NEW (a fresh optimizer, as when a stage starts)")
