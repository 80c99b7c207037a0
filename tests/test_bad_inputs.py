"""Bad input, through the command line as a user types it: one error line naming the file, tensor, flag or field and
what was expected, exit status 1, no traceback, and nothing left where the output would have gone.

Each case makes its broken input from the tiny run of tests/fault_fixtures.py and runs one `python -m deltamoe ...`
(or the trainer's `python -m deltamoe.megatron_ext.training.train ...`) through tests/cli_runner.py. Bad inputs
tested elsewhere in-process (test_conversion, test_prepare_data, test_graft, test_merge, test_eval_errors,
test_upcycle, ...) are not repeated here; docs/reliability.md lists both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests import cli_runner

TRAIN = "deltamoe.megatron_ext.training.train"


@dataclass
class Case:
    command: str
    """deltamoe subcommand, or "train" for the trainer entry."""
    make: Callable[[dict, Path], tuple[list, Path]]
    """(chain, tmp) -> (arguments after the subcommand, the output path that must not appear)."""
    message: str
    """Regex the error line must match (it names the culprit and what was expected)."""


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return dst


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def copy_dataset(chain, tmp: Path, lang: str = "es", *, sidecar: bool = True) -> Path:
    for ext in (".bin", ".idx", ".lang.json") if sidecar else (".bin", ".idx"):
        shutil.copy2(f"{chain['root'] / 'data' / lang}{ext}", f"{tmp / lang}{ext}")
    return tmp / lang


_MOUNTS: list[Path] = []


@pytest.fixture(autouse=True)
def _unmount():
    yield
    while _MOUNTS:
        subprocess.run(["umount", "-l", str(_MOUNTS.pop())], check=False)


def readonly_folder(tmp: Path) -> Path:
    """A folder nobody may write in: chmod for a normal user, a read-only tmpfs for root (chmod does not stop root)."""
    folder = tmp / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("root without permission to mount: no folder here is unwritable for this process")
    _MOUNTS.append(folder)
    return folder


def train_flags(chain, tmp: Path, *, data=None, load=None, extra=()) -> list:
    root = chain["root"]
    out = load or tmp / "stage1"
    return ["--deltamoe-stage", "1", "--pretrained-checkpoint", root / "moe", "--load", out, "--save", out,
            "--data-path", data or root / "data" / "es", "--original-languages", "en", "--languages", "en,es",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
            "--lr", "1e-3", "--save-interval", "1000", *extra]


# ---- import -------------------------------------------------------------------------------------------------------

def _import_config_not_json(chain, tmp):
    hf = copy(chain["root"] / "b", tmp / "b")
    (hf / "config.json").write_text("{ not json")
    return ["--hf", hf, "--out", tmp / "out"], tmp / "out"


def _import_config_field_missing(chain, tmp):
    hf = copy(chain["root"] / "b", tmp / "b")
    edit_json(hf / "config.json", lambda c: c.pop("num_attention_heads"))
    return ["--hf", hf, "--out", tmp / "out"], tmp / "out"


def _import_index_names_wrong_shard(chain, tmp):
    from safetensors.torch import load_file, save_file

    hf = copy(chain["root"] / "b", tmp / "b")
    tensors = load_file(hf / "model.safetensors")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, hf / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[5:]}, hf / "model-00002-of-00002.safetensors")
    (hf / "model.safetensors").unlink()
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}  # every tensor claimed by shard 1
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ["--hf", hf, "--out", tmp / "out"], tmp / "out"


def _import_pp_does_not_divide_layers(chain, tmp):
    return ["--hf", chain["root"] / "b", "--out", tmp / "out", "--pp", "2"], tmp / "out"


def _import_out_is_a_file(chain, tmp):
    (tmp / "out").write_text("not a folder")
    return ["--hf", chain["root"] / "b", "--out", tmp / "out", "--overwrite"], tmp / "out" / "release"


def _import_unwritable_out(chain, tmp):
    folder = readonly_folder(tmp)
    return ["--hf", chain["root"] / "b", "--out", folder / "out"], folder / "out"


# ---- upcycle ------------------------------------------------------------------------------------------------------

def _upcycle_hf_folder_as_dense(chain, tmp):
    return ["--dense", chain["root"] / "b", "--out", tmp / "out", "--num-experts", "4", "--topk", "2"], tmp / "out"


def _dense_with_tracker(text):
    def make(chain, tmp):
        dense = copy(chain["root"] / "dense", tmp / "dense")
        (dense / "latest_checkpointed_iteration.txt").write_text(text)
        return ["--dense", dense, "--out", tmp / "out", "--num-experts", "4", "--topk", "2"], tmp / "out"
    return make


def _upcycle_metadata_not_json(chain, tmp):
    dense = copy(chain["root"] / "dense", tmp / "dense")
    (dense / "deltamoe.json").write_text('{"hf_config": ')
    return ["--dense", dense, "--out", tmp / "out", "--num-experts", "4", "--topk", "2"], tmp / "out"


# ---- export -------------------------------------------------------------------------------------------------------

def _export_format_for_dense(chain, tmp):
    return ["--megatron", chain["root"] / "dense", "--out", tmp / "out", "--format", "mixtral"], tmp / "out"


def _export_release_without_metadata(chain, tmp):
    moe = copy(chain["root"] / "moe", tmp / "moe")
    (moe / "release" / "metadata.json").unlink()
    return ["--megatron", moe, "--out", tmp / "out"], tmp / "out"


def _export_plan_not_json(chain, tmp):
    moe = copy(chain["root"] / "moe", tmp / "moe")
    (moe / "deltamoe_upcycle.json").write_text("[")
    return ["--megatron", moe, "--out", tmp / "out"], tmp / "out"


# ---- graft --------------------------------------------------------------------------------------------------------

def _post_with_other_tokenizer(chain, tmp):
    """I's weights with a tokenizer trained on other text: same shapes, other meanings for the ids."""
    from tests.test_prepare_data import train_tokenizer

    post = copy(chain["root"] / "i", tmp / "i")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (post / name).unlink(missing_ok=True)
    train_tokenizer(post, vocab_size=384)
    return post


