"""Export a Megatron checkpoint (dense, or an upcycled MoE from any TP/EP layout) to Hugging Face safetensors.

Examples:
    deltamoe export --megatron /ckpt/qwen2.5-0.5b-megatron --out /models/qwen2.5-0.5b-roundtrip
    deltamoe export --megatron /ckpt/llama-moe-stage2 --out /models/llama-deltamoe --format auto   # -> Mixtral

A dense checkpoint exports to its source architecture with its original config.json, field for field
(only the dtype field follows --dtype). An MoE exports to Mixtral
(Llama family), Qwen2-MoE or Qwen3-MoE, exactly or not at all (DESIGN.md decision 12): the format is checked against
the source architecture and the routing the checkpoint records (architectures/moe.py lists what each format holds),
and `--format auto` takes the architecture's own format when it holds the model, else the first that does (a Llama
shared variant, or a Llama trained without top-k renormalisation, goes to Qwen2-MoE). The checkpoint is read in one
process at TP=EP=1, one tensor at a time as the output needs it (runtime/streamed_checkpoint.py: whatever TP/EP layout
it was saved with is reassembled, and memory holds a few tensors, never the model). A pass over the tensors' shapes
alone lays out the shards first, so a writer thread puts each tensor in its place as it comes (safetensors_io.py,
`PlannedShardWriter`); the index and a model card (README.md) that says how the model routes come with them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.outputs import atomic_output_dir, check_output_dir
from deltamoe.common.hf_folder import TOKENIZER_FILES
from deltamoe.architectures import read_architecture_config
from deltamoe.architectures.moe import MOE_FORMATS, choose_format, moe_hf_config
from deltamoe.converters.mapping import expand_rules
from deltamoe.converters.model_card import write_export_card
from deltamoe.converters.safetensors_io import PlannedShardWriter
from deltamoe.converters.transforms import to_hf

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--megatron", required=True, help="Megatron checkpoint folder (from import/upcycle/training)")
    parser.add_argument("--out", required=True, help="output Hugging Face folder (must not exist)")
    parser.add_argument("--format", default="auto", choices=["auto", *MOE_FORMATS], help="HF MoE format for MoE checkpoints")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="output dtype (auto: the checkpoint's)")
    parser.add_argument("--max-shard-size-gb", type=float, default=2.0, help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def dense_hf_config(imported: dict, out_dtype: torch.dtype) -> dict:
    """The config.json a dense checkpoint was imported from, field for field, order kept. The one field that can
    change is the weights' dtype, under the name the source used (`dtype`, or 4.x's `torch_dtype`): it names the
    exported tensors' dtype. A source without either keeps none (transformers then reads the tensors' dtype)."""
    config = dict(imported)
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = str(out_dtype).removeprefix("torch.")
    return config


def hf_tensors(state: Mapping[str, torch.Tensor], hf_config: dict, *, moe: dict | None, fmt_name: str | None,
               ignored_config_fields=()):
    """Yield (hf_name, tensor) from a whole (TP=EP=1) megatron state dict; every megatron tensor must be consumed.

    Each tensor is looked up once, when its HF tensors are due: `state` may read it from disk then
    (`StreamedCheckpoint`)."""
    arch, config = read_architecture_config(hf_config, ignored_fields=ignored_config_fields)
    if moe is not None:
        choose_format(fmt_name, config, moe)  # the format holds this model exactly, or a DeltaMoEError says why not
    if moe is None:
        bindings = expand_rules(arch.rules, config)
    else:
        fmt = MOE_FORMATS[fmt_name]
        flags = {"shared_expert": bool(moe.get("shared_expert_intermediate_size")),
                 "shared_expert_gate": bool(moe.get("shared_expert_gate"))}
        bindings = expand_rules(fmt.rules, _WithFlags(config, flags), num_experts=moe["num_experts"])
    params = {k for k in state if not k.endswith("._extra_state")}
    if config.tie_word_embeddings:
        params.discard("output_layer.weight")
    unused = sorted(params - set(bindings))
    if unused:
        raise DeltaMoEError(f"megatron tensor {unused[0]!r} has no mapping to the HF format ({len(unused)} unmapped)")
    ungated_shared = moe is not None and fmt_name == "qwen2_moe" and _ungated_shared(moe)
    for name, binding in bindings.items():
        if name not in params:
            raise DeltaMoEError(f"megatron checkpoint lacks tensor {name!r}")
        tensor = state[name]
        if ungated_shared and name.endswith("shared_experts.linear_fc2.weight"):
            tensor = tensor * UNGATED_SHARED_FC2_SCALE
        for hf_name, t in zip(binding.hf, to_hf(binding.rule.transform, tensor, config)):
            yield hf_name, t
    if moe is not None and fmt_name == "qwen2_moe" and not moe.get("shared_expert_intermediate_size"):
        yield from _zero_shared_experts(config)
    if ungated_shared:
        for i in range(config.num_layers):
            yield f"model.layers.{i}.mlp.shared_expert_gate.weight", torch.zeros(1, config.hidden_size)


# Qwen2-MoE always gates its shared expert with sigmoid(shared_expert_gate(x)). An ungated megatron shared expert is
# exported with a zero gate (sigmoid = 1/2 for every token) and its down-projection doubled: the same function. The
# exported upcycle plan records the doubled scale, so graft adds a doubled FFN delta to that expert too.
UNGATED_SHARED_FC2_SCALE = 2.0


def _ungated_shared(moe: dict) -> bool:
    return bool(moe.get("shared_expert_intermediate_size")) and not moe.get("shared_expert_gate")


def _zero_shared_experts(config):
    """Qwen2-MoE always has a shared expert: a 1-wide one with zero down-projection adds exactly nothing."""
    from deltamoe.architectures.moe import ZERO_SHARED_EXPERT_SIZE as n

    for i in range(config.num_layers):
        p = f"model.layers.{i}.mlp"
        yield f"{p}.shared_expert.gate_proj.weight", torch.zeros(n, config.hidden_size)
        yield f"{p}.shared_expert.up_proj.weight", torch.zeros(n, config.hidden_size)
        yield f"{p}.shared_expert.down_proj.weight", torch.zeros(config.hidden_size, n)
        yield f"{p}.shared_expert_gate.weight", torch.zeros(1, config.hidden_size)


class _WithFlags:
    """An ArchitectureConfig with extra rule flags (shared_expert, shared_expert_gate)."""

    def __init__(self, config, flags: dict[str, bool]):
        self._config, self._flags = config, flags

    def __getattr__(self, name):
        return self._flags[name] if name in self._flags else getattr(self._config, name)


def export(megatron_dir: str | Path, out: str | Path, *, fmt: str = "auto", dtype: str = "auto",
           max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False, spec: str | None = None) -> Path:
    from deltamoe.megatron_ext.moe.plan import PLAN_FILE, UpcyclePlan
    from deltamoe.megatron_ext.runtime.checkpoint import read_metadata
    from deltamoe.megatron_ext.runtime.streamed_checkpoint import StreamedCheckpoint
    from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed, world_size_from_env

    # Before anything that could fail on one rank only: every rank of a torchrun launch stops here at once.
    if world_size_from_env() != 1:
        raise DeltaMoEError("export runs in one process (torch_dist reshards any saved layout); launch it without torchrun")
    started = time.time()
    megatron_dir = Path(megatron_dir)
    meta = read_metadata(megatron_dir)
    check_output_dir(out, inputs=[megatron_dir], overwrite=overwrite)
    arch, arch_config = meta.architecture(str(megatron_dir / "deltamoe.json"))
    if fmt != "auto" and not meta.moe:
        raise DeltaMoEError(f"{megatron_dir} is a dense checkpoint; --format applies to MoE checkpoints only")
    fmt_name = choose_format(fmt, arch_config, meta.moe) if meta.moe else None

    init_distributed(ParallelLayout())
    if torch.distributed.get_world_size() != 1:
        raise DeltaMoEError("export runs in one process (torch_dist reshards any saved layout); launch it without torchrun")
    from deltamoe.megatron_ext.runtime.specs import CONVERSION_SPEC

    # Grouped-GEMM training checkpoints are read through the sequential-expert model's request: the torch_dist keys
    # are the same. The legacy key layout reads too (runtime/checkpoint_layout.py). Each tensor is read from disk when
    # its HF tensors are written, so memory holds a few tensors, not the model.
    state = StreamedCheckpoint(megatron_dir, spec=spec or CONVERSION_SPEC,
                               moe_overrides={"grouped_gemm": False} if meta.moe else None)
    meta = state.meta
    # Megatron keeps some tensors (norms) in float32 whatever the model dtype: write everything in one dtype.
    out_dtype = DTYPES[dtype] or getattr(torch, meta.params_dtype)
    if meta.moe:
        hf_config = moe_hf_config(meta.hf_config, MOE_FORMATS[fmt_name], meta.moe,
                                  ignored_fields=meta.ignored_config_fields)
        hf_config["dtype"] = str(out_dtype).removeprefix("torch.")
    else:
        hf_config = dense_hf_config(meta.hf_config, out_dtype)

    def tensors(source):
        return hf_tensors(source, meta.hf_config, moe=meta.moe, fmt_name=fmt_name,
                          ignored_config_fields=meta.ignored_config_fields)

    # The conversion run over shapes alone plans the shards (the layout ShardWriter would give these tensors in this
    # order); a writer thread then puts each tensor at its place while the next one is read and converted.
    planned = [(hf_name, out_dtype, list(t.shape)) for hf_name, t in tensors(state.shapes())]
    with atomic_output_dir(out, inputs=[megatron_dir], overwrite=overwrite) as tmp:
        writer = PlannedShardWriter(tmp, planned, max_shard_bytes=max_shard_bytes)
        try:
            for hf_name, t in tqdm(tensors(state), desc="export", total=len(planned)):
                writer.add(hf_name, t.to(out_dtype))
            writer.finish()
        finally:
            writer.close()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (megatron_dir / name).exists():
                shutil.copy2(megatron_dir / name, tmp / name)
        if (megatron_dir / PLAN_FILE).exists():
            plan = UpcyclePlan.load(megatron_dir)
            if fmt_name == "qwen2_moe" and _ungated_shared(meta.moe) and plan.shared_expert is not None:
                plan.shared_expert.fc2_scale *= UNGATED_SHARED_FC2_SCALE
            plan.save(tmp)
        write_export_card(tmp, name=Path(out).name, megatron_dir=megatron_dir, meta=meta, hf_format=fmt_name or arch.name,
                          routing=routing_section(meta, hf_config) if meta.moe else None)
    print(f"exported {megatron_dir} -> {out} ({fmt_name or arch.name}) in {time.time() - started:.1f}s")
    masked = sorted(s for s, run in (meta.source.get("training") or {}).items() if run.get("expert_allocation") == "by-language")
    if meta.moe and masked:
        print(f"note: {', '.join(masked)} trained with --expert-allocation by-language; that mask is a training-time "
              "device: the exported model routes every token by its routers alone (README.md says so)")
    return Path(out)


def routing_section(meta, hf_config: dict) -> list[str]:
    """The model card's routing lines for an exported MoE: the router alone decides, whatever training used."""
    training = meta.source.get("training") or {}
    allocated = sorted(stage for stage, run in training.items() if run.get("expert_allocation") == "by-language")
    lines = [
        "Inference routes every token by the router alone: softmax over all experts, top-k, "
        + ("then the top-k weights renormalised to sum to 1." if hf_config.get("norm_topk_prob", True)
           else "without renormalising the top-k weights (trained with --moe-router-pre-softmax)."),
        "No language tag is read at inference. The config and tensors compute the trained Megatron model's function: "
        "`deltamoe export` writes only formats that do (checked against Megatron's float32 logits in DeltaMoE's "
        "tests) and refuses the others.",
    ]
    if allocated:
        lines.append(f"Training ({', '.join(allocated)}) masked each token's router to its language's experts "
                     "(`--expert-allocation by-language`); that mask was a training-time device and is not part of this "
                     "model: untagged text is routed by what the routers learned.")
    return lines


def main(args: argparse.Namespace) -> int:
    export(args.megatron, args.out, fmt=args.format, dtype=args.dtype,
           max_shard_bytes=int(args.max_shard_size_gb * 1024**3), overwrite=args.overwrite)
    return 0
