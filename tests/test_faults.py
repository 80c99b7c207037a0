"""Fault injection: every command killed (SIGKILL) at named points before, during and after writing, a full disk,
a failing or dying rank among several; then the checks a user relies on after a crash.

After each kill: the output is absent (or, killed after it was put in place, complete), the inputs are unchanged
(sha256 of every file), and rerunning the same command gives the same files as the unbroken run of
tests/fault_fixtures.py. Points come from `deltamoe.common.faults` (DELTAMOE_FAULT=<point>); each command runs as
`python -m deltamoe ...` in its own process (tests/cli_runner.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import cli_runner
from tests.fault_fixtures import deltamoe, must, tree_hashes, with_out

TRAIN = "deltamoe.megatron_ext.training.train"

INPUTS = {
    "prepare-data": ["text/es.jsonl", "b"], "import": ["b"], "upcycle": ["dense"], "export": ["moe"],
    "graft": ["b", "i", "hf-moe"], "merge": ["b", "i"], "eval": ["b", "suite.yaml", "text"], "report": ["eval-b"],
}
TORCH_DIST_PICKLE = ("*/.metadata",)
"""torch.distributed.checkpoint's pickled plan differs between two saves of the same tensors; the .distcp shards and
every JSON file must not."""
RUN_RECORDS = ("deltamoe_graft.json", "deltamoe_merge.json")
"""Graft and merge manifests record elapsed seconds and peak memory."""


def assert_same_output(command: str, out: Path, reference: Path) -> None:
    """Complete, valid and equal to the unbroken run's output."""
    if command == "prepare-data":
        from deltamoe.megatron_ext.data.blend import check_indexed_files
        from deltamoe.megatron_ext.data.language_tag import read_language_tag

        check_indexed_files(str(out), read_language_tag(out))
        assert tree_hashes(out) == {k.replace(reference.name, out.name, 1): v for k, v in tree_hashes(reference).items()}
    elif command in ("import", "upcycle"):
        from deltamoe.megatron_ext.runtime.checkpoint import checkpoint_dir, read_metadata

        checkpoint_dir(out), read_metadata(out)
        assert tree_hashes(out, skip=TORCH_DIST_PICKLE) == tree_hashes(reference, skip=TORCH_DIST_PICKLE)
    elif command in ("export", "graft", "merge"):
        from deltamoe.converters.safetensors_io import SafetensorsReader

        assert len(SafetensorsReader(out).read_all()) == len(SafetensorsReader(reference).read_all())
        assert tree_hashes(out, skip=RUN_RECORDS) == tree_hashes(reference, skip=RUN_RECORDS)
    elif command == "eval":
        def metrics(folder):
            return [(r["task"], r["language"], r["metrics"]) for r in json.loads((folder / "results.json").read_text())["results"]]
        assert metrics(out) == metrics(reference)
    elif command == "report":
        assert (out / "report.json").read_text() == (reference / "report.json").read_text()
        assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(p.name for p in (reference / "plots").iterdir())
    else:
        raise AssertionError(command)


def assert_absent(command: str, out: Path) -> None:
    if command == "prepare-data":
        # The sidecar is the completeness marker: without it no reader takes .bin/.idx for a dataset.
        from deltamoe.common.errors import DeltaMoEError
        from deltamoe.megatron_ext.data.language_tag import read_language_tag

        with pytest.raises(DeltaMoEError, match="missing language tag sidecar"):
            read_language_tag(out)
    else:
        assert not out.exists(), sorted(p.name for p in out.iterdir())


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