def _graft_post_other_tokenizer(chain, tmp):
    root = chain["root"]
    return ["--base", root / "b", "--post", _post_with_other_tokenizer(chain, tmp), "--moe", root / "hf-moe",
            "--out", tmp / "out"], tmp / "out"


def _graft_scale_nan(chain, tmp):
    root = chain["root"]
    return ["--base", root / "b", "--post", root / "i", "--moe", root / "hf-moe", "--out", tmp / "out",
            "--scale", "nan"], tmp / "out"


def _graft_workers_zero(chain, tmp):
    root = chain["root"]
    return ["--base", root / "b", "--post", root / "i", "--moe", root / "hf-moe", "--out", tmp / "out",
            "--workers", "0"], tmp / "out"


def _graft_moe_expert_count_mismatch(chain, tmp):
    root = chain["root"]
    moe = copy(root / "hf-moe", tmp / "hf-moe")
    edit_json(moe / "config.json", lambda c: c.update(num_local_experts=6))
    return ["--base", root / "b", "--post", root / "i", "--moe", moe, "--out", tmp / "out"], tmp / "out"


# ---- merge --------------------------------------------------------------------------------------------------------

def _merge_density_out_of_range(chain, tmp):
    root = chain["root"]
    return ["--method", "ties", "--base", root / "b", "--models", root / "i", "--density", "1.5",
            "--out", tmp / "out"], tmp / "out"


def _merge_workers_zero(chain, tmp):
    root = chain["root"]
    return ["--method", "ties", "--base", root / "b", "--models", root / "i", "--workers", "0",
            "--out", tmp / "out"], tmp / "out"


def _merge_model_other_tokenizer(chain, tmp):
    root = chain["root"]
    return ["--method", "task_arithmetic", "--base", root / "b", "--models", _post_with_other_tokenizer(chain, tmp),
            "--out", tmp / "out"], tmp / "out"


def _merge_base_missing(chain, tmp):
    return ["--method", "task_arithmetic", "--base", tmp / "nope", "--models", chain["root"] / "i",
            "--out", tmp / "out"], tmp / "out"


# ---- prepare-data -------------------------------------------------------------------------------------------------

def _prepare(tmp, chain, input_path, *extra, tokenizer=None):
    return ["--input", input_path, "--tokenizer", tokenizer or chain["root"] / "b", "--lang", "es",
            "--out", tmp / "es", *extra], tmp / "es.bin"


def _prepare_not_utf8(chain, tmp):
    (tmp / "latin1.txt").write_bytes("año pequeño\n".encode("latin-1"))
    return _prepare(tmp, chain, tmp / "latin1.txt")


def _prepare_tokenizer_not_a_folder(chain, tmp):
    return _prepare(tmp, chain, chain["root"] / "text" / "es.jsonl", tokenizer=tmp / "nope")


