"""Distributed set-up for every Megatron entry point: NCCL on GPU, gloo on CPU, torchrun's environment.

Run alone (`deltamoe import ...`) it makes a one-process group on a free local port; under torchrun or srun it reads
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun sets them.

No rank waits forever for another: the process group is made before any input is checked, every rank's checks are
agreed on (`all_ranks_agree`: one failing rank makes every rank stop with an error), and a rank that dies outright
(SIGKILL, out of memory) is noticed through its closed connection (gloo) or the group's timeout (NCCL;
--distributed-timeout-minutes, 10 by default as in Megatron-LM).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Iterator

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


DEFAULT_TIMEOUT_MINUTES = 10.0
"""Megatron-LM's --distributed-timeout-minutes default: the longest a rank waits for a stuck or vanished peer."""


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun / srun wrappers set it (1 for a plain `python -m ...`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(*, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, backend: str | None = None) -> None:
    """The default process group (NCCL on GPU, gloo on CPU) from the launcher's environment, unless already made.

    Megatron-LM's trainer keeps a group made before `pretrain` (megatron/training/initialize.py:271-275,
    `_initialize_distributed` skips init_process_group when torch.distributed is initialized), so its entry point
    can agree on start-up checks before Megatron starts.
    """
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    kwargs = {}
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", local_rank)
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out",
              "Timeout", "NCCL communicator was aborted", "ProcessGroupNCCL", "connect() failed")


def _is_peer_failure(e: BaseException) -> bool:
    return isinstance(e, torch.distributed.DistError) or (
        isinstance(e, RuntimeError) and any(text in str(e) for text in _PEER_LOST))


@contextlib.contextmanager
def peer_failures_as_errors(what: str) -> Iterator[None]:
    """Inside collectives (a torch_dist save), a vanished peer becomes one DeltaMoEError instead of a gloo traceback."""
    try:
        yield
    except Exception as e:
        if isinstance(e, DeltaMoEError) or not _is_peer_failure(e):
            raise
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DeltaMoEError(f"{what}: another rank failed or died ({first_line}); see its log. Nothing was "
                            "committed: rerun the same command") from None


def _failed_ranks(failed_here: bool) -> list[int]:
    use_cuda = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    flag = torch.tensor([1 if failed_here else 0], dtype=torch.int32, device=device)
    flags = [torch.zeros_like(flag) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(flags, flag)
    return [r for r, f in enumerate(flags) if int(f.item())]


@contextlib.contextmanager
def all_ranks_agree(what: str) -> Iterator[None]:
    """Run a block on every rank; if it fails on any rank, it fails on every rank (DeltaMoEError on the others).

    Without it a rank whose check fails exits while the others walk into their next collective and wait for it
    until the timeout. The block itself must not run collectives (a rank failing half-way would leave the others
    inside one): wrap the checks and the local work between collectives, not a torch_dist save.
    """
    failure: BaseException | None = None
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - reported to the other ranks, then re-raised unchanged
        failure = e
    failed: list[int] = []
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        try:
            failed = _failed_ranks(failure is not None)
        except Exception as e:
            if failure is not None:
                raise failure from None
            if not _is_peer_failure(e):
                raise
            raise DeltaMoEError(f"{what}: lost contact with another rank ({str(e).strip()[:200]}); it has probably "
                                "died: see its log") from None
    if failure is not None:
        raise failure
    if failed:
        raise DeltaMoEError(f"{what} failed on rank(s) {', '.join(map(str, failed))} (see the error printed by "
                            f"{'that rank' if len(failed) == 1 else 'those ranks'}); every rank stops")


def init_distributed(layout: ParallelLayout | None = None, *, seed: int = 1234,
                     timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Initialise torch.distributed (if needed) and megatron's parallel state for `layout`."""
    from megatron.core import parallel_state, tensor_parallel

    layout = layout or ParallelLayout()
    cpu_compat.install()
    init_process_group(timeout_minutes=timeout_minutes)
    world = torch.distributed.get_world_size()
    model_parallel = layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size * layout.context_parallel_size
    if world % model_parallel:
        raise DeltaMoEError(
            f"world size ({world}) is not divisible by tensor ({layout.tensor_model_parallel_size}) x pipeline "
            f"({layout.pipeline_model_parallel_size}) x context ({layout.context_parallel_size}) parallel sizes"
        )
    if parallel_state.model_parallel_is_initialized():
        if _current_layout() == _requested_layout(layout, world):
            # The groups megatron would make again are the ones it has: a process running several commands (a
            # notebook, the test suite) reuses them instead of leaving a set of gloo groups and their threads behind
            # on each call (destroy_model_parallel only forgets its groups; torch keeps them until destroyed).
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _requested_layout(layout: ParallelLayout, world: int) -> tuple[int, ...]:
    tp, pp, cp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, layout.context_parallel_size
    etp = layout.expert_tensor_parallel_size or tp  # megatron-core 0.19.2 parallel_state.py:871-872
    return tp, pp, cp, layout.expert_model_parallel_size, etp, world


def _current_layout() -> tuple[int, ...]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_context_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
            ps.get_expert_tensor_parallel_world_size(), torch.distributed.get_world_size())


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
