"""A torch_dist checkpoint's model tensors read one at a time, whole (TP = PP = EP = 1), without building the model.

`load_model` builds megatron's model and loads every tensor before the first one is used: export held the whole model
in memory (3.67 GiB peak for a 2.07 GB MoE; ~0.9 TB for a Qwen2.5-72B upcycled to 6 experts). Export needs each
tensor once, so `StreamedCheckpoint` is a read-only mapping that reads a tensor when it is asked for and keeps nothing.

What each tensor is stored as comes from megatron itself: the model is built on the meta device (no weights), and its
`sharded_state_dict()` gives every state-dict entry's torch_dist key, global offset and shape (the layer and expert
axes megatron prepends, the two halves of a gated fc1 through its ShardedTensorFactory), i.e. the very request
`load_model` hands to `dist_checkpointing.load`, legacy key layout included (`fit_request_to_checkpoint`). Megatron's
loader cannot serve one entry at a time in one process: it turns a request into torch ShardedTensors whose other
fragments it places on rank `(rank + 1) % world_size` (megatron-core 0.19.2,
dist_checkpointing/strategies/torch.py, `sharded_tensor_to_torch_sharded_tensor`), which with one process is this rank,
so a request must hold every layer of a stacked tensor at once. Here the entry's chunks go straight to
torch.distributed.checkpoint's public reader (`FileSystemReader`, `create_read_items_for_chunk_list`: the resharding
its default planner uses), so any saved TP/EP layout is reassembled the same way, and a chunk the checkpoint does not
fully cover is an error, not uninitialised memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping

import torch

from deltamoe.common.errors import DeltaMoEError


class _ChunkPlanner:
    """The part of torch.distributed.checkpoint's LoadPlanner that `FileSystemReader.read_data` calls."""

    def __init__(self, destinations: dict):
        self._destinations = destinations  # (key, chunk offsets) -> tensor viewed with megatron's prepended axes

    def resolve_tensor(self, read_item):
        index = read_item.dest_index
        tensor = self._destinations[(index.fqn, tuple(index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        return tensor

    def commit_tensor(self, read_item, tensor) -> None:
        pass

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError(f"{read_item.dest_index.fqn}: a tensor request was answered with bytes")


class StreamedCheckpoint(Mapping):
    """`{state-dict name: tensor}` of a Megatron checkpoint folder, each tensor read from disk when it is looked up.

    The names are those of `load_model(folder)[0].state_dict()` without `_extra_state`; the tensors are equal to its.
    """

    def __init__(self, folder: str | os.PathLike, *, spec: str, moe_overrides: dict | None = None):
        from megatron.core.dist_checkpointing.mapping import ShardedObject
        from torch.distributed.checkpoint import FileSystemReader

        from deltamoe.megatron_ext.runtime.checkpoint import load_request

        _, self.meta, request, self.torch_dist_dir = load_request(folder, spec=spec, moe_overrides=moe_overrides,
                                                                  device="meta")
        self._entries = {name: entry for name, entry in request.items() if not isinstance(entry, ShardedObject)}
        self._reader = FileSystemReader(str(self.torch_dist_dir))
        self._metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self._metadata, is_coordinator=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self) -> dict[str, torch.Tensor]:
        """The same mapping with meta tensors (shape and dtype, no data): a conversion run over it plans its outputs."""
        return {name: torch.empty(e.data.shape, dtype=e.data.dtype, device="meta") for name, e in self._entries.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, apply_factories, apply_factory_merges

        entry = self._entries[name]
        # A fresh CPU tensor for the entry (a plain ShardedTensor, or a factory megatron builds its shards from).
        request = {name: dataclasses.replace(entry, data=torch.empty(entry.data.shape, dtype=entry.data.dtype))}
        factories = {name: request[name]} if isinstance(entry, ShardedTensorFactory) else {}
        apply_factories(request)
        self._read(list(nested_values(request)))
        loaded = dict_list_map_inplace(lambda sh: sh.data, request)
        return apply_factory_merges(loaded, factories)[name]

    def _read(self, shards) -> None:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        destinations, chunks = {}, {}
        for sh in shards:
            if sh.flattened_range is not None:
                raise DeltaMoEError(f"{self.torch_dist_dir}: tensor {sh.key!r} is requested as a flattened range; "
                                    "only whole tensors can be streamed")
            stored = self._metadata.state_dict_metadata.get(sh.key)
            if not isinstance(stored, TensorStorageMetadata):
                raise DeltaMoEError(f"{self.torch_dist_dir}: tensor {sh.key!r} is not in the checkpoint (the model needs it)")
            if tuple(stored.size) != tuple(sh.global_shape):
                raise DeltaMoEError(f"{self.torch_dist_dir}: tensor {sh.key!r} is stored with shape {tuple(stored.size)}; "
                                    f"the model described by deltamoe.json needs {tuple(sh.global_shape)}")
            shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            destinations[(sh.key, tuple(sh.global_offset))] = sh.data.view(shape)
            chunks.setdefault(sh.key, []).append(ChunkStorageMetadata(offsets=torch.Size(sh.global_offset),
                                                                      sizes=torch.Size(shape)))
        items = []
        for key, local in chunks.items():
            found = create_read_items_for_chunk_list(key, self._metadata.state_dict_metadata[key], local)
            covered = sum(math.prod(item.lengths) for item in found)
            requested = sum(math.prod(chunk.sizes) for chunk in local)
            if covered != requested:
                raise DeltaMoEError(f"{self.torch_dist_dir}: the checkpoint holds only part of tensor {key!r} "
                                    f"({covered} of {requested} elements of the request)")
            items.extend(found)
        plan = self._reader.prepare_local_plan(LoadPlan(items))
        (plan,) = self._reader.prepare_global_plan([plan])
        self._reader.read_data(plan, _ChunkPlanner(destinations)).wait()

