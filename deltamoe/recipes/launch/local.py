"""Run a recipe on this machine with torchrun, or check it first with `--dry-run` (one CPU process, no GPU needed).

The dry run builds the recipe (our layout checks), prints the per-GPU memory estimate, parses the Megatron flags with
megatron-core's own argument parser and runs its `validate_args` (pretending the recipe's Hopper GPUs when this
machine has none), then prints the exact torchrun command and environment.

Examples:
    python -m deltamoe.recipes.launch.local qwen3_8b_stage1_cpt_8gpu_h100_bf16 --dry-run
    python -m deltamoe.recipes.launch.local llama3_1_8b_stage2_review_8gpu_h100_bf16 --data-root /data --workdir /ckpt
    python -m deltamoe.recipes.launch.local smollm2_135m_demo_stage1_cpu         # 1 CPU process
Several nodes: use the Slurm scripts in deltamoe/recipes/slurm/ (srun starts one torchrun per node).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from unittest import mock

from deltamoe.common.errors import DeltaMoEError
from deltamoe.recipes.config import Recipe, estimate_memory, to_megatron_args
from deltamoe.recipes.launch.args import add_recipe_arguments, recipe_from_args
from deltamoe.recipes.layout import GB
from deltamoe.recipes.megatron_args import DELTAMOE_FLAGS

TRAIN_ENTRY = ["-m", "deltamoe", "train"]
"""How torchrun starts the trainer (`-m deltamoe.megatron_ext.training.train` is the same entry)."""


def launch_environment(recipe: Recipe) -> dict[str, str]:
    """Environment the trainer needs for this recipe."""
    p = recipe.parallel
    env = {}
    if recipe.device == "cuda" and (p.tensor_model_parallel_size > 1 or p.context_parallel_size > 1):
        # megatron's validate_args insists: TP/CP communication must be ordered before the GEMMs it overlaps.
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if recipe.device == "cpu":
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "2")
    return env


def torchrun_command(recipe: Recipe, *, multi_node: bool = False) -> list[str]:
    """One node's torchrun command; with multi_node, the rendezvous comes from the Slurm environment."""
    p = recipe.parallel
    if multi_node:
        rendezvous = ["--nnodes", str(p.num_nodes), "--rdzv-backend", "c10d", "--rdzv-id", "$SLURM_JOB_ID",
                      "--rdzv-endpoint", "$MASTER_ADDR:$MASTER_PORT"]
    else:
        rendezvous = ["--standalone", "--nnodes", "1"]
    return ["torchrun", *rendezvous, "--nproc-per-node", str(p.gpus_per_node), *TRAIN_ENTRY, *to_megatron_args(recipe)]


def megatron_flags(recipe: Recipe) -> list[str]:
    """The Megatron part of the flags (DeltaMoE's own flags are added by our trainer's parser, not megatron's)."""
    args = to_megatron_args(recipe)
    cut = min(args.index(f) for f in DELTAMOE_FLAGS if f in args)
    return args[:cut]


def megatron_validate(recipe: Recipe) -> argparse.Namespace:
    """Parse and validate the flags with megatron-core's own code; its complaints become a DeltaMoEError."""
    import megatron.training.arguments as megatron_arguments
    import torch

    parser = megatron_arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False))
    flags = megatron_flags(recipe)
    try:
        namespace = parser.parse_args(flags)
    except (argparse.ArgumentError, SystemExit) as e:
        raise DeltaMoEError(f"recipe {recipe.name}: megatron-core does not accept the flags: {e}") from None
    namespace.world_size, namespace.rank = recipe.parallel.world_size, 0
    pretend = contextlib.ExitStack()
    if not torch.cuda.is_available():
        # validate_args asks the GPU for its compute capability (for --moe-grouped-gemm): answer for the H100s the
        # recipe targets; on CPU recipes the CPU compat layer has to answer the same question at run time.
        pretend.enter_context(mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)))
        pretend.enter_context(mock.patch.object(megatron_arguments, "get_device_arch_version", return_value=9))
    with pretend, mock.patch.dict(os.environ, launch_environment(recipe)), contextlib.redirect_stdout(io.StringIO()):
        try:
            megatron_arguments.validate_args(namespace, {})
        except (AssertionError, ValueError) as e:
            raise DeltaMoEError(f"recipe {recipe.name}: megatron-core's validate_args refuses it: {e}") from None
    return namespace


def check_runtime(recipe: Recipe) -> list[str]:
    """Problems that stop a real launch on this machine (a dry run only reports them)."""
    problems = []
    if recipe.precision.needs_transformer_engine and importlib.util.find_spec("transformer_engine") is None:
        problems.append(f"precision fp8 needs Transformer Engine, which is not importable here: run in the NGC "
                        f"container (Dockerfile) or pick the bf16 variant of {recipe.name}")
    if recipe.device == "cuda":
        import torch

        if torch.cuda.device_count() < recipe.parallel.gpus_per_node:
            problems.append(f"recipe {recipe.name} needs {recipe.parallel.gpus_per_node} GPUs per node, "
                            f"this machine has {torch.cuda.device_count()}")
    return problems


def shell_join(command: list[str]) -> str:
    """shlex.join, except that "$VAR" placeholders stay expandable."""
    return " ".join(f'"{a}"' if re.fullmatch(r"(\$[A-Z_]+:?)+", a) else shlex.quote(a) for a in command)


def dry_run(recipe: Recipe) -> str:
    """Validate everything that can be validated without GPUs; return a report ending with the command."""
    estimate = estimate_memory(recipe)
    megatron_validate(recipe)
    p = recipe.parallel
    summary = (f"recipe {recipe.name}: layout OK (world size {p.world_size}, data parallel {p.data_parallel_size}, "
               f"expert data parallel {p.expert_data_parallel_size}); {recipe.train.iterations} iterations; "
               "megatron-core accepts the flags")
    lines = [summary, estimate.format()]
    limit = recipe.parallel.gpu_memory_gib
    if limit and estimate.total > limit * GB:
        lines.append(f"warning: the estimate exceeds parallel.gpu_memory_gib ({limit}): expect out-of-memory")
    lines += [f"note (not fatal in a dry run): {p}" for p in check_runtime(recipe)]
    env = launch_environment(recipe)
    command = torchrun_command(recipe, multi_node=recipe.parallel.num_nodes > 1)
    if recipe.parallel.num_nodes > 1:
        lines.append(f"{recipe.parallel.num_nodes} nodes: run through Slurm (deltamoe/recipes/slurm/); each node runs:")
    lines.append(" ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + shell_join(command))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltamoe.recipes.launch.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="validate and print the command, start nothing")
    args = parser.parse_args(argv)
    try:
        recipe = recipe_from_args(args)
        if args.dry_run:
            print(dry_run(recipe))
            return 0
        if recipe.parallel.num_nodes > 1:
            raise DeltaMoEError(f"recipe {recipe.name} needs {recipe.parallel.num_nodes} nodes: submit a Slurm script "
                                "from deltamoe/recipes/slurm/ instead")
        problems = check_runtime(recipe)
        if problems:
            raise DeltaMoEError("; ".join(problems))
    except DeltaMoEError as e:
        print(f"deltamoe.recipes.launch.local: error: {e}", file=sys.stderr)
        return 1
    command = torchrun_command(recipe)
    print(shlex.join(command), flush=True)
    return subprocess.call(command, env={**os.environ, **launch_environment(recipe)})


if __name__ == "__main__":
    sys.exit(main())
