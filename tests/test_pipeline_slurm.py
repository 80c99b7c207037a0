"""`deltamoe pipeline ... --launcher slurm`: the whole chain as sbatch jobs chained with --dependency=afterok.

Without Slurm: the dry run of production pipelines (job order, dependencies, resources, the trainer flags of the
local pipeline), refusals before anything is submitted, and the rerun rules against a fake Slurm client. With Slurm
(slow): a one-node cluster of Debian's slurmctld/slurmd/munged started here (tests/slurm_cluster.py) runs the tiny
pipeline's chain (tests/tiny_production_pipeline.py) end to end with real sbatch and afterok dependencies, then a rerun submits
nothing.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from deltamoe import cli
from deltamoe.common.errors import DeltaMoEError
from deltamoe.recipes.config import to_megatron_args
from deltamoe.recipes.launch import slurm
from deltamoe.recipes.launch.slurm import SlurmOptions, submit_pipeline
from deltamoe.recipes.production import get_recipe
from deltamoe.recipes.production_pipeline import PIPELINES, missing_inputs, production_pipeline
from tests.tiny_production_pipeline import make_tiny_inputs, tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
CHAIN = ["import", "upcycle", "stage1", "stage2", "export", "graft", "eval:base", "eval:post", "eval:deltamoe", "report"]


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    return make_tiny_inputs(tmp_path_factory.mktemp("tiny-inputs"))


def _no_slurm_here(monkeypatch):
    def check(self):
        raise DeltaMoEError("sbatch not found on PATH")

    monkeypatch.setattr(slurm.SlurmCommands, "check", check)


def _dry_run_jobs(out: str) -> list[tuple[str, dict[str, str], list[str]]]:
    """(variable, sbatch options, arguments after the script) of each `job_x=$(... sbatch ...)` line."""
    jobs = []
    for line in out.splitlines():
        match = re.fullmatch(r"(job_\w+)=\$\((.*)\)", line)
        if not match:
            continue
        words = shlex.split(match.group(2).replace("$job_", "JOB_"))
        env = [w for w in words[:words.index("sbatch")]]
        words = words[words.index("sbatch") + 1:]
        script = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
        options = dict(w[2:].split("=", 1) if "=" in w else (w[2:], "") for w in words[:script])
        options.update(dict(e.split("=", 1) for e in env))
        options["script"] = Path(words[script]).name
        jobs.append((match.group(1), options, words[script + 1:]))
    return jobs


# ------------------------------------------------------------------------------------------------ dry run (no Slurm)
@pytest.mark.parametrize("name", ["llama3_1_8b_8gpu_h100_bf16", "qwen3_8b_16gpu_h100_fp8"])
def test_dry_run_of_a_production_pipeline_prints_the_chain(name, tmp_path, monkeypatch, capsys):
    _no_slurm_here(monkeypatch)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("IMAGE", raising=False)
    workdir = tmp_path / "run"
    argv = ["pipeline", name, "--launcher", "slurm", "--dry-run", "--workdir", str(workdir), "--base-model", "/models/B",
            "--post-model", "/models/I", "--suite", "/data/deltamoe/suite.yaml", "--partition", "gpu", "--account", "proj",
            "--sbatch-arg=--qos=high"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    jobs = _dry_run_jobs(out)
    assert [v for v, _, _ in jobs] == ["job_" + re.sub(r"\W", "_", s) for s in CHAIN]
    stage1_name, stage2_name = PIPELINES[name]
    nodes = get_recipe(stage1_name).parallel.num_nodes
    for i, (variable, options, arguments) in enumerate(jobs):
        stage = CHAIN[i]
        assert options["job-name"] == f"deltamoe-{name}-{stage.replace(':', '-')}"
        assert options.get("dependency") == (f"afterok:JOB_{jobs[i - 1][0][4:]}" if i else None)  # the previous job
        assert options["kill-on-invalid-dep"] == "yes" and options["qos"] == "high"
        assert options["partition"] == "gpu" and options["account"] == "proj"
        assert options["chdir"] == str(workdir) and options["output"] == f"{workdir}/logs/{stage.replace(':', '-')}-%j.out"
        if stage in ("stage1", "stage2"):
            recipe = get_recipe(stage1_name if stage == "stage1" else stage2_name)
            assert options["script"] == f"{stage}_{'cpt' if stage == 'stage1' else 'review'}_{8 * nodes}gpu_h100.sbatch"
            assert (options["nodes"], options["gpus-per-node"], options["NPROC_PER_NODE"]) == (str(nodes), "8", "8")
            assert options["time"] == {("stage1", 1): "48:00:00", ("stage1", 2): "24:00:00", ("stage2", 1): "04:00:00",
                                       ("stage2", 2): "02:00:00"}[stage, nodes]  # the script's header
            placed = dataclasses.replace(recipe, workdir=str(workdir), data_root="/data/deltamoe",
                                         model=dataclasses.replace(recipe.model, hf_model="/models/B"))
            assert arguments == to_megatron_args(placed)  # exactly the local pipeline's trainer flags
        else:
            assert options["script"] == "step_1node.sbatch" and options["nodes"] == "1"
            assert options["gpus-per-node"] == ("1" if stage.startswith("eval:") else "0")
            assert options["time"] == "04:00:00" and options["cpus-per-task"] == "16"
            assert arguments[:3] == ["python", "-m", "deltamoe"]  # the image's python, not this machine's
            assert arguments[3] == stage.split(":")[0]
    upcycled = jobs[1][2][jobs[1][2].index("--out") + 1]
    assert jobs[2][2][jobs[2][2].index("--pretrained-checkpoint") + 1] == upcycled == str(
        workdir / get_recipe(stage1_name).init_checkpoint)
    # The inputs a cluster must supply are named, the container mounts them, and nothing is written.
    assert "# note: base model /models/B: no config.json" in out and "data prefix /data/deltamoe/el/cpt_text_document" in out
    mounts = re.search(r"MOUNTS=(\S+)", out).group(1).split(",")
    assert sorted(mounts) == sorted([f"{workdir}:{workdir}", "/models/B:/models/B", "/models/I:/models/I",
                                     "/data/deltamoe:/data/deltamoe"])  # the suite is inside the data root
    assert re.search(r"IMAGE=(\S+)", out).group(1) == str(Path("~/deltamoe.sqsh").expanduser())
    assert not workdir.exists()
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0  # the dry run is a shell script


def test_every_demo_stage_gets_its_own_job_name_and_log(tmp_path):
    from deltamoe.recipes.demo_pipeline import demo
    from deltamoe.recipes.pipeline import build_stages

    workdir = tmp_path / "w"
    p = demo(cache=tmp_path / "cache", workdir=workdir, expert_allocation="both", quick=True)
    jobs = slurm.plan_jobs(p, build_stages(p, workdir), workdir, SlurmOptions(container_image=None))
    assert len({j.name for j in jobs}) == len({j.log for j in jobs}) == len(jobs) > 20
    assert all(j.log.parent == workdir / "logs" for j in jobs)  # prepare-data:indexed/x.train is no sub-folder
    training = {j.stage.name: j.script.name for j in jobs if j.script != slurm.STEP_SCRIPT}
    assert training == {"stage1": "stage1_cpt_8gpu_h100.sbatch", "stage2": "stage2_review_8gpu_h100.sbatch",
                        "stage1:by-language": "stage1_cpt_8gpu_h100.sbatch",
                        "stage2:by-language": "stage2_review_8gpu_h100.sbatch", "dense-cpt": "stage1_cpt_8gpu_h100.sbatch"}
    assert all(j.gpus_per_node == 0 for j in jobs)  # a CPU recipe asks for no GPU anywhere


def test_options_without_effect_are_named(tmp_path, capsys):
    argv = ["pipeline", "demo", "--dry-run", "--workdir", str(tmp_path / "w"), "--cache", str(tmp_path / "cache"),
            "--partition", "gpu", "--base-model", "/models/B"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "--partition has no effect here (--launcher slurm only)" in err
    assert "--base-model has no effect here (production pipelines only)" in err


def test_production_pipelines_pair_every_stage1_with_its_stage2():
    assert len(PIPELINES) == 12
    for name, (stage1, stage2) in PIPELINES.items():
        assert get_recipe(stage2).init_checkpoint == stage1 and name == stage1.replace("_stage1_cpt_", "_")
    with pytest.raises(DeltaMoEError, match=r"needs --base-model, --post-model, --suite"):
        production_pipeline("qwen2_5_7b_8gpu_h100_bf16", workdir="/ckpt")
    with pytest.raises(DeltaMoEError, match=r"unknown production pipeline 'qwen2_5_7b'"):
        production_pipeline("qwen2_5_7b", base_model="b", post_model="i", suite="s", workdir="w")
    assert cli.main(["pipeline", "nope"]) == 1


# ------------------------------------------------------------------------------------------------ rules (fake Slurm)
class FakeSlurm(slurm.SlurmCommands):
    def __init__(self, queued=None, fail_submit_at: int | None = None, refuse_test: bool = False):
        self._queued, self.fail_submit_at, self.refuse_test = queued or {}, fail_submit_at, refuse_test
        self.calls: list[tuple[str, list[str]]] = []

    def check(self):
        pass

    def queued(self):
        return self._queued

    def test_only(self, line, env):
        self.calls.append(("test", line))
        if self.refuse_test:
            raise DeltaMoEError("`sbatch --test-only ...` failed (exit 1): invalid partition specified: gpu")

    def submit(self, line, env):
        self.calls.append(("submit", line))
        submitted = sum(kind == "submit" for kind, _ in self.calls)
        if submitted == self.fail_submit_at:
            raise DeltaMoEError("`sbatch --parsable ...` failed (exit 1): QOSMaxSubmitJobPerUserLimit")
        return str(100 + submitted)

    def cancel(self, job_ids):
        self.calls.append(("cancel", list(job_ids)))


def _name(stage: str) -> str:
    return f"deltamoe-tiny_cpu-{stage.replace(':', '-')}"


def test_rerun_skips_complete_stages_and_waits_for_queued_ones(tiny_inputs, tmp_path, capsys):
    workdir = tmp_path / "w"
    p = tiny_pipeline(tiny_inputs, workdir)
    (workdir / "tiny-dense").mkdir(parents=True)
    (workdir / "tiny-dense" / "deltamoe.json").write_text("{}")  # import is complete
    fake = FakeSlurm(queued={(_name("upcycle"), str(workdir)): ("77", "RUNNING"),
                             (_name("stage1"), "/elsewhere"): ("78", "PENDING")})  # another workdir's job: not ours
    manifest = submit_pipeline(p, workdir, options=SlurmOptions(container_image=None), slurm=fake)
    kinds = [kind for kind, _ in fake.calls]
    assert kinds == ["test"] * 8 + ["submit"] * 8  # every request checked before the first submission
    records = manifest["stages"]
    assert records["import"]["status"] == "complete" and records["upcycle"] == {
        "status": "queued", "launcher": "slurm", "job_id": "77", "job_name": _name("upcycle")}
    submitted = [records[s] for s in CHAIN[2:]]
    assert [r["job_id"] for r in submitted] == [str(101 + i) for i in range(8)]
    assert [r["after"] for r in submitted] == [["77"]] + [[str(101 + i)] for i in range(7)]
    assert all(r["status"] == "submitted" and "--kill-on-invalid-dep=yes" in r["sbatch"] for r in submitted)
    # No container: the jobs call this Python; the training job gets the trainer flags, and the manifest is on disk.
    export = records["export"]["sbatch"]
    assert export[export.index(str(slurm.STEP_SCRIPT)) + 1:][:3] == [sys.executable, "-m", "deltamoe"]
    stage1 = records["stage1"]["sbatch"]
    assert stage1[stage1.index(str(slurm.training_script(p.arms[0].stage1))) + 1:] == to_megatron_args(p.arms[0].stage1)
    assert json.loads((workdir / "manifest.json").read_text())["stages"]["stage2"]["after"] == ["101"]
    assert (workdir / "logs").is_dir() and "submitted 8 job(s)" in capsys.readouterr().out


def test_a_queued_job_after_a_stage_that_needs_a_new_job_is_refused(tiny_inputs, tmp_path):
    workdir = tmp_path / "w"
    fake = FakeSlurm(queued={(_name("stage2"), str(workdir)): ("88", "PENDING")})
    with pytest.raises(DeltaMoEError, match=r"stage stage2 has job 88 \(PENDING\) queued, but the earlier stage import "
                                            r"needs a new job: `scancel 88`"):
        submit_pipeline(tiny_pipeline(tiny_inputs, workdir), workdir, options=SlurmOptions(container_image=None), slurm=fake)
    assert fake.calls == []


def test_nothing_stays_submitted_when_slurm_refuses_a_job(tiny_inputs, tmp_path):
    workdir = tmp_path / "w"
    p = tiny_pipeline(tiny_inputs, workdir)
    refused = FakeSlurm(refuse_test=True)
    with pytest.raises(DeltaMoEError, match="invalid partition specified"):
        submit_pipeline(p, workdir, options=SlurmOptions(container_image=None, partition="gpu"), slurm=refused)
    assert [kind for kind, _ in refused.calls] == ["test"] and not workdir.exists()
    failing = FakeSlurm(fail_submit_at=3)
    with pytest.raises(DeltaMoEError, match="QOSMaxSubmitJobPerUserLimit"):
        submit_pipeline(p, workdir, options=SlurmOptions(container_image=None), slurm=failing)
    assert failing.calls[-1] == ("cancel", ["101", "102"])


def test_missing_inputs_are_refused_before_anything_is_submitted(tiny_inputs, tmp_path):
    workdir = tmp_path / "w"
    p = tiny_pipeline(tiny_inputs, workdir)
    broken = dataclasses.replace(p, post_model=str(tmp_path / "no-post"), suite=str(tmp_path / "no-suite.yaml"))
    fake = FakeSlurm()
    with pytest.raises(DeltaMoEError) as error:
        submit_pipeline(broken, workdir, options=SlurmOptions(container_image=None), slurm=fake)
    message = str(error.value)
    assert "nothing submitted" in message and f"post-trained model {tmp_path / 'no-post'}: no config.json" in message
    assert f"evaluation suite {tmp_path / 'no-suite.yaml'}: no such file" in message
    assert fake.calls == [] and not workdir.exists()
    # A base model that is not the recipe's model: named field by field.
    wrong = production_pipeline("llama3_1_8b_8gpu_h100_bf16", base_model=tiny_inputs["base"],
                                post_model=tiny_inputs["post"], data_root=tiny_inputs["data"], suite=tiny_inputs["suite"],
                                workdir=workdir)
    problems = missing_inputs(wrong)
    assert any("hidden_size is 64, recipe llama3_1_8b_stage1_cpt_8gpu_h100_bf16 says model.hidden_size = 4096" in p
               for p in problems)
    assert any("data prefix" in p and "el/cpt_text_document" in p for p in problems)


def test_step_script_runs_one_command_in_the_container():
    text = slurm.STEP_SCRIPT.read_text()
    assert text.count("srun ") == 1 and '"$@"' in text and "--container-image" in text
    assert subprocess.run(["bash", "-n", str(slurm.STEP_SCRIPT)], check=False).returncode == 0


# ------------------------------------------------------------------------------------------------ real Slurm (slow)
@pytest.mark.slow
def test_tiny_chain_runs_on_a_one_node_slurm_cluster(tiny_inputs, tmp_path, monkeypatch, capsys):
    from tests.slurm_cluster import one_node_cluster

    workdir = tmp_path / "w"
    p = tiny_pipeline(tiny_inputs, workdir)
    options = SlurmOptions(container_image=None, cpus_per_task=1)
    with one_node_cluster(cpus=2) as cluster:
        monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
        monkeypatch.setenv("PYTHONPATH", str(REPO))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        from tests.test_training import _free_port

        monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # the training script's rendezvous port
        records = submit_pipeline(p, workdir, options=options)["stages"]
        assert list(records) == CHAIN and all(r["status"] == "submitted" for r in records.values())
        ids = [records[s]["job_id"] for s in CHAIN]
        # Slurm holds the chain: the last job waits on the one before it.
        last = cluster.job(ids[-1])
        assert last["JobState"] == "PENDING" and last["Reason"] == "Dependency", last
        assert last["Dependency"].startswith(f"afterok:{ids[-2]}"), last
        assert all(records[s]["after"] == [ids[i]] for i, s in enumerate(CHAIN[1:]))

        # Rerun while the chain is queued: every job is waited for, none submitted again.
        again = submit_pipeline(p, workdir, options=options)["stages"]
        assert [again[s]["job_id"] for s in CHAIN if again[s]["status"] == "queued"] == [
            i for s, i in zip(CHAIN, ids) if again[s]["status"] == "queued"]
        assert {again[s]["status"] for s in CHAIN} <= {"queued", "complete"} and again["report"]["status"] == "queued"
        queued = cluster.run("squeue", "--noheader", "--format=%i").split()
        assert set(queued) <= set(ids)

        jobs = cluster.wait(ids, timeout=1800)  # ~3 min on an idle 2-core machine
        logs = {s: Path(records[s]["log"]) for s in CHAIN}
        failed = [(s, jobs[i]["JobState"], logs[s].read_text()[-3000:] if logs[s].exists() else "no log")
                  for s, i in zip(CHAIN, ids) if jobs[i]["JobState"] != "COMPLETED"]
        assert not failed, failed
        from datetime import datetime

        def seconds(info, a, b):
            return (datetime.fromisoformat(info[b]) - datetime.fromisoformat(info[a])).total_seconds()

        with capsys.disabled():  # job times, for the record (pytest -s shows them)
            print("\n".join(f"job {i} {s}: waited {seconds(jobs[i], 'SubmitTime', 'StartTime'):.0f} s, "
                            f"ran {seconds(jobs[i], 'StartTime', 'EndTime'):.0f} s" for s, i in zip(CHAIN, ids)))
        # One after the other, in the pipeline's order.
        for before, after in zip(ids, ids[1:]):
            assert jobs[after]["StartTime"] >= jobs[before]["EndTime"], (jobs[before], jobs[after])
        assert jobs[ids[2]]["NumNodes"] == "1" and jobs[ids[2]]["Command"].endswith("stage1_cpt_8gpu_h100.sbatch")
        assert all(logs[s].exists() for s in CHAIN)
        assert json.loads((workdir / "deltamoe" / "config.json").read_text())["model_type"] == "mixtral"
        report = json.loads((workdir / "report" / "report.json").read_text())
        assert [Path(i["results"]).parent.name for i in report["inputs"]] == ["base", "post", "deltamoe"]

        # Rerun after the chain: nothing to submit, every stage complete in the manifest (with its metrics).
        capsys.readouterr()
        final = submit_pipeline(p, workdir, options=options)["stages"]
        assert "nothing to submit" in capsys.readouterr().out
        assert all(final[s]["status"] == "complete" for s in CHAIN)
        assert "perplexity/es" in final["eval:deltamoe"]["metrics"] and final["stage2"]["metrics"]["log_rows"] >= 2
        assert json.loads((workdir / "manifest.json").read_text())["stages"]["report"]["status"] == "complete"
        assert cluster.run("squeue", "--noheader").strip() == ""

        # A stage made stale (its output removed) is the only one submitted again, after nothing.
        import shutil

        shutil.rmtree(workdir / "report")
        rerun = submit_pipeline(p, workdir, options=options)["stages"]
        assert [s for s in CHAIN if rerun[s]["status"] == "submitted"] == ["report"] and rerun["report"]["after"] == []
        assert cluster.wait([rerun["report"]["job_id"]], timeout=300)[rerun["report"]["job_id"]]["JobState"] == "COMPLETED"
        assert (workdir / "report" / "report.json").exists()