def _prepare_foreign_files_at_out(chain, tmp):
    (tmp / "es.bin").write_bytes(b"someone else's data")
    (tmp / "es.idx").write_bytes(b"MMIDIDX")
    args, _ = _prepare(tmp, chain, chain["root"] / "text" / "es.jsonl")
    return args, tmp / "es.lang.json"


def _prepare_unwritable(chain, tmp):
    folder = readonly_folder(tmp)
    return ["--input", chain["root"] / "text" / "es.jsonl", "--tokenizer", chain["root"] / "b", "--lang", "es",
            "--out", folder / "es"], folder / "es.bin"


def _prepare_workers_zero(chain, tmp):
    return _prepare(tmp, chain, chain["root"] / "text" / "es.jsonl", "--workers", "0")


def _prepare_field_not_a_string(chain, tmp):
    (tmp / "n.jsonl").write_text('{"text": "uno"}\n{"text": 5}\n')
    return _prepare(tmp, chain, tmp / "n.jsonl")


def _prepare_corrupt_gzip(chain, tmp):
    (tmp / "x.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not gzip data")
    return _prepare(tmp, chain, tmp / "x.jsonl.gz")


# ---- eval ---------------------------------------------------------------------------------------------------------

def _suite(chain, tmp, text: str, name: str = "suite.yaml") -> Path:
    (tmp / name).write_text(text)
    shutil.copytree(chain["root"] / "text", tmp / "text", dirs_exist_ok=True)
    return tmp / name


def _eval(chain, tmp, suite, *extra):
    return ["--model", chain["root"] / "b", "--suite", suite, "--out", tmp / "out", *extra], tmp / "out"


GOOD_SUITE = "languages: {original: [en], new: [es]}\ntasks:\n  - {type: perplexity, language: es, data: text/es.jsonl}\n"


def _eval_bad_yaml(chain, tmp):
    return _eval(chain, tmp, _suite(chain, tmp, "languages: {original: [en], new: [es]\ntasks: [\n"))


def _eval_unknown_task_type(chain, tmp):
    return _eval(chain, tmp, _suite(chain, tmp, GOOD_SUITE.replace("perplexity", "summarise")))


def _eval_missing_data_file(chain, tmp):
    return _eval(chain, tmp, _suite(chain, tmp, GOOD_SUITE.replace("text/es.jsonl", "text/missing.jsonl")))


def _eval_limit_zero(chain, tmp):
    return _eval(chain, tmp, _suite(chain, tmp, GOOD_SUITE), "--limit", "0")


def _eval_model_missing(chain, tmp):
    args, out = _eval(chain, tmp, _suite(chain, tmp, GOOD_SUITE))
    args[1] = tmp / "no-model"
    return args, out


def _eval_unknown_task_selected(chain, tmp):
    return _eval(chain, tmp, _suite(chain, tmp, GOOD_SUITE), "--tasks", "arc")


def _eval_json_suite_not_a_mapping(chain, tmp):
    return _eval(chain, tmp, _suite(chain, tmp, "[1, 2]", name="suite.json"))


# ---- report -------------------------------------------------------------------------------------------------------

def _report_allocation_map_missing(chain, tmp):
    return [chain["root"] / "eval-b", "--out", tmp / "out", "--expert-allocation-map", tmp / "alloc.json"], tmp / "out"


def _report_results_not_json(chain, tmp):
    (tmp / "r").mkdir()
    (tmp / "r" / "results.json").write_text('{"model": ')
    return [tmp / "r", "--out", tmp / "out"], tmp / "out"


def _report_results_missing_field(chain, tmp):
    (tmp / "r").mkdir()
    (tmp / "r" / "results.json").write_text(json.dumps({"model": {"name": "x"}, "results": []}))
    return [tmp / "r", "--out", tmp / "out"], tmp / "out"


# ---- training -----------------------------------------------------------------------------------------------------

def _train_missing_prefix(chain, tmp):
    return train_flags(chain, tmp, data=tmp / "nothing-here"), tmp / "stage1"


def _train_other_tokenizer(chain, tmp):
    from tests.test_prepare_data import train_tokenizer

    train_tokenizer(tmp / "other-tokenizer", vocab_size=300)
    cli_must = cli_runner.run("deltamoe", ["prepare-data", "--input", chain["root"] / "text" / "es.jsonl", "--tokenizer",
                                           tmp / "other-tokenizer", "--lang", "es", "--out", tmp / "es"])
    assert cli_must.returncode == 0, cli_must.stderr[-2000:]
    return train_flags(chain, tmp, data=tmp / "es"), tmp / "stage1"


