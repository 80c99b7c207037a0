"""Pieces every task uses: reading its examples (with `limit`), few-shot sampling, result records."""

from __future__ import annotations

import random

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hashing import sha256_file
from deltamoe.evaluation.data import read_records
from deltamoe.evaluation.suite import Suite, TaskSpec

FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default between solved examples
TARGET_DELIMITER = " "  # lm-eval's default between a prompt and its answer


def load_examples(spec: TaskSpec, required: dict) -> tuple[list[dict], list[dict]]:
    """(examples to score, pool of few-shot examples). Without `fewshot_data` the pool is the whole data file."""
    records = read_records(spec.data, required)
    pool = read_records(spec.fewshot_data, required) if spec.fewshot_data is not None else records
    examples = records[:spec.limit] if spec.limit else records
    if spec.num_fewshot:
        available = len(pool) - (0 if spec.fewshot_data is not None else 1)
        if available < spec.num_fewshot:
            source = spec.fewshot_data or spec.data
            raise DeltaMoEError(
                f"task {spec.key}: num_fewshot={spec.num_fewshot} but {source} offers only {available} other examples")
    return examples, pool


def sample_shots(spec: TaskSpec, suite: Suite, pool: list[dict], example: dict) -> list[dict]:
    """`num_fewshot` examples from the pool, never the example itself; the same for every model and run.

    The generator is seeded by a string (suite seed, task key, example line), which Python hashes with SHA-512,
    so the choice does not depend on PYTHONHASHSEED, the order tasks run in, or other examples.
    """
    if not spec.num_fewshot:
        return []
    rng = random.Random(f"{suite.seed}:{spec.key}:{example['_line']}")
    own = spec.fewshot_data is None
    candidates = [r for r in pool if not (own and r["_line"] == example["_line"])]
    return rng.sample(candidates, spec.num_fewshot)


def task_result(spec: TaskSpec, suite: Suite, *, metrics: dict, num_examples: int, samples: list[dict],
                details: dict | None = None) -> dict:
    return {
        "task": spec.name,
        "type": spec.type,
        "language": spec.language,
        "group": suite.group(spec.language),
        "domain": spec.domain,
        "num_examples": num_examples,
        "num_fewshot": spec.num_fewshot,
        "data": str(spec.data),
        "data_sha256": sha256_file(spec.data),
        "metrics": metrics,
        "details": details or {},
        "samples": samples,
    }
