"""Upcycle a dense Megatron checkpoint (from `deltamoe import`) into an MoE checkpoint whose expert 0 is the FFN.

Example (one process; a CPU is enough for models that fit in memory):
    deltamoe upcycle --dense /ckpt/qwen2.5-0.5b-megatron --out /ckpt/qwen2.5-0.5b-moe6 --num-experts 6 --topk 2

Shared-expert variant (the FFN becomes an always-on shared expert; 8 routed experts of FFN/4 rows each; exports to
Qwen2-MoE, the one HF format with a shared expert, so it is refused for Qwen3, whose q/k norms Qwen2-MoE lacks):
    deltamoe upcycle --dense /ckpt/llama --out /ckpt/llama-shared --variant shared --num-experts 8 --topk 2 --granularity 4

The output is a Megatron-LM trainer checkpoint (`--load OUT --ckpt-format torch_dist`) plus `deltamoe_upcycle.json`,
the plan that export copies and graft reads. At step 0 the MoE computes exactly the dense model's function (see
deltamoe/megatron_ext/moe/upcycle.py for why each variant is exact). The checkpoint reshards on load, so train it at any
expert-parallel size that divides --num-experts; pass --expert-parallel-size to check that divisibility now.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hashing import sha256_file
from deltamoe.common.outputs import atomic_output_dir, check_output_dir
from deltamoe.megatron_ext.moe.upcycle import ROUTER_INITS, build_plan, check_dense, moe_settings_for, upcycle_state_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dense", required=True, help="dense Megatron checkpoint folder (from `deltamoe import`)")
    parser.add_argument("--out", required=True, help="output MoE checkpoint folder (must not exist unless --overwrite)")
    parser.add_argument("--num-experts", type=int, required=True, help="routed experts per layer (E >= 2)")
    parser.add_argument("--topk", type=int, required=True, help="experts per token (K <= E)")
    parser.add_argument("--variant", choices=["copy", "shared"], default="copy",
                        help="copy: expert 0 = FFN (frozen), experts 1..E-1 copies (MoE-LPR). shared: FFN = shared expert, "
                             "routed experts = granular slices with zero-initialised read-out")
    parser.add_argument("--granularity", type=int, default=1, help="shared variant: routed expert size = FFN size / G")
    # normal is the default: with a zero router and identical copies every logit ties, top-k always picks the same
    # experts, and their equal outputs give the router no gradient, so the other new experts would never train.
    # Any router keeps the copy variant exact at step 0 (all experts compute the same function).
    parser.add_argument("--router-init", choices=ROUTER_INITS, default="normal",
                        help="normal (default): seeded N(0, --router-init-std), breaks ties between identical copies; "
                             "zeros: uniform routing at step 0")
    parser.add_argument("--router-init-std", type=float, default=0.02)
    parser.add_argument("--noise-std", type=float, default=0.0,
                        help="seeded Gaussian noise added to the new experts' copies (breaks exact function preservation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--expert-parallel-size", type=int, default=1,
                        help="the expert-parallel size you will train with: --num-experts must be divisible by it")
    parser.add_argument("--overwrite", action="store_true")


def checkpoint_sha256(folder: str | Path) -> dict[str, str]:
    """sha256 of every file of a Megatron checkpoint folder, by relative path."""
    root = Path(folder)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def upcycle(dense: str | Path, out: str | Path, *, num_experts: int, topk: int, variant: str = "copy",
            granularity: int = 1, router_init: str = "normal", router_init_std: float = 0.02, noise_std: float = 0.0,
            seed: int = 0, expert_parallel_size: int = 1, overwrite: bool = False, spec: str | None = None) -> Path:
    """Load the dense checkpoint, transform its state dict, load it strictly into the MoE model and save both.

    `spec`: the module tree both models are built with (default specs.CONVERSION_SPEC); the files do not depend on it.
    """
    from deltamoe.architectures.moe import check_exportable
    from deltamoe.common.hf_folder import copy_tokenizer_files
    from deltamoe.megatron_ext.runtime.checkpoint import CheckpointMetadata, load_model, read_metadata, save_checkpoint
    from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
    from deltamoe.megatron_ext.runtime.model_builder import build_gpt_model, transformer_config
    from deltamoe.megatron_ext.runtime.specs import CONVERSION_SPEC

    from deltamoe.megatron_ext.runtime.distributed import world_size_from_env

    if world_size_from_env() != 1:  # before anything that could fail on one rank only
        raise DeltaMoEError("upcycle runs in one process (the checkpoint reshards on load); launch it without torchrun")
    started = time.time()
    dense = Path(dense)
    meta = read_metadata(dense)
    if meta.is_moe:
        raise DeltaMoEError(f"{dense} is already an MoE checkpoint ({meta.moe.get('num_experts')} experts in "
                            f"{dense}/deltamoe.json); upcycle a dense checkpoint from `deltamoe import`")
    arch, arch_config = meta.architecture(str(dense / "deltamoe.json"))
    # Every cheap check runs before any weight is read.
    plan = build_plan(variant=variant, num_experts=num_experts, topk=topk, ffn_hidden_size=arch_config.ffn_hidden_size,
                      granularity=granularity, noise_std=noise_std, seed=seed, router_init=router_init,
                      router_init_std=router_init_std, base_architecture=arch.name,
                      expert_model_parallel_size=expert_parallel_size)
    settings = moe_settings_for(plan)
    # Exact or refused, and before days of training: the MoE must fit an HF format (DESIGN.md decision 12).
    check_exportable(arch_config, dataclasses.asdict(settings), f"upcycle --variant {variant} of a {arch.name} model")
    check_output_dir(out, inputs=[dense], overwrite=overwrite)

    init_distributed(ParallelLayout())
    if torch.distributed.get_world_size() != 1:
        raise DeltaMoEError("upcycle runs in one process (the checkpoint reshards on load); launch it without torchrun")
    # The HF files the dense checkpoint was imported from identify the base model B for `deltamoe graft`, which checks
    # them against --base; without an import record, the Megatron files themselves are hashed.
    plan.base_sha256 = dict(meta.source.get("sha256") or {}) or checkpoint_sha256(dense)
    spec = spec or CONVERSION_SPEC
    dense_model, meta = load_model(dense, spec=spec)
    dense_sd = dense_model.state_dict()
    check_dense(dense_sd, source=str(dense))
    moe_sd = upcycle_state_dict(dense_sd, plan, arch_config.num_layers)
    del dense_model, dense_sd

    params_dtype = getattr(torch, meta.params_dtype)
    cfg = transformer_config(arch_config, moe=settings, params_dtype=params_dtype)
    # Every spec writes the TE spec's torch_dist keys (runtime/checkpoint_layout.py), so training loads this under any.
    model = build_gpt_model(arch_config, cfg, padded_vocab=meta.padded_vocab_size, spec=spec)
    load_strict(model, moe_sd)

    out_meta = CheckpointMetadata(
        hf_config=meta.hf_config, padded_vocab_size=meta.padded_vocab_size, params_dtype=meta.params_dtype,
        moe=dataclasses.asdict(settings),
        source={"dense": str(dense.resolve()), "dense_source": meta.source, "upcycled_with": plan.variant},
        ignored_config_fields=meta.ignored_config_fields,
    )
    with atomic_output_dir(out, inputs=[dense], overwrite=overwrite) as tmp:
        save_checkpoint(model, tmp, out_meta)
        plan.save(tmp)
        copy_tokenizer_files(dense, tmp)
    print(f"upcycled {dense} -> {out}: {plan.variant}, {plan.num_experts} experts top-{plan.topk}"
          f"{f', granularity {plan.granularity}' if plan.variant == 'shared' else ''} ({time.time() - started:.1f}s)")
    return Path(out)


def load_strict(model, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict, strict on every tensor (megatron's `_extra_state` entries carry no weights)."""
    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and not k.endswith("._extra_state")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DeltaMoEError(f"upcycled state dict does not match the MoE model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise DeltaMoEError(f"upcycled tensor {name}: shape {tuple(tensor.shape)}, the MoE model expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)


def main(args: argparse.Namespace) -> int:
    upcycle(args.dense, args.out, num_experts=args.num_experts, topk=args.topk, variant=args.variant,
            granularity=args.granularity, router_init=args.router_init, router_init_std=args.router_init_std,
            noise_std=args.noise_std, seed=args.seed, expert_parallel_size=args.expert_parallel_size,
            overwrite=args.overwrite)
    return 0