KILLS = [
    pytest.param("import", "import:converted", id="import-before-writing"),
    pytest.param("import", "import:checkpoint-saved", id="import-shards-written-no-tracker"),
    pytest.param("import", "import:output-written", id="import-written-not-renamed"),
    pytest.param("upcycle", "upcycle:checkpoint-saved", id="upcycle-during-save"),
    pytest.param("export", "export:shard-written", id="export-between-shards"),
    pytest.param("graft", "graft:shard-written", id="graft-between-shards"),
    pytest.param("graft", "graft:output-committed", id="graft-after-rename"),
    pytest.param("merge", "merge:output-written", id="merge-written-not-renamed"),
    pytest.param("prepare-data", "prepare-data:bin-idx-moved", id="prepare-data-before-sidecar"),
    pytest.param("eval", "eval:task-done", id="eval-between-tasks"),
    pytest.param("report", "write:*/.report.tmp-*/plots/*", id="report-while-writing-plots"),
]


@pytest.mark.parametrize("command, point", KILLS)
def test_killed_command_leaves_nothing_half_written_and_a_rerun_finishes_it(chain, tmp_path, command, point):
    root, argv = chain["root"], chain["argv"][command]
    reference = Path(argv[-1])
    out = tmp_path / reference.name
    line = with_out(argv, out)
    inputs = {name: tree_hashes(root / name) for name in INPUTS[command]}

    killed = deltamoe(line, env={"DELTAMOE_FAULT": point})
    assert killed.returncode == -9, f"not killed at {point}: exit {killed.returncode}\n{killed.stderr[-3000:]}"
    assert f"kill at {point}" in killed.stderr
    after_rename = point.endswith("output-committed")
    if after_rename:
        assert_same_output(command, out, reference)
    else:
        assert_absent(command, out)
    assert {name: tree_hashes(root / name) for name in INPUTS[command]} == inputs, "an input changed"

    rerun = deltamoe(line)
    if after_rename:  # the output is complete: the same command refuses to overwrite it
        assert rerun.returncode == 1 and "already exists" in rerun.stderr and "Traceback" not in rerun.stderr
    else:
        must(rerun)
        assert_same_output(command, out, reference)
    assert hidden_leftovers(tmp_path) == [], "temporary files of the killed run survived the rerun"


def test_killed_overwrite_keeps_the_old_or_the_new_output_never_neither(chain, tmp_path):
    """--overwrite swaps the folders in one renameat2(RENAME_EXCHANGE): killed before, the old output; after, the new."""
    from deltamoe.common.outputs import _exchange

    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir(), probe_b.mkdir()
    if not _exchange(probe_a, probe_b):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE): test_overwrite_without_rename_exchange_... "
                    "covers the two-rename fallback that --overwrite uses here")
    argv, reference = chain["argv"]["export"], Path(chain["argv"]["export"][-1])
    out = tmp_path / "hf-moe"
    must(deltamoe(with_out(argv, out)[:-2] + ["--dtype", "bfloat16", "--out", str(out)]))
    old = tree_hashes(out)
    line = with_out(argv, out)[:-2] + ["--overwrite", "--out", str(out)]

    killed = deltamoe(line, env={"DELTAMOE_FAULT": "export:output-written"})
    assert killed.returncode == -9 and tree_hashes(out) == old
    killed = deltamoe(line, env={"DELTAMOE_FAULT": "export:output-committed"})
    assert killed.returncode == -9
    assert_same_output("export", out, reference)
    must(deltamoe(line))
    assert_same_output("export", out, reference)
    assert hidden_leftovers(tmp_path) == []


