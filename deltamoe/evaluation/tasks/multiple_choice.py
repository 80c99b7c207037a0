"""Multiple choice by log-likelihood, k-shot, in the prompt shapes of ARC, HellaSwag, MMLU (Okapi) and Belebele.

Data (JSONL; or TSV with columns `choice_0`, `choice_1`, ... instead of `choices`):

    {"question": "...", "choices": ["...", "..."], "gold": 0}            # arc, hellaswag, mmlu
    {"passage": "...", "question": "...", "choices": [...], "gold": 2}   # belebele

`gold` is the 0-based index of the right choice. Prompt shapes (lm-eval's task YAMLs; Okapi's multilingual
ARC/HellaSwag/MMLU, Lai et al. 2023; Belebele, Bandarkar et al. 2023):

    arc        "Question: {question}\\nAnswer:"                  scored: " {choice}"
    hellaswag  "{question}" (the context, already joined)         scored: " {choice}"
    mmlu       "{question}\\nA. {c0}\\nB. {c1}...\\nAnswer:"        scored: " A", " B", ...
    belebele   "P: {passage}\\nQ: {question}\\nA: {c0}...\\nAnswer:" scored: " A", " B", ...

Few-shot examples are the same prompt followed by " " + their answer, joined by a blank line.
Metrics, as lm-eval's `ConfigurableTask.process_results` computes them:
`acc` = argmax of the summed log-likelihood; `acc_norm` = argmax of log-likelihood / len(choice) in *characters*
(lm-eval's code; its docs speak of length normalisation); `acc_bytes` = argmax of log-likelihood / UTF-8 bytes of
the choice, which is the fairer one across scripts (a Cyrillic letter is 2 bytes, a CJK character 3).
"""

from __future__ import annotations

import string

import numpy as np

from deltamoe.common.errors import DeltaMoEError
from deltamoe.evaluation.tasks.common import (
    FEWSHOT_DELIMITER,
    TARGET_DELIMITER,
    load_examples,
    sample_shots,
    task_result,
)

REQUIRED = {"question": str, "choices": list, "gold": int}
LETTERS = string.ascii_uppercase


def check_example(spec, ex: dict) -> None:
    where = f"{spec.data}:{ex['_line']}"
    choices = ex["choices"]
    if not choices:
        raise DeltaMoEError(f"{where}: 'choices' is empty; expected at least one choice")
    if not all(isinstance(c, str) and c for c in choices):
        raise DeltaMoEError(f"{where}: every entry of 'choices' must be a non-empty string")
    if not 0 <= ex["gold"] < len(choices):
        raise DeltaMoEError(f"{where}: gold index {ex['gold']} is out of range for {len(choices)} choices (0-based)")
    if spec.format in ("mmlu", "belebele") and len(choices) > len(LETTERS):
        raise DeltaMoEError(f"{where}: format {spec.format} labels choices A-Z; got {len(choices)} choices")
    if spec.format == "belebele" and not isinstance(ex.get("passage"), str):
        raise DeltaMoEError(f"{where}: format belebele needs a string column 'passage'")


def doc_to_text(fmt: str, ex: dict) -> str:
    if fmt == "arc":
        return f"Question: {ex['question']}\nAnswer:"
    if fmt == "hellaswag":
        return ex["question"]
    options = "".join(f"{LETTERS[i]}{'.' if fmt == 'mmlu' else ':'} {c}\n" for i, c in enumerate(ex["choices"]))
    if fmt == "mmlu":
        return f"{ex['question'].strip()}\n{options}Answer:"
    return f"P: {ex['passage']}\nQ: {ex['question'].strip()}\n{options}Answer:"


def doc_to_choices(fmt: str, ex: dict) -> list[str]:
    return list(ex["choices"]) if fmt in ("arc", "hellaswag") else list(LETTERS[:len(ex["choices"])])


def build_context(spec, suite, pool: list[dict], ex: dict) -> str:
    shots = [doc_to_text(spec.format, s) + TARGET_DELIMITER + doc_to_choices(spec.format, s)[s["gold"]]
             for s in sample_shots(spec, suite, pool, ex)]
    prefix = spec.description + "".join(s + FEWSHOT_DELIMITER for s in shots)
    return prefix + doc_to_text(spec.format, ex)


def score(lls: list[float], choices: list[str], gold: int) -> dict:
    lls_arr = np.array(lls)
    chars = np.array([float(len(c)) for c in choices])
    nbytes = np.array([float(len(c.encode("utf-8"))) for c in choices])
    return {
        "acc": float(np.argmax(lls_arr) == gold),
        "acc_norm": float(np.argmax(lls_arr / chars) == gold),
        "acc_bytes": float(np.argmax(lls_arr / nbytes) == gold),
    }


def evaluate(spec, backend, suite) -> dict:
    examples, pool = load_examples(spec, REQUIRED)
    for ex in examples + ([] if pool is examples else pool):
        check_example(spec, ex)
    pairs, owner = [], []
    contexts = []
    for i, ex in enumerate(examples):
        context = build_context(spec, suite, pool, ex)
        contexts.append(context)
        for choice in doc_to_choices(spec.format, ex):
            pairs.append((context, TARGET_DELIMITER + choice))
            owner.append(i)
    results = backend.loglikelihood(pairs, desc=f"multiple choice {spec.key}")
    lls: list[list[float]] = [[] for _ in examples]
    for i, (lp, _) in zip(owner, results):
        lls[i].append(lp)
    samples, totals = [], {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 0.0}
    for ex, context, ll in zip(examples, contexts, lls):
        s = score(ll, doc_to_choices(spec.format, ex), ex["gold"])
        for k in totals:
            totals[k] += s[k]
        samples.append({"line": ex["_line"], "gold": ex["gold"], "loglikelihoods": ll, **s,
                        "context": context})
    metrics = {k: v / len(examples) for k, v in totals.items()}
    return task_result(spec, suite, metrics=metrics, num_examples=len(examples), samples=samples)
