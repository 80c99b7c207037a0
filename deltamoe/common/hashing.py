"""File hashes and version stamps recorded in manifests."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path


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


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a result depends on."""
    out = {}
    for name in ("deltamoe", "torch", "megatron-core", "transformers", "safetensors", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
