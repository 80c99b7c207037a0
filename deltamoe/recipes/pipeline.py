"""Run a recipe end to end: import -> upcycle -> stage 1 -> stage 2 -> export -> graft -> evaluate -> report.

    deltamoe pipeline demo --workdir runs/demo                 # the embedded default (SmolLM2 + public texts, CPU ok)
    deltamoe pipeline demo --workdir runs/demo --scale 3       # longer, stronger effect
    deltamoe pipeline demo --workdir runs/demo --from stage2 --until graft
    deltamoe pipeline demo --workdir runs/demo --expert-allocation both   # learned vs by-language, side by side
    deltamoe pipeline qwen2_5_7b_8gpu_h100_bf16 --workdir /ckpt/run1 --base-model /models/Qwen2.5-7B \\
        --post-model /models/Qwen2.5-7B-Instruct --data-root /data/deltamoe --suite suite.yaml \\
        --launcher slurm --partition gpu --dry-run       # a production recipe pair as Slurm jobs (drop --dry-run to submit)

Each stage is the command a user would run alone (`deltamoe import ...`, `torchrun ... -m deltamoe train ...`), run
as a subprocess and printed first, with its place ("stage k/N"), the recipe's time estimate and the time since the
pipeline started; when it ends, its time and what is left. A stage whose output is complete is skipped; a training
stage whose checkpoint folder holds an earlier iteration resumes from it (Megatron's --load).
`<workdir>/manifest.json` records inputs with hashes, versions, each stage's command, timing and metrics. After the
evaluations, the model card (README.md) of every model the pipeline made gets its evaluation table.
`deltamoe --verbose pipeline ...` shows every warning, in every stage (DELTAMOE_VERBOSE is inherited).

A recipe trains one or more MoE *arms* from the same upcycled checkpoint (e.g. learned routing and experts allocated
by language, docs/allocation.md); each arm has its own stage 1, stage 2, export, graft and evaluation, and the report
puts every arm next to the baselines. The first arm's stages have the plain names (stage1, ..., graft); another
arm's carry its tag (stage1:by-language, ..., graft:by-language).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.faults import fault_point
from deltamoe.common.hashing import sha256_dir, versions


@dataclass(kw_only=True)
class PreparedData:
    jsonl: str
    """Input JSONL ({"text": ...}) relative to the data root."""
    lang: str
    prefix: str
    """Output prefix of the Megatron indexed dataset, relative to the data root (the recipes' data_blend prefixes)."""


@dataclass(kw_only=True)
class MoEArm:
    """One MoE trained from the shared upcycled checkpoint: stage 1 -> stage 2 -> export -> graft -> eval."""

    label: str
    """Model name in the evaluation and report (also the grafted model's folder under the workdir)."""
    stage1: object
    """recipes.config.Recipe of stage 1 (new experts + routers)."""
    stage2: object
    """recipes.config.Recipe of stage 2 (routers, LPR or allocation loss, replay)."""
    tag: str = ""
    """Suffix of this arm's stage names and folders; "" for the first arm (stage1, hf-moe, ...)."""

    def stage(self, name: str) -> str:
        return f"{name}:{self.tag}" if self.tag else name

    def folder(self, name: str) -> str:
        return f"{name}-{self.tag}" if self.tag else name


@dataclass(kw_only=True)
class PipelineRecipe:
    name: str
    base_model: str
    """Dense HF model B (the one that is upcycled)."""
    post_model: str | None = None
    """Post-trained dense HF model I; None: made by a short SFT of B on `sft_data` (the demo)."""
    sft_data: str | None = None
    sft_steps: int = 40
    data_root: str
    prepare: list[PreparedData]
    arms: list[MoEArm]
    """MoEs trained from the one upcycled checkpoint; every arm's stage 1 starts from the same init_checkpoint."""
    dense_baseline: object | None = None
    """recipes.config.Recipe training the dense model on stage 1's data at the same token budget (then + ParamΔ)."""
    suite: str
    """Evaluation suite file (deltamoe/evaluation schema)."""
    nproc_per_node: int = 1
    eval_args: list[str] = field(default_factory=list)
    fetch_assets: bool = False
    """Run `deltamoe fetch-demo-assets` first (the embedded default)."""
    report_note: str = ""
    """A sentence put under the report's title (`deltamoe report --note`): what this recipe's budget can show."""
    estimates: dict[str, float] = field(default_factory=dict)
    """Expected seconds per stage, by stage name or by kind (the name before ':', e.g. "eval"), as measured on the
    machine the recipe was timed on; printed next to each stage. A stage without one is shown without estimate."""

    def estimate(self, stage: str) -> float | None:
        return self.estimates.get(stage, self.estimates.get(stage.split(":")[0]))

    def __post_init__(self):
        if self.post_model is None and self.sft_data is None:
            raise DeltaMoEError(f"pipeline {self.name}: give post_model, or sft_data to make one")
        if not self.arms:
            raise DeltaMoEError(f"pipeline {self.name}: no MoE arm to train")
        for field_name in ("label", "tag"):
            values = [getattr(a, field_name) for a in self.arms]
            if len(set(values)) != len(values):
                raise DeltaMoEError(f"pipeline {self.name}: arms repeat a {field_name}: {values}")
        taken = {"base", "post", "dense-cpt+paramdelta", "report", "eval"} & {a.label for a in self.arms}
        if taken:
            raise DeltaMoEError(f"pipeline {self.name}: arm label(s) {sorted(taken)} name another model or folder")
        first = self.arms[0].stage1
        for arm in self.arms:
            if (arm.stage1.init_checkpoint, arm.stage1.upcycle) != (first.init_checkpoint, first.upcycle):
                raise DeltaMoEError(f"pipeline {self.name}: arm {arm.label!r} starts from {arm.stage1.init_checkpoint} "
                                    f"({arm.stage1.upcycle}); every arm must share the first arm's upcycled checkpoint "
                                    f"{first.init_checkpoint} ({first.upcycle})")
            if arm.stage2.init_checkpoint != arm.stage1.name:
                raise DeltaMoEError(f"pipeline {self.name}: arm {arm.label!r}: stage 2 starts from "
                                    f"{arm.stage2.init_checkpoint!r}, not its stage 1 {arm.stage1.name!r}")
        names = [r.name for a in self.arms for r in (a.stage1, a.stage2)]
        if len(set(names)) != len(names):
            raise DeltaMoEError(f"pipeline {self.name}: arms share a training recipe (checkpoint folder): {names}")

    @property
    def expert_allocation_map(self) -> dict | None:
        """The allocation map any arm trains with (the report measures every MoE against it); None without one."""
        for arm in self.arms:
            for recipe in (arm.stage1, arm.stage2):
                if recipe.train.expert_allocation_map is not None:
                    return recipe.train.expert_allocation_map
        return None


@dataclass
class Stage:
    name: str
    output: Path
    command: list[str]
    done: Callable[[], bool]
    metrics: Callable[[], dict] = lambda: {}


def _training_done(folder: Path, iterations: int) -> bool:
    from deltamoe.megatron_ext.runtime.checkpoint import read_tracker

    value = read_tracker(folder)  # a corrupt tracker is an error naming it, not a traceback
    return isinstance(value, int) and value >= iterations


def _dataset_done(prefix: Path) -> bool:
    """prepare-data writes PREFIX.lang.json last: with it, .bin and .idx are complete (language_tag.py)."""
    from deltamoe.megatron_ext.data.language_tag import dataset_files

    return all(p.exists() for p in dataset_files(prefix))


def _train_command(recipe, nproc: int) -> list[str]:
    from deltamoe.recipes.config import to_megatron_args

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "deltamoe", "train", *to_megatron_args(recipe)]


