"""Quiet by default: the known, harmless warnings of megatron-core, torch and transformers, filtered in this one place.

Every DeltaMoE process used to open with a screen of the same warnings ("Transformer Engine and Apex are not
installed", "No CUDA runtime is found", deprecations inside megatron-core), which hid the few lines that matter.
Each entry below names one message exactly (a regular expression matched at the start of the message, as
`warnings.filterwarnings` does), the module that emits it, and why it is harmless for DeltaMoE. Anything not listed
is shown as usual. The filters are installed when the `deltamoe` package is imported, before torch or megatron are,
so the trainer's module entry and every subcommand are quiet alike.

`deltamoe --verbose ...` (or `DELTAMOE_VERBOSE=1`) shows everything. The CLI flag sets the variable, so the
processes a pipeline launches (torchrun, the trainer, export, eval, ...) inherit the choice.

What is filtered (CUDA availability is not known when the filters go in, so a message is listed only if it is
harmless on every machine; where it carries a fact, the trainer's startup line states that fact once instead):
- megatron-core's "Transformer Engine and Apex are not installed" / "Apex is not installed" fallbacks: TE and apex
  are optional by design (DESIGN.md 1); the trainer prints the layer spec and optimizer it uses instead.
- deprecations megatron-core raises from its own defaults or its own calls (GPTModel, the "full" CUDA-graph scope,
  MCore async save, ShardedTensor, DCP's argument order, c10d's `*_tensor` collectives): nothing a user can change.
- torch's "No CUDA runtime is found" (cpp_extension, at import): DeltaMoE builds no CUDA extension.
- messages that state a CPU machine's facts ("pin_memory ... no accelerator", DCP loading in one process).
- megatron's distributed optimizer asking `.grad` of its main-parameter views (float32 training).
- megatron's rerun state machine announcing its mode (at start and around each evaluation) as warnings.
Left visible on purpose: megatron's "Cannot save the BlendedDataset indexes because path_to_cache is None" (on a large
blend, indexes are rebuilt at every start: set --data-cache-path) and its printed (not logged) "TP/PP size not found
in checkpoint args" when a run starts from a converted checkpoint.
- megatron-core INFO listings (every parameter of every gradient bucket, the DDP/optimizer config dumps, dataset
  index building) are lowered to WARNING; Megatron's argument dump and its per-iteration line stay.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

VERBOSE_ENV = "DELTAMOE_VERBOSE"


@dataclass(frozen=True, kw_only=True)
class KnownWarning:
    """One Python warning, identified by message, category and emitting module."""

    message: str
    """Regular expression matched at the start of the warning's message."""
    category: type[Warning]
    module: str
    """Regular expression matched at the start of the module the warning is attributed to."""
    why: str
    """Why it is harmless for DeltaMoE."""


@dataclass(frozen=True, kw_only=True)
class KnownLogRecord:
    """One `logging` record, identified by logger name and message."""

    logger: str
    message: str
    """Regular expression matched at the start of the record's formatted message."""
    why: str


_TE_APEX = "Transformer Engine and apex are optional (DESIGN.md 1); the trainer states the spec and optimizer it uses"

WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(message=r"Transformer Engine and Apex are not installed\. Falling back to", category=UserWarning,
                 module=r"megatron\.", why=_TE_APEX),
    KnownWarning(message=r"Apex is not installed\. Falling back to Torch Norm", category=UserWarning,
                 module=r"megatron\.", why=_TE_APEX),
    KnownWarning(message=r"Only transformer-engine>=1\.7\.0 supports MoE experts, but your version is 0\.0\.0\.",
                 category=UserWarning, module=r"megatron\.core\.extensions\.transformer_engine_spec_provider",
                 why="version 0.0.0 means Transformer Engine is absent; an old installed TE is still reported"),
    KnownWarning(message=r"full scope is deprecated\. Use empty cuda_graph_modules", category=UserWarning,
                 module=r"megatron\.core\.transformer\.transformer_config",
                 why="megatron-core's own default (cuda_graph_modules='full') raises it for every TransformerConfig"),
    KnownWarning(message=r"\s*It is recommended to use a ModelConfig", category=UserWarning,
                 module=r"megatron\.training\.argument_utils",
                 why="a model provider function is megatron's documented pretrain() interface, which we use"),
    KnownWarning(message=r"MimoModelConfig is experimental", category=UserWarning, module=r"megatron\.core\.models\.mimo",
                 why="raised when megatron imports its multimodal models, which DeltaMoE does not use"),
    KnownWarning(message=r"Please use DTensor instead and we are deprecating ShardedTensor", category=FutureWarning,
                 module=r"(torch|megatron|deltamoe)\.",
                 why="megatron-core's torch_dist checkpoints are built on ShardedTensor; nothing for a user to change"),
    KnownWarning(message=r"The argument order of load has been changed", category=UserWarning,
                 module=r"torch\.distributed\.checkpoint", why="megatron-core's call into torch DCP"),
    KnownWarning(message=r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the intent is to "
                         r"load in a single process", category=UserWarning, module=r"torch\.distributed\.checkpoint",
                 why="conversions load checkpoints in one process on purpose (torch_dist reshards)"),
    KnownWarning(message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                 category=FutureWarning, module=r"torch\.distributed\.c10d_logger",
                 why="megatron-core's own collective calls"),
    KnownWarning(message=r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
                 category=UserWarning, module=r"(megatron\.core\.optimizer|deltamoe\.megatron_ext\.runtime\.cpu_compat)",
                 why="megatron's distributed optimizer zero_grad (optimizer.py _zero_grad_group_helper) asks .grad of "
                     "its float32 main-parameter shards, views of the parameters when they are float32; gradients "
                     "live in main_grad"),
    KnownWarning(message=r"'pin_memory' argument is set as true but no accelerator is found", category=UserWarning,
                 module=r"torch\.utils\.data\.dataloader", why="a fact of a CPU machine; pinning matters on GPUs only"),
)

LOG_RECORDS: tuple[KnownLogRecord, ...] = (
    KnownLogRecord(logger="torch.utils.cpp_extension", message=r"No CUDA runtime is found",
                   why="printed at import on machines without CUDA; DeltaMoE compiles no CUDA extension"),
    KnownLogRecord(logger="megatron.core.models.gpt.gpt_model", message=r"GPTModel IS DEPRECATED",
                   why="Megatron-LM's pretrain() and megatron-core 0.19's checkpoints are GPTModel's (DESIGN.md 2)"),
    KnownLogRecord(logger="megatron.core.dist_checkpointing.strategies.torch", message=r"MCore's async save is deprecated",
                   why="megatron-core's synchronous save calls its own async path; nothing is saved asynchronously"),
    KnownLogRecord(logger="megatron.core.rerun_state_machine",
                   message=r"(RerunStateMachine initialized in mode |Setting RerunStateMachine mode |Result validation enabled)",
                   why="megatron logs its rerun state machine's mode (--rerun-mode) at start and around every evaluation "
                       "as warnings; they report a setting, not a problem"),
)

QUIET_LOGGERS: tuple[str, ...] = (
    "megatron.core.distributed.param_and_grad_buffer",  # one line per parameter of every gradient bucket
    "megatron.core.distributed.distributed_data_parallel",  # the whole DDP config on one line
    "megatron.core.optimizer",  # the whole optimizer config on one line
    "megatron.core.datasets",  # index building, several lines per dataset and split
)
"""Loggers whose INFO output is a listing, not progress: lowered to WARNING (their warnings still show)."""


class _DropKnown(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


_installed: dict = {}


def verbose() -> bool:
    """Whether the user asked to see everything (DELTAMOE_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def install() -> None:
    """Filter the known, harmless warnings (idempotent; nothing when DELTAMOE_VERBOSE=1)."""
    if verbose() or _installed:
        return
    before = list(warnings.filters)
    for w in WARNINGS:
        warnings.filterwarnings("ignore", message=w.message, category=w.category, module=w.module)
    _installed["warnings"] = [f for f in warnings.filters if f not in before]
    filters = []
    for r in LOG_RECORDS:
        f = _DropKnown(r.message)
        logging.getLogger(r.logger).addFilter(f)
        filters.append((r.logger, f))
    _installed["log_filters"] = filters
    levels = {}
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
    _installed["levels"] = levels


def set_verbose() -> None:
    """Show everything from now on, in this process and the processes it starts (DELTAMOE_VERBOSE=1)."""
    os.environ[VERBOSE_ENV] = "1"
    for f in _installed.pop("warnings", []):
        if f in warnings.filters:
            warnings.filters.remove(f)
    # Adding a filter is the public way to invalidate the registries of warnings already ignored; a trailing
    # "default" for every warning is what Python does anyway when no filter matches.
    warnings.simplefilter("default", append=True)
    for name, f in _installed.pop("log_filters", []):
        logging.getLogger(name).removeFilter(f)
    for name, level in _installed.pop("levels", {}).items():
        logging.getLogger(name).setLevel(level)
    _installed.clear()
