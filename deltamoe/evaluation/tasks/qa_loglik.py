"""Log-likelihood of reference answers to questions: does the model still answer like its post-trained self?

Data (JSONL or TSV): columns `question` and `answer` (strings). The context is `"Question: {question}\\nAnswer:"`
and the scored continuation `" {answer}"`; with the task's `chat_template: true` the context is the question
wrapped in the tokenizer's chat template (with the assistant turn opened) and the continuation the bare answer.
Boundary tokenization follows lm-eval (see `TokenizedBackend.encode_pair`).

Metrics: `loglik` (mean summed log-likelihood per answer, nats), `bits_per_byte` (all answers together: -sum log p
in bits / UTF-8 bytes of the answers, comparable across languages and tokenizers) and `greedy_acc` (share of answers
that greedy decoding would reproduce token for token). `details.bootstrap`: the 95% percentile bootstrap interval of
bits per byte over answers (deltamoe/evaluation/bootstrap.py).
"""

from __future__ import annotations

import math

from deltamoe.common.errors import DeltaMoEError
from deltamoe.evaluation.bootstrap import interval_record
from deltamoe.evaluation.tasks.common import load_examples, task_result

REQUIRED = {"question": str, "answer": str}


def evaluate(spec, backend, suite) -> dict:
    examples, _ = load_examples(spec, REQUIRED)
    pairs = []
    for ex in examples:
        if not ex["answer"].strip():
            raise DeltaMoEError(f"{spec.data}:{ex['_line']}: column 'answer' is empty")
        if spec.chat_template:
            pairs.append((backend.apply_chat_template(ex["question"]), ex["answer"]))
        else:
            pairs.append((f"Question: {ex['question']}\nAnswer:", " " + ex["answer"]))
    results = backend.loglikelihood(pairs, desc=f"qa {spec.key}")
    total_lp = sum(lp for lp, _ in results)
    total_bytes = sum(len(cont.encode("utf-8")) for _, cont in pairs)
    metrics = {
        "loglik": total_lp / len(examples),
        "bits_per_byte": -total_lp / (math.log(2) * total_bytes),
        "greedy_acc": sum(g for _, g in results) / len(examples),
    }
    samples = [{"line": ex["_line"], "loglik": lp, "greedy": g, "bytes": len(cont.encode("utf-8"))}
               for ex, (lp, g), (_, cont) in zip(examples, results, pairs)]
    return task_result(spec, suite, metrics=metrics, num_examples=len(examples), samples=samples,
                       details={"bootstrap": interval_record(samples)})