def test_overwrite_without_rename_exchange_recovers_the_old_output(chain, tmp_path):
    """Where the exchange is unavailable, a kill between the two renames leaves OUT absent and the old output as
    .OUT.old-*: the next run puts it back before it writes."""
    argv, reference = chain["argv"]["export"], Path(chain["argv"]["export"][-1])
    out = tmp_path / "hf-moe"
    must(deltamoe(with_out(argv, out)[:-2] + ["--dtype", "bfloat16", "--out", str(out)]))
    old = tree_hashes(out)
    line = with_out(argv, out)[:-2] + ["--overwrite", "--out", str(out)]
    env = {"DELTAMOE_NO_RENAME_EXCHANGE": "1"}

    killed = deltamoe(line, env={**env, "DELTAMOE_FAULT": "export:overwrite-old-moved-aside"})
    assert killed.returncode == -9 and not out.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".hf-moe.old-")]
    assert len(aside) == 1 and tree_hashes(aside[0]) == old
    failed = deltamoe(line, env={**env, "DELTAMOE_FAULT": "export:output-written", "DELTAMOE_FAULT_ACTION": "error"})
    assert failed.returncode == 1 and "restored" in failed.stderr and "Traceback" not in failed.stderr
    assert tree_hashes(out) == old
    must(deltamoe(line, env=env))
    assert_same_output("export", out, reference)
    assert hidden_leftovers(tmp_path) == []


def test_failed_second_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    from deltamoe.common import outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setenv("DELTAMOE_NO_RENAME_EXCHANGE", "1")
    real_rename = Path.rename

    def failing_rename(self, target):
        if ".out.tmp-" in self.name:
            raise OSError(5, "Input/output error (injected)", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="injected"):
        with outputs.atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old.txt").read_text() == "old"


# ---- a full disk --------------------------------------------------------------------------------------------------

def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture(params=["tmpfs", "injected"])
def small_disk(request, tmp_path):
    """(folder, env, make_room): a 256 KiB tmpfs when the test may mount one (root), else ENOSPC injected when the
    command opens a file for writing under the folder. make_room() is "free space" before the rerun."""
    folder = tmp_path / "disk"
    if request.param == "tmpfs":
        if not _mount_tmpfs(folder, "256k"):
            pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC variant covers the same checks")
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(folder)], check=False))
        return folder, {}, lambda: subprocess.run(["mount", "-o", "remount,size=16m", str(folder)], check=True)
    folder.mkdir()
    env = {"DELTAMOE_FAULT": f"write:{folder}/.*.tmp-*/*", "DELTAMOE_FAULT_ACTION": "enospc", "DELTAMOE_FAULT_AFTER": "1"}
    return folder, env, lambda: env.clear()


@pytest.mark.parametrize("command", ["import", "export"])
def test_full_disk_is_one_clear_error_and_nothing_is_left(chain, small_disk, command):
    folder, env, make_room = small_disk
    root, argv = chain["root"], chain["argv"][command]
    reference = Path(argv[-1])
    out = folder / reference.name
    inputs = {name: tree_hashes(root / name) for name in INPUTS[command]}
    full = deltamoe(with_out(argv, out), env=dict(env))
    assert full.returncode == 1, full.stderr[-3000:]
    assert f"deltamoe {command}: error:" in full.stderr and "no space left on device" in full.stderr
    assert "Traceback" not in full.stderr
    assert sorted(os.listdir(folder)) == [], "a partial output or temporary folder was left on the full disk"
    assert {name: tree_hashes(root / name) for name in INPUTS[command]} == inputs
    make_room()
    must(deltamoe(with_out(argv, out), env=dict(env)))
    assert_same_output(command, out, reference)


# ---- training: killed while saving a checkpoint -------------------------------------------------------------------

def train_flags(chain, out: Path) -> list[str]:
    root = chain["root"]
    return ["--deltamoe-stage", "1", "--pretrained-checkpoint", str(root / "moe"), "--load", str(out), "--save", str(out),
            "--data-path", str(root / "data" / "es"), "--original-languages", "en", "--languages", "en,es",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
            "--lr", "1e-3", "--min-lr", "1e-3", "--lr-decay-style", "constant", "--log-interval", "1",
            "--save-interval", "2", "--seed", "1234"]


def train(chain, out: Path, **kw) -> cli_runner.Result:
    return cli_runner.run(TRAIN, train_flags(chain, out), **kw)


