"""Score a Hugging Face checkpoint on a suite of local tasks (perplexity, multiple choice, translation, instruction
following, Q/A log-likelihood, MoE routing), per language, fully offline.

The suite file (YAML/JSON) names the original and new languages and the tasks; its schema is in
deltamoe/evaluation/README.md and deltamoe/evaluation/suite.py, and deltamoe/evaluation/example_suite.yaml runs as is.
Output folder (written atomically): results.json (metrics per task x language, model path and file hashes, suite
hash, versions, seed, backend), results.md (the same as a table) and samples/<task>_<language>.jsonl.

Example (CPU, or the first GPU in bf16 when there is one):

  deltamoe eval --model runs/deltamoe_hf --suite deltamoe/evaluation/example_suite.yaml --out runs/eval_deltamoe

Compare several models afterwards with `deltamoe report runs/eval_base runs/eval_deltamoe --out runs/report`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.faults import fault_point
from deltamoe.common.hashing import sha256_dir, sha256_file, versions
from deltamoe.common.outputs import atomic_output_dir, check_output_dir
from deltamoe.evaluation.backends import check_model_dir, load_backend
from deltamoe.evaluation.suite import Suite, load_suite
from deltamoe.evaluation.tasks import run_task

RESULTS_VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--suite", required=True, help="suite file (.yaml or .json)")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="hf: transformers (default); vllm if installed")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass (default: the suite's)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per task (quick checks)")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="NAME[/LANG]", help="run only these tasks")
    parser.add_argument("--name", default=None, help="model name shown in reports (default: the model folder's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _package_versions() -> dict:
    out = versions()
    for name in ("sacrebleu", "nltk", "tokenizers", "vllm"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def select_tasks(suite: Suite, wanted: list[str] | None) -> list:
    if not wanted:
        return list(suite.tasks)
    chosen = [t for t in suite.tasks if t.name in wanted or t.key in wanted]
    unknown = [w for w in wanted if not any(w in (t.name, t.key) for t in suite.tasks)]
    if unknown:
        raise DeltaMoEError(f"--tasks {unknown} not in suite {suite.path} (tasks: {[t.key for t in suite.tasks]})")
    return chosen


def evaluate_model(model_dir: str | Path, suite: Suite, *, backend: str = "hf", device: str | None = None,
                   dtype: str | None = None, batch_size: int | None = None, limit: int | None = None,
                   tasks: list[str] | None = None, name: str | None = None) -> dict:
    """Run every selected task of the suite on one model; returns the results document (samples included)."""
    model_dir = check_model_dir(model_dir).resolve()
    specs = select_tasks(suite, tasks)
    if limit is not None:
        if limit < 1:
            raise DeltaMoEError(f"--limit must be a positive integer, got {limit}")
        for spec in specs:
            spec.limit = min(spec.limit or limit, limit)
    torch.manual_seed(suite.seed)
    model = load_backend(backend, model_dir, device=device, dtype=dtype, batch_size=batch_size or suite.batch_size,
                         max_length=suite.max_length)
    results = []
    for spec in tqdm(specs, desc=f"eval {model_dir.name}", unit="task"):
        started = time.perf_counter()
        result = run_task(spec, model, suite)
        result["seconds"] = round(time.perf_counter() - started, 3)
        results.append(result)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()
                          if not k.startswith("expert_") or k == "expert_0_share")
        shown = shown or result["details"].get("not_applicable", "")
        tqdm.write(f"{spec.key} [{result['group']}] {shown}")
        fault_point("eval:task-done")
    suite_info = asdict(suite)
    suite_info["tasks"] = [{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(t).items()} for t in suite.tasks]
    suite_info["path"] = str(suite.path)
    return {
        "results_version": RESULTS_VERSION,
        "model": {"name": name or model_dir.name, "path": str(model_dir),
                  "hashes": sha256_dir(model_dir, ("*.safetensors", "*.json", "*.model", "*.txt")),
                  "architectures": json.loads((model_dir / "config.json").read_text()).get("architectures")},
        "suite": {"path": str(suite.path), "sha256": sha256_file(suite.path) if suite.path else None, "content": suite_info},
        "languages": {"original": suite.original_languages, "new": suite.new_languages},
        "seed": suite.seed,
        "backend": model.describe(),
        "versions": _package_versions(),
        "results": results,
    }


def results_markdown(doc: dict) -> str:
    lines = [f"# Evaluation of {doc['model']['name']}", "", f"model: `{doc['model']['path']}`  ",
             f"suite: `{doc['suite']['path']}` (sha256 {str(doc['suite']['sha256'])[:12]})  ",
             f"backend: {doc['backend']}", "", "| task | language | group | n | metric | value |", "|---|---|---|---|---|---|"]
    for r in doc["results"]:
        for metric, value in r["metrics"].items():
            lines.append(f"| {r['task']} | {r['language']} | {r['group']} | {r['num_examples']} | {metric} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, doc: dict) -> None:
    """results.json without samples, samples per task in samples/, and results.md."""
    samples_dir = out / "samples"
    samples_dir.mkdir()
    slim = dict(doc, results=[{k: v for k, v in r.items() if k != "samples"} for r in doc["results"]])
    for r in doc["results"]:
        with open(samples_dir / f"{r['task']}_{r['language']}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in r["samples"])
    (out / "results.json").write_text(json.dumps(slim, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(results_markdown(doc), encoding="utf-8")


def main(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    check_output_dir(args.out, inputs=[args.model, args.suite], overwrite=args.overwrite)
    doc = evaluate_model(args.model, suite, backend=args.backend, device=args.device, dtype=args.dtype,
                         batch_size=args.batch_size, limit=args.limit, tasks=args.tasks, name=args.name)
    with atomic_output_dir(args.out, inputs=[args.model, args.suite], overwrite=args.overwrite) as tmp:
        write_results(tmp, doc)
    print(f"wrote {args.out}/results.json ({len(doc['results'])} task x language results)")
    return 0
