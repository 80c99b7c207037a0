"""Evaluation tasks, one module per task type; each defines `REQUIRED` (its columns) and `evaluate(spec, backend,
suite) -> dict` (a result record: task, language, group, metrics, details, samples)."""

from __future__ import annotations

import importlib

TASK_MODULES = {
    "perplexity": "deltamoe.evaluation.tasks.perplexity",
    "multiple_choice": "deltamoe.evaluation.tasks.multiple_choice",
    "translation": "deltamoe.evaluation.tasks.translation",
    "instruction_following": "deltamoe.evaluation.tasks.instruction_following",
    "qa_loglik": "deltamoe.evaluation.tasks.qa_loglik",
    "routing": "deltamoe.evaluation.tasks.routing",
}


def run_task(spec, backend, suite) -> dict:
    return importlib.import_module(TASK_MODULES[spec.type]).evaluate(spec, backend, suite)
