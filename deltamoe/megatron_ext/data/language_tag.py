"""The language tag of a tokenized dataset: the sidecar `PREFIX.lang.json` next to `PREFIX.bin` / `PREFIX.idx`.

Megatron's indexed format (.bin/.idx) has no room for metadata, so the language a dataset was written in, the
tokenizer that wrote it and the inputs it came from live in a JSON sidecar. Training reads the sidecars of every
dataset in a blend to know, per sample, whether it is original-language text (the language prior of MoE-LPR's stage
2) and which experts it may use (language-allocated experts). `deltamoe prepare-data` writes the sidecar last, after
.bin and .idx are renamed into place, so a sidecar is also the marker of a complete dataset.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError

SIDECAR_SUFFIX = ".lang.json"
SIDECAR_FORMAT = "deltamoe.language-tag/1"

# BCP-47-like: a 2-3 letter primary subtag, optional script/region/variant subtags ("en", "es", "zh-Hans", "pt_BR").
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")

# Files whose content defines token ids. tokenizer_config.json is left out on purpose: it also holds the chat
# template, which may differ between two copies of the same vocabulary.
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")


def check_language_code(code: str, *, what: str = "language code") -> str:
    """Return `code` if it looks like a language code (en, es, zh-Hans, pt_BR), else raise DeltaMoEError."""
    if not isinstance(code, str) or not _LANGUAGE_CODE.match(code):
        raise DeltaMoEError(
            f"{what} {code!r} is not a language code: expected a lowercase ISO 639 code such as 'en', 'es' or 'zh-Hans'"
        )
    return code


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}{SIDECAR_SUFFIX}")


def dataset_files(prefix: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(.bin, .idx, .lang.json) paths of a dataset prefix."""
    p = os.fspath(prefix)
    return Path(p + ".bin"), Path(p + ".idx"), sidecar_path(p)


@dataclass(kw_only=True)
class TokenizerInfo:
    """Which tokenizer wrote the token ids: enough to refuse mixing datasets from different vocabularies."""

    name: str
    """The tokenizer's name_or_path as given on the command line."""
    vocab_size: int
    """len(tokenizer): base vocabulary plus added tokens."""
    eod_id: int | None
    """Token that ends each document (the tokenizer's eos), or None when documents were written without one."""
    bos_id: int | None = None
    fingerprint: str = ""
    """sha256 over the vocabulary-defining files (tokenizer.json, vocab.json, merges.txt, ...)."""


@dataclass(kw_only=True)
class InputFile:
    path: str
    sha256: str
    num_documents: int


@dataclass(kw_only=True)
class LanguageTag:
    """Everything `PREFIX.lang.json` records."""

    language: str
    tokenizer: TokenizerInfo
    num_documents: int
    num_sequences: int
    """Sentences when split, otherwise equal to num_documents (Megatron's .idx counts both)."""
    num_tokens: int
    dtype: str
    """numpy dtype of the token ids in .bin (uint16 below 65500 ids, else int32, as Megatron chooses)."""
    inputs: list[InputFile]
    options: dict = field(default_factory=dict)
    model_vocab_size: int | None = None
    versions: dict = field(default_factory=dict)
    format: str = SIDECAR_FORMAT

    def __post_init__(self):
        check_language_code(self.language, what="language")
        if isinstance(self.tokenizer, dict):
            self.tokenizer = TokenizerInfo(**self.tokenizer)
        self.inputs = [i if isinstance(i, InputFile) else InputFile(**i) for i in self.inputs]
        if self.num_documents <= 0 or self.num_tokens <= 0:
            raise DeltaMoEError(
                f"language tag: a dataset needs at least one document and one token "
                f"(num_documents={self.num_documents}, num_tokens={self.num_tokens})"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"


def read_language_tag(prefix: str | os.PathLike) -> LanguageTag:
    """Read and validate the sidecar of a dataset prefix, with a clear error when it is missing or malformed."""
    path = sidecar_path(prefix)
    if not path.exists():
        bin_path = Path(os.fspath(prefix) + ".bin")
        hint = (
            f"{bin_path} exists but has no language tag: it was not written by `deltamoe prepare-data` or that run "
            "did not finish; re-run `deltamoe prepare-data ... --overwrite`"
            if bin_path.exists()
            else f"no dataset at prefix {os.fspath(prefix)} (expected {bin_path}, .idx and {path.name}); "
            "write it with `deltamoe prepare-data --out PREFIX ...`"
        )
        raise DeltaMoEError(f"{path}: missing language tag sidecar: {hint}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DeltaMoEError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != SIDECAR_FORMAT:
        raise DeltaMoEError(f"{path}: field 'format' must be {SIDECAR_FORMAT!r}, got {raw.get('format') if isinstance(raw, dict) else raw!r}")
    try:
        return LanguageTag(**raw)
    except TypeError as e:
        raise DeltaMoEError(f"{path}: unexpected or missing fields: {e}") from None
    except DeltaMoEError as e:
        raise DeltaMoEError(f"{path}: {e}") from None


def write_language_tag(prefix: str | os.PathLike, tag: LanguageTag) -> Path:
    """Write the sidecar through a temporary file renamed into place (a reader never sees half a JSON)."""
    path = sidecar_path(prefix)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(tag.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return path
