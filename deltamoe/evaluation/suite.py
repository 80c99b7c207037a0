"""Evaluation suites: which languages are original and which are new, and which tasks to run on which data.

A suite is one YAML or JSON file. Data paths are relative to the suite file's folder. Schema (version 1):

```yaml
name: demo                      # free text, copied into results
seed: 1234                      # few-shot sampling and torch seeds
max_length: 2048                # longest sequence fed to the model (capped by the model's own limit)
batch_size: 8                   # sequences per forward pass (the CLI's --batch-size overrides it)
languages:
  original: [en]                # languages the base model already had
  new: [es, ru]                 # languages added by continued pre-training
language_names: {en: English, es: Spanish, ru: Russian}   # optional; used in translation prompts
defaults: {num_fewshot: 0, limit: 100}                      # optional; any task field
tasks:
  - {type: perplexity, language: es, data: examples/text_es.jsonl}   # optional: domain: in | out
  - {name: arc, type: multiple_choice, format: arc, language: es, data: examples/arc_es.jsonl, num_fewshot: 1}
  - {name: flores, type: translation, source_language: en, language: es, data: examples/flores_en_es.tsv}
  - {type: instruction_following, language: es, data: examples/ifeval_es.jsonl, chat_template: true}
  - {type: qa_loglik, language: es, data: examples/qa_es.jsonl}
  - {type: routing, language: es, data: examples/text_es.jsonl}
```

Task fields: `type` (one of TASK_TYPES), `language`, `data` are required; `name` (default: the type) groups the
same task across languages in the report, so (`name`, `language`) must be unique. The per-type fields are
documented on `TaskSpec`. Unknown fields are errors, so a typo never silently changes a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from deltamoe.common.errors import DeltaMoEError

TASK_TYPES = ("perplexity", "multiple_choice", "translation", "instruction_following", "qa_loglik", "routing")
MC_FORMATS = ("arc", "hellaswag", "mmlu", "belebele")
DOMAINS = ("", "in", "out")


@dataclass(kw_only=True)
class TaskSpec:
    type: str
    """One of TASK_TYPES."""
    language: str
    """Language code of the evaluated text (for translation: the target language)."""
    data: Path
    """JSONL or TSV file with the examples (schemas in deltamoe/evaluation/README.md)."""
    name: str = ""
    """Task family shown in the report (default: the type); the same name in several languages forms one row."""
    num_fewshot: int = 0
    """Solved examples put before each prompt (multiple_choice, translation)."""
    fewshot_data: Path | None = None
    """File the few-shot examples come from; default: the other examples of `data`."""
    limit: int | None = None
    """Use only the first `limit` examples."""
    format: str = "arc"
    """multiple_choice prompt shape: arc, hellaswag, mmlu (Okapi m_mmlu), belebele."""
    description: str = ""
    """Text put once before the few-shot examples (e.g. MMLU's subject line)."""
    source_language: str | None = None
    """translation: language of the `source` column."""
    max_new_tokens: int = 64
    """Greedy generation budget (translation, instruction_following)."""
    chat_template: bool = False
    """instruction_following, qa_loglik: wrap the prompt in the tokenizer's chat template (error if it has none)."""
    bleu_tokenize: str = "13a"
    """translation: sacrebleu BLEU tokenizer (13a; zh for Chinese, char for other unsegmented scripts)."""
    domain: str = ""
    """perplexity: "in" (held-out text of the training genres) or "out" (another genre, never trained on); the
    report then shows the two kinds side by side. Empty: not part of that comparison."""

    def __post_init__(self):
        if self.type not in TASK_TYPES:
            raise DeltaMoEError(f"task type {self.type!r} is unknown; expected one of {', '.join(TASK_TYPES)}")
        self.name = self.name or self.type
        self.data = Path(self.data)
        if self.fewshot_data is not None:
            self.fewshot_data = Path(self.fewshot_data)
        if not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise DeltaMoEError(f"task {self.key}: num_fewshot must be an integer >= 0, got {self.num_fewshot!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise DeltaMoEError(f"task {self.key}: limit must be a positive integer or null, got {self.limit!r}")
        if self.type == "multiple_choice" and self.format not in MC_FORMATS:
            raise DeltaMoEError(f"task {self.key}: format {self.format!r} is unknown; expected one of {', '.join(MC_FORMATS)}")
        if self.type == "translation" and not self.source_language:
            raise DeltaMoEError(f"task {self.key}: translation needs source_language")
        if self.domain not in DOMAINS:
            raise DeltaMoEError(f"task {self.key}: domain must be one of {', '.join(map(repr, DOMAINS))}, got {self.domain!r}")
        if self.domain and self.type != "perplexity":
            raise DeltaMoEError(f"task {self.key}: domain is for perplexity tasks, not {self.type}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise DeltaMoEError(f"task {self.key}: max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")

    @property
    def key(self) -> str:
        return f"{self.name or self.type}/{self.language}"


@dataclass(kw_only=True)
class Suite:
    name: str
    original_languages: list[str]
    new_languages: list[str]
    tasks: list[TaskSpec]
    language_names: dict[str, str] = field(default_factory=dict)
    seed: int = 1234
    max_length: int = 2048
    batch_size: int = 8
    path: Path | None = None

    def __post_init__(self):
        both = set(self.original_languages) & set(self.new_languages)
        if both:
            raise DeltaMoEError(f"suite {self.path}: languages {sorted(both)} are listed as both original and new")
        if not self.original_languages and not self.new_languages:
            raise DeltaMoEError(f"suite {self.path}: languages.original and languages.new are both empty")
        if not self.tasks:
            raise DeltaMoEError(f"suite {self.path}: no tasks")
        for name, value in (("max_length", self.max_length), ("batch_size", self.batch_size)):
            if not isinstance(value, int) or value < 1:
                raise DeltaMoEError(f"suite {self.path}: {name} must be a positive integer, got {value!r}")
        known = set(self.languages)
        seen = set()
        for task in self.tasks:
            for lang in (task.language, task.source_language):
                if lang is not None and lang not in known:
                    raise DeltaMoEError(
                        f"suite {self.path}: task {task.key} uses language {lang!r}, which the suite does not define "
                        f"(languages: {sorted(known)})"
                    )
            if task.key in seen:
                raise DeltaMoEError(f"suite {self.path}: task {task.key} appears twice; give one of them another name")
            seen.add(task.key)

    @property
    def languages(self) -> list[str]:
        return list(self.original_languages) + list(self.new_languages)

    def group(self, language: str) -> str:
        return "original" if language in self.original_languages else "new"

    def language_name(self, language: str) -> str:
        return self.language_names.get(language, language)


_TASK_FIELDS = {f.name for f in fields(TaskSpec)}
_TOP_FIELDS = {"name", "seed", "max_length", "batch_size", "languages", "language_names", "defaults", "tasks"}


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file (.yaml/.yml/.json); data paths become absolute and must exist."""
    path = Path(path)
    if not path.is_file():
        raise DeltaMoEError(f"suite file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise DeltaMoEError(f"suite file {path} could not be parsed: {e}") from None
    if not isinstance(raw, dict):
        raise DeltaMoEError(f"suite file {path}: expected a mapping at the top level")
    unknown = set(raw) - _TOP_FIELDS
    if unknown:
        raise DeltaMoEError(f"suite file {path}: unknown fields {sorted(unknown)}; expected {sorted(_TOP_FIELDS)}")
    langs = raw.get("languages")
    if not isinstance(langs, dict) or set(langs) - {"original", "new"}:
        raise DeltaMoEError(f"suite file {path}: 'languages' must be a mapping with lists 'original' and 'new'")
    defaults = raw.get("defaults") or {}
    root = path.parent
    tasks = []
    for i, entry in enumerate(raw.get("tasks") or []):
        if not isinstance(entry, dict):
            raise DeltaMoEError(f"suite file {path}: tasks[{i}] must be a mapping")
        merged = {**defaults, **entry}
        unknown = set(merged) - _TASK_FIELDS
        if unknown:
            raise DeltaMoEError(f"suite file {path}: tasks[{i}] has unknown fields {sorted(unknown)}")
        missing = [k for k in ("type", "language", "data") if k not in merged]
        if missing:
            raise DeltaMoEError(f"suite file {path}: tasks[{i}] is missing {missing}")
        for key in ("data", "fewshot_data"):
            if merged.get(key) is not None:
                file = (root / merged[key]).resolve()
                if not file.is_file():
                    raise DeltaMoEError(f"suite file {path}: tasks[{i}].{key} {file} does not exist")
                merged[key] = file
        tasks.append(TaskSpec(**merged))
    return Suite(
        name=str(raw.get("name", path.stem)),
        original_languages=[str(x) for x in langs.get("original") or []],
        new_languages=[str(x) for x in langs.get("new") or []],
        language_names={str(k): str(v) for k, v in (raw.get("language_names") or {}).items()},
        tasks=tasks,
        seed=raw.get("seed", 1234),
        max_length=raw.get("max_length", 2048),
        batch_size=raw.get("batch_size", 8),
        path=path.resolve(),
    )
