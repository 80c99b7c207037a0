"""Run DeltaMoE's command lines as a user does, without paying Python + torch + megatron imports for every one.

`run("deltamoe", ["import", "--hf", ...])` is `python -m deltamoe import --hf ...`; the trainer is
`run("deltamoe.megatron_ext.training.train", [...])`. A server process imports the heavy third-party packages once
(torch, transformers, megatron-core; never deltamoe, which each command imports fresh) and forks one child per
command line; the child runs the module with `runpy` exactly as `python -m` does (`alter_sys`, `__main__`), so an
uncaught exception prints a traceback and exits 1, `sys.exit(n)` exits n, and a signal ends it as it would end any
process. `run_ranks(n, ...)` starts n such processes with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), as `srun` would start them on a cluster, and waits for all of them up to a deadline.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
               "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclass
class Result:
    returncode: int | None
    """Exit status; negative: killed by that signal; None: still running at the deadline (then killed)."""
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def base_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without a launcher's variables (pytest may hold a one-rank group itself)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("DELTAMOE_FAULT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(overrides)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-u", __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=base_env(), cwd=REPO)
        self.lock = threading.Lock()
        atexit.register(self.close)

    def request(self, payload: dict) -> list[Result]:
        with self.lock:
            self.proc.stdin.write(json.dumps(payload) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the CLI runner server died")
        return [Result(**r) for r in json.loads(line)]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_server: _Server | None = None


def _get() -> _Server:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()
    return _server


def run(module: str, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
        cwd: str | os.PathLike = REPO) -> Result:
    """`python -m module *argv` in a fresh process; `env` adds to base_env()."""
    return _get().request({"module": module, "argv": list(map(str, argv)), "env": base_env(**(env or {})),
                           "ranks": [{}], "timeout": timeout, "cwd": str(cwd)})[0]


def run_ranks(module: str, argv: list[str], *, num_ranks: int, env: dict[str, str] | None = None,
              timeout: float = 300, cwd: str | os.PathLike = REPO) -> list[Result]:
    """num_ranks processes of `python -m module *argv` with the variables torchrun gives each rank."""
    port = str(free_port())
    ranks = [dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(num_ranks), LOCAL_WORLD_SIZE=str(num_ranks),
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(num_ranks)]
    return _get().request({"module": module, "argv": list(map(str, argv)), "env": base_env(**(env or {})),
                           "ranks": ranks, "timeout": timeout, "cwd": str(cwd)})


# ---- the server side ------------------------------------------------------------------------------------------------

def _child(module: str, argv: list[str], env: dict, cwd: str, out_path: str, err_path: str) -> None:
    import atexit as child_atexit
    import runpy
    import traceback

    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: a deadline kills what it started too
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the server's request pipe stays the server's
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdin = open(os.devnull)
        sys.argv = [module, *argv]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
        child_atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _serve_one(request: dict) -> list[dict]:
    import tempfile
    import time

    tmp = Path(tempfile.mkdtemp(prefix="cli-runner-"))
    children = []
    started = time.monotonic()
    for i, extra in enumerate(request["ranks"]):
        out_path, err_path = tmp / f"{i}.out", tmp / f"{i}.err"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request["module"], request["argv"], {**request["env"], **extra}, request["cwd"],
                   str(out_path), str(err_path))
        children.append((pid, out_path, err_path))
    deadline = started + request["timeout"]
    status: dict[int, tuple[int | None, float]] = {}
    while len(status) < len(children) and time.monotonic() < deadline:
        for pid, _, _ in children:
            if pid in status:
                continue
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                code = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
                status[pid] = (code, time.monotonic() - started)
        time.sleep(0.05)
    results = []
    for pid, out_path, err_path in children:
        if pid not in status:  # past the deadline: a hang
            try:
                os.killpg(pid, 9)
            except ProcessLookupError:
                os.kill(pid, 9)
            os.waitpid(pid, 0)
            status[pid] = (None, time.monotonic() - started)
        code, seconds = status[pid]
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        results.append({"returncode": code, "stdout": read(out_path), "stderr": read(err_path),
                        "seconds": round(seconds, 2)})
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return results


def _serve() -> None:
    import warnings

    warnings.simplefilter("ignore")
    # Third-party imports only: every command imports deltamoe itself, as a fresh `python -m` would.
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import yaml  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import megatron.core  # noqa: F401
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt.gpt_model  # noqa: F401
    import megatron.training  # noqa: F401

    warnings.resetwarnings()
    for line in sys.stdin:
        if line.strip():
            sys.stdout.write(json.dumps(_serve_one(json.loads(line))) + "\n")
            sys.stdout.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
