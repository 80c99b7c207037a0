"""Streaming Hugging Face safetensors I/O: read tensors shard by shard, write shards of bounded size.

Memory stays bounded by one shard (reading) plus one shard buffer (writing), whatever the model size, the way
mergekit's `io/` works. Every problem with an input folder ends in one `DeltaMoEError` naming the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import queue
import threading
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltamoe.common import faults
from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hashing import FolderHasher

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries of a safetensors file's header, offset of its data); safe_open has validated the file."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


class _MappedShard:
    """One safetensors file mapped copy-on-write: `get` returns tensors that are views of the page cache.

    `safe_open(...).get_tensor` copies each tensor out of its own map; a view skips that copy (the arithmetic reads
    the bytes once, from the page cache the read-ahead filled). Copy-on-write: a caller writing into a tensor changes
    its private copy, never the file. `release` gives a tensor's pages back, so memory stays bounded by what is in use
    rather than by the shard; a view read after its release faults the file's bytes in again, unchanged.
    """

    def __init__(self, path: Path):
        self._entries, self._data_start = _read_header(path)
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def can_map(self, name: str) -> bool:
        return self._entries[name]["dtype"] in DTYPES

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self._data_start + begin)
        return raw.view(dtype).view(shape)

    def release(self, name: str) -> None:
        begin, end = (self._data_start + o for o in self._entries[name]["data_offsets"])
        page = mmap.PAGESIZE
        first, last = -(-begin // page) * page, end // page * page  # whole pages inside the tensor only
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


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
        self._mapped: tuple[str, _MappedShard] | None = None
        self._headers: dict[str, tuple[dict, int]] = {}
        self._hasher: FolderHasher | None = None

    def hash_while_reading(self, order: list[str] | None = None, lookahead: int = 1,
                           patterns: tuple[str, ...] = ("*.safetensors", "*.json")) -> FolderHasher:
        """Hash the folder's files (as `sha256_dir`) in a background thread that reads ahead of `get`.

        `order`: the shards in the order the caller will first read them (default: sorted, the order of
        `iter_tensors`); the thread never runs more than `lookahead` shards ahead of the reads.
        """
        self._hasher = FolderHasher(self.folder, order=order or self.shards, lookahead=lookahead, patterns=patterns)
        return self._hasher

    def shard_of(self, name: str) -> str:
        return self._shard_of[name]

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
        shard = self._shard_of[name]
        if self._hasher is not None:
            self._hasher.started(shard)
            entry = self._entry(name)
            self._hasher.wait_for(shard, self._data_start(shard) + entry["data_offsets"][1])
        mapped = self._mapped_for(shard)
        return mapped.get(name) if mapped.can_map(name) else self._handle_for(shard).get_tensor(name)

    def _mapped_for(self, shard: str) -> _MappedShard:
        if self._mapped is None or self._mapped[0] != shard:
            self._mapped = (shard, _MappedShard(self.folder / shard))
        return self._mapped[1]

    def release(self, name: str) -> None:
        """Give back the memory pages of tensor `name` (read with `get`): the caller is done with it."""
        shard = self._shard_of[name]
        if self._mapped is not None and self._mapped[0] == shard:
            self._mapped[1].release(name)

    def _header(self, shard: str) -> tuple[dict, int]:
        if shard not in self._headers:
            self._headers[shard] = _read_header(self.folder / shard)
        return self._headers[shard]

    def _entry(self, name: str) -> dict:
        return self._header(self._shard_of[name])[0][name]

    def _data_start(self, shard: str) -> int:
        return self._header(shard)[1]

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._entry(name)["dtype"]
        if code not in DTYPES:
            raise DeltaMoEError(f"{self.folder}/{self._shard_of[name]}: tensor {name!r} has dtype {code}, expected one "
                                f"of {', '.join(DTYPES)}")
        return DTYPES[code]

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors, shard by shard, so at most one shard's file handle is mapped at a time."""
        for shard, names in self.keys_by_shard().items():
            if self._hasher is not None:
                self._hasher.started(shard)
            for name in names:
                yield name, self.get(name)

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
        return _name_shards(self.folder, self._written, self.total_bytes)


