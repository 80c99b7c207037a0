"""Distributed set-up for every Megatron entry point: NCCL on GPU, gloo on CPU, torchrun's environment.

Run alone (`deltamoe import ...`) it makes a one-process group on a free local port; under torchrun or srun it reads
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun sets them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.megatron_ext.runtime import cpu_compat


@dataclass(kw_only=True)
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    context_parallel_size: int = 1

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                     "context_parallel_size"):
            if getattr(self, name) < 1:
                raise DeltaMoEError(f"{name} must be >= 1, got {getattr(self, name)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(layout: ParallelLayout | None = None, *, seed: int = 1234) -> None:
    """Initialise torch.distributed (if needed) and megatron's parallel state for `layout`."""
    from megatron.core import parallel_state, tensor_parallel

    layout = layout or ParallelLayout()
    cpu_compat.install()
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend=backend)
    world = torch.distributed.get_world_size()
    model_parallel = layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size * layout.context_parallel_size
    if world % model_parallel:
        raise DeltaMoEError(
            f"world size ({world}) is not divisible by tensor ({layout.tensor_model_parallel_size}) x pipeline "
            f"({layout.pipeline_model_parallel_size}) x context ({layout.context_parallel_size}) parallel sizes"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
