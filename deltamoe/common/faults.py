"""Test-only fault injection: make a command fail at a named point of its run, the way a cluster does.

Nothing happens unless `DELTAMOE_FAULT` is set; `fault_point(name)` is then a string comparison. The fault-injection
suite (tests/test_faults.py) sets, for one process (and the processes it starts):

    DELTAMOE_FAULT=<point>              the point, e.g. "import:checkpoint-saved", or "write:<glob>" (below)
    DELTAMOE_FAULT_ACTION=kill          kill (default): SIGKILL, as a pre-empted job or a dead node
                                        error: raise DeltaMoEError, as a bad input found on one rank only
                                        enospc: raise OSError(ENOSPC), as a full disk
    DELTAMOE_FAULT_RANK=<r>             only on that rank (RANK of torchrun / srun); default every rank
    DELTAMOE_FAULT_AFTER=<n>            let the first n arrivals pass (default 0: the first one fails)

Points are named `<command>:<what has just happened>` ("graft:shard-written"). Generic points in shared code
(output folders, safetensors shards, Megatron saves) take the running command's name from `set_command`.
`write:<glob>` fires when the process opens a file whose path matches the glob for writing (Python's `open` audit
event), which reaches code we do not own, e.g. Megatron-LM's trainer writing `latest_checkpointed_iteration.txt`.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
import sys

from deltamoe.common.errors import DeltaMoEError

ENV = "DELTAMOE_FAULT"
_command = "deltamoe"
_arrivals: dict[str, int] = {}
_audit_installed = False


def set_command(name: str) -> None:
    """Name of the running command (`import`, `train`, ...): the prefix of the generic points."""
    global _command
    _command = name


def command() -> str:
    return _command


def _armed(name: str) -> bool:
    if os.environ.get(ENV) != name:
        return False
    rank = os.environ.get("DELTAMOE_FAULT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return False
    _arrivals[name] = _arrivals.get(name, 0) + 1
    return _arrivals[name] > int(os.environ.get("DELTAMOE_FAULT_AFTER", "0"))


def _fire(name: str, path: str | None = None) -> None:
    action = os.environ.get("DELTAMOE_FAULT_ACTION", "kill")
    print(f"[deltamoe fault injection] {action} at {name}" + (f" ({path})" if path else ""), file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected)", path or name)
    raise DeltaMoEError(f"injected fault at {name}")


def fault_point(name: str) -> None:
    """Fail here when the test hook asks for this point; a no-op otherwise."""
    if ENV in os.environ and _armed(name):
        _fire(name)


def point(what: str) -> None:
    """A generic point of the running command: `fault_point(f"{command}:{what}")`."""
    if ENV in os.environ:
        fault_point(f"{_command}:{what}")


def install_from_env() -> None:
    """Arm `write:<glob>` points (an audit hook on `open`); called by the entry points, a no-op without the hook."""
    global _audit_installed
    spec = os.environ.get(ENV, "")
    if _audit_installed or not spec.startswith("write:"):
        return
    pattern = spec.removeprefix("write:")

    def on_open(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        mode, flags = args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
        path = os.fsdecode(args[0])
        if writing and fnmatch.fnmatch(path, pattern) and _armed(spec):
            _fire(spec, path)

    sys.addaudithook(on_open)
    _audit_installed = True
