"""Translation, FLORES style: k-shot prompts, greedy generation, chrF++ and BLEU through sacrebleu.

Data (JSONL or TSV): columns `source` and `target` (strings), one sentence pair per record. The task's
`source_language` names the source side and `language` the target side. Prompt (Source/Target are the suite's
`language_names`):

    {Source}: {source of shot 1}\\n{Target}: {target of shot 1}\\n\\n ... {Source}: {source}\\n{Target}:

Generation is greedy and stops at the first newline. Scores are corpus-level (sacrebleu's `corpus_score`):
`chrf_pp` (chrF++, Popović 2017: character 6-grams plus word bigrams, beta 2), `chrf` (chrF, Popović 2015) and
`bleu` (Papineni et al. 2002; tokenizer from the task's `bleu_tokenize`, 13a by default as sacrebleu's).
"""

from __future__ import annotations

from sacrebleu.metrics import BLEU, CHRF

from deltamoe.common.errors import DeltaMoEError
from deltamoe.evaluation.tasks.common import (
    FEWSHOT_DELIMITER,
    load_examples,
    sample_shots,
    task_result,
)

REQUIRED = {"source": str, "target": str}


def score_translations(hypotheses: list[str], references: list[str], *, bleu_tokenize: str = "13a") -> dict:
    """Corpus chrF++, chrF and BLEU (0-100) of hypotheses against one reference each."""
    try:
        bleu = BLEU(tokenize=bleu_tokenize)
    except (KeyError, RuntimeError, ImportError) as e:  # unknown name / missing extra (ja-mecab) / sentencepiece
        raise DeltaMoEError(f"sacrebleu cannot use BLEU tokenizer {bleu_tokenize!r}: {e}") from None
    return {
        "chrf_pp": CHRF(word_order=2).corpus_score(hypotheses, [references]).score,
        "chrf": CHRF().corpus_score(hypotheses, [references]).score,
        "bleu": bleu.corpus_score(hypotheses, [references]).score,
    }


def build_prompt(spec, suite, pool: list[dict], ex: dict) -> str:
    src = suite.language_name(spec.source_language)
    tgt = suite.language_name(spec.language)
    shots = [f"{src}: {s['source']}\n{tgt}: {s['target']}" for s in sample_shots(spec, suite, pool, ex)]
    return spec.description + "".join(s + FEWSHOT_DELIMITER for s in shots) + f"{src}: {ex['source']}\n{tgt}:"


def evaluate(spec, backend, suite) -> dict:
    examples, pool = load_examples(spec, REQUIRED)
    for ex in examples:
        if not ex["source"].strip() or not ex["target"].strip():
            raise DeltaMoEError(f"{spec.data}:{ex['_line']}: 'source' and 'target' must be non-empty")
    prompts = [build_prompt(spec, suite, pool, ex) for ex in examples]
    outputs = backend.generate(prompts, max_new_tokens=spec.max_new_tokens, stop=["\n"],
                               desc=f"translation {spec.key}")
    hypotheses = [o.strip() for o in outputs]
    references = [ex["target"] for ex in examples]
    metrics = score_translations(hypotheses, references, bleu_tokenize=spec.bleu_tokenize)
    samples = [{"line": ex["_line"], "source": ex["source"], "reference": ref, "hypothesis": hyp}
               for ex, ref, hyp in zip(examples, references, hypotheses)]
    return task_result(spec, suite, metrics=metrics, num_examples=len(examples), samples=samples)
