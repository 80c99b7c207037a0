"""Upcycle a dense Hugging Face model into an HF MoE folder (Mixtral / Qwen2-MoE / Qwen3-MoE), following an UpcyclePlan.

The Megatron upcycle (`deltamoe upcycle`) is what training uses; this HF-space twin exists so tests and the demo can
build "an untrained upcycled MoE of B" without Megatron, and check that graft and export agree with it.

Function preservation, exactly (not approximately):
- Routers are zero, so the softmax is uniform; top-k picks k experts and the renormalised weights sum to 1. Every
  routed expert of the copy variant is the whole FFN, so the MoE block returns FFN(x). Renormalisation is always on in
  Mixtral; for Qwen2-MoE/Qwen3-MoE we write `norm_topk_prob: true` (without it the block would return k/E * FFN(x)).
- Qwen2-MoE always has a shared expert, added as `sigmoid(shared_expert_gate(x)) * shared_expert(x)`:
  * copy variant: the shared expert is all zeros (zero down_proj makes its output exactly 0 whatever the gate; a gate
    pushing the sigmoid "towards 0" would only be approximate). It stays dead unless someone trains it.
  * shared variant: the shared expert is the FFN with down_proj multiplied by 2 and a zero shared_expert_gate, so
    sigmoid(0) = 1/2 times 2 gives the FFN exactly (both factors are powers of two); the routed experts' down_proj is
    zero. This is the Megatron upcycle's layout too (megatron_ext/moe/upcycle.py: zero gate, doubled shared fc2).

One `fc2_scale` convention everywhere: an upcycle plan describes the tensors of the folder it sits in, i.e. each
expert's stored down-projection is `fc2_scale` times the dense FFN's. `build_plan(variant="shared")` gives the shared
expert fc2_scale 2 and the routed experts 0; the Megatron upcycle writes that plan, export copies it unchanged (the
Megatron and Qwen2-MoE tensors are the same), this HF upcycle takes the same plan and writes the same tensors, and
`deltamoe graft` gives each expert fc2_scale times the FFN's delta. A plan that would not preserve the function is
refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from deltamoe.architectures.moe import MOE_FORMATS, moe_hf_config
from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.outputs import atomic_output_dir
from deltamoe.common.hf_folder import copy_tokenizer_files, read_config
from deltamoe.converters.hf_moe_layout import FORMATS, MoEFormat, format_for_dense, parse_dense_name
from deltamoe.converters.safetensors_io import PlannedShardWriter, SafetensorsReader
from deltamoe.megatron_ext.moe.plan import ExpertSource, UpcyclePlan

QWEN2_MOE_SHARED_GATE_COMPENSATION = 2.0
"""1 / sigmoid(0): the shared expert's fc2_scale that cancels a zero shared_expert_gate (the plan's value)."""


def ffn_slice(tensor: torch.Tensor, proj: str, source: ExpertSource) -> torch.Tensor:
    """The part of a dense FFN tensor an expert takes: gate/up rows or down columns [start, stop), scaled (float32)."""
    t = tensor.float()
    part, scale = ((t[source.ffn_start:source.ffn_stop], source.fc1_scale) if proj in ("gate", "up")
                   else (t[:, source.ffn_start:source.ffn_stop], source.fc2_scale))
    return part if scale == 1.0 else part * scale  # a view when unscaled: callers never write into it


def _expert_width(plan: UpcyclePlan) -> int:
    widths = {e.ffn_stop - e.ffn_start for e in plan.routed_experts}
    if len(widths) != 1:
        raise DeltaMoEError(f"upcycle plan: routed experts have different widths {sorted(widths)}; HF MoE formats "
                            "need one expert size")
    for i, e in enumerate([*plan.routed_experts, *([plan.shared_expert] if plan.shared_expert else [])]):
        if not 0 <= e.ffn_start < e.ffn_stop <= plan.ffn_hidden_size:
            raise DeltaMoEError(f"upcycle plan: expert source {i} slice [{e.ffn_start}, {e.ffn_stop}) is outside the "
                                f"FFN (ffn_hidden_size {plan.ffn_hidden_size})")
    return widths.pop()


def moe_config(dense: dict, fmt: MoEFormat, plan: UpcyclePlan) -> dict:
    """The MoE config.json: the one `deltamoe export` writes for the same model (architectures.moe.moe_hf_config)."""
    shared = plan.shared_expert
    moe = {"num_experts": plan.num_experts, "topk": plan.topk, "ffn_hidden_size": _expert_width(plan),
           "shared_expert_intermediate_size": (shared.ffn_stop - shared.ffn_start) if shared else None}
    return moe_hf_config(dense, MOE_FORMATS[fmt.name], moe)


def _check_plan(plan: UpcyclePlan, fmt: MoEFormat, dense: dict) -> None:
    if plan.ffn_hidden_size != dense.get("intermediate_size"):
        raise DeltaMoEError(f"upcycle plan: ffn_hidden_size ({plan.ffn_hidden_size}) differs from the dense "
                            f"config's intermediate_size ({dense.get('intermediate_size')})")
    if plan.noise_std != 0.0 or plan.router_init != "zeros":
        raise DeltaMoEError("upcycle plan: the HF upcycle makes exact copies with zero routers "
                            f"(noise_std 0, router_init 'zeros'); got noise_std {plan.noise_std}, router_init {plan.router_init!r}")
    if plan.shared_expert is not None and not fmt.has_shared_expert:
        raise DeltaMoEError(f"upcycle plan: variant {plan.variant!r} has a shared expert but {fmt.name} has none "
                            f"(use {[f for f, v in FORMATS.items() if v.has_shared_expert]})")
    if plan.variant == "shared" and plan.shared_expert is None:
        raise DeltaMoEError("upcycle plan: variant 'shared' needs a shared_expert source")
    _check_function_preserving(plan)


def _check_function_preserving(plan: UpcyclePlan) -> None:
    """The written MoE must compute the dense model: copy variant = full copies (renormalised weights sum to 1);
    shared variant = shared expert with fc2_scale 1 / sigmoid(0) and routed experts with a zero read-out."""
    ffn = plan.ffn_hidden_size
    shared = plan.shared_expert
    if shared is not None:
        if (shared.ffn_start, shared.ffn_stop, shared.fc1_scale) != (0, ffn, 1.0) or \
                shared.fc2_scale != QWEN2_MOE_SHARED_GATE_COMPENSATION:
            raise DeltaMoEError(
                f"upcycle plan: shared expert [{shared.ffn_start}, {shared.ffn_stop}) fc1_scale {shared.fc1_scale} "
                f"fc2_scale {shared.fc2_scale}; the zero shared_expert_gate gives it weight sigmoid(0) = 1/2, so it must be "
                f"the whole FFN with fc2_scale {QWEN2_MOE_SHARED_GATE_COMPENSATION} (the plan `deltamoe upcycle "
                "--variant shared` writes) for the MoE to compute the dense model")
        bad = [e for e, src in enumerate(plan.routed_experts) if src.fc2_scale != 0.0]
        if bad:
            raise DeltaMoEError(f"upcycle plan: routed expert {bad[0]} has fc2_scale {plan.routed_experts[bad[0]].fc2_scale}; "
                                "next to a shared expert that already computes the FFN, routed experts start with a "
                                "zero read-out (fc2_scale 0)")
        return
    bad = [e for e, src in enumerate(plan.routed_experts)
           if (src.ffn_start, src.ffn_stop, src.fc1_scale, src.fc2_scale) != (0, ffn, 1.0, 1.0)]
    if bad:
        raise DeltaMoEError(f"upcycle plan: routed expert {bad[0]} is not a full, unscaled copy of the FFN; the copy "
                            "variant is exact only when every routed expert is")


def _moe_layout(reader: SafetensorsReader, plan: UpcyclePlan, fmt: MoEFormat, config: dict, *, num_layers: int,
                hidden: int) -> list[tuple[str, torch.dtype, list[int], tuple]]:
    """Every output tensor in write order: (name, dtype, shape, (dense tensor, projection, expert source)).

    The dense model's tensors shard by shard (an FFN tensor becomes its experts, then the shared expert), then the
    zero routers and gates in the dtype of the first tensor.
    """
    layout = []
    names = [n for names in reader.keys_by_shard().values() for n in names]
    for name in names:
        dtype, shape = reader.dtype(name), reader.shape(name)
        ffn = parse_dense_name(name)
        if ffn is None:
            layout.append((name, dtype, shape, (name, None, None)))
            continue
        layer, proj = ffn
        for j, source in enumerate(plan.routed_experts):
            sliced = list(ffn_slice(torch.empty(shape, device="meta"), proj, source).shape)
            layout.append((fmt.expert_name(layer, j, proj), dtype, sliced, (name, proj, source)))
        if fmt.has_shared_expert:
            if plan.shared_expert is not None:
                sliced = list(ffn_slice(torch.empty(shape, device="meta"), proj, plan.shared_expert).shape)
            else:
                width = config["shared_expert_intermediate_size"]
                sliced = [width, shape[1]] if proj != "down" else [shape[0], width]
            layout.append((fmt.shared_expert_name(layer, proj), dtype, sliced, (name, proj, plan.shared_expert)))
    first = reader.dtype(names[0])
    for layer in range(num_layers):
        layout.append((fmt.router_name(layer), first, [plan.num_experts, hidden], (None, None, None)))
        if fmt.has_shared_expert:
            layout.append((fmt.shared_expert_gate_name(layer), first, [1, hidden], (None, None, None)))
    return layout


def upcycle_hf(dense_dir: str | os.PathLike, out_dir: str | os.PathLike, plan: UpcyclePlan, fmt: str | None = None, *,
               overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write an HF MoE folder of format `fmt` (default: the dense model's counterpart) made from `dense_dir`."""
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    dense = read_config(dense_dir)
    counterpart = format_for_dense(dense.get("model_type"), f"{dense_dir}/config.json")
    if fmt is not None and fmt != counterpart.name:
        raise DeltaMoEError(f"{dense_dir}/config.json: a {dense.get('model_type')} model upcycles to "
                            f"{counterpart.name}, not {fmt}")
    fmt_ = counterpart
    _check_plan(plan, fmt_, dense)
    config = moe_config(dense, fmt_, plan)
    shared_source = plan.shared_expert
    reader = SafetensorsReader(dense_dir)
    num_layers = dense["num_hidden_layers"]
    with atomic_output_dir(out_dir, inputs=[dense_dir], overwrite=overwrite) as tmp, \
            reader.hash_while_reading(patterns=("*.safetensors",)) as hasher:  # each byte read once
        layout = _moe_layout(reader, plan, fmt_, config, num_layers=num_layers, hidden=dense["hidden_size"])
        writer = PlannedShardWriter(tmp, [(name, dtype, shape) for name, dtype, shape, _ in layout],
                                    max_shard_bytes=max_shard_bytes)
        try:
            upcast: tuple[str, torch.Tensor] | None = None  # the dense FFN tensor in float32, for all its experts
            for name, dtype, shape, (dense_name, proj, source) in layout:
                if dense_name is None:  # routers and shared-expert gates start at zero
                    writer.add(name, writer.buffer(name).zero_())
                elif proj is None:  # not an FFN tensor: as it is
                    writer.add(name, reader.get(dense_name))
                else:
                    if upcast is None or upcast[0] != dense_name:
                        upcast = (dense_name, reader.get(dense_name).float())
                    out = writer.buffer(name)
                    if source is None:  # copy variant's shared expert: its output is exactly zero
                        out.zero_()
                    else:
                        out.copy_(ffn_slice(upcast[1], proj, source))  # = ffn_slice(...).to(dtype)
                    writer.add(name, out)
            writer.finish()
        finally:
            writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        dataclasses.replace(plan, base_architecture=dense["model_type"], base_sha256=hasher.result()).save(tmp)
        copy_tokenizer_files(dense_dir, tmp)
    return out_dir
