"""Instruction following with verifiable constraints, in the style of IFEval (Zhou et al. 2023).

Data (JSONL only, constraints are a list): one prompt per record,

    {"prompt": "Describe the sea in three sentences, in Spanish.",
     "constraints": [{"type": "max_sentences", "value": 3}, {"type": "language", "value": "es"}]}

Constraint types (checked on the greedy response; words and sentences are counted with NLTK tokenizers that need
no downloaded data: `RegexpTokenizer(r"\\w+")` and an untrained `PunktSentenceTokenizer`):

    min_words / max_words          {"value": N}
    min_sentences / max_sentences  {"value": N}
    keywords                       {"words": [...]}  every word appears (case-insensitive)
    forbidden_words                {"words": [...]}  none appears
    format                         {"value": "json" | "bullets" | "lowercase" | "uppercase"}
                                   (bullets: every non-empty line starts with "* " or "- "; optional "count": N)
    language                       {"value": "ru", "script": optional, "words": optional [...]}
                                   >= 80% of letters in the language's script (from a small table, or `script`,
                                   a Unicode script name such as CYRILLIC); with `words`, one of them must appear
                                   (scripts cannot tell Spanish from English; marker words can).

Metrics (IFEval's strict variants): `prompt_level_acc` (all constraints of a prompt hold) and
`instruction_level_acc` (share of all constraints that hold). With the task's `chat_template: true` the prompt goes
through the tokenizer's chat template.
"""

from __future__ import annotations

import json
import re
import unicodedata

from nltk.tokenize import PunktSentenceTokenizer, RegexpTokenizer

from deltamoe.common.errors import DeltaMoEError
from deltamoe.evaluation.tasks.common import load_examples, task_result

REQUIRED = {"prompt": str, "constraints": list}
_WORDS = RegexpTokenizer(r"\w+")
_SENTENCES = PunktSentenceTokenizer()  # untrained: default abbreviation-free rules, no nltk data download
SCRIPTS = {
    **dict.fromkeys(("ru", "uk", "bg", "be", "sr", "mk", "kk", "ky", "tg", "mn"), ("CYRILLIC",)),
    "zh": ("CJK",), "ja": ("CJK", "HIRAGANA", "KATAKANA"), "ko": ("HANGUL",),
    **dict.fromkeys(("ar", "fa", "ur"), ("ARABIC",)), "el": ("GREEK",), "he": ("HEBREW",),
    **dict.fromkeys(("hi", "mr", "ne"), ("DEVANAGARI",)), "th": ("THAI",), "ka": ("GEORGIAN",), "hy": ("ARMENIAN",),
}
CONSTRAINT_TYPES = ("min_words", "max_words", "min_sentences", "max_sentences", "keywords", "forbidden_words",
                    "format", "language")


def count_words(text: str) -> int:
    return len(_WORDS.tokenize(text))


def count_sentences(text: str) -> int:
    return len(_SENTENCES.tokenize(text.strip())) if text.strip() else 0


def script_share(text: str, scripts: tuple[str, ...]) -> float:
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0
    inside = sum(1 for ch in letters if unicodedata.name(ch, "").split(" ")[0] in scripts)
    return inside / len(letters)


def _words_present(text: str, words: list[str]) -> list[bool]:
    low = text.lower()
    return [re.search(rf"(?<!\w){re.escape(w.lower())}(?!\w)", low) is not None for w in words]


def check_constraint(constraint: dict, response: str) -> bool:
    """Whether one constraint holds for the response (the constraint was validated by `validate_constraint`)."""
    kind = constraint["type"]
    if kind in ("min_words", "max_words"):
        n = count_words(response)
        return n >= constraint["value"] if kind == "min_words" else n <= constraint["value"]
    if kind in ("min_sentences", "max_sentences"):
        n = count_sentences(response)
        return n >= constraint["value"] if kind == "min_sentences" else n <= constraint["value"]
    if kind == "keywords":
        return all(_words_present(response, constraint["words"]))
    if kind == "forbidden_words":
        return not any(_words_present(response, constraint["words"]))
    if kind == "format":
        value, text = constraint["value"], response.strip()
        if value == "json":
            text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text)
            try:
                json.loads(text)
                return True
            except json.JSONDecodeError:
                return False
        if value == "bullets":
            lines = [line for line in text.splitlines() if line.strip()]
            ok = bool(lines) and all(line.lstrip().startswith(("* ", "- ")) for line in lines)
            return ok and ("count" not in constraint or len(lines) == constraint["count"])
        if value == "lowercase":
            return text == text.lower() and any(ch.isalpha() for ch in text)
        return text == text.upper() and any(ch.isalpha() for ch in text)
    # language
    scripts = tuple(s.upper() for s in ([constraint["script"]] if "script" in constraint else
                                        SCRIPTS.get(constraint["value"], ("LATIN",))))
    ok = script_share(response, scripts) >= 0.8
    if constraint.get("words"):
        ok = ok and any(_words_present(response, constraint["words"]))
    return ok


def validate_constraint(where: str, c) -> None:
    if not isinstance(c, dict) or c.get("type") not in CONSTRAINT_TYPES:
        raise DeltaMoEError(f"{where}: each constraint needs a 'type' among {', '.join(CONSTRAINT_TYPES)}; got {c!r}")
    kind = c["type"]
    if kind.startswith(("min_", "max_")) and (not isinstance(c.get("value"), int) or c["value"] < 0):
        raise DeltaMoEError(f"{where}: constraint {kind} needs an integer 'value' >= 0")
    if kind in ("keywords", "forbidden_words") and not (
            isinstance(c.get("words"), list) and c["words"] and all(isinstance(w, str) and w for w in c["words"])):
        raise DeltaMoEError(f"{where}: constraint {kind} needs a non-empty list of strings 'words'")
    if kind == "format" and c.get("value") not in ("json", "bullets", "lowercase", "uppercase"):
        raise DeltaMoEError(f"{where}: constraint format needs 'value' json, bullets, lowercase or uppercase")
    if kind == "language" and not isinstance(c.get("value"), str):
        raise DeltaMoEError(f"{where}: constraint language needs a language code 'value'")


def evaluate(spec, backend, suite) -> dict:
    examples, _ = load_examples(spec, REQUIRED)
    for ex in examples:
        where = f"{spec.data}:{ex['_line']}"
        if not ex["constraints"]:
            raise DeltaMoEError(f"{where}: 'constraints' is empty; expected at least one constraint")
        for c in ex["constraints"]:
            validate_constraint(where, c)
    prompts = [backend.apply_chat_template(ex["prompt"]) if spec.chat_template else ex["prompt"] + "\n"
               for ex in examples]
    responses = backend.generate(prompts, max_new_tokens=spec.max_new_tokens, desc=f"instructions {spec.key}")
    samples, prompt_ok, held, total = [], 0, 0, 0
    for ex, response in zip(examples, responses):
        checks = [check_constraint(c, response) for c in ex["constraints"]]
        prompt_ok += all(checks)
        held += sum(checks)
        total += len(checks)
        samples.append({"line": ex["_line"], "response": response, "checks": checks})
    metrics = {"prompt_level_acc": prompt_ok / len(examples), "instruction_level_acc": held / total}
    return task_result(spec, suite, metrics=metrics, num_examples=len(examples), samples=samples)
