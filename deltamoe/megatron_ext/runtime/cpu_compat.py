"""Run megatron-core and Megatron-LM's trainer on a machine without CUDA (tests, CI, the CPU demo).

This is the only module in DeltaMoE that knows megatron assumes CUDA. `install()` is called by the runtime when
`torch.cuda.is_available()` is False and is a no-op otherwise, so GPU runs never see any of it.

megatron-core 0.19.2's CUDA assumptions come in a few kinds (measured in ../shared/notes/megatron-on-cpu.md), each
handled once here instead of patching call sites one by one:
1. CUDA devices named in tensor factories and moves (`device="cuda"`, `torch.cuda.current_device()`, `.cuda()`,
   `.to("cuda")`, `pin_memory`): one `TorchFunctionMode` rewrites them to CPU.
2. `torch.cuda` runtime calls (streams, events, synchronize, memory statistics, device count): inert stand-ins.
3. The "CUDA" RNG that megatron's tensor-parallel tracker forks for dropout: the CPU generator, which is the one CPU
   dropout draws from, so forking it has the same meaning as on GPU.
4. Type strings compared against `'torch.cuda.FloatTensor'` (optimizer, grad clipping): reported as CUDA names.
5. The trainer's `initialize_megatron` asserts CUDA unless `allow_no_cuda=True`; its dataset helpers run `make` on a
   Makefile the wheel does not ship (the compiled helpers are in the wheel).
6. gloo collectives are stricter than NCCL's: `all_to_all_single` wants list split sizes (megatron passes tensors
   on CPU) and `all_gather` wants equal shapes (megatron gathers uneven expert-token counts across tensor ranks).
7. Backward passes: a mode steps aside while its handler runs, so `loss.backward()` (handled by the mode) would run
   megatron's custom autograd functions without it (sequence parallel's backward allocates on
   `torch.cuda.current_device()`). The autograd engine entry point runs under the mode instead.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how megatron passes torch.cuda.current_device().
    return isinstance(device, int) and not isinstance(device, bool)


_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite every request for a CUDA device into the CPU."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            return _TYPE_NAMES.get(tensor.dtype, func(*args))
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class _Stream:
    """Inert stand-in for torch.cuda.Stream / Event."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _Stream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, *args):
        return 0.0


def _noop_factory():
    # A distinct function per patched attribute: torch.compile's rule table refuses one object under two names.
    return lambda *args, **kwargs: None


def _zero_factory():
    return lambda *args, **kwargs: 0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = _noop_factory()
    cuda.synchronize = _noop_factory()
    cuda.empty_cache = _noop_factory()
    cuda.Stream = _Stream
    cuda.Event = _Stream
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.device = lambda *a, **k: contextlib.nullcontext()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, _zero_factory())
    cuda.reset_peak_memory_stats = _noop_factory()
    cuda.reset_max_memory_allocated = _noop_factory()
    cuda.memory_stats = lambda *a, **k: {}
    cuda.mem_get_info = lambda *a, **k: (0, 0)
    cuda.get_device_name = lambda *a, **k: "cpu"
    # Megatron-LM's argument validation refuses --moe-grouped-gemm below compute capability 8.0; the grouped-GEMM
    # path it guards falls back to torch ops that run on CPU, so report an Ampere-class device.
    cuda.get_device_capability = lambda *a, **k: (8, 0)
    # The trainer's argument checks read the architecture from the properties too (`get_device_arch_version`, e.g.
    # with tensor parallelism); the same Ampere-class answer.
    cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        major=8, minor=0, name="cpu", total_memory=0, multi_processor_count=1)
    # The "CUDA" RNG is the CPU generator: CPU dropout draws from it, so megatron's RNG tracker keeps its meaning.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.nvtx = types.SimpleNamespace(range_push=_noop_factory(), range_pop=_noop_factory(), range=lambda *a, **k: contextlib.nullcontext(), mark=_noop_factory())


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    original_all_to_all_single = torch.distributed.all_to_all_single

    @functools.wraps(original_all_to_all_single)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return original_all_to_all_single(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    torch.distributed.all_to_all_single = all_to_all_single

    original_all_gather = torch.distributed.all_gather

    @functools.wraps(original_all_gather)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        # gloo gathers equal shapes only; megatron gathers uneven first dimensions (the alltoall dispatcher's
        # tensor-parallel gather of expert tokens, `output_split_sizes`), which NCCL accepts. Pad to the longest.
        if async_op or all(t.shape == tensor.shape for t in tensor_list):
            return original_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        original_all_gather(gathered, padded, group=group)
        for out, full in zip(tensor_list, gathered):
            out.copy_(full[: out.shape[0]])
        return None

    torch.distributed.all_gather = all_gather

    try:
        from megatron.training import initialize, training
    except ImportError:  # megatron.training is optional for pure megatron.core use
        return
    original_initialize = initialize.initialize_megatron

    @functools.wraps(original_initialize)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original_initialize(*args, **kwargs)

    initialize.initialize_megatron = initialize_megatron
    training.initialize_megatron = initialize_megatron


def _patch_autograd_engine() -> None:
    from torch import autograd
    from torch.autograd import graph

    original = graph._engine_run_backward

    @functools.wraps(original)
    def engine_run_backward(*args, **kwargs):
        with _CudaToCpuMode():
            return original(*args, **kwargs)

    graph._engine_run_backward = engine_run_backward
    autograd._engine_run_backward = engine_run_backward


def install() -> bool:
    """Make megatron run on CPU when CUDA is absent. Idempotent; returns True when the compat layer is active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    _patch_torch_cuda()
    _patch_megatron()
    _patch_autograd_engine()
    # megatron wraps a few router helpers in torch.compile; compiling them on CPU costs seconds per shape and buys
    # nothing for tests and the demo.
    torch._dynamo.config.disable = True
    _CudaToCpuMode().__enter__()  # stays active for the life of the process
    _INSTALLED = True
    return True


def is_active() -> bool:
    return _INSTALLED
