"""One tiny run of every command, shared by the fault-injection suite and the bad-input tests (session-scoped).

B and I are tiny Llamas with the same in-process BPE tokenizer (vocabulary 384); everything else is made from them
by the commands themselves, through `tests/cli_runner.py` (each a fresh `python -m deltamoe ...` process):
prepare-data (es, en) -> import -> upcycle (4 experts, top-2) -> export (several shards) -> graft; merge; eval;
report. The unbroken outputs are the references a killed and rerun command must reproduce.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from tests import cli_runner

SHARD_GB = "0.0002"
"""~200 KB shards: the tiny MoE and the grafted model are written in several, so a kill can land between two."""


def commands(root: Path) -> dict[str, list[str]]:
    """Each command's arguments with its output as the last two items (`--out PATH`, or the trainer's folder)."""
    return {
        "prepare-data": ["prepare-data", "--input", root / "text" / "es.jsonl", "--tokenizer", root / "b", "--lang", "es",
                         "--model", root / "b", "--out", root / "data" / "es"],
        "import": ["import", "--hf", root / "b", "--out", root / "dense"],
        "upcycle": ["upcycle", "--dense", root / "dense", "--num-experts", "4", "--topk", "2", "--out", root / "moe"],
        "export": ["export", "--megatron", root / "moe", "--max-shard-size-gb", SHARD_GB, "--out", root / "hf-moe"],
        "graft": ["graft", "--base", root / "b", "--post", root / "i", "--moe", root / "hf-moe", "--max-shard-size",
                  SHARD_GB, "--out", root / "grafted"],
        "merge": ["merge", "--method", "task_arithmetic", "--base", root / "b", "--models", root / "i",
                  "--weights", "0.5", "--out", root / "merged"],
        "eval": ["eval", "--model", root / "b", "--suite", root / "suite.yaml", "--out", root / "eval-b"],
        "report": ["report", root / "eval-b", "--out", root / "report"],
    }


def with_out(argv: list, out: Path) -> list[str]:
    """The same command line writing to `out` instead."""
    return [str(a) for a in argv[:-1]] + [str(out)]


def deltamoe(argv: list, **kw) -> cli_runner.Result:
    return cli_runner.run("deltamoe", [str(a) for a in argv], **kw)


def must(result: cli_runner.Result) -> cli_runner.Result:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def tree_hashes(path: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under a folder (or of the files of a dataset prefix), by relative name."""
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    if path.is_dir():
        files = {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}
    else:
        files = {p.name: p for p in sorted(path.parent.glob(path.name + ".*")) if p.is_file()}
    return {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in files.items()
            if not any(Path(name).match(s) for s in skip)}


def write_inputs(root: Path) -> None:
    from tests.fixtures_eval import TEXT, make_tiny_eval_model, write_jsonl

    make_tiny_eval_model(root / "b", seed=0)
    make_tiny_eval_model(root / "i", seed=1)
    (root / "text").mkdir()
    for lang in ("es", "en"):
        write_jsonl(root / "text" / f"{lang}.jsonl", [{"text": f"{s} {t}"} for s in TEXT[lang] for t in TEXT[lang][:4]])
    suite = {"name": "tiny", "languages": {"original": ["en"], "new": ["es"]}, "max_length": 64, "batch_size": 4,
             "tasks": [{"type": "perplexity", "language": lang, "data": f"text/{lang}.jsonl", "limit": 6}
                       for lang in ("en", "es")]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chain")
    write_inputs(root)
    argv = commands(root)
    must(deltamoe(argv["prepare-data"]))
    must(deltamoe(["prepare-data", "--input", root / "text" / "en.jsonl", "--tokenizer", root / "b", "--lang", "en",
                   "--out", root / "data" / "en"]))
    for name in ("import", "upcycle", "export", "graft", "merge", "eval", "report"):
        must(deltamoe(argv[name]))
    results = json.loads((root / "eval-b" / "results.json").read_text())
    assert [r["task"] for r in results["results"]] == ["perplexity", "perplexity"]
    return {"root": root, "argv": argv}
