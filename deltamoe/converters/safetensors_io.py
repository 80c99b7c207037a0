"""Streaming Hugging Face safetensors I/O: read tensors shard by shard, write shards of bounded size.

Memory stays bounded by one shard (reading) plus one shard buffer (writing), whatever the model size, the way
mergekit's `io/` works. Every problem with an input folder ends in one `DeltaMoEError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltamoe.common import faults
from deltamoe.common.errors import DeltaMoEError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsReader:
    """Lazy access to the tensors of a HF checkpoint folder (single file or sharded with an index)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DeltaMoEError(f"{self.folder}: not a folder (expected a Hugging Face checkpoint folder)")
        index_path = self.folder / INDEX_NAME
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DeltaMoEError(f"{index_path}: corrupt index (expected JSON with a 'weight_map' object): {e}") from None
        elif (self.folder / SINGLE_NAME).exists():
            weight_map = None
        else:
            raise DeltaMoEError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME} found")
        self._shard_of: dict[str, str] = {}
        shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
        for shard in shards:
            path = self.folder / shard
            if not path.exists():
                raise DeltaMoEError(f"{path}: shard listed in {INDEX_NAME} is missing")
            try:
                with safe_open(path, framework="pt") as f:
                    names = list(f.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise DeltaMoEError(f"{path}: corrupt safetensors file: {e}") from None
            for name in names:
                self._shard_of[name] = shard
        if weight_map is not None:
            for name, shard in weight_map.items():
                if self._shard_of.get(name) != shard:
                    raise DeltaMoEError(f"{index_path}: tensor {name!r} is listed in {shard} but that shard does not hold it")
        self._open_shard: str | None = None
        self._handle = None

    @property
    def shards(self) -> list[str]:
        return sorted(set(self._shard_of.values()))

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def keys_by_shard(self) -> dict[str, list[str]]:
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name, shard in self._shard_of.items():
            by_shard[shard].append(name)
        return dict(sorted(by_shard.items()))

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def _handle_for(self, shard: str):
        if self._open_shard != shard:
            self._handle = safe_open(self.folder / shard, framework="pt")
            self._open_shard = shard
        return self._handle

    def get(self, name: str) -> torch.Tensor:
        if name not in self._shard_of:
            raise DeltaMoEError(f"{self.folder}: tensor {name!r} not found")
        return self._handle_for(self._shard_of[name]).get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self._handle_for(self._shard_of[name]).get_slice(name).get_shape())

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors, shard by shard, so at most one shard's file handle is mapped at a time."""
        for shard, names in self.keys_by_shard().items():
            for name in names:
                yield name, self._handle_for(shard).get_tensor(name)

    def read_all(self) -> dict[str, torch.Tensor]:
        return dict(self.iter_tensors())


class ShardWriter:
    """Write tensors into `model-0000i-of-0000N.safetensors` shards of at most `max_shard_bytes`, plus the index."""

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()
        self._buffer_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name!r} written twice")
        self._seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().contiguous()
        # safetensors refuses tensors that share storage (tied embeddings): give a shared one its own copy.
        if tensor.untyped_storage().data_ptr() in self._storages:
            tensor = tensor.clone()
        self._storages.add(tensor.untyped_storage().data_ptr())
        self._buffer[name] = tensor
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        tmp_name = f"shard-{len(self._written):05d}.tmp.safetensors"
        save_file(self._buffer, self.folder / tmp_name, metadata=self.metadata)
        self._written.append((tmp_name, list(self._buffer)))
        self._buffer = {}
        self._storages = set()
        self._buffer_bytes = 0
        faults.point("shard-written")

    def finish(self) -> list[str]:
        """Flush the last shard, give shards their final names and write the index (when there are several)."""
        self._flush()
        count = len(self._written)
        if count == 1:
            (self.folder / self._written[0][0]).rename(self.folder / SINGLE_NAME)
            return [SINGLE_NAME]
        weight_map = {}
        names = []
        for i, (tmp_name, tensor_names) in enumerate(self._written):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / tmp_name).rename(self.folder / final)
            names.append(final)
            weight_map.update({t: final for t in tensor_names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names
