"""A one-node Slurm cluster on this machine, for tests: Debian's munged, slurmctld and slurmd run in the foreground.

`make slurm-test-deps` installs them (apt, as root). Everything the daemons write (key, sockets, state, spool, logs)
lives in one temporary folder and the ports are free ones, so several clusters can run side by side; clients reach
this one through SLURM_CONF (`cluster.env`). The node offers `cpus` CPUs and no GPU; accounting is off (no slurmdbd),
so finished jobs are read with `scontrol show job` (kept for an hour: MinJobAge).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_requirements() -> str | None:
    """Why this machine cannot start the cluster (None when it can)."""
    missing = [c for c in (*DAEMONS, *CLIENTS) if shutil.which(c) is None]
    if missing:
        return (f"{', '.join(missing)} not installed: run `make slurm-test-deps` (apt-get install slurmctld slurmd "
                f"munge slurm-client, as root)")
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs (CI runs the tests as root)"
    return None


class Cluster:
    def __init__(self, root: Path, node: str):
        self.root, self.node = root, node
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    def run(self, *argv: str, check: bool = True) -> str:
        proc = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}\n{self.logs()}")
        return proc.stdout

    def start(self, daemon: str, *argv: str) -> None:
        log = open(self.root / f"{daemon}.out", "w")
        proc = subprocess.Popen([daemon, *argv], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._daemons.append((daemon, proc))

    def alive(self) -> None:
        for name, proc in self._daemons:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        parts = []
        for path in sorted(self.root.glob("*.out")) + sorted(self.root.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, Dependency, StartTime, EndTime, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id)
        fields = {}
        for word in out.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, str]]:
        """Wait until every job has ended (or one ended badly); return their scontrol fields."""
        deadline = time.monotonic() + timeout
        while True:
            self.alive()
            jobs = {j: self.job(j) for j in job_ids}
            states = {j: info["JobState"] for j, info in jobs.items()}
            if all(s in TERMINAL_STATES for s in states.values()) or any(
                    s in TERMINAL_STATES and s != "COMPLETED" for s in states.values()):
                return jobs
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still running after {timeout:.0f} s: {states}\n{self.logs()}")
            time.sleep(2)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "--noheader", check=False).strip() and time.monotonic() < deadline:
                time.sleep(1)
        for _, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextlib.contextmanager
def one_node_cluster(cpus: int = 2):
    """Start munged, slurmctld and slurmd for a one-node cluster with `cpus` CPUs; stop them on exit."""
    problem = missing_requirements()
    if problem:
        raise RuntimeError(f"cannot start a Slurm cluster for the test: {problem}")
    # munged insists that every folder above its socket is searchable by everyone (pytest's tmp_path is 0700).
    root = Path(tempfile.mkdtemp(prefix="deltamoe-slurm-"))
    root.chmod(0o755)
    node = socket.gethostname().split(".")[0]
    cluster = Cluster(root, node)
    try:
        key, sock = root / "munge.key", root / "munge.socket"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        cluster.start("munged", "--foreground", f"--socket={sock}", f"--key-file={key}", f"--pid-file={root}/munged.pid",
                      f"--seed-file={root}/munged.seed", f"--log-file={root}/munged.log")
        (root / "state").mkdir()
        (root / "spool").mkdir()
        cluster.conf.write_text("\n".join([
            "ClusterName=deltamoe-test", f"SlurmctldHost={node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
            # No cgroups: processes are tracked through /proc, tasks are not bound.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
            "ReturnToService=2", "MinJobAge=3600", "SlurmctldTimeout=60", "SlurmdTimeout=120",
            f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        deadline = time.monotonic() + 30
        while not sock.exists():
            cluster.alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create its socket\n{cluster.logs()}")
            time.sleep(0.2)
        cluster.start("slurmctld", "-D", "-i", "-f", str(cluster.conf))
        cluster.start("slurmd", "-D", "-f", str(cluster.conf), "-N", node)
        deadline = time.monotonic() + 90
        while cluster.run("sinfo", "--noheader", "--format=%T", "--nodes", node, check=False).strip() != "idle":
            cluster.alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node} not idle after 90 s\n{cluster.logs()}")
            time.sleep(0.5)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
