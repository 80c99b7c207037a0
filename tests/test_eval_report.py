"""End to end through the CLI: `deltamoe eval` on three tiny models (two dense, one Mixtral) with a suite built from
the shipped examples, then `deltamoe report`: averages equal a hand computation, plots are real images."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import yaml

from deltamoe import cli
from deltamoe.common.errors import DeltaMoEError
from deltamoe.evaluation.report import build_report, load_results
from deltamoe.evaluation.suite import load_suite
from tests.fixtures_eval import make_tiny_eval_model, make_tiny_mixtral

torch.set_num_threads(1)
EVAL_DIR = Path(__file__).resolve().parents[1] / "deltamoe" / "evaluation"
KEEP = {("perplexity", None), ("arc", None), ("mmlu", None), ("flores", "es"), ("qa", None), ("routing", None)}


def _small_suite(tmp_path: Path) -> Path:
    """The example suite, trimmed to a few tasks, with data paths made absolute."""
    raw = yaml.safe_load((EVAL_DIR / "example_suite.yaml").read_text())
    tasks = []
    for task in raw["tasks"]:
        name = task.get("name", task["type"])
        if (name, None) in KEEP or (name, task["language"]) in KEEP:
            tasks.append({**task, "data": str(EVAL_DIR / task["data"]), "max_new_tokens": 8})
    raw["tasks"] = tasks
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def test_example_suite_loads():
    suite = load_suite(EVAL_DIR / "example_suite.yaml")
    assert suite.original_languages == ["en"] and suite.new_languages == ["es", "ru"]
    assert {t.type for t in suite.tasks} == {"perplexity", "multiple_choice", "translation", "instruction_following",
                                             "qa_loglik", "routing"}
    assert all(t.data.is_file() for t in suite.tasks)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_report")
    suite = _small_suite(root)
    models = {
        "base": make_tiny_eval_model(root / "base", arch="llama", seed=0),
        "dense": make_tiny_eval_model(root / "dense", arch="llama", seed=1),
        "moe": make_tiny_mixtral(root / "moe", seed=2),
    }
    outs = {}
    for name, folder in models.items():
        outs[name] = root / f"eval_{name}"
        assert cli.main(["eval", "--model", str(folder), "--suite", str(suite), "--out", str(outs[name]),
                         "--batch-size", "4", "--name", name]) == 0
    report_dir = root / "report"
    assert cli.main(["report", *map(str, outs.values()), "--out", str(report_dir)]) == 0
    return {"root": root, "suite": suite, "models": models, "outs": outs, "report": report_dir}


def test_results_record_provenance(evaluated):
    doc = json.loads((evaluated["outs"]["moe"] / "results.json").read_text())
    assert doc["model"]["path"] == str(evaluated["models"]["moe"].resolve())
    assert set(doc["model"]["hashes"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert len(doc["suite"]["sha256"]) == 64 and doc["suite"]["path"] == str(evaluated["suite"].resolve())
    assert doc["seed"] == 1234 and doc["versions"]["torch"] and doc["versions"]["sacrebleu"]
    assert doc["backend"]["dtype"] == "float32" and doc["backend"]["device"] == "cpu"
    assert all(len(r["data_sha256"]) == 64 for r in doc["results"])
    keys = {(r["task"], r["language"]) for r in doc["results"]}
    assert ("mmlu", "ru") in keys and ("flores", "es") in keys and ("routing", "ru") in keys
    samples = (evaluated["outs"]["moe"] / "samples" / "arc_es.jsonl").read_text().splitlines()
    assert len(samples) == 4 and "loglikelihoods" in json.loads(samples[0])


def test_eval_is_deterministic(evaluated, tmp_path):
    again = tmp_path / "again"
    assert cli.main(["eval", "--model", str(evaluated["models"]["moe"]), "--suite", str(evaluated["suite"]),
                     "--out", str(again), "--batch-size", "3", "--name", "moe", "--tasks", "arc", "flores"]) == 0
    first = {(r["task"], r["language"]): r["metrics"]
             for r in json.loads((evaluated["outs"]["moe"] / "results.json").read_text())["results"]}
    for r in json.loads((again / "results.json").read_text())["results"]:
        for metric, value in r["metrics"].items():  # another batch size: equal up to float rounding
            assert value == pytest.approx(first[(r["task"], r["language"])][metric], rel=1e-5, abs=1e-6)


def test_report_averages_equal_hand_computation(evaluated):
    report = json.loads((evaluated["report"] / "report.json").read_text())
    assert report["models"] == ["base", "dense", "moe"]
    assert report["languages"] == {"original": ["en"], "new": ["es", "ru"]}
    rows = {(r["task"], r["metric"], r["model"]): r for r in report["rows"]}
    checked = 0
    for name, out in evaluated["outs"].items():
        per = {}
        for r in json.loads((out / "results.json").read_text())["results"]:
            for metric, value in r["metrics"].items():
                per.setdefault((r["task"], metric), {})[r["language"]] = value
        for (task, metric), langs in per.items():
            row = rows[(task, metric, name)]
            original = [langs[x] for x in ("en",) if x in langs]
            new = [langs[x] for x in ("es", "ru") if x in langs]
            assert row["original_avg"] == (pytest.approx(sum(original) / len(original)) if original else None)
            assert row["new_avg"] == (pytest.approx(sum(new) / len(new)) if new else None)
            checked += 1
    assert checked > 30
    # One value spelled out: bits per byte, new languages = mean of es and ru.
    base = {r["language"]: r["metrics"]["bits_per_byte"]
            for r in json.loads((evaluated["outs"]["base"] / "results.json").read_text())["results"] if r["task"] == "perplexity"}
    row = rows[("perplexity", "bits_per_byte", "base")]
    assert row["new_avg"] == pytest.approx((base["es"] + base["ru"]) / 2) and row["original_avg"] == pytest.approx(base["en"])
    markdown = (evaluated["report"] / "report.md").read_text()
    assert f"{row['new_avg']:.4f}" in markdown and "| perplexity | bits_per_byte ↓ |" in markdown
    assert "## Per language" in markdown and "### arc — acc" in markdown
    # Routing exists only for the MoE model; the dense models' routing cells are empty ("–").
    assert set(report["routing"]) == {"moe"}
    dense_routing = [r for k, r in rows.items() if k[0] == "routing" and k[2] != "moe"]
    assert dense_routing and all(r["per_language"] == {} and r["new_avg"] is None for r in dense_routing)
    assert rows[("routing", "expert_0_share", "moe")]["new_avg"] is not None


def test_report_plots_are_real_images(evaluated):
    plots = sorted((evaluated["report"] / "plots").glob("*.png"))
    names = {p.name for p in plots}
    assert {"bars_perplexity_bits_per_byte.png", "bars_arc_acc.png", "bars_flores_chrf_pp.png",
            "bars_qa_bits_per_byte.png", "bars_routing_expert_0_share.png", "routing_moe.png"} <= names
    for plot in plots:
        assert plot.stat().st_size > 5_000, plot
        pixels = matplotlib.image.imread(plot)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and float(np.var(pixels[..., :3])) > 1e-3, plot


def test_report_rejects_bad_inputs(evaluated, tmp_path):
    outs = list(evaluated["outs"].values())
    docs = [load_results(p) for p in outs]
    with pytest.raises(DeltaMoEError, match=r"--names gives 2 names for 3 results"):
        build_report(docs, ["a", "b"])
    with pytest.raises(DeltaMoEError, match=r"not unique"):
        build_report(docs, ["a", "a", "b"])
    with pytest.raises(DeltaMoEError, match=r"no results\.json"):
        load_results(tmp_path)
    swapped = json.loads(json.dumps(docs[0]))
    swapped["languages"] = {"original": ["es"], "new": ["en", "ru"]}
    with pytest.raises(DeltaMoEError, match=r"language 'es' is original here but new in another result"):
        build_report([docs[1], swapped])


def test_help_shows_copy_paste_examples(capsys):
    for sub, example in (("eval", "deltamoe eval --model "), ("report", "deltamoe report runs/eval_base")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([sub, "--help"])
        assert exit_info.value.code == 0
        assert example in capsys.readouterr().out


def test_report_measures_routing_on_allocated_experts(evaluated, tmp_path, capsys):
    """--expert-allocation-map adds, per MoE model and language, the share of top-k choices on the language's experts
    (+ shared), mean over layers: equal to a hand sum over the eval's layer x expert table."""
    allocation = {"experts": {"es": [1, 2], "ru": [3], "en": [1]}, "shared_experts": [0]}  # the tiny Mixtral has 4 experts
    out = tmp_path / "report"
    assert cli.main(["report", *map(str, evaluated["outs"].values()), "--out", str(out),
                     "--expert-allocation-map", json.dumps(allocation)]) == 0
    report = json.loads((out / "report.json").read_text())
    shares = {r["language"]: r["details"]["shares"] for r in json.loads((evaluated["outs"]["moe"] / "results.json").read_text())["results"]
              if r["task"] == "routing"}
    num_experts = len(shares["en"][0])
    allowed = {"es": [0, 1, 2], "ru": [0, 3], "en": [0, 1]}
    assert num_experts == 4 and set(report["allocation"]["share"]) == {"moe"}  # dense models have no routing
    for lang, experts in allowed.items():
        by_hand = sum(sum(row[e] for e in experts) for row in shares[lang]) / len(shares[lang])
        assert report["allocation"]["share"]["moe"][lang] == pytest.approx(by_hand)
        assert 0.0 < by_hand < 1.0
    markdown = (out / "report.md").read_text()
    assert "## Routing on the allocated experts" in markdown and "es: [0, 1, 2]" in markdown
    assert f"{report['allocation']['share']['moe']['ru']:.4f}" in markdown

    # A map that names experts the model does not have is one clear error; nothing is written.
    bad = tmp_path / "bad"
    capsys.readouterr()
    assert cli.main(["report", *map(str, evaluated["outs"].values()), "--out", str(bad),
                     "--expert-allocation-map", '{"experts": {"es": [1, 99]}}']) == 1
    assert ("--expert-allocation-map does not fit model 'moe': expert allocation: experts['es'] has expert 99, "
            "outside 0..3 (num_experts=4)") in capsys.readouterr().err
    with pytest.raises(DeltaMoEError, match=r"experts\['es'\] is empty"):
        build_report([load_results(p) for p in evaluated["outs"].values()], None, {"experts": {"es": []}})
    with pytest.raises(DeltaMoEError, match=r"experts\.es must be a list of expert indices"):
        build_report([load_results(p) for p in evaluated["outs"].values()], None, {"experts": {"es": 1}})
    with pytest.raises(DeltaMoEError, match=r"no result has routing shares"):
        build_report([load_results(evaluated["outs"]["base"])], None, allocation)
    assert not bad.exists()


def test_report_puts_several_moe_models_side_by_side(evaluated, tmp_path):
    from deltamoe.evaluation.report import write_report

    moe = load_results(evaluated["outs"]["moe"])
    report = build_report([load_results(evaluated["outs"]["base"]), moe, moe], ["base", "learned", "by-language"])
    assert set(report["routing"]) == {"learned", "by-language"}
    (tmp_path / "r").mkdir()
    written = write_report(tmp_path / "r", report)
    compare = tmp_path / "r" / "plots" / "routing_compare.png"
    assert compare in written
    pixels = matplotlib.image.imread(compare)
    single = matplotlib.image.imread(tmp_path / "r" / "plots" / "routing_learned.png")
    assert pixels.shape[0] > 1.5 * single.shape[0]  # one row of heatmaps per model
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "| task | metric | base orig | base new | learned orig | learned new | by-language orig | by-language new |" in markdown