def _read_jsonl_metrics(path: Path) -> dict:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"log_rows": len(rows), "last": rows[-1] if rows else None}


def _eval_metrics(path: Path) -> dict:
    """task/language -> metrics, from an eval results.json."""
    doc = json.loads(path.read_text())
    return {f"{r['task']}/{r['language']}": r["metrics"] for r in doc["results"]}


def build_stages(p: PipelineRecipe, workdir: Path) -> list[Stage]:
    from deltamoe.recipes.megatron_args import checkpoint_dir, routing_log_file

    deltamoe = [sys.executable, "-m", "deltamoe"]
    data_root = Path(p.data_root)
    post = Path(p.post_model) if p.post_model else workdir / "post-sft"
    stages: list[Stage] = []
    if p.fetch_assets:
        from deltamoe.recipes.demo_data import suite_is_current

        stages.append(Stage("assets", data_root, [*deltamoe, "fetch-demo-assets", "--cache", str(data_root.parent)],
                            lambda: (Path(p.base_model) / "config.json").exists() and suite_is_current(data_root)))
    if p.post_model is None:
        stages.append(Stage("post-train", post,
                            [sys.executable, "-m", "deltamoe.recipes.sft", "--base", p.base_model, "--data",
                             str(data_root / p.sft_data), "--out", str(post), "--steps", str(p.sft_steps)],
                            lambda: (post / "config.json").exists()))
    for d in p.prepare:
        prefix = data_root / d.prefix
        stages.append(Stage(f"prepare-data:{d.prefix}", prefix,
                            [*deltamoe, "prepare-data", "--input", str(data_root / d.jsonl), "--tokenizer",
                             p.base_model, "--lang", d.lang, "--out", str(prefix), "--model", p.base_model],
                            lambda prefix=prefix: _dataset_done(prefix)))
    init = p.arms[0].stage1
    dense = workdir / init.init_checkpoint.replace("upcycled", "dense")
    moe = workdir / init.init_checkpoint
    stages.append(Stage("import", dense, [*deltamoe, "import", "--hf", p.base_model, "--out", str(dense)],
                        lambda: (dense / "deltamoe.json").exists()))
    up = init.upcycle
    stages.append(Stage("upcycle", moe,
                        [*deltamoe, "upcycle", "--dense", str(dense), "--out", str(moe), "--num-experts",
                         str(up.num_experts), "--topk", str(up.topk), "--variant", up.variant,
                         "--granularity", str(up.granularity),
                         "--expert-parallel-size", str(init.parallel.expert_model_parallel_size)],
                        lambda: (moe / "deltamoe.json").exists()))
    models = {"base": Path(p.base_model), "post": post}
    for arm in p.arms:
        for name, recipe in (("stage1", arm.stage1), ("stage2", arm.stage2)):
            out = Path(checkpoint_dir(recipe))
            stages.append(Stage(arm.stage(name), out, _train_command(recipe, p.nproc_per_node),
                                lambda out=out, r=recipe: _training_done(out, r.train.iterations),
                                lambda r=recipe: _read_jsonl_metrics(Path(routing_log_file(r)))))
        hf_moe = workdir / arm.folder("hf-moe")
        stages.append(Stage(arm.stage("export"), hf_moe, [*deltamoe, "export", "--megatron", checkpoint_dir(arm.stage2),
                                                          "--out", str(hf_moe)],
                            lambda hf_moe=hf_moe: (hf_moe / "config.json").exists()))
        grafted = workdir / arm.label
        stages.append(Stage(arm.stage("graft"), grafted, [*deltamoe, "graft", "--base", p.base_model, "--post", str(post),
                                                          "--moe", str(hf_moe), "--out", str(grafted)],
                            lambda grafted=grafted: (grafted / "config.json").exists()))
        models[arm.label] = grafted
    if p.dense_baseline is not None:
        cpt = Path(checkpoint_dir(p.dense_baseline))
        stages.append(Stage("dense-cpt", cpt, _train_command(p.dense_baseline, p.nproc_per_node),
                            lambda: _training_done(cpt, p.dense_baseline.train.iterations)))
        cpt_hf = workdir / "hf-dense-cpt"
        stages.append(Stage("dense-cpt-export", cpt_hf, [*deltamoe, "export", "--megatron", str(cpt), "--out", str(cpt_hf)],
                            lambda: (cpt_hf / "config.json").exists()))
        param_delta = workdir / "dense-cpt-paramdelta"
        stages.append(Stage("param-delta", param_delta,
                            [*deltamoe, "merge", "--method", "param_delta", "--base", p.base_model, "--models",
                             str(cpt_hf), str(post), "--out", str(param_delta)],
                            lambda: (param_delta / "config.json").exists()))
        models["dense-cpt+paramdelta"] = param_delta
    results = []
    for label, model in models.items():
        out = workdir / "eval" / label
        results.append(out)
        stages.append(Stage(f"eval:{label}", out, [*deltamoe, "eval", "--model", str(model), "--suite", p.suite,
                                                    "--out", str(out), "--name", label, *p.eval_args],
                            lambda out=out: (out / "results.json").exists(),
                            lambda out=out: _eval_metrics(out / "results.json")))
    report = workdir / "report"
    allocation = p.expert_allocation_map
    allocation_args = [] if allocation is None else ["--expert-allocation-map", json.dumps(allocation, sort_keys=True)]
    # A report of other models (e.g. before an arm was added) is stale: the stage reruns it with --overwrite.
    note_args = ["--note", p.report_note] if p.report_note else []
    stages.append(Stage("report", report, [*deltamoe, "report", *map(str, results), "--out", str(report),
                                           *allocation_args, *note_args, "--overwrite"],
                        lambda: _report_current(report, results, p.report_note)))
    return stages