def _train_ids_beyond_vocab(chain, tmp):
    prefix = copy_dataset(chain, tmp)
    edit_json(Path(f"{prefix}.lang.json"), lambda t: t["tokenizer"].update(vocab_size=1000, name="big-tokenizer"))
    return train_flags(chain, tmp, data=prefix), tmp / "stage1"


def _train_no_language_tag(chain, tmp):
    return train_flags(chain, tmp, data=copy_dataset(chain, tmp, sidecar=False)), tmp / "stage1"


def _train_seq_length_beyond_positions(chain, tmp):
    flags = train_flags(chain, tmp)
    flags[flags.index("--seq-length") + 1] = "512"
    return flags, tmp / "stage1"


def _train_truncated(ext: str, cut: int):
    def make(chain, tmp):
        prefix = copy_dataset(chain, tmp)
        path = Path(f"{prefix}{ext}")
        path.write_bytes(path.read_bytes()[:-cut])
        return train_flags(chain, tmp, data=prefix), tmp / "stage1"
    return make


def _train_idx_of_another_dataset(chain, tmp):
    prefix = copy_dataset(chain, tmp)
    shutil.copy2(f"{chain['root'] / 'data' / 'en'}.idx", f"{prefix}.idx")
    return train_flags(chain, tmp, data=prefix), tmp / "stage1"


def _train_corrupt_tracker_in_load(chain, tmp):
    load = tmp / "stage1"
    load.mkdir()
    (load / "latest_checkpointed_iteration.txt").write_text("iteration 7\n")
    return train_flags(chain, tmp, load=load), load / "deltamoe.json"


def _train_allocation_map_missing(chain, tmp):
    return train_flags(chain, tmp, extra=["--expert-allocation", "by-language", "--expert-allocation-map",
                                          str(tmp / "allocation.json")]), tmp / "stage1"


def _train_te_spec_without_te(chain, tmp):
    from deltamoe.megatron_ext.runtime.specs import HAVE_TE

    if HAVE_TE and torch.cuda.is_available():
        pytest.skip("Transformer Engine and CUDA are here: --deltamoe-layer-spec te is valid")
    return train_flags(chain, tmp, extra=["--deltamoe-layer-spec", "te"]), tmp / "stage1"


def _train_megatron_assert(chain, tmp):
    return train_flags(chain, tmp, extra=["--min-lr", "1e-2"]), tmp / "stage1"


# ---- pipeline -----------------------------------------------------------------------------------------------------

def _pipeline_corrupt_tracker(chain, tmp):
    stage1 = tmp / "work" / "smollm2_135m_demo_stage1_cpu"
    stage1.mkdir(parents=True)
    (stage1 / "latest_checkpointed_iteration.txt").write_text("\n")
    return ["demo", "--workdir", tmp / "work", "--cache", tmp / "cache", "--dry-run"], tmp / "work" / "manifest.json"


def _pipeline_unknown_stage(chain, tmp):
    return ["demo", "--workdir", tmp / "work", "--cache", tmp / "cache", "--from", "stage3"], tmp / "work" / "manifest.json"


