"""Output folders that are either complete or absent.

Every command writes into a temporary sibling folder and renames it into place when everything is written, so an
interrupted run leaves no half-written output. An existing output folder is refused unless the caller asks to
overwrite it, and an output may never sit inside one of the inputs (that would overwrite or pollute an input).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from deltamoe.common.errors import DeltaMoEError


def check_output_dir(out: str | os.PathLike, *, inputs: list[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Validate an output folder before any work starts; returns its resolved path."""
    out_path = Path(out).resolve()
    for inp in inputs:
        if inp is None:
            continue
        inp_path = Path(inp).resolve()
        if out_path == inp_path or inp_path in out_path.parents:
            raise DeltaMoEError(f"output folder {out_path} is inside input {inp_path}: choose an output outside the inputs")
        if out_path in inp_path.parents:
            raise DeltaMoEError(f"output folder {out_path} contains input {inp_path}: choose another output folder")
    if out_path.exists() and not overwrite:
        raise DeltaMoEError(f"output folder {out_path} already exists: remove it or pass --overwrite")
    return out_path


def begin_output_dir(out: str | os.PathLike, *, inputs: list[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Validate `out` and create the temporary sibling folder to write into; returns the temporary folder."""
    out_path = check_output_dir(out, inputs=inputs, overwrite=overwrite)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit_output_dir(tmp: Path, out: str | os.PathLike) -> None:
    """Put a completely written temporary folder in place of `out` (replacing it when overwriting)."""
    out_path = Path(out).resolve()
    if out_path.exists():
        old = out_path.parent / f".{out_path.name}.old-{uuid.uuid4().hex[:8]}"
        out_path.rename(old)
        tmp.rename(out_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_path)


def discard_output_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, inputs: list[str | os.PathLike] = (), overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on failure it is removed."""
    tmp = begin_output_dir(out, inputs=inputs, overwrite=overwrite)
    try:
        yield tmp
    except BaseException:
        discard_output_dir(tmp)
        raise
    commit_output_dir(tmp, out)
