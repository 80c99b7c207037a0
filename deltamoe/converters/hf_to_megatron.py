"""Import a dense Hugging Face checkpoint into a Megatron `torch_dist` checkpoint that Megatron-LM's trainer loads.

Example (one process; a CPU is enough):
    deltamoe import --hf /models/Qwen2.5-0.5B --out /ckpt/qwen2.5-0.5b-megatron

Tensor-parallel layout at import (the checkpoint still loads at any TP/PP afterwards):
    torchrun --nproc-per-node 2 -m deltamoe import --hf /models/Llama-3.2-1B --out /ckpt/llama --tp 2

Then train with `--load /ckpt/llama --ckpt-format torch_dist --tokenizer-model /ckpt/llama`.

Imports are exact or refused. Every config.json field is accounted for by the architecture's config table
(`python -m deltamoe.architectures` prints them): mapped to a megatron-core setting, known not to change the function,
or refused unless at its neutral value. A field the table does not know is refused too; once you know it leaves the
function unchanged, name it (recorded in the checkpoint's deltamoe.json):
    deltamoe import --hf /models/custom-llama --out /ckpt/custom --ignore-config-field my_serving_hint
Every HF tensor is consumed by the architecture's mapping table or dropped explicitly; shapes are checked tensor by
tensor; tensors are read lazily from the safetensors shards. The output appears only when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from tqdm import tqdm

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.faults import fault_point
from deltamoe.common.outputs import (
    begin_output_dir, check_output_dir, commit_output_dir, discard_output_dir, disk_full_error, is_disk_full,
)
from deltamoe.common.hf_folder import copy_tokenizer_files, read_config
from deltamoe.architectures import read_architecture_config
from deltamoe.architectures.base import Transform
from deltamoe.converters.mapping import check_hf_accounting, expand_rules, global_name
from deltamoe.converters.safetensors_io import SafetensorsReader
from deltamoe.converters.transforms import tensor_parallel_slice, to_megatron

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output Megatron checkpoint folder (must not exist)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this import run (needs that many processes)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this import run")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="parameter dtype (auto: the HF weights' dtype)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="pad the vocabulary to a multiple of this, as Megatron-LM's trainer does")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--ignore-config-field", action="append", default=[], metavar="FIELD", dest="ignore_config_fields",
                        help="accept config.json field FIELD that DeltaMoE's architecture table does not know (a newer "
                             "transformers, a custom config), as transformers' model class ignores it; only when it does "
                             "not change the model's function. Repeatable; a RoPE key is rope_parameters.KEY. Recorded in "
                             "the checkpoint's deltamoe.json. Known fields that change the function cannot be ignored")
    parser.add_argument("--distributed-timeout-minutes", type=float, default=None,
                        help="with several processes: how long a rank waits for a stuck or vanished one (default 10)")


def _hf_dtype(reader: SafetensorsReader) -> torch.dtype:
    name = next(iter(reader.keys()))
    return reader.get(name).dtype


def convert_into(model, reader: SafetensorsReader, hf_config: dict, *, padded_vocab: int, source: str,
                 ignored_config_fields=()) -> None:
    """Fill a Megatron model (this rank's shard) from a HF reader, checking every tensor's shape."""
    from megatron.core import parallel_state

    arch, config = read_architecture_config(hf_config, source=f"{source}/config.json",
                                            ignored_fields=ignored_config_fields)
    bindings = expand_rules(arch.rules, config)
    check_hf_accounting(bindings, reader.keys(), arch.dropped_hf, source)
    _check_shapes(bindings, reader, config, source)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    offset = _layer_offset(model)
    params = dict(model.named_parameters())
    if config.tie_word_embeddings and "output_layer.weight" in params:
        params.pop("output_layer.weight")  # tied: shares the embedding on the last pipeline stage
    with torch.no_grad():
        for local_name, param in tqdm(params.items(), desc="import", disable=torch.distributed.get_rank() != 0):
            name = global_name(local_name, offset)
            if name not in bindings:
                raise DeltaMoEError(f"{source}: megatron parameter {name!r} has no mapping for {arch.name}")
            binding = bindings[name]
            full = to_megatron(binding.rule.transform, [reader.get(h) for h in binding.hf], config, padded_vocab)
            local = full
            if getattr(param, "tensor_model_parallel", False):
                local = tensor_parallel_slice(
                    full, partition_dim=param.partition_dim, rank=tp_rank, size=tp_size,
                    gated=binding.rule.transform is Transform.GATED_FC1,
                )
            if tuple(local.shape) != tuple(param.shape):
                raise DeltaMoEError(
                    f"{source}: {binding.hf[0]} gives {name} of shape {tuple(local.shape)}, model expects {tuple(param.shape)}"
                )
            param.copy_(local.to(param.dtype))


def _layer_offset(model) -> int:
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    return layers[0].layer_number - 1 if layers is not None and len(layers) else 0


def _check_shapes(bindings, reader: SafetensorsReader, config, source: str) -> None:
    """Shapes HF tensors must have for the config (nanoGPT's from_pretrained check), before any conversion work."""
    h, d = config.hidden_size, config.kv_channels
    expected_by_suffix = {
        "embed_tokens.weight": (config.vocab_size, h),
        "lm_head.weight": (config.vocab_size, h),
        "q_proj.weight": (config.num_attention_heads * d, h),
        "k_proj.weight": (config.num_query_groups * d, h),
        "v_proj.weight": (config.num_query_groups * d, h),
        "q_proj.bias": (config.num_attention_heads * d,),
        "k_proj.bias": (config.num_query_groups * d,),
        "v_proj.bias": (config.num_query_groups * d,),
        "o_proj.weight": (h, config.num_attention_heads * d),
        "gate_proj.weight": (config.ffn_hidden_size, h),
        "up_proj.weight": (config.ffn_hidden_size, h),
        "down_proj.weight": (h, config.ffn_hidden_size),
        "q_norm.weight": (d,),
        "k_norm.weight": (d,),
        "layernorm.weight": (h,),
        "norm.weight": (h,),
    }
    for binding in bindings.values():
        for name in binding.hf:
            suffix = next((s for s in expected_by_suffix if name.endswith(s)), None)
            shape = tuple(reader.shape(name))
            if suffix and shape != expected_by_suffix[suffix]:
                raise DeltaMoEError(
                    f"{source}: tensor {name!r} has shape {shape}, config.json implies {expected_by_suffix[suffix]}"
                )


def import_hf(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, dtype: str = "auto",
              vocab_divisible_by: int = 128, overwrite: bool = False, ignore_config_fields=(),
              spec: str | None = None, timeout_minutes: float | None = None) -> Path:
    """Convert; every rank of the (tp x pp) group calls this. Returns the output folder.

    `spec` is the module tree the weights pass through (default: specs.CONVERSION_SPEC); the files do not depend on
    it, nor on whether Transformer Engine is installed.

    The process group exists before any input is read, and every step between collectives is agreed on by all
    ranks, so a rank that fails (a bad input on its node, a full disk) stops every rank with an error instead of
    leaving them in a barrier.
    """
    from deltamoe.megatron_ext.runtime.checkpoint import CheckpointMetadata, save_checkpoint
    from deltamoe.megatron_ext.runtime.distributed import (
        DEFAULT_TIMEOUT_MINUTES, ParallelLayout, all_ranks_agree, init_distributed, init_process_group,
        peer_failures_as_errors, world_size_from_env,
    )
    from deltamoe.megatron_ext.runtime.model_builder import (
        build_gpt_model, check_tensor_parallel, padded_vocab_size, transformer_config,
    )

    timeout_minutes = timeout_minutes or DEFAULT_TIMEOUT_MINUTES
    if world_size_from_env() > 1:  # one process cannot wait for another: it checks first, as cheaply as possible
        init_process_group(timeout_minutes=timeout_minutes)
    hf_dir = Path(hf_dir)
    with all_ranks_agree("import: checking the inputs"):
        hf_config = read_config(hf_dir)
        ignored = sorted(set(ignore_config_fields))
        _, config = read_architecture_config(hf_config, source=str(hf_dir / "config.json"), ignored_fields=ignored)
        padded = padded_vocab_size(config.vocab_size, vocab_divisible_by)
        check_tensor_parallel(config, tp, padded, source=str(hf_dir / "config.json"))
        if config.num_layers % pp:
            raise DeltaMoEError(f"{hf_dir}/config.json: pipeline-parallel size {pp} does not divide num_hidden_layers ({config.num_layers})")
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else world_size_from_env()
        if world != tp * pp:
            raise DeltaMoEError(f"import runs with tp x pp = {tp * pp} processes, got {world} (launch with torchrun --nproc-per-node {tp * pp})")
        check_output_dir(out, inputs=[hf_dir], overwrite=overwrite)
        reader = SafetensorsReader(hf_dir)
        params_dtype = _hf_dtype(reader) if dtype == "auto" else DTYPES[dtype]
        fault_point("import:inputs-checked")

    init_distributed(ParallelLayout(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                     timeout_minutes=timeout_minutes)
    from megatron.core import parallel_state

    is_rank0 = torch.distributed.get_rank() == 0
    with all_ranks_agree("import: converting the weights"):
        # Every parameter is overwritten from the HF tensors (convert_into refuses one without a mapping): skip megatron's
        # random initialisation, a tenth of a CPU import's time.
        cfg = transformer_config(config, params_dtype=params_dtype, tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp, perform_initialization=False)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        from deltamoe.megatron_ext.runtime.specs import CONVERSION_SPEC

        model = build_gpt_model(config, cfg, padded_vocab=padded, spec=spec or CONVERSION_SPEC,
                                pre_process=pp_rank == 0, post_process=pp_rank == pp - 1)
        # Rank 0 hashes the files for the checkpoint's metadata while it reads them: each byte is read once.
        with reader.hash_while_reading() if is_rank0 else contextlib.nullcontext() as hasher:
            convert_into(model, reader, hf_config, padded_vocab=padded, source=str(hf_dir), ignored_config_fields=ignored)
            hashes = hasher.result() if is_rank0 else {}
        meta = CheckpointMetadata(
            hf_config=hf_config,
            padded_vocab_size=padded,
            params_dtype=str(params_dtype).removeprefix("torch."),
            source={"hf": str(hf_dir.resolve()), "sha256": hashes,
                    "imported_with": {"tp": tp, "pp": pp}},
            ignored_config_fields=ignored,
        )
        fault_point("import:converted")

    # All ranks write into one temporary folder that rank 0 makes; rank 0 renames it once every rank is done.
    out = Path(out).resolve()
    started = time.time()
    tmp, committed = None, False
    try:
        with all_ranks_agree("import: creating the output folder"):
            if is_rank0:
                tmp = begin_output_dir(out, inputs=[hf_dir], overwrite=overwrite)
        holder = [str(tmp) if is_rank0 else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        with peer_failures_as_errors("import: saving the checkpoint"):
            save_checkpoint(model, Path(holder[0]), meta)
        with all_ranks_agree("import: finishing the checkpoint"):
            if is_rank0:
                copy_tokenizer_files(hf_dir, tmp)
        with all_ranks_agree("import: putting the output in place"):
            if is_rank0:
                commit_output_dir(tmp, out)
                committed = True
    except BaseException as e:
        if tmp is not None and not committed:
            discard_output_dir(tmp)
        if not isinstance(e, DeltaMoEError) and is_disk_full(e):
            raise disk_full_error(out, e) from None
        raise
    if is_rank0:
        print(f"imported {hf_dir} -> {out} ({config.architecture}, {world} process(es), {time.time() - started:.1f}s save)")
    return out


def main(args: argparse.Namespace) -> int:
    import_hf(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
              vocab_divisible_by=args.make_vocab_size_divisible_by, overwrite=args.overwrite,
              ignore_config_fields=args.ignore_config_fields,
              timeout_minutes=args.distributed_timeout_minutes)
    return 0
