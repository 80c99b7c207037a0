"""Per-language perplexity on held-out text, also as bits per byte.

Data (JSONL or TSV): one document per record, column `text` (string).

Token perplexity depends on the tokenizer, so it cannot compare languages (or models with different tokenizers);
bits per byte can: total negative log-likelihood in bits divided by the UTF-8 bytes of the text (as in the Pile
paper, Gao et al. 2020, and lm-eval's `bits_per_byte`). Corpus-level: sums over all documents, then one division;
`details.bootstrap` holds its 95% percentile bootstrap interval over documents (deltamoe/evaluation/bootstrap.py).
Every token is predicted once with lm-eval's rolling windows (see `TokenizedBackend.rolling_windows`).
"""

from __future__ import annotations

import math

from nltk.tokenize import RegexpTokenizer

from deltamoe.common.errors import DeltaMoEError
from deltamoe.evaluation.bootstrap import interval_record
from deltamoe.evaluation.tasks.common import load_examples, task_result

REQUIRED = {"text": str}
_WORDS = RegexpTokenizer(r"\w+")  # needs no downloaded NLTK data


def evaluate(spec, backend, suite) -> dict:
    examples, _ = load_examples(spec, REQUIRED)
    requests, owner = [], []
    for i, ex in enumerate(examples):
        if not ex["text"].strip():
            raise DeltaMoEError(f"{spec.data}:{ex['_line']}: column 'text' is empty")
        for window in backend.rolling_windows(ex["text"]):
            requests.append(window)
            owner.append(i)
    scores = backend.loglikelihood_tokens(requests, desc=f"perplexity {spec.key}")
    doc_logprob = [0.0] * len(examples)
    doc_tokens = [0] * len(examples)
    for (_, cont), i, (lp, _) in zip(requests, owner, scores):
        doc_logprob[i] += lp
        doc_tokens[i] += len(cont)
    total_lp = sum(doc_logprob)
    total_bytes = sum(len(ex["text"].encode("utf-8")) for ex in examples)
    total_words = sum(len(_WORDS.tokenize(ex["text"])) for ex in examples)
    total_tokens = sum(doc_tokens)
    metrics = {
        "bits_per_byte": -total_lp / (math.log(2) * total_bytes),
        "byte_perplexity": math.exp(-total_lp / total_bytes),
        "token_perplexity": math.exp(-total_lp / total_tokens),
        "word_perplexity": math.exp(-total_lp / max(total_words, 1)),
    }
    samples = [{"line": ex["_line"], "logprob": lp, "tokens": n, "bytes": len(ex["text"].encode("utf-8"))}
               for ex, lp, n in zip(examples, doc_logprob, doc_tokens)]
    details = {"total_logprob": total_lp, "total_tokens": total_tokens, "total_bytes": total_bytes,
               "total_words": total_words, "bootstrap": interval_record(samples)}
    return task_result(spec, suite, metrics=metrics, num_examples=len(examples), samples=samples, details=details)
