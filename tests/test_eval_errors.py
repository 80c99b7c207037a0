"""Bad input gives one clear DeltaMoEError naming the file, line or field (and the CLI exits 1 with it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from deltamoe import cli
from deltamoe.common.errors import DeltaMoEError
from deltamoe.evaluation.backends import HFBackend
from deltamoe.evaluation.data import read_records
from deltamoe.evaluation.runner import evaluate_model
from deltamoe.evaluation.suite import Suite, TaskSpec, load_suite
from deltamoe.evaluation.tasks import multiple_choice
from tests.fixtures_eval import make_tiny_eval_model, write_jsonl

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parents[1] / "deltamoe" / "evaluation" / "examples"


def _suite_file(tmp_path: Path, tasks: list[dict], **top) -> Path:
    doc = {"name": "t", "languages": {"original": ["en"], "new": ["es"]}, "tasks": tasks, **top}
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(doc))
    return path


def _mc_spec(tmp_path: Path, records: list[dict]) -> TaskSpec:
    return TaskSpec(type="multiple_choice", language="en", data=write_jsonl(tmp_path / "mc.jsonl", records))


def _suite(spec: TaskSpec) -> Suite:
    return Suite(name="t", original_languages=["en"], new_languages=["es"], tasks=[spec])


def test_missing_column_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "arc.jsonl", [{"question": "q", "choices": ["a"], "gold": 0}, {"question": "q", "gold": 0}])
    with pytest.raises(DeltaMoEError, match=r"arc\.jsonl:2: missing column 'choices' \(columns present: \['gold', 'question'\]\)"):
        read_records(path, multiple_choice.REQUIRED)


def test_missing_column_tsv(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("source\ttranslation\nHello\tHola\n")
    with pytest.raises(DeltaMoEError, match=r"pairs\.tsv:2: missing column 'target'"):
        read_records(path, {"source": str, "target": str})


def test_tsv_gold_not_an_integer(tmp_path):
    path = tmp_path / "mc.tsv"
    path.write_text("question\tchoice_0\tchoice_1\tgold\nq\ta\tb\tB\n")
    with pytest.raises(DeltaMoEError, match=r"mc\.tsv:2: column 'gold' must be an integer, got 'B'"):
        read_records(path, multiple_choice.REQUIRED)


@pytest.mark.parametrize("content", ["", "\n\n", "source\ttarget\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / ("data.tsv" if "\t" in content else "data.jsonl")
    path.write_text(content)
    with pytest.raises(DeltaMoEError, match=r"data\.(tsv|jsonl) is empty: expected at least one example"):
        read_records(path, {"source": str, "target": str})


def test_invalid_json_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DeltaMoEError, match=r"x\.jsonl:2: not valid JSON"):
        read_records(path, {"text": str})


def test_language_not_defined_by_suite(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    path = _suite_file(tmp_path, [{"type": "perplexity", "language": "fr", "data": data.name}])
    with pytest.raises(DeltaMoEError, match=r"task perplexity/fr uses language 'fr', which the suite does not define "
                                            r"\(languages: \['en', 'es'\]\)"):
        load_suite(path)


def test_translation_source_language_not_defined(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [{"source": "x", "target": "y"}])
    path = _suite_file(tmp_path, [{"type": "translation", "source_language": "de", "language": "es", "data": data.name}])
    with pytest.raises(DeltaMoEError, match=r"uses language 'de', which the suite does not define"):
        load_suite(path)


@pytest.mark.parametrize("task, message", [
    ({"type": "summarise", "language": "en", "data": "t.jsonl"}, r"task type 'summarise' is unknown"),
    ({"type": "perplexity", "language": "en", "data": "t.jsonl", "shots": 2}, r"tasks\[0\] has unknown fields \['shots'\]"),
    ({"type": "perplexity", "language": "en"}, r"tasks\[0\] is missing \['data'\]"),
    ({"type": "perplexity", "language": "en", "data": "nope.jsonl"}, r"tasks\[0\]\.data .*nope\.jsonl does not exist"),
    ({"type": "multiple_choice", "format": "piqa", "language": "en", "data": "t.jsonl"}, r"format 'piqa' is unknown"),
])
def test_bad_suite_task(tmp_path, task, message):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(DeltaMoEError, match=message):
        load_suite(_suite_file(tmp_path, [task]))


def test_duplicate_task_and_language(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    task = {"type": "perplexity", "language": "en", "data": "t.jsonl"}
    with pytest.raises(DeltaMoEError, match=r"task perplexity/en appears twice"):
        load_suite(_suite_file(tmp_path, [task, task]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_eval_model(tmp_path_factory.mktemp("eval_errors") / "llama", arch="llama_tied")


@pytest.fixture(scope="module")
def backend(model_dir) -> HFBackend:
    return HFBackend(model_dir, device="cpu", max_length=64)


def test_empty_choices(tmp_path, backend):
    spec = _mc_spec(tmp_path, [{"question": "q", "choices": ["a", "b"], "gold": 1}, {"question": "q", "choices": [], "gold": 0}])
    with pytest.raises(DeltaMoEError, match=r"mc\.jsonl:2: 'choices' is empty; expected at least one choice"):
        multiple_choice.evaluate(spec, backend, _suite(spec))


@pytest.mark.parametrize("gold", [2, -1])
def test_gold_out_of_range(tmp_path, backend, gold):
    spec = _mc_spec(tmp_path, [{"question": "q", "choices": ["a", "b"], "gold": gold}])
    with pytest.raises(DeltaMoEError, match=rf"mc\.jsonl:1: gold index {gold} is out of range for 2 choices \(0-based\)"):
        multiple_choice.evaluate(spec, backend, _suite(spec))


def test_model_folder_without_config(tmp_path, model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").unlink()
    suite = load_suite(_suite_file(tmp_path, [{"type": "perplexity", "language": "en", "data": str(EXAMPLES / "text_en.jsonl")}]))
    with pytest.raises(DeltaMoEError, match=r"model folder .*broken has no config\.json: expected a Hugging Face checkpoint folder"):
        evaluate_model(broken, suite)


def test_cli_prints_error_and_exits_1(tmp_path, model_dir, capsys):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    suite = _suite_file(tmp_path, [{"type": "perplexity", "language": "xx", "data": "t.jsonl"}])
    code = cli.main(["eval", "--model", str(model_dir), "--suite", str(suite), "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "deltamoe eval: error:" in err and "language 'xx', which the suite does not define" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_chat_template_missing(tmp_path, model_dir):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    backend = HFBackend(plain, device="cpu", max_length=64)
    with pytest.raises(DeltaMoEError, match=r"the tokenizer has no chat template, but the task asks for one"):
        backend.apply_chat_template("hi")
