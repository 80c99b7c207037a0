"""Bootstrap intervals, the in/out-of-domain table, the scale curve, and the out-of-domain demo texts, on small data
whose answers are known by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from deltamoe import cli
from deltamoe.common.errors import DeltaMoEError
from deltamoe.evaluation import bootstrap
from deltamoe.evaluation.report import build_report, load_results
from deltamoe.evaluation.suite import TaskSpec
from deltamoe.recipes import corpora, demo_data


def test_ratio_interval_matches_the_normal_approximation_of_a_mean():
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 1.0, size=400)
    lo, hi = bootstrap.ratio_interval(x, np.ones_like(x))
    half = 1.96 * x.std() / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.25 * half) and hi == pytest.approx(x.mean() + half, abs=0.25 * half)
    assert (lo, hi) == bootstrap.ratio_interval(x, np.ones_like(x))  # fixed seed: reproducible


def test_ratio_interval_is_a_ratio_of_sums_not_a_mean_of_ratios():
    # One long example dominates the bytes: every resample's ratio lies between the two per-example ratios,
    # and identical examples give a zero-width interval at the ratio itself.
    assert bootstrap.ratio_interval([3.0] * 5, [2.0] * 5) == (1.5, 1.5)
    lo, hi = bootstrap.ratio_interval([1.0, 300.0], [1.0, 100.0])
    assert 1.0 <= lo < 301 / 101 < hi <= 3.0


def test_paired_difference_removes_the_spread_between_examples():
    rng = np.random.default_rng(1)
    sizes = rng.integers(100, 1000, size=30).astype(float)
    bits_a = sizes * rng.uniform(0.5, 2.5, size=30)  # examples differ a lot in difficulty
    bits_b = bits_a - 0.01 * sizes                   # model b is better by exactly 0.01 bits per byte everywhere
    lo, hi = bootstrap.paired_difference_interval(bits_a, sizes, bits_b, sizes)
    assert lo == pytest.approx(-0.01) and hi == pytest.approx(-0.01)
    a_lo, a_hi = bootstrap.ratio_interval(bits_a, sizes)
    assert a_hi - a_lo > 0.1  # unpaired, the same 0.01 would be hidden in the spread
    with pytest.raises(DeltaMoEError, match="no examples"):
        bootstrap.ratio_interval([], [])
    with pytest.raises(DeltaMoEError, match="differ in size"):
        bootstrap.paired_difference_interval([1.0], [1.0], [1.0, 2.0], [1.0, 1.0])


def _eval_folder(root: Path, name: str, rows: list[tuple[str, str, str, str, list[tuple[float, int]]]]) -> Path:
    """A `deltamoe eval` output folder: rows of (task, type, language, domain, [(logprob nats, bytes)])."""
    folder = root / name
    (folder / "samples").mkdir(parents=True)
    results = []
    for task, ttype, lang, domain, samples in rows:
        bpb = -sum(lp for lp, _ in samples) / (math.log(2) * sum(b for _, b in samples))
        results.append({"task": task, "type": ttype, "language": lang, "group": "original" if lang == "en" else "new",
                        "domain": domain, "num_examples": len(samples), "metrics": {"bits_per_byte": bpb},
                        "details": {}})
        key = "logprob" if ttype == "perplexity" else "loglik"
        with open(folder / "samples" / f"{task}_{lang}.jsonl", "w") as f:
            f.writelines(json.dumps({"line": i + 1, key: lp, "bytes": b}) + "\n" for i, (lp, b) in enumerate(samples))
    doc = {"model": {"name": name}, "languages": {"original": ["en"], "new": ["es"]}, "results": results}
    (folder / "results.json").write_text(json.dumps(doc))
    return folder


def _nats(bpb: float, size: int) -> float:
    return -bpb * size * math.log(2)


def test_report_shows_domains_side_by_side_and_paired_noise(tmp_path):
    sizes = [100, 200, 300, 400]
    rows = lambda shift: [  # noqa: E731
        ("perplexity", "perplexity", "es", "in", [(_nats(2.0 - shift, b), b) for b in sizes]),
        ("perplexity_other", "perplexity", "es", "in", [(_nats(3.0 - shift, b), b) for b in sizes]),
        ("perplexity_manual", "perplexity", "es", "out", [(_nats(1.5 - shift / 10, b), b) for b in sizes]),
        ("faq", "qa_loglik", "es", "", [(_nats(1.0 + 0.1 * i, b), b) for i, b in enumerate(sizes)]),
    ]
    docs = [load_results(_eval_folder(tmp_path, "base", rows(0.0))), load_results(_eval_folder(tmp_path, "moe", rows(0.5)))]
    report = build_report(docs)
    assert report["domains"]["in"]["base"]["es"] == pytest.approx(2.5)  # mean over the two in-domain tasks
    assert report["domains"]["in"]["moe"]["es"] == pytest.approx(2.0)
    assert report["domains"]["out"]["moe"]["es"] == pytest.approx(1.45)
    noise = {(r["task"], r["language"]): r for r in report["noise"]}
    manual = noise[("perplexity_manual", "es")]
    assert manual["n"] == 4 and manual["reference"] == "base"
    assert manual["models"]["moe"]["difference"] == pytest.approx(-0.05)
    assert manual["models"]["moe"]["difference_interval"] == pytest.approx([-0.05, -0.05])
    faq = noise[("faq", "es")]["models"]
    assert faq["base"]["bits_per_byte"] == pytest.approx(sum((1.0 + 0.1 * i) * b for i, b in enumerate(sizes)) / sum(sizes))
    assert faq["base"]["interval"][0] < faq["base"]["bits_per_byte"] < faq["base"]["interval"][1]
    assert faq["moe"]["difference_interval"] == pytest.approx([0.0, 0.0])
    out = tmp_path / "report"
    assert cli.main(["report", *(str(tmp_path / n) for n in ("base", "moe")), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "| base | – | – | 2.5000 | 1.5000 | 2.5000 | 1.5000 |" in markdown
    assert "| perplexity_manual | es | 4 | 1.500 [1.500, 1.500] | 1.450 [1.450, 1.450] | -0.050 [-0.050, -0.050] |" in markdown


def test_domain_is_checked_with_the_task_named():
    with pytest.raises(DeltaMoEError, match=r"task perplexity/es: domain must be one of '', 'in', 'out', got 'inside'"):
        TaskSpec(type="perplexity", language="es", data="x.jsonl", domain="inside")
    with pytest.raises(DeltaMoEError, match=r"task qa_loglik/es: domain is for perplexity tasks"):
        TaskSpec(type="qa_loglik", language="es", data="x.jsonl", domain="out")


def _run(root: Path, iters: int, bpb: dict[str, float], n: int) -> Path:
    """A pipeline workdir: manifest with stage-1 and dense-CPT recipes, eval folders of n out-of-domain passages."""
    root.mkdir()
    train = {"train_iters": iters, "global_batch_size": 4, "seq_length": 256}
    manifest = {"config": {"arms": [{"label": "deltamoe", "stage1": {"train": train}}], "dense_baseline": {"train": train}},
                "stages": {"stage1": {"seconds": 10.0 * iters}, "eval:base": {"seconds": 5.0}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    for model, value in bpb.items():
        # The first example is hard (3 bits per byte), the others have the model's value.
        samples = [(_nats(3.0 if i == 0 else value, 100), 100) for i in range(n)]
        _eval_folder(root / "eval", model, [("perplexity_manual", "perplexity", "es", "out", samples)])
    return root


def test_scale_curve_recomputes_every_point_on_the_shared_examples(tmp_path):
    small = _run(tmp_path / "s1", 10, {"base": 2.0, "post": 2.0, "deltamoe": 1.8, "dense-cpt+paramdelta": 1.9}, n=2)
    large = _run(tmp_path / "s4", 40, {"base": 2.0, "post": 2.0, "deltamoe": 1.4, "dense-cpt+paramdelta": 1.6}, n=8)
    out = tmp_path / "curve"
    assert cli.main(["scale-curve", str(large), str(small), "--out", str(out)]) == 0
    result = json.loads((out / "scale_curve.json").read_text())
    assert result["examples"] == {"perplexity_manual/es": 2}
    points = {(p["stage1_tokens"], p["model"]): p["values"]["new/out"] for p in result["points"]}
    assert points[(10 * 1024, "deltamoe")] == pytest.approx((3.0 + 1.8) / 2)
    assert points[(40 * 1024, "deltamoe")] == pytest.approx((3.0 + 1.4) / 2)  # not (3 + 7 * 1.4) / 8: same examples
    assert [r["total_seconds"] for r in result["runs"]] == [105.0, 405.0]
    assert (out / "scale_curve.png").stat().st_size > 5000
    assert "| 40960 | 405.0 | deltamoe | 2.2000 |" in (out / "scale_curve.md").read_text()


def test_scale_curve_refuses_a_baseline_with_other_tokens(tmp_path):
    run = _run(tmp_path / "s1", 10, {"base": 2.0, "post": 2.0, "deltamoe": 1.8, "dense-cpt+paramdelta": 1.9}, n=2)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["dense_baseline"]["train"]["train_iters"] = 5
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeltaMoEError, match=r"dense CPT trains 5120 tokens, stage 1 10240"):
        from deltamoe.evaluation.scale_curve import read_run

        read_run(run)


PAGE = """<html><head><title>T</title></head><body><div class="navheader"><p>Prev Next</p></div>
<div class="section"><p>First  paragraph,
wrapped &amp; <em>marked</em>.</p><pre class="screen"><p>not prose</p></pre><p>Second.</p></div>
<div class="navfooter"><p>Home</p></div></body></html>"""


def test_html_paragraphs_keep_prose_and_drop_navigation_and_screens():
    assert corpora.html_paragraphs(PAGE) == ["First paragraph, wrapped & marked.", "Second."]


def test_manual_passages_are_parallel_sized_and_shuffled():
    en = {f"p{k}.html": [("word " * 60).strip()] * 5 for k in range(6)}  # 299 bytes per paragraph
    es = {page: [f"es {i}"] * len(paras) for i, (page, paras) in enumerate(en.items())}
    ru = {**{page: ["ру"] * len(paras) for page, paras in en.items()}, "p0.html": ["ру"] * 4}  # p0 differs: dropped
    out = demo_data.manual_passages({"en": en, "es": es, "ru": ru})
    assert [r["id"] for r in out["en"]] == [r["id"] for r in out["es"]] == [r["id"] for r in out["ru"]]
    assert not any(r["id"].startswith("p0.html") for r in out["en"])
    # 800 bytes need 3 paragraphs; the remaining 2 of a page join that run: one passage of all 5 per page.
    assert sorted(r["id"] for r in out["en"]) == [f"p{k}.html:0-5" for k in range(1, 6)]
    assert [r["id"] for r in out["en"]] != sorted(r["id"] for r in out["en"])  # a limit samples, not the first pages
    assert out["ru"][0]["text"] == "\n\n".join(["ру"] * 5) and out["es"][0]["lang"] == "es"
    with pytest.raises(DeltaMoEError, match="no page has the same paragraphs"):
        demo_data.manual_passages({"en": {"a.html": ["x"]}, "ru": {"a.html": ["x", "y"]}})


def test_report_note_is_shown_and_a_changed_note_makes_the_pipeline_redo_the_report(tmp_path):
    from deltamoe.recipes.pipeline import _report_current

    folder = _eval_folder(tmp_path, "base", [("perplexity", "perplexity", "es", "in", [(_nats(2.0, 100), 100)])])
    out = tmp_path / "report"
    assert cli.main(["report", str(folder), "--out", str(out), "--note", "Budget: tiny."]) == 0
    assert "**Budget: tiny.**" in (out / "report.md").read_text()
    assert _report_current(out, [folder], "Budget: tiny.") and not _report_current(out, [folder], "Budget: other.")


def test_scale_curve_reads_the_first_eval_folder_that_has_a_model(tmp_path):
    from deltamoe.evaluation.scale_curve import read_run

    run = _run(tmp_path / "s1", 10, {"deltamoe": 1.8}, n=2)
    (run / "eval").rename(run / "eval-curve")
    _eval_folder(run / "eval", "deltamoe", [("perplexity_manual", "perplexity", "es", "out", [(_nats(9.0, 100), 100)])])
    evals = read_run(run, ("eval-curve", "eval"))["evals"]
    assert evals["deltamoe"]["results"][0]["metrics"]["bits_per_byte"] == pytest.approx((3.0 + 1.8) / 2)
    with pytest.raises(DeltaMoEError, match="no <model>/results.json under nowhere"):
        read_run(run, ("nowhere",))


def test_scale_curve_joins_an_earlier_curve_only_on_the_same_examples(tmp_path, capsys):
    models = {"base": 2.0, "post": 2.0, "deltamoe": 1.8, "dense-cpt+paramdelta": 1.9}
    small = _run(tmp_path / "s1", 10, models, n=2)
    assert cli.main(["scale-curve", str(small), "--out", str(tmp_path / "c1")]) == 0
    earlier = tmp_path / "c1" / "scale_curve.json"
    large = _run(tmp_path / "s16", 160, {**models, "deltamoe": 1.2, "dense-cpt+paramdelta": 1.3}, n=2)
    out = tmp_path / "c2"
    assert cli.main(["scale-curve", str(large), "--earlier", str(earlier), "--out", str(out)]) == 0
    result = json.loads((out / "scale_curve.json").read_text())
    assert [r["stage1_tokens"] for r in result["runs"]] == [10 * 1024, 160 * 1024]
    points = {(p["stage1_tokens"], p["model"]): p["values"]["new/out"] for p in result["points"]}
    assert points[(10 * 1024, "deltamoe")] == pytest.approx((3.0 + 1.8) / 2)
    assert points[(160 * 1024, "deltamoe")] == pytest.approx((3.0 + 1.2) / 2)
    assert result["lines"] == {"perplexity_manual/es": [1, 2]}

    wider = _run(tmp_path / "s4", 40, models, n=3)  # evaluated on 3 examples, the earlier curve on 2
    capsys.readouterr()
    assert cli.main(["scale-curve", str(wider), "--earlier", str(earlier), "--out", str(tmp_path / "c3")]) == 1
    assert ("c1/scale_curve.json: computed on examples {'perplexity_manual/es': 2}, these runs share "
            "{'perplexity_manual/es': 3}: evaluate them with the same tasks and --limit") in capsys.readouterr().err
    assert not (tmp_path / "c3").exists()
    moved = json.loads(earlier.read_text())
    moved["lines"] = {"perplexity_manual/es": [1, 3]}
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    assert cli.main(["scale-curve", str(large), "--earlier", str(tmp_path / "moved.json"), "--out", str(tmp_path / "c4")]) == 1
    assert "moved.json: computed on other example lines of perplexity_manual/es" in capsys.readouterr().err
    assert cli.main(["scale-curve", str(small), "--earlier", str(earlier), "--out", str(tmp_path / "c5")]) == 1
    assert f"c1/scale_curve.json: already has the run {small}" in capsys.readouterr().err
    assert not any((tmp_path / c).exists() for c in ("c4", "c5"))
