"""Element-wise float32 arithmetic on large tensors in bounded row blocks, for graft and merge.

The operations are the ones graft and merge always used (upcast to float32, subtract, `add(alpha=...)`, cast back),
applied to blocks of about `BLOCK_ELEMENTS` elements in reused float32 buffers instead of to whole tensors: the same
values, but the working set stays in cache and no full-size float32 copy is ever allocated (a 152k x 8192 embedding's
would be 5 GB). NaN / Inf checks ride on the blocks too: a non-finite input makes the block's sum non-finite, and only
then is each input checked on its own to name it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from deltamoe.common.errors import DeltaMoEError

if TYPE_CHECKING:
    from deltamoe.converters.safetensors_io import PlannedShardWriter

BLOCK_ELEMENTS = 1 << 20
"""Elements per block: 4 MiB of float32, small enough for a core's cache, large enough that per-block Python is noise."""


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run block arithmetic on one intra-op thread: the hashing and writing threads use the other cores.

    Splitting a 4 MiB block across OpenMP threads gains little, and on a busy machine it loses badly: measured on 2
    cores shared with another job, a block's upcast took 6.9 ms on 2 threads and 0.17 ms on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_finite(tensor: torch.Tensor, name: str, folder: Path) -> None:
    # max(|t|) propagates NaN and Inf and is several times faster than isfinite().all() on bf16 CPU tensors.
    if tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor.abs().max()):
        raise DeltaMoEError(f"{folder}: tensor {name!r} contains NaN or Inf values")


def check_block(block: torch.Tensor, sources: list[tuple[torch.Tensor, str, Path]]) -> None:
    """Raise for the first non-finite source when the float32 `block` computed from them is not finite."""
    if not torch.isfinite(block.sum()):  # a sum can also overflow on finite inputs: then every check below passes
        for tensor, name, folder in sources:
            check_finite(tensor, name, folder)


def row_blocks(rows: int, row_elements: int) -> Iterator[tuple[int, int]]:
    step = max(1, BLOCK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a Slurm job's allocation, not the node's core count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_count(workers: int | None) -> int:
    """`--workers` as given, or the usable CPUs when unset; at least 1."""
    workers = usable_cpus() if workers is None else workers
    if workers < 1:
        raise DeltaMoEError(f"--workers: must be at least 1, got {workers}")
    return workers


def add_workers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=None,
                        help="threads computing tensors side by side (default: the CPUs this process may use); "
                             "the output is the same for any value")


WORKING_SET_BYTES = 1 << 30
"""Working memory (estimated) that tensors computed side by side may hold together; a larger tensor runs alone."""


class TensorJobs:
    """Compute independent tensors on `workers` threads; the caller reads inputs and writes outputs in its own thread.

    torch releases the GIL inside its operators, so tensors whose arithmetic is bound by one serial kernel (TIES's
    top-k, DARE's random stream: one generator per tensor) use every core. Each job's result is the same whatever
    thread computes it, so outputs do not change with `workers`. Admission keeps memory bounded: at most `workers`
    jobs at once, and their estimated working sets (`cost`) together within `budget`, except that a job over the
    budget may run when nothing else does. `done(result)` runs in the caller's thread, in completion order.

    Use as a context manager: leaving it (also on an error) waits for the running jobs, so no thread writes into a
    buffer after its owner is closed.
    """

    def __init__(self, workers: int, done: Callable[[object], None], budget: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tensor job")
        self._workers, self._done = workers, done
        self._budget = WORKING_SET_BYTES if budget is None else budget
        self._running: dict[Future, int] = {}

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def make_room(self, cost: int) -> None:
        """Wait (handing finished results to `done`) until a job of working set `cost` may start."""
        while self._running and (len(self._running) >= self._workers
                                 or sum(self._running.values()) + cost > self._budget):
            self.finish_one()

    def submit(self, cost: int, fn: Callable[..., object], *args) -> None:
        self.make_room(cost)
        self._running[self._pool.submit(fn, *args)] = cost

    def buffer(self, writer: PlannedShardWriter, name: str) -> torch.Tensor:
        """`writer.buffer(name)` (a `PlannedShardWriter`), handing finished jobs to `done` while the writer waits for
        memory that running jobs' outputs hold: waiting on the writer alone would wait for this thread."""
        while (buffer := writer.buffer(name, wait=not self.busy)) is None:
            self.finish_one()
        return buffer

    def finish_one(self) -> None:
        """Wait for at least one running job and hand its result to `done` (re-raising the job's error)."""
        finished, _ = wait(self._running, return_when=FIRST_COMPLETED)
        for future in finished:
            del self._running[future]
        for future in finished:
            self._done(future.result())

    def finish_all(self) -> None:
        while self._running:
            self.finish_one()

    def __enter__(self) -> "TensorJobs":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Scratch:
    """Reusable float32 buffers, one per slot, grown on demand (fresh large allocations cost a page fault per 4 KiB).

    Not thread-safe: one per thread (`ThreadScratch`).
    """

    def __init__(self):
        self._buffers: dict[int, torch.Tensor] = {}

    def like(self, slot: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < n:
            buf = self._buffers[slot] = torch.empty(max(n, BLOCK_ELEMENTS), dtype=torch.float32)
        return buf[:n].view(shape)

    def upcast(self, slot: int, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor.float()` in a reused buffer (a copy even when `tensor` is float32: callers write into it)."""
        return self.like(slot, tensor.shape).copy_(tensor)


class ThreadScratch(threading.local):
    """A `Scratch` for each thread that asks (`TensorJobs` workers)."""

    def __init__(self):
        self.scratch = Scratch()