@pytest.fixture(scope="module")
def unbroken_training(chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("unbroken")
    must(train(chain, root / "stage1"))
    must(deltamoe(["export", "--megatron", root / "stage1", "--out", root / "exported"]))
    return root / "exported"


@pytest.mark.slow
@pytest.mark.parametrize("point", [
    pytest.param("write:*/iter_0000004/*", id="first-file-of-the-second-checkpoint"),
    pytest.param("write:*/latest_checkpointed_iteration.txt", id="tracker-update-of-the-second-checkpoint"),
])
def test_training_killed_while_saving_resumes_to_the_unbroken_weights(chain, unbroken_training, tmp_path, point):
    from deltamoe.megatron_ext.runtime.checkpoint import read_tracker

    out = tmp_path / "stage1"
    moe_before = tree_hashes(chain["root"] / "moe")
    env = {"DELTAMOE_FAULT": point, "DELTAMOE_FAULT_AFTER": "0" if "iter_0000004" in point else "1"}
    killed = train(chain, out, env=env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert read_tracker(out) == 2, "the second checkpoint must not count before it is complete"
    must(train(chain, out))  # the same command: resumes from iteration 2
    assert read_tracker(out) == 4
    must(deltamoe(["export", "--megatron", out, "--out", tmp_path / "exported"]))
    # The same model; the card and the record differ only in the folder names (this run's --save, its routing log).
    card_and_record = ("README.md", "deltamoe_training.json")
    assert tree_hashes(tmp_path / "exported", skip=card_and_record) == tree_hashes(unbroken_training, skip=card_and_record)
    record = (tmp_path / "exported" / "deltamoe_training.json").read_text()
    assert record.replace(str(out.resolve()), str((unbroken_training.parent / "stage1").resolve())) == \
        (unbroken_training / "deltamoe_training.json").read_text()
    assert tree_hashes(chain["root"] / "moe") == moe_before


# ---- the pipeline: killed between stages and inside one ------------------------------------------------------------

@pytest.mark.slow
def test_pipeline_killed_between_and_inside_stages_resumes(chain, tmp_path):
    from deltamoe.common.hashing import sha256_dir
    from deltamoe.megatron_ext.runtime.checkpoint import checkpoint_dir

    src = chain["root"]
    root = tmp_path / "root"
    for name in ("b", "i", "text"):
        shutil.copytree(src / name, root / name)
    shutil.copy2(src / "suite.yaml", root / "suite.yaml")
    workdir = tmp_path / "work"
    line = ["--root", str(root), "--workdir", str(workdir), "--until", "upcycle"]

    slow = 900  # each stage is a cold `python -m deltamoe ...` subprocess
    killed = cli_runner.run("tests.tiny_pipeline", line, env={"DELTAMOE_FAULT": "pipeline:stage-done"}, timeout=slow)
    assert killed.returncode == -9, killed.stderr[-3000:]
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert [n for n, s in manifest["stages"].items() if s.get("status") == "complete"] == ["prepare-data:pipeline-data/es"]

    inside = cli_runner.run("tests.tiny_pipeline", line, env={"DELTAMOE_FAULT": "import:checkpoint-saved"}, timeout=slow)
    assert inside.returncode == 1 and "stage import failed (exit -9)" in inside.stderr, inside.stderr[-3000:]
    assert "=== prepare-data:pipeline-data/es: complete, skipped" in inside.stdout
    dense = workdir / "smollm2-dense"
    assert not dense.exists()

    resumed = must(cli_runner.run("tests.tiny_pipeline", line, timeout=slow))
    assert "prepare-data:pipeline-data/es: complete, skipped" in resumed.stdout
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert all(manifest["stages"][n]["status"] == "complete" for n in ("prepare-data:pipeline-data/es", "import", "upcycle"))
    assert manifest["inputs"]["base_model"]["sha256"] == sha256_dir(root / "b")
    source_paths = (*TORCH_DIST_PICKLE, "deltamoe.json")  # deltamoe.json records the (copied) --hf folder's path
    assert tree_hashes(dense, skip=source_paths) == tree_hashes(src / "dense", skip=source_paths)
    checkpoint_dir(workdir / "smollm2-upcycled")
    assert hidden_leftovers(workdir) == []


# ---- several ranks: one fails or dies, every rank exits non-zero in bounded time -----------------------------------

BOUND_S = 150


def _assert_all_stop(results, failing_rank_message: str):
    assert all(not r.timed_out for r in results), "a rank hung: " + " | ".join(r.stderr[-800:] for r in results)
    assert all(r.returncode != 0 for r in results), [r.returncode for r in results]
    assert max(r.seconds for r in results) < BOUND_S
    assert failing_rank_message in results[0].stderr, results[0].stderr[-3000:]
    assert "Traceback" not in results[0].stderr, results[0].stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("action, point, message", [
    ("error", "import:inputs-checked", "import: checking the inputs failed on rank(s) 1"),
    ("error", "import:converted", "import: converting the weights failed on rank(s) 1"),
    ("kill", "import:converted", "import: "),
])
def test_import_on_two_ranks_stops_every_rank_when_one_fails(chain, tmp_path, action, point, message):
    line = ["import", "--hf", chain["root"] / "b", "--out", tmp_path / "dense", "--tp", "2"]
    results = cli_runner.run_ranks("deltamoe", line, num_ranks=2, timeout=BOUND_S + 30, env={
        "DELTAMOE_FAULT": point, "DELTAMOE_FAULT_RANK": "1", "DELTAMOE_FAULT_ACTION": action})
    _assert_all_stop(results, message)
    assert results[1].returncode == (-9 if action == "kill" else 1)
    assert not (tmp_path / "dense").exists() and hidden_leftovers(tmp_path) == []


@pytest.mark.slow
def test_export_on_two_ranks_refuses_on_every_rank_at_once(chain, tmp_path):
    line = ["export", "--megatron", chain["root"] / "moe", "--out", tmp_path / "hf"]
    results = cli_runner.run_ranks("deltamoe", line, num_ranks=2, timeout=BOUND_S)
    _assert_all_stop(results, "export runs in one process")
    assert "export runs in one process" in results[1].stderr and not (tmp_path / "hf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("action", ["error", "kill"])
def test_trainer_start_up_on_two_ranks_stops_every_rank_when_one_fails(chain, tmp_path, action):
    results = cli_runner.run_ranks(TRAIN, train_flags(chain, tmp_path / "stage1"), num_ranks=2, timeout=BOUND_S + 30,
                                   env={"DELTAMOE_FAULT": "train:start-up-checked", "DELTAMOE_FAULT_RANK": "1",
                                        "DELTAMOE_FAULT_ACTION": action})
    message = "training start-up checks failed on rank(s) 1" if action == "error" else "training start-up checks: lost contact"
    _assert_all_stop(results, message)
    assert not (tmp_path / "stage1" / "latest_checkpointed_iteration.txt").exists()


def test_pipeline_counts_a_dataset_done_only_with_its_language_tag(chain, tmp_path):
    """.bin/.idx without the sidecar are what a prepare-data killed before its last write leaves: not done."""
    from deltamoe.recipes.pipeline import build_stages
    from tests.tiny_pipeline import tiny_recipe

    root = tmp_path / "root"
    (root / "pipeline-data").mkdir(parents=True)
    stage = next(s for s in build_stages(tiny_recipe(root, tmp_path / "work"), tmp_path / "work")
                 if s.name.startswith("prepare-data:"))
    prefix = chain["root"] / "data" / "es"
    for ext in (".bin", ".idx"):
        shutil.copy2(f"{prefix}{ext}", f"{stage.output}{ext}")
    assert not stage.done()
    shutil.copy2(f"{prefix}.lang.json", f"{stage.output}.lang.json")
    assert stage.done()