def _name_shards(folder: Path, written: list[tuple[str, list[str]]], total_bytes: int) -> list[str]:
    """Rename temporary shards to HF's names (one shard: model.safetensors) and write the index for several."""
    count = len(written)
    if count == 1:
        (folder / written[0][0]).rename(folder / SINGLE_NAME)
        return [SINGLE_NAME]
    weight_map = {}
    names = []
    for i, (tmp_name, tensor_names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        (folder / tmp_name).rename(folder / final)
        names.append(final)
        weight_map.update({t: final for t in tensor_names})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _safetensors_dtype_rank() -> dict[torch.dtype, int]:
    """The order safetensors lays tensors out in a file (by dtype, then name), read from safetensors itself."""
    from safetensors.torch import save

    names = {dtype: f"t{i:02d}" for i, dtype in enumerate(DTYPES.values())}
    data = save({names[d]: torch.zeros(1, dtype=d) for d in DTYPES.values()})
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    offsets = {d: header[n]["data_offsets"][0] for d, n in names.items()}
    return {d: rank for rank, d in enumerate(sorted(offsets, key=offsets.get))}  # 0: first in the file


_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_DTYPE_RANK: dict[torch.dtype, int] = {}


class PlannedShardWriter:
    """Write tensors whose names, dtypes and shapes are known in advance, in any order, without a shard buffer.

    The shards are laid out up front exactly as `ShardWriter` + `safetensors.torch.save_file` would write the same
    tensors added in `specs` order (same shard split, same header, same byte offsets): the files are byte-identical.
    Each shard's header is written first; a background thread then writes each tensor at its offset as soon as it is
    added, so the disk writes overlap the caller's reads and arithmetic, and memory holds only the tensors waiting to
    be written (`max_pending_bytes`, or one tensor when it is larger) instead of a whole output shard.

    `buffer(name)` gives an empty tensor to compute a planned tensor into; its memory comes back to a pool once the
    tensor is written, so a conversion reuses the same few hundred MiB instead of allocating (and page-faulting: 3 s
    per GB measured on a fresh 2-core VM) a new tensor for every output.
    """

    def __init__(self, folder: str | os.PathLike, specs: list[tuple[str, torch.dtype, list[int]]],
                 max_shard_bytes: int = 2 * 1024**3, metadata: dict[str, str] | None = None,
                 max_pending_bytes: int = 512 * 1024**2):
        if not _DTYPE_RANK:
            _DTYPE_RANK.update(_safetensors_dtype_rank())
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, torch.dtype, list[int], int]]] = []
        shard_bytes = 0
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            if not shards or (shards[-1] and shard_bytes + nbytes > max_shard_bytes):
                shards.append([])
                shard_bytes = 0
            shards[-1].append((name, dtype, list(shape), nbytes))
            shard_bytes += nbytes
        self._place: dict[str, tuple[int, int, torch.dtype, list[int]]] = {}  # name -> (shard, file offset, ...)
        self._files: list[tuple[str, list[str]]] = []
        self._fds: list[int] = []
        self._remaining: list[int] = []
        self.total_bytes = 0
        for index, entries in enumerate(shards):
            entries.sort(key=lambda e: (_DTYPE_RANK[e[1]], e[0]))
            header: dict = {"__metadata__": metadata}
            offset = 0
            for name, dtype, shape, nbytes in entries:
                if name in self._place or name in header:
                    raise ValueError(f"tensor {name!r} planned twice")
                header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # safetensors pads its header with spaces to 8 bytes
            start = 8 + len(text)
            for name, dtype, shape, _ in entries:
                self._place[name] = (index, start + header[name]["data_offsets"][0], dtype, shape)
            tmp_name = f"shard-{index:05d}.tmp.safetensors"
            fd = os.open(self.folder / tmp_name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            _pwrite_all(fd, memoryview(len(text).to_bytes(8, "little") + text), 0)
            os.ftruncate(fd, start + offset)
            self._files.append((tmp_name, [e[0] for e in entries]))
            self._remaining.append(len(entries))
            self.total_bytes += offset
        self._written: set[str] = set()
        self._queue: queue.Queue = queue.Queue()
        self._pending_bytes = 0
        self._max_pending_bytes = max_pending_bytes
        self._cond = threading.Condition()
        self._done_shards: list[int] = []
        self._free: list[torch.Tensor] = []  # byte buffers back from the writer thread, for `buffer`
        self._out_bytes = 0  # bytes of pool buffers handed out and not yet written
        self._owned: dict[int, torch.Tensor] = {}  # data_ptr of a handed-out buffer's view -> its byte buffer
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="safetensors writer", daemon=True)
        self._thread.start()

    def buffer(self, name: str, wait: bool = True) -> torch.Tensor | None:
        """An uninitialised tensor of `name`'s planned dtype and shape, from the pool; pass it to `add` when filled.

        `wait=False`: None instead of waiting for the writer to free memory (a caller that holds other buffers it has
        not added yet must add those first, or it would wait for itself).
        """
        _, _, dtype, shape = self._place[name]
        nbytes = math.prod(shape) * dtype.itemsize
        def fitting() -> int | None:
            fits = [k for k, b in enumerate(self._free) if b.numel() >= nbytes]
            return min(fits, key=lambda k: self._free[k].numel()) if fits else None

        def ready() -> bool:
            return (self._error is not None or fitting() is not None or self._out_bytes == 0
                    or self._out_bytes + nbytes <= self._max_pending_bytes)

        with self._cond:  # new memory only while the buffers out (being filled or written) stay under the bound
            if not wait and not ready():
                return None
            self._cond.wait_for(ready)
            k = fitting()
            raw = self._free.pop(k) if k is not None else None
            if raw is None:
                self._free = [b for b in self._free if b.numel() >= nbytes]  # too small to serve: let them go
            self._out_bytes += nbytes
        if raw is None:
            raw = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        tensor = raw[:nbytes].view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)
        if nbytes:
            self._owned[tensor.data_ptr()] = raw
        return tensor

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._raise_error()
        if name not in self._place:
            raise ValueError(f"tensor {name!r} is not in the writer's plan")
        if name in self._written:
            raise ValueError(f"tensor {name!r} written twice")
        index, offset, dtype, shape = self._place[name]
        if tensor.dtype != dtype or list(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r}: planned {dtype} {shape}, got {tensor.dtype} {list(tensor.shape)}")
        self._written.add(name)
        tensor = tensor.detach().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        raw = self._owned.pop(tensor.data_ptr(), None) if nbytes else None
        with self._cond:
            if raw is None:  # a pool buffer was already counted when it was handed out
                self._cond.wait_for(lambda: self._error is not None or self._pending_bytes == 0
                                    or self._pending_bytes + nbytes <= self._max_pending_bytes)
            self._pending_bytes += nbytes
        self._queue.put((index, offset, tensor, nbytes, raw))
        self._report_shards()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            index, offset, tensor, nbytes, raw = item
            try:
                if self._error is None and nbytes:
                    _pwrite_all(self._fds[index], memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), offset)
            except BaseException as e:  # re-raised in the caller's thread by add() / finish()
                self._error = e
            del tensor
            with self._cond:
                self._pending_bytes -= nbytes
                if raw is not None:
                    self._free.append(raw)
                    self._out_bytes -= nbytes
                self._remaining[index] -= 1
                if self._remaining[index] == 0:
                    self._done_shards.append(index)
                self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _report_shards(self) -> None:
        with self._cond:
            done, self._done_shards = self._done_shards, []
        for _ in done:
            faults.point("shard-written")

    def close(self) -> None:
        """Stop the writer thread and close the files (also after an error); idempotent."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def finish(self) -> list[str]:
        """Wait for every write, give shards their final names and write the index (when there are several)."""
        missing = [n for n in self._place if n not in self._written]
        self._queue.put(None)
        self._thread.join()
        self._raise_error()
        self._report_shards()
        if missing:
            self.close()
            raise ValueError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
        self.close()
        return _name_shards(self.folder, self._files, self.total_bytes)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
