"""Run a pipeline on Slurm: every stage one sbatch job, each job after the one before it (`--dependency=afterok`).

    deltamoe pipeline qwen2_5_7b_8gpu_h100_bf16 --launcher slurm --dry-run \\
        --workdir /checkpoints/run1 --base-model /models/Qwen2.5-7B --post-model /models/Qwen2.5-7B-Instruct \\
        --suite /data/suite.yaml                            # print the sbatch lines (a shell script), submit nothing
    deltamoe pipeline qwen2_5_7b_8gpu_h100_bf16 --launcher slurm --partition gpu --account myproj ...   # submit

Jobs. A training stage is submitted with the Slurm script of its stage (deltamoe/recipes/slurm/stage1_cpt_8gpu_h100.sbatch
on one node, the 16gpu one on more), sized from its recipe (--nodes, --gpus-per-node) and given the exact trainer
flags the local pipeline runs (`to_megatron_args`); every other stage (import, upcycle, export, graft, merge, eval,
report, prepare-data) runs its local command on one node through step_1node.sbatch, with one GPU for evaluation and
none for the streaming conversions. The scripts own container, mounts and environment and call one `srun`; the
command line states the resources (time and CPUs default to the script's #SBATCH header) and adds
--kill-on-invalid-dep=yes, so a failed stage cancels the jobs after it instead of leaving them pending forever.
Jobs are named `deltamoe-<pipeline>-<stage>`, run in the workdir (--chdir) and log to <workdir>/logs/<stage>-<jobid>.out.

The chain is linear, in the local pipeline's order: simple to read in squeue and exactly what `deltamoe pipeline`
would run on one machine (evaluations of the base and post models wait for the MoE too).

Rerunning the same command is how a chain resumes: stages whose outputs are complete are not submitted (as locally);
a stage whose job is already pending or running for this workdir (same job name and working directory in `squeue
--me`) is not submitted again, the next job waits for it; a training stage resubmitted after a failure resumes from
its last checkpoint (Megatron's --load). A queued job after a stage that needs a new job is refused (scancel it
first): it waits for a job that can no longer succeed. Every job line is checked with `sbatch --test-only` before the
first is submitted, and a failed submission cancels the jobs submitted before it. `<workdir>/manifest.json` records
job ids, sbatch lines and logs; a rerun after the chain finished marks every stage complete with its metrics. A dry
run submits and writes nothing (it reads squeue when Slurm is there, to show what a rerun would wait for).

Containers: the jobs run in $IMAGE (pyxis `--container-image`, default ~/deltamoe.sqsh, the Dockerfile's image) with
the workdir, data root, models and suite mounted, calling `python` from the image; `--no-container` runs them in
this Python environment instead (it must be on a filesystem the compute nodes share). Partition and account come
from --partition/--account or sbatch's own SBATCH_PARTITION / SBATCH_ACCOUNT; --sbatch-arg adds any sbatch option.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError

SLURM_DIR = Path(__file__).resolve().parents[1] / "slurm"
STEP_SCRIPT = SLURM_DIR / "step_1node.sbatch"
DEFAULT_IMAGE = "~/deltamoe.sqsh"
QUEUED_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")
GPU_STEPS = ("eval", "post-train")
"""Stages other than training that use a GPU when the recipe does (transformers evaluation, the demo's SFT)."""


@dataclass(kw_only=True)
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    """CPUs of every job's task (default: the script's #SBATCH --cpus-per-task)."""
    container_image: str | None = DEFAULT_IMAGE
    """pyxis image the jobs run in; None runs them in this Python environment."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra sbatch options for every job, e.g. ["--qos=high"]."""


@dataclass(kw_only=True)
class Job:
    stage: object
    """pipeline.Stage this job runs."""
    name: str
    script: Path
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    time: str
    arguments: list[str]
    """Arguments after the script: the stage's command, or the trainer flags for a training script."""
    env: dict[str, str] = field(default_factory=dict)
    """This job's own environment on top of the chain's (sbatch exports the environment it is called with)."""
    log: Path

    @property
    def variable(self) -> str:
        """Shell variable holding this job's id in the dry run's script."""
        return "job_" + re.sub(r"\W", "_", self.stage.name)

    def sbatch(self, workdir: Path, options: SlurmOptions, after: list[str]) -> list[str]:
        line = ["sbatch", "--parsable", f"--job-name={self.name}", f"--chdir={workdir}", f"--output={self.log}",
                f"--nodes={self.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={self.gpus_per_node}",
                f"--cpus-per-task={self.cpus_per_task}", f"--time={self.time}"]
        line += [f"--partition={options.partition}"] if options.partition else []
        line += [f"--account={options.account}"] if options.account else []
        line += [f"--dependency=afterok:{':'.join(after)}"] if after else []
        return [*line, "--kill-on-invalid-dep=yes", *options.sbatch_args, str(self.script), *self.arguments]


def _header(script: Path, option: str) -> str:
    match = re.search(rf"^#SBATCH --{option}=(\S+)", script.read_text(), re.MULTILINE)
    if not match:
        raise DeltaMoEError(f"{script}: no `#SBATCH --{option}=` line")
    return match.group(1)


def training_script(recipe) -> Path:
    """The Slurm script of a recipe's stage (stage 0, the dense baseline, trains like stage 1) for its node count;
    the pipeline's sbatch line sets nodes, GPUs and time, so only the script's body and defaults matter."""
    stage = "stage2_review" if recipe.train.stage == 2 else "stage1_cpt"
    return SLURM_DIR / f"{stage}_{8 if recipe.parallel.num_nodes == 1 else 16}gpu_h100.sbatch"


def training_recipes(p) -> dict:
    """Stage name -> recipe, for the pipeline's training stages."""
    recipes = {}
    for arm in p.arms:
        recipes[arm.stage("stage1")], recipes[arm.stage("stage2")] = arm.stage1, arm.stage2
    if p.dense_baseline is not None:
        recipes["dense-cpt"] = p.dense_baseline
    return recipes


def plan_jobs(p, stages: list, workdir: Path, options: SlurmOptions) -> list[Job]:
    """One job per stage, in order (nothing is submitted)."""
    from deltamoe.recipes.config import to_megatron_args

    training = training_recipes(p)
    device = p.arms[0].stage1.device
    python = "python" if options.container_image else sys.executable
    jobs = []
    for stage in stages:
        recipe = training.get(stage.name)
        if recipe is not None:
            flags = to_megatron_args(recipe)
            if stage.command[-len(flags):] != flags:
                raise DeltaMoEError(f"stage {stage.name}: the local command does not end with recipe {recipe.name}'s "
                                    f"trainer flags; the Slurm job would train something else")
            script, arguments = training_script(recipe), flags
            nodes = recipe.parallel.num_nodes
            gpus = recipe.parallel.gpus_per_node if recipe.device == "cuda" else 0
            env = {"NPROC_PER_NODE": str(recipe.parallel.gpus_per_node)}
        else:
            script, nodes, env = STEP_SCRIPT, 1, {}
            arguments = [python if a == sys.executable else a for a in stage.command]
            gpus = 1 if device == "cuda" and stage.name.split(":")[0] in GPU_STEPS else 0
        slug = re.sub(r"[^\w.+-]", "-", stage.name)  # prepare-data:indexed/es.train -> a file name, not a folder
        jobs.append(Job(stage=stage, name=f"deltamoe-{p.name}-{slug}", script=script, nodes=nodes, gpus_per_node=gpus,
                        cpus_per_task=options.cpus_per_task or int(_header(script, "cpus-per-task")),
                        time=_header(script, "time"), arguments=arguments, env=env,
                        log=workdir / "logs" / f"{slug}-%j.out"))
    return jobs


def chain_environment(p, workdir: Path, options: SlurmOptions) -> dict[str, str]:
    """What every job's script reads (sbatch passes its environment on): image, mounts, paths."""
    env = {"IMAGE": os.path.expanduser(options.container_image) if options.container_image else "",
           "DATA_ROOT": str(p.data_root), "WORKDIR": str(workdir), "PYTHONUNBUFFERED": "1"}
    if options.container_image:
        folders = [workdir, p.data_root, p.base_model, p.post_model, Path(p.suite).parent, os.environ.get("HF_HOME")]
        mounts: list[Path] = []
        for folder in sorted({Path(f).resolve() for f in folders if f}, key=lambda f: len(f.parts)):
            if not any(folder.is_relative_to(m) for m in mounts):  # a folder inside a mounted one is there already
                mounts.append(folder)
        env["MOUNTS"] = ",".join(f"{m}:{m}" for m in sorted(mounts))
    else:
        # The scripts call `python` / `torchrun`: this environment's, first on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return env


class SlurmCommands:
    """The Slurm client commands the launcher calls (a test replaces them with a fake)."""

    def check(self) -> None:
        missing = [c for c in ("sbatch", "squeue", "scancel") if shutil.which(c) is None]
        if missing:
            raise DeltaMoEError(f"--launcher slurm: {', '.join(missing)} not found on PATH (run on a Slurm login node; "
                                f"--dry-run prints the jobs anywhere)")

    def _run(self, argv: list[str], env: dict | None = None, timeout: float = 120) -> str:
        try:
            proc = subprocess.run(argv, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeltaMoEError(f"`{shlex.join(argv[:2])} ...` did not answer within {timeout:.0f} s: is slurmctld "
                                f"reachable from here (scontrol ping)?") from None
        if proc.returncode != 0:
            said = "; ".join(line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip())
            raise DeltaMoEError(f"`{shlex.join(argv[:2])} ...` failed (exit {proc.returncode}): {said}")
        return proc.stdout

    def queued(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(job name, working directory) -> (job id, state) of this user's pending and running jobs."""
        out = self._run(["squeue", "--me", "--noheader", "--states=" + ",".join(QUEUED_STATES),
                         "--format=%i|%j|%T|%Z"], timeout=60)
        jobs = {}
        for line in out.splitlines():
            job_id, name, state, workdir = line.strip().split("|", 3)
            jobs[(name, workdir)] = (job_id, state)
        return jobs

    def test_only(self, line: list[str], env: dict) -> None:
        """sbatch --test-only: Slurm checks the request (partition, account, resources) and submits nothing."""
        self._run([line[0], "--test-only", *[a for a in line[1:] if a != "--parsable"]], env)

    def submit(self, line: list[str], env: dict) -> str:
        return self._run(line, env).strip().split(";")[0]

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            subprocess.run(["scancel", *job_ids], check=False)


def _render(job: Job, line: list[str], after: list[str]) -> str:
    """One sbatch line of the dry run's script; dependencies on jobs of this chain are shell variables."""
    words = []
    for arg in line:
        # "$job_x" must stay expandable; everything else is quoted.
        words.append("--dependency=afterok:" + ":".join(after) if arg.startswith("--dependency=") else shlex.quote(arg))
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in job.env.items())
    return f"{job.variable}=$({env + ' ' if env else ''}{' '.join(words)})"


def _describe(job: Job) -> str:
    gpus = f"{job.gpus_per_node} GPU{'s' if job.gpus_per_node != 1 else ''} per node" if job.gpus_per_node else "no GPU"
    return (f"# {job.stage.name}: {job.nodes} node{'s' if job.nodes > 1 else ''}, {gpus}, {job.cpus_per_task} CPUs, "
            f"{job.time} ({job.script.name})")


def submit_pipeline(p, workdir: Path, *, start: str | None = None, until: str | None = None, dry_run: bool = False,
                    options: SlurmOptions | None = None, slurm: SlurmCommands | None = None) -> dict:
    """Submit the stages that are neither complete nor queued, as a chain; return the manifest."""
    from deltamoe.recipes.pipeline import _select, build_stages
    from deltamoe.recipes.production_pipeline import missing_inputs

    options = options or SlurmOptions()
    slurm = slurm or SlurmCommands()
    workdir = Path(workdir).resolve()
    problems = [] if p.fetch_assets else missing_inputs(p)
    if problems and not dry_run:
        raise DeltaMoEError(f"pipeline {p.name}: nothing submitted, inputs are missing:\n  " + "\n  ".join(problems))
    jobs = plan_jobs(p, _select(build_stages(p, workdir), start, until), workdir, options)
    notes = [f"# note: {problem}" for problem in problems]
    try:
        slurm.check()
        queued = slurm.queued()
    except DeltaMoEError as e:
        if not dry_run:
            raise
        queued = {}
        notes.append(f"# note: queued jobs not checked: {e}")

    plan: list[tuple[Job, str, str | None]] = []  # (job, complete | queued | submit, queued job id)
    for job in jobs:
        queued_job = queued.get((job.name, str(workdir)))
        if job.stage.done():
            plan.append((job, "complete", None))
        elif queued_job is None:
            plan.append((job, "submit", None))
        elif any(action == "submit" for _, action, _ in plan):
            earlier = next(j.stage.name for j, action, _ in plan if action == "submit")
            raise DeltaMoEError(f"stage {job.stage.name} has job {queued_job[0]} ({queued_job[1]}) queued, but the earlier "
                                f"stage {earlier} needs a new job: `scancel {queued_job[0]}`, then rerun")
        else:
            plan.append((job, "queued", queued_job[0]))

    chain_env = chain_environment(p, workdir, options)
    to_submit = [job for job, action, _ in plan if action == "submit"]
    header = [f"# deltamoe pipeline {p.name} on Slurm: {len(to_submit)} job(s) to submit, each after the one before "
              f"(afterok); logs in {workdir / 'logs'}", *notes,
              "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in chain_env.items())]
    print("\n".join(header), flush=True)

    manifest = _open_manifest(p, workdir) if not dry_run else {"stages": {}}
    records = manifest["stages"]
    previous: str | None = None  # the id (or, in a dry run, the $variable) of the chain's last job so far
    if not dry_run:
        for job in to_submit:  # nothing is submitted unless Slurm accepts every request
            slurm.test_only(job.sbatch(workdir, options, []), {**chain_env, **job.env})
        (workdir / "logs").mkdir(parents=True, exist_ok=True)  # Slurm does not make the --output folder
    submitted: list[str] = []
    for job, action, queued_id in plan:
        if action == "complete":
            print(f"# {job.stage.name}: complete, not submitted ({job.stage.output})", flush=True)
            record = records.setdefault(job.stage.name, {})
            record.update(status="complete", metrics=job.stage.metrics())
            continue
        if action == "queued":
            print(f"# {job.stage.name}: job {queued_id} already queued ({job.name}), the next job waits for it", flush=True)
            records[job.stage.name] = {"status": "queued", "launcher": "slurm", "job_id": queued_id, "job_name": job.name}
            previous = queued_id
            continue
        after = [previous] if previous else []
        line = job.sbatch(workdir, options, after)
        print(_describe(job), flush=True)
        if dry_run:
            print(_render(job, line, after), flush=True)
            previous = f"${job.variable}"
            continue
        try:
            job_id = slurm.submit(line, {**chain_env, **job.env})
        except DeltaMoEError:
            slurm.cancel(submitted)
            print(f"# cancelled the jobs submitted before: {' '.join(submitted) or 'none'}", file=sys.stderr, flush=True)
            raise
        submitted.append(job_id)
        print(f"{job_id}  {shlex.join(line)}", flush=True)
        records[job.stage.name] = {"status": "submitted", "launcher": "slurm", "job_id": job_id, "job_name": job.name,
                                   "after": after, "sbatch": line, "environment": job.env,
                                   "log": str(job.log).replace("%j", job_id), "submitted_at": time.time()}
        previous = job_id
    manifest["slurm"] = {"environment": chain_env, "options": vars(options)}
    if not dry_run:
        _write_manifest(workdir, manifest)
    if submitted:
        print(f"# submitted {len(submitted)} job(s): squeue --me --name={','.join(j.name for j in to_submit)}\n"
              f"# rerun the same command to resume after a failure or to record the finished chain", flush=True)
    elif not dry_run:
        print("# nothing to submit", flush=True)
    return manifest


def _open_manifest(p, workdir: Path) -> dict:
    import json

    from deltamoe.common.hashing import sha256_dir, versions
    from deltamoe.recipes.pipeline import _jsonable

    path = workdir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"stages": {}}
    base = Path(p.base_model)
    manifest.update(recipe=p.name, launcher="slurm", versions=versions(), config=_jsonable(p),
                    inputs={"base_model": {"path": p.base_model, "sha256": sha256_dir(base) if base.is_dir() else {}}})
    return manifest


def _write_manifest(workdir: Path, manifest: dict) -> None:
    from deltamoe.recipes.pipeline import _write_json

    workdir.mkdir(parents=True, exist_ok=True)
    _write_json(workdir / "manifest.json", manifest)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Slurm (--launcher slurm: one sbatch job per stage, chained with afterok)")
    group.add_argument("--partition", help="Slurm partition of every job (default: $SBATCH_PARTITION or the cluster's)")
    group.add_argument("--account", help="Slurm account of every job (default: $SBATCH_ACCOUNT or yours)")
    group.add_argument("--cpus-per-task", type=int, help="CPUs of every job (default: the scripts' #SBATCH value)")
    group.add_argument("--container-image", default=os.environ.get("IMAGE") or DEFAULT_IMAGE,
                       help=f"pyxis image the jobs run in (default: $IMAGE or {DEFAULT_IMAGE}; see Dockerfile)")
    group.add_argument("--no-container", action="store_true",
                       help="run the jobs in this Python environment instead (on a filesystem the nodes share)")
    group.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                       help="extra sbatch option for every job, e.g. --sbatch-arg=--qos=high (repeatable)")


def options_from_args(args: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task,
                        container_image=None if args.no_container else args.container_image,
                        sbatch_args=list(args.sbatch_arg))
