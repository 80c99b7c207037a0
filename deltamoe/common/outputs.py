"""Output folders that are either complete or absent.

Every command writes into a temporary sibling folder and renames it into place when everything is written, so an
interrupted run leaves no half-written output. An existing output folder is refused unless the caller asks to
overwrite it, and an output may never sit inside one of the inputs (that would overwrite or pollute an input).

What a reader of OUT can see, whatever happens to the writing process (POSIX rename is atomic within a filesystem):
- a new output: OUT absent, then complete;
- `--overwrite` on Linux: the old OUT, then the new one, never neither: the complete temporary folder and OUT are
  swapped in one `renameat2(RENAME_EXCHANGE)` call (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs, ...), then the old
  output, now in the temporary folder, is deleted;
- `--overwrite` where the exchange is unavailable (another OS, a filesystem without it, e.g. some network mounts):
  two renames, OUT -> `.OUT.old-*` and temporary -> OUT. If the second one fails the old output is renamed back
  and the error is raised; only a process killed between the two renames leaves OUT absent, and then the next run
  writing OUT renames the `.old-*` folder back before it starts.
Leftover temporary folders of interrupted runs (`.OUT.tmp-*`) are deleted by the next run that writes OUT.
A full disk or a folder without write permission is one error naming OUT; nothing of the run is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterator

from deltamoe.common import faults
from deltamoe.common.errors import DeltaMoEError

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_TEXTS = ("No space left on device", "os error 28", "[Errno 28]", "Disk quota exceeded", "os error 122")


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
    _restore_interrupted_overwrite(out_path)
    if out_path.exists() and not overwrite:
        raise DeltaMoEError(f"output folder {out_path} already exists: remove it or pass --overwrite")
    if out_path.exists() and not out_path.is_dir():
        raise DeltaMoEError(f"output folder {out_path} is a file, not a folder: choose another output")
    check_writable(out_path.parent, what=f"output folder {out_path}")
    return out_path


def check_writable(folder: str | os.PathLike, *, what: str) -> None:
    """Refuse, before any work, an output whose folder cannot be created or written (permissions, read-only mount).

    Probes by creating and removing a folder in the nearest existing ancestor: `os.access` says yes to root on a
    read-only filesystem, and no to nothing that ACLs allow.
    """
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise DeltaMoEError(f"{what}: {existing} is a file, not a folder")
    try:
        probe = existing / f".deltamoe-write-probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise DeltaMoEError(f"{what}: cannot write in {existing} ({e.strerror}): choose a writable location") from None


def _siblings(out_path: Path, kind: str) -> list[Path]:
    """`.OUT.tmp-*` or `.OUT.old-*` next to OUT, oldest first."""
    prefix = f".{out_path.name}.{kind}-"
    found = [p for p in out_path.parent.iterdir() if p.name.startswith(prefix)] if out_path.parent.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _restore_interrupted_overwrite(out_path: Path) -> None:
    """A run killed between the two renames of a fallback overwrite left OUT absent and the old one aside."""
    if out_path.exists() or not out_path.parent.is_dir():
        return
    for old in reversed(_siblings(out_path, "old")):
        with contextlib.suppress(OSError):  # another rank may have restored it first
            old.rename(out_path)
            print(f"restored {out_path} from {old.name} (an overwrite of it was interrupted)", file=sys.stderr)
            return


def _remove_leftovers(out_path: Path) -> None:
    leftovers = _siblings(out_path, "tmp") + (_siblings(out_path, "old") if out_path.exists() else [])
    for path in leftovers:
        print(f"removing {path} (left by an interrupted run writing {out_path.name})", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)


def begin_output_dir(out: str | os.PathLike, *, inputs: list[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Validate `out` and create the temporary sibling folder to write into; returns the temporary folder."""
    out_path = check_output_dir(out, inputs=inputs, overwrite=overwrite)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_path)
    tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if sys.platform != "linux" or os.environ.get("DELTAMOE_NO_RENAME_EXCHANGE"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # kernel or filesystem without the flag
    raise OSError(code, os.strerror(code), str(b))


def commit_output_dir(tmp: Path, out: str | os.PathLike) -> None:
    """Put a completely written temporary folder in place of `out` (replacing it when overwriting)."""
    out_path = Path(out).resolve()
    faults.point("output-written")
    if not out_path.exists():
        tmp.rename(out_path)
        faults.point("output-committed")
        return
    if _exchange(tmp, out_path):
        faults.point("output-committed")
        shutil.rmtree(tmp, ignore_errors=True)  # now the old output
        return
    old = out_path.parent / f".{out_path.name}.old-{uuid.uuid4().hex[:8]}"
    out_path.rename(old)
    try:
        faults.point("overwrite-old-moved-aside")
        tmp.rename(out_path)
    except BaseException:
        old.rename(out_path)
        raise
    faults.point("output-committed")
    shutil.rmtree(old, ignore_errors=True)


def discard_output_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library wrapped it (safetensors, torch.distributed.checkpoint)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            return True
        if any(text in str(exc) for text in _DISK_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_is_full(folder: str | os.PathLike, probe_bytes: int = 1 << 20) -> bool:
    """Whether `folder`'s filesystem refuses to take `probe_bytes` more (ENOSPC / EDQUOT).

    For writers that lose the errno on the way up: torch_dist's writer threads log "[Errno 28]" and raise only
    "Worker failure ... <class 'OSError'>" (megatron/core/dist_checkpointing/strategies/filesystem_async.py).
    """
    folder = Path(folder)
    folder = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    if folder is None:
        return False
    probe = folder / f".deltamoe-space-probe-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as e:
        return e.errno in _DISK_ERRNOS
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def disk_full_error(out: str | os.PathLike, exc: BaseException) -> DeltaMoEError:
    return DeltaMoEError(f"{out}: no space left on device while writing it ({str(exc).strip()[:200]}); the partial "
                         "output was removed: free space (or choose another location) and rerun the same command")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, inputs: list[str | os.PathLike] = (), overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on failure it is removed."""
    tmp = begin_output_dir(out, inputs=inputs, overwrite=overwrite)
    try:
        yield tmp
        commit_output_dir(tmp, out)
    except BaseException as e:
        discard_output_dir(tmp)
        if not isinstance(e, DeltaMoEError) and is_disk_full(e):
            raise disk_full_error(out, e) from None
        raise
