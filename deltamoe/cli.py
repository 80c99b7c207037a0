"""`deltamoe <subcommand>`: one CLI for every job, training included.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `main(args) -> int | None`.
Modules are imported only when their subcommand runs, so `deltamoe graft` never pays for importing megatron-core.
`train` is the exception: its flags are Megatron-LM's (plus DeltaMoE's), so its argv goes untouched to the trainer's
own parser (`main_argv(argv)`). torchrun launches it like any module:
    torchrun --nproc-per-node 8 -m deltamoe train --deltamoe-stage 1 ...
(`-m deltamoe.megatron_ext.training.train` is the same entry).

Known, harmless warnings of megatron-core, torch and transformers are filtered (deltamoe/common/quiet.py);
`deltamoe --verbose <subcommand>` or DELTAMOE_VERBOSE=1 shows them, in every process a pipeline starts too.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from deltamoe.common import faults
from deltamoe.common import quiet
from deltamoe.common.errors import DeltaMoEError

ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}
"""OSErrors that are facts of the machine (disk full, permissions, read-only or failing storage), not bugs: the CLI
prints them, with the file they name, like a DeltaMoEError."""


def environment_error(e: BaseException) -> str | None:
    """The message to print for a machine-level failure (disk full, permissions), or None for anything else."""
    from deltamoe.common.outputs import is_disk_full

    if is_disk_full(e):
        return f"no space left on device: {e}; free space and rerun the same command (outputs are complete or absent)"
    if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
        return str(e)
    return None

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("deltamoe.megatron_ext.training.train", "train stage 1 / 2 with Megatron-LM's trainer (torchrun ... -m deltamoe train)"),
    "import": ("deltamoe.converters.hf_to_megatron", "Hugging Face dense checkpoint -> Megatron torch_dist checkpoint"),
    "export": ("deltamoe.converters.megatron_to_hf", "Megatron torch_dist checkpoint (dense or MoE) -> Hugging Face safetensors"),
    "upcycle": ("deltamoe.megatron_ext.moe.upcycle_cli", "Megatron dense checkpoint -> upcycled MoE checkpoint (expert 0 = original FFN)"),
    "prepare-data": ("deltamoe.megatron_ext.data.prepare", "text/JSONL -> Megatron indexed dataset with a language tag"),
    "rewrite-checkpoint": ("deltamoe.megatron_ext.runtime.rewrite_cli", "rewrite a legacy-layout Megatron checkpoint's weights in the current key layout"),
    "graft": ("deltamoe.converters.graft", "graft the post-training delta (instruct - base) into every expert of an HF MoE"),
    "merge": ("deltamoe.converters.merge", "dense merge baselines: ParamDelta, task arithmetic, TIES, DARE"),
    "eval": ("deltamoe.evaluation.runner", "score a Hugging Face checkpoint on a suite of local tasks"),
    "report": ("deltamoe.evaluation.report", "compare eval results of several models: Markdown, JSON and plots"),
    "scale-curve": ("deltamoe.evaluation.scale_curve", "bits per byte against stage-1 tokens over pipeline runs of several sizes"),
    "pipeline": ("deltamoe.recipes.pipeline", "run a recipe end to end: import -> upcycle -> train -> export -> graft -> eval -> report"),
    "fetch-demo-assets": ("deltamoe.recipes.demo_assets", "fetch and verify the offline demo assets (SmolLM2, public texts)"),
    "env": ("deltamoe.megatron_ext.runtime.environment", "versions, devices, the layer spec `auto` picks and why (for bug reports)"),
}
VERBOSE_HELP = "show every warning of megatron-core, torch and transformers (also: DELTAMOE_VERBOSE=1)"


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<18} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="deltamoe",
        description="DeltaMoE: upcycle a dense LLM into language experts and graft its post-training delta.",
        epilog="subcommands:\n" + "\n".join(lines) + "\n\nRun `deltamoe <subcommand> --help` for each one's options and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("subcommand", choices=list(SUBCOMMANDS), metavar="subcommand")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deltamoe --verbose SUB ...` or `deltamoe SUB ... --verbose`: decided before any module (torch, megatron) loads.
    while argv and argv[0] == "--verbose":
        argv.pop(0)
        quiet.set_verbose()
    if "--verbose" in argv:
        quiet.set_verbose()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = _top_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0 if argv else 2
        parser.parse_args(argv[:1])  # prints the usage error and exits 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        if hasattr(module, "main_argv"):  # the trainer: Megatron-LM's parser reads argv as it is
            return int(module.main_argv(argv[1:]) or 0)
        parser = argparse.ArgumentParser(
            prog=f"deltamoe {name}",
            description=(module.__doc__ or SUBCOMMANDS[name][1]).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parser)
        parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
        args = parser.parse_args(argv[1:])
        faults.set_command(name)
        faults.install_from_env()
        return int(module.main(args) or 0)
    except DeltaMoEError as e:
        print(f"deltamoe {name}: error: {e}", file=sys.stderr)
        return 1
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        message = environment_error(e)
        if message is None:
            raise
        print(f"deltamoe {name}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
