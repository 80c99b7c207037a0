"""Files of a Hugging Face model folder other than weights: config.json and the tokenizer files.

Below both `megatron_ext` and `converters` (every command that reads or writes a model folder uses it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of a HF folder, with a clear error when it is absent or not JSON."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise DeltaMoEError(f"{path}: missing (expected a Hugging Face model folder with config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DeltaMoEError(f"{path}: not valid JSON: {e}") from None


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files present in `src` (and generation_config.json) to `dst`."""
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        path = Path(src) / name
        if path.exists():
            shutil.copy2(path, Path(dst) / name)
            copied.append(name)
    return copied


def _token_table(folder: Path) -> tuple[Path, dict[int, str] | str] | None:
    """(file, id -> token) from tokenizer.json or vocab.json; (file, sha256) for a SentencePiece tokenizer.model;
    None when the folder has no tokenizer files."""
    for name in ("tokenizer.json", "vocab.json"):
        path = folder / name
        if not path.exists():
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DeltaMoEError(f"{path}: not valid JSON: {e}") from None
        if name == "vocab.json":
            vocab = doc
        else:
            vocab = (doc.get("model") or {}).get("vocab")
            if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
                vocab = {piece[0]: i for i, piece in enumerate(vocab)}
        if not isinstance(vocab, dict):
            continue
        table = {int(i): str(t) for t, i in vocab.items()}
        # Special tokens are left out: instruct releases rename reserved ones (their rows were never trained).
        for added in doc.get("added_tokens", []) if name == "tokenizer.json" else []:
            if not added.get("special"):
                table[int(added["id"])] = str(added["content"])
        return path, table
    path = folder / "tokenizer.model"
    if path.exists():
        from deltamoe.common.hashing import sha256_file

        return path, sha256_file(path)
    return None


def check_same_tokenizer(base: str | os.PathLike, other: str | os.PathLike, *, flag: str) -> None:
    """Refuse a model whose tokenizer gives B's token ids other meanings (rows of the embeddings would not match).

    Every id of B's vocabulary must be the same token in `other`'s; ids past B's vocabulary (tokens an instruct
    model added) are allowed, and special added tokens are not compared. Folders without tokenizer files are not
    compared.
    """
    a, b = _token_table(Path(base)), _token_table(Path(other))
    if a is None or b is None:
        return
    (file_a, table_a), (file_b, table_b) = a, b
    if isinstance(table_a, str) or isinstance(table_b, str):
        if table_a != table_b:
            raise DeltaMoEError(f"{flag} {other}: its tokenizer ({file_b.name}) differs from {file_a}: the models "
                                "must share a tokenizer (their embedding rows must mean the same tokens)")
        return
    for token_id in sorted(table_a):
        if table_b.get(token_id) != table_a[token_id]:
            raise DeltaMoEError(
                f"{flag} {other}: another tokenizer than {base}'s: id {token_id} is {table_b.get(token_id)!r} in "
                f"{file_b} but {table_a[token_id]!r} in {file_a}; the models must share a tokenizer (tokens added "
                "after the base vocabulary are fine)")
