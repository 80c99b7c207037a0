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