CASES = {
    "import-config-not-json": Case("import", _import_config_not_json, r"b/config\.json: not valid JSON"),
    # An absent field takes transformers' default (32 heads for Llama), as transformers would load it: the tensors
    # then do not fit, and the error names the first one and the shape the config implies.
    "import-config-field-missing": Case("import", _import_config_field_missing,
                                        r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(64, 64\), "
                                        r"config\.json implies \(512, 64\)"),
    "import-index-names-wrong-shard": Case("import", _import_index_names_wrong_shard,
                                           r"model\.safetensors\.index\.json: tensor '.*' is listed in "
                                           r"model-00001-of-00002\.safetensors but that shard does not hold it"),
    "import-pp-does-not-divide-layers": Case("import", _import_pp_does_not_divide_layers,
                                             r"pipeline-parallel size 2 does not divide num_hidden_layers \(3\)"),
    "import-out-is-a-file": Case("import", _import_out_is_a_file, r"output folder .*/out is a file, not a folder"),
    "import-unwritable-out": Case("import", _import_unwritable_out, r"output folder .*readonly/out: cannot write in .*readonly"),
    "upcycle-hf-folder-as-dense": Case("upcycle", _upcycle_hf_folder_as_dense,
                                       r"b/deltamoe\.json: missing \(expected a DeltaMoE Megatron checkpoint"),
    "upcycle-corrupt-tracker": Case("upcycle", _dense_with_tracker("12abc"),
                                    r"dense/latest_checkpointed_iteration\.txt: corrupt checkpoint tracker: expected an "
                                    r"iteration number or 'release', found '12abc'"),
    "upcycle-empty-tracker": Case("upcycle", _dense_with_tracker(""), r"corrupt checkpoint tracker: .*found an empty file"),
    "upcycle-tracker-names-missing-iteration": Case("upcycle", _dense_with_tracker("7"),
                                                    r"dense/iter_0000007: torch_dist checkpoint missing or incomplete"),
    "upcycle-metadata-not-json": Case("upcycle", _upcycle_metadata_not_json,
                                      r"dense/deltamoe\.json: not valid DeltaMoE checkpoint metadata"),
    "export-format-for-dense": Case("export", _export_format_for_dense,
                                    r"dense is a dense checkpoint; --format applies to MoE checkpoints only"),
    "export-release-without-metadata": Case("export", _export_release_without_metadata,
                                            r"moe/release: torch_dist checkpoint missing or incomplete \(no metadata\.json\)"),
    "export-plan-not-json": Case("export", _export_plan_not_json, r"moe/deltamoe_upcycle\.json: not a valid upcycle plan"),
    "graft-post-other-tokenizer": Case("graft", _graft_post_other_tokenizer,
                                       r"--post .*/i: another tokenizer than .*/b's: id \d+ is .* in .*i/tokenizer\.json"),
    "graft-scale-nan": Case("graft", _graft_scale_nan, r"--scale: expected a finite number, got nan"),
    "graft-workers-zero": Case("graft", _graft_workers_zero, r"--workers: must be at least 1, got 0"),
    "graft-moe-expert-count-mismatch": Case("graft", _graft_moe_expert_count_mismatch,
                                            r"hf-moe/deltamoe_upcycle\.json: num_experts 4 but config\.json has "
                                            r"num_local_experts = 6"),
    "merge-density-out-of-range": Case("merge", _merge_density_out_of_range, r"--density: must be in \(0, 1\], got 1\.5"),
    "merge-workers-zero": Case("merge", _merge_workers_zero, r"--workers: must be at least 1, got 0"),
    "merge-model-other-tokenizer": Case("merge", _merge_model_other_tokenizer, r"--models .*/i: another tokenizer than"),
    "merge-base-missing": Case("merge", _merge_base_missing, r"nope/config\.json: missing"),
    "prepare-data-not-utf8": Case("prepare-data", _prepare_not_utf8, r"latin1\.txt: not UTF-8 text"),
    "prepare-data-tokenizer-not-a-folder": Case("prepare-data", _prepare_tokenizer_not_a_folder,
                                                r"--tokenizer .*nope: not a folder"),
    "prepare-data-foreign-files-at-out": Case("prepare-data", _prepare_foreign_files_at_out,
                                              r"es\.bin, .*es\.idx already exists: choose another --out or pass "
                                              r"--overwrite \(no language tag: not written by `deltamoe prepare-data`\)"),
    "prepare-data-unwritable-out": Case("prepare-data", _prepare_unwritable, r"--out .*readonly/es: cannot write in"),
    "prepare-data-workers-zero": Case("prepare-data", _prepare_workers_zero, r"--workers must be at least 1, got 0"),
    "prepare-data-field-not-a-string": Case("prepare-data", _prepare_field_not_a_string,
                                            r"n\.jsonl:2: field 'text' must be a string, got int"),
    "prepare-data-corrupt-gzip": Case("prepare-data", _prepare_corrupt_gzip, r"x\.jsonl\.gz: cannot read"),
    "eval-bad-yaml": Case("eval", _eval_bad_yaml, r"suite file .*suite\.yaml could not be parsed"),
    "eval-unknown-task-type": Case("eval", _eval_unknown_task_type, r"task type 'summarise' is unknown; expected one of"),
    "eval-missing-data-file": Case("eval", _eval_missing_data_file, r"tasks\[0\]\.data .*text/missing\.jsonl does not exist"),
    "eval-limit-zero": Case("eval", _eval_limit_zero, r"--limit must be a positive integer, got 0"),
    "eval-model-missing": Case("eval", _eval_model_missing, r"model folder .*no-model does not exist"),
    "eval-unknown-task-selected": Case("eval", _eval_unknown_task_selected, r"--tasks \['arc'\] not in suite"),
    "eval-json-suite-not-a-mapping": Case("eval", _eval_json_suite_not_a_mapping,
                                          r"suite file .*suite\.json: expected a mapping at the top level"),
    "report-allocation-map-missing": Case("report", _report_allocation_map_missing,
                                          r"--expert-allocation-map .*alloc\.json: no such file"),
    "report-results-not-json": Case("report", _report_results_not_json, r"r/results\.json: not valid JSON"),
    "report-results-missing-field": Case("report", _report_results_missing_field,
                                         r"r/results\.json: missing field 'languages'"),
    "train-missing-data-prefix": Case("train", _train_missing_prefix,
                                      r"nothing-here\.lang\.json: missing language tag sidecar: no dataset at prefix"),
    "train-data-of-another-tokenizer": Case("train", _train_other_tokenizer,
                                            r"es\.lang\.json: tokenized with .*other-tokenizer .* but the model's "
                                            r"tokenizer files in .*moe hash to"),
    "train-token-ids-beyond-vocab": Case("train", _train_ids_beyond_vocab,
                                         r"es\.lang\.json: tokenized with big-tokenizer \(1000 tokens\) but the model's "
                                         r"vocab_size is 384 .*token ids >= 384 have no embedding row"),
    "train-dataset-without-language-tag": Case("train", _train_no_language_tag,
                                               r"es\.lang\.json: missing language tag sidecar: .*es\.bin exists but has "
                                               r"no language tag"),
    "train-seq-length-beyond-positions": Case("train", _train_seq_length_beyond_positions,
                                              r"--seq-length 512 exceeds the model's max_position_embeddings \(256"),
    "train-truncated-idx": Case("train", _train_truncated(".idx", 8), r"es\.idx: \d+ bytes, expected \d+ for \d+ sequences"),
    "train-truncated-bin": Case("train", _train_truncated(".bin", 2), r"es\.bin: \d+ bytes, expected \d+ .*truncated"),
    "train-idx-of-another-dataset": Case("train", _train_idx_of_another_dataset,
                                         r"es\.idx: its sequences hold \d+ tokens in all but es\.lang\.json records \d+"),
    "train-corrupt-tracker-in-load": Case("train", _train_corrupt_tracker_in_load,
                                          r"stage1/latest_checkpointed_iteration\.txt: corrupt checkpoint tracker"),
    "train-allocation-map-missing": Case("train", _train_allocation_map_missing,
                                         r"--expert-allocation-map .*allocation\.json: no such file"),
    "train-te-spec-without-te": Case("train", _train_te_spec_without_te,
                                     r"layer spec 'te' needs Transformer Engine and CUDA"),
    "train-megatron-refuses-flags": Case("train", _train_megatron_assert,
                                         r"Megatron-LM's argument check refused the flags: .*min_lr"),
    "pipeline-corrupt-tracker": Case("pipeline", _pipeline_corrupt_tracker,
                                     r"smollm2_135m_demo_stage1_cpu/latest_checkpointed_iteration\.txt: corrupt checkpoint "
                                     r"tracker"),
    "pipeline-unknown-stage": Case("pipeline", _pipeline_unknown_stage, r"unknown stage 'stage3'; stages: "),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_error_and_leaves_nothing(chain, tmp_path, name):
    case = CASES[name]
    work = tmp_path / "case"
    work.mkdir()
    args, out = case.make(chain, work)
    before = sorted(p.name for p in work.iterdir())
    if case.command == "train":
        result = cli_runner.run(TRAIN, [str(a) for a in args])
        prefix = "deltamoe train: error: "
    else:
        result = cli_runner.run("deltamoe", [case.command, *map(str, args)])
        prefix = f"deltamoe {case.command}: error: "
    errors = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.search(case.message, errors[0]), f"{errors[0]!r} does not match {case.message!r}"
    assert not out.exists(), f"{out} was left behind"
    assert sorted(p.name for p in work.iterdir()) == before, "a file or temporary folder was left behind"


def test_at_least_forty_distinct_bad_inputs_across_every_command():
    commands = {c.command for c in CASES.values()}
    assert len(CASES) >= 40
    assert commands >= {"import", "upcycle", "export", "graft", "merge", "prepare-data", "eval", "report", "train",
                        "pipeline"}


def test_docs_list_every_bad_input():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    missing = [name for name in CASES if f"| `{name}` |" not in doc]
    assert not missing, f"docs/reliability.md lacks {missing}"