def _report_current(report: Path, results: list[Path], note: str = "") -> bool:
    """The report exists and was made from exactly these eval results, with this note."""
    try:
        doc = json.loads((report / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return ([Path(i["results"]) for i in doc.get("inputs", [])] == [r / "results.json" for r in results]
            and doc.get("note", "") == note)


def _select(stages: list[Stage], start: str | None, until: str | None) -> list[Stage]:
    names = [s.name for s in stages]

    def index(name: str, *, last: bool) -> int:
        # "eval" names every eval:<model> stage: --from takes the first of them, --until the last.
        matches = [i for i, n in enumerate(names) if n == name or n.split(":")[0] == name]
        if not matches:
            raise DeltaMoEError(f"unknown stage {name!r}; stages: {', '.join(names)}")
        return matches[-1] if last else matches[0]

    lo = index(start, last=False) if start else 0
    hi = index(until, last=True) if until else len(stages) - 1
    return stages[lo: hi + 1]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def run_pipeline(p: PipelineRecipe, workdir: Path, *, start: str | None = None, until: str | None = None,
                 dry_run: bool = False) -> dict:
    stages = _select(build_stages(p, workdir), start, until)  # a bad --from/--until leaves nothing behind
    workdir.mkdir(parents=True, exist_ok=True)
    manifest_path = workdir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"stages": {}}
    manifest.update(recipe=p.name, versions=versions(), config=_jsonable(p),
                    inputs={"base_model": {"path": p.base_model, "sha256": sha256_dir(p.base_model)}})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    selected = stages
    pipeline_started = time.time()
    for k, stage in enumerate(selected, 1):
        estimate = p.estimate(stage.name)
        place = f"stage {k}/{len(selected)}"
        print(f"\n=== {stage.name}: {place}" + (f", estimate {_duration(estimate)}" if estimate else "")
              + f", pipeline at {_duration(time.time() - pipeline_started)}", flush=True)
        print(f"    $ {shlex.join(stage.command)}", flush=True)
        if stage.done():
            print(f"=== {stage.name}: complete, skipped ({stage.output})", flush=True)
            manifest["stages"].setdefault(stage.name, {})["status"] = "complete"
            continue
        if dry_run:
            continue
        started = time.time()
        proc = subprocess.run(stage.command, env=env)
        elapsed = round(time.time() - started, 1)
        record = {"command": stage.command, "seconds": elapsed, "returncode": proc.returncode, "output": str(stage.output)}
        manifest["stages"][stage.name] = record
        _write_json(manifest_path, manifest)
        if proc.returncode != 0 or not stage.done():
            raise DeltaMoEError(f"stage {stage.name} failed (exit {proc.returncode}) after {elapsed}s; rerun the "
                                f"pipeline to resume, or run the command above alone to debug")
        record.update(status="complete", metrics=stage.metrics())
        _write_json(manifest_path, manifest)
        left = [p.estimate(s.name) for s in selected[k:] if not s.done()]
        known = [e for e in left if e]
        rest = f", about {_duration(sum(known))}{'+' if len(known) < len(left) else ''} left" if left else ", last stage"
        print(f"=== {stage.name}: done in {elapsed}s" + (f" (estimate {_duration(estimate)})" if estimate else "")
              + f"; {place}, pipeline at {_duration(time.time() - pipeline_started)}{rest}", flush=True)
        fault_point("pipeline:stage-done")
    _write_json(manifest_path, manifest)
    if not dry_run:
        _add_evaluations_to_cards(p, workdir)
    report = workdir / "report" / "report.md"
    if report.exists() and not dry_run:
        print("\n" + report.read_text())
    return manifest


def _add_evaluations_to_cards(p: PipelineRecipe, workdir: Path) -> None:
    """Put each model's evaluation table into the model card (README.md) of the models this pipeline made."""
    from deltamoe.converters.model_card import add_evaluation

    models = {arm.label: workdir / arm.label for arm in p.arms}
    if p.dense_baseline is not None:
        models["dense-cpt+paramdelta"] = workdir / "dense-cpt-paramdelta"
    for label, folder in models.items():
        results = workdir / "eval" / label / "results.json"
        if results.exists() and (folder / "README.md").exists():
            add_evaluation(folder, results, report=workdir / "report" / "report.md")


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    return obj


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deltamoe.recipes.launch import slurm
    from deltamoe.recipes import production_pipeline

    parser.add_argument("recipe", help="pipeline recipe: 'demo' (the embedded default) or a production pipeline "
                                       "(a model's stage 1 + stage 2 recipes, e.g. qwen2_5_7b_8gpu_h100_bf16; "
                                       "deltamoe/recipes/production_pipeline.py)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where checkpoints, results and the manifest go (default: runs/<recipe>)")
    parser.add_argument("--from", dest="start", help="first stage to run (e.g. stage1)")
    parser.add_argument("--until", help="last stage to run (e.g. graft)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: run the stages here, one after the other; slurm: submit them as sbatch jobs "
                             "chained with --dependency=afterok (deltamoe/recipes/launch/slurm.py)")
    parser.add_argument("--scale", type=float, default=1.0, help="demo only: multiply training iterations")
    parser.add_argument("--quick", action="store_true", help="demo only: a few steps per stage (CI's end-to-end check)")
    parser.add_argument("--expert-allocation", choices=("learned", "by-language", "both"), default="learned",
                        help="demo only: MoE arms to train: learned routing (MoE-LPR, the default), experts allocated "
                             "by language (docs/allocation.md), or both side by side in one report")
    parser.add_argument("--cache", type=Path, default=None, help="demo asset cache (default $DELTAMOE_CACHE or ~/.cache/deltamoe)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the stage commands (with --launcher slurm: the sbatch lines) without running them")
    production_pipeline.add_arguments(parser)
    slurm.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from deltamoe.recipes.demo_pipeline import PIPELINES
    from deltamoe.recipes.production_pipeline import PIPELINES as PRODUCTION, missing_inputs, production_pipeline

    workdir = (args.workdir or Path("runs") / args.recipe).resolve()
    _warn_unused(args, demo=args.recipe in PIPELINES)
    if args.recipe in PIPELINES:
        recipe = PIPELINES[args.recipe](scale=args.scale, quick=args.quick, cache=args.cache, workdir=workdir,
                                        expert_allocation=args.expert_allocation)
    elif args.recipe in PRODUCTION:
        recipe = production_pipeline(args.recipe, base_model=args.base_model, post_model=args.post_model,
                                     data_root=args.data_root, suite=args.suite, workdir=workdir)
    else:
        raise DeltaMoEError(f"unknown pipeline recipe {args.recipe!r}; known: {', '.join([*PIPELINES, *sorted(PRODUCTION)])}")
    if args.launcher == "slurm":
        from deltamoe.recipes.launch.slurm import options_from_args, submit_pipeline

        submit_pipeline(recipe, workdir, start=args.start, until=args.until, dry_run=args.dry_run,
                        options=options_from_args(args))
        return 0
    problems = [] if recipe.fetch_assets or args.dry_run else missing_inputs(recipe)
    if problems:
        raise DeltaMoEError(f"pipeline {recipe.name}: inputs are missing:\n  " + "\n  ".join(problems))
    run_pipeline(recipe, workdir, start=args.start, until=args.until, dry_run=args.dry_run)
    return 0


def _warn_unused(args: argparse.Namespace, *, demo: bool) -> None:
    """Name the options that have no effect on this run (a typo'd launcher or recipe is otherwise silent)."""
    groups = {"demo only": {"scale": 1.0, "quick": False, "expert_allocation": "learned", "cache": None},
              "production pipelines only": {"base_model": None, "post_model": None, "data_root": None, "suite": None},
              "--launcher slurm only": {"partition": None, "account": None, "cpus_per_task": None, "no_container": False,
                                        "sbatch_arg": []}}
    unused = [] if demo else ["demo only"]
    unused += ["production pipelines only"] if demo else []
    unused += ["--launcher slurm only"] if args.launcher != "slurm" else []
    for group in unused:
        for name, default in groups[group].items():
            if getattr(args, name) != default:
                print(f"deltamoe pipeline: warning: --{name.replace('_', '-')} has no effect here ({group})",
                      file=sys.stderr)
