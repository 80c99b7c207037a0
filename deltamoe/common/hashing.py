"""File hashes and version stamps recorded in manifests."""

from __future__ import annotations

import hashlib
import importlib.metadata
import mmap
import os
import threading
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError

WEIGHT_SUFFIX = ".safetensors"


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_dir(path: str | os.PathLike, patterns: tuple[str, ...] = ("*.safetensors", "*.json")) -> dict[str, str]:
    """sha256 of each file in a folder matching the patterns (not recursive), by file name."""
    root = Path(path)
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    return {p.name: sha256_file(p) for p in files}


class FolderHasher:
    """`sha256_dir` of a folder, computed while a consumer streams its weights, so each byte is read from disk once.

    A background thread reads the folder's files sequentially (JSON files first, then the weight files
    in the order the consumer will read them) and hashes them; hashlib and file reads release the GIL, so this
    overlaps the consumer's arithmetic. The consumer reads tensors through mmap and first waits (`wait_for`) until the
    thread has read past the bytes it needs: the disk sees one sequential reader, and the consumer's page faults find
    the page cache filled. To keep that true for models far larger than memory the thread stays at most `lookahead`
    weight files ahead of the furthest file the consumer has started (`started`), so the page cache needs about
    `lookahead + 1` shards per input.

    Use as a context manager; `result()` finishes what the consumer did not read and returns {file name: sha256},
    equal to `sha256_dir(folder, patterns)`.
    """

    def __init__(self, folder: str | os.PathLike, order: list[str] | None = None,
                 patterns: tuple[str, ...] = ("*.safetensors", "*.json"), lookahead: int = 1,
                 chunk_bytes: int = 1 << 24):
        self.folder = Path(folder)
        files = sorted({p.name for pattern in patterns for p in self.folder.glob(pattern) if p.is_file()})
        weights = [f for f in files if f.endswith(WEIGHT_SUFFIX)]
        ordered = [f for f in dict.fromkeys(order or []) if f in weights]
        self._weights = ordered + [f for f in weights if f not in ordered]
        self._files = [f for f in files if not f.endswith(WEIGHT_SUFFIX)] + self._weights
        self._names = sorted(files)
        self._position = {name: i for i, name in enumerate(self._weights)}
        self._lookahead, self._chunk_bytes = lookahead, chunk_bytes
        self._started = -1  # index in self._weights of the furthest weight file the consumer has started
        self._stop = False  # the consumer is done: no more throttling
        self._abort = False  # the consumer failed: stop reading
        self._error: BaseException | None = None
        self._hashes: dict[str, str] = {}
        self._progress: dict[str, int] = {}  # bytes read so far of the file being read
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"sha256 {self.folder.name}", daemon=True)
        self._thread.start()

    def started(self, name: str) -> None:
        """The consumer starts reading weight file `name`: the thread may now read up to `lookahead` files beyond it."""
        i = self._position.get(name)
        if i is not None and i > self._started:
            with self._cond:
                self._started = max(self._started, i)
                self._cond.notify_all()

    def wait_for(self, name: str, end: int) -> None:
        """Block until the thread has read file `name` up to byte `end` (or has stopped)."""
        if name in self._hashes:
            return
        with self._cond:
            self._cond.wait_for(lambda: name in self._hashes or self._progress.get(name, 0) >= end
                                or self._error is not None or self._abort or not self._thread.is_alive())

    def _may_read(self, name: str) -> bool:
        i = self._position.get(name)
        return self._stop or self._abort or i is None or i <= self._started + self._lookahead

    def _run(self) -> None:
        try:
            for name in self._files:
                with self._cond:
                    self._cond.wait_for(lambda: self._may_read(name))
                digest = self._hash_file(name)
                if digest is None:
                    return
                with self._cond:
                    self._hashes[name] = digest
                    self._cond.notify_all()
        except BaseException as e:  # re-raised in the consumer's thread by result()
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _hash_file(self, name: str) -> str | None:
        """sha256 of one file read through a sequential mmap; None when aborted.

        Measured on the 2-core development VM, cold cache, 2.07 GB: 1.7-1.9 s through mmap against 3.0-6.5 s with
        16 MiB read() calls (whose copies into a user buffer cost a second of system time).
        """
        digest = hashlib.sha256()
        with open(self.folder / name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if mapped is None:
            return digest.hexdigest()
        try:
            mapped.madvise(mmap.MADV_SEQUENTIAL)  # larger read-ahead, pages dropped behind first
            with memoryview(mapped) as view:
                for start in range(0, size, self._chunk_bytes):
                    if self._abort:
                        return None
                    digest.update(view[start:start + self._chunk_bytes])
                    with self._cond:
                        self._progress[name] = min(size, start + self._chunk_bytes)
                        self._cond.notify_all()
        finally:
            mapped.close()
        return digest.hexdigest()

    def result(self) -> dict[str, str]:
        with self._cond:
            self._stop = True  # nothing is left to wait for: read the rest at full speed
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise DeltaMoEError(f"{self.folder}: cannot read a file to hash it: {self._error}") from self._error
        return {name: self._hashes[name] for name in self._names}

    def __enter__(self) -> "FolderHasher":
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._abort = True
            self._cond.notify_all()
        self._thread.join()


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a result depends on."""
    out = {}
    for name in ("deltamoe", "torch", "megatron-core", "transformers", "safetensors", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
