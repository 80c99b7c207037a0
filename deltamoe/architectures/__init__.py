"""Registry of supported dense architectures and reading a HF config into an `ArchitectureConfig`, strictly."""

from __future__ import annotations

from collections.abc import Iterable

from deltamoe.common.errors import DeltaMoEError
from deltamoe.architectures.base import Architecture, ArchitectureConfig
from deltamoe.architectures.fields import account_fields
from deltamoe.architectures.llama import LLAMA
from deltamoe.architectures.qwen2 import QWEN2
from deltamoe.architectures.qwen3 import QWEN3
from deltamoe.architectures.rope import read_rope
from deltamoe.architectures.sliding_window import read_sliding_window

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLAMA, QWEN2, QWEN3)}

def supported() -> str:
    return ", ".join(cls for a in ARCHITECTURES.values() for cls in a.hf_architectures)


def get_architecture(hf_config: dict, source: str = "config.json") -> Architecture:
    names = list(hf_config.get("architectures") or [])
    model_type = hf_config.get("model_type")
    for arch in ARCHITECTURES.values():
        if any(n in arch.hf_architectures for n in names) or (not names and model_type in arch.model_types):
            return arch
    found = names or [model_type]
    raise DeltaMoEError(f"{source}: unsupported architecture {found}; supported: {supported()}")


def read_architecture_config(hf_config: dict, source: str = "config.json", *,
                             ignored_fields: Iterable[str] = ()) -> tuple[Architecture, ArchitectureConfig]:
    """Map a HF config.json through the architecture's field table: every field accounted for, or an error.

    `ignored_fields`: unknown fields (and `rope_parameters.KEY` keys) the user accepted with --ignore-config-field;
    a checkpoint keeps them in deltamoe.json, so every later read passes the same list.
    """
    arch = get_architecture(hf_config, source)
    model = arch.hf_architectures[0]
    ignored = set(ignored_fields)
    fields = account_fields(hf_config, arch.config_table, model=model, ignored=ignored, source=source)
    values: dict = {"architecture": arch.name}
    for row in arch.config_table:
        if row.target is not None:
            values[row.target] = fields[row.name]
    rope = read_rope(hf_config, max_position_embeddings=values["max_position_embeddings"], ignored=ignored,
                     source=source)
    values.update(rope_theta=rope.theta, position_embedding_type=rope.position_embedding_type,
                  rope_scaling_factor=rope.llama3_factor, rope_linear_factor=rope.linear_factor, yarn=rope.yarn)
    if arch.sliding_window:
        values["sliding_window"], values["sliding_window_layers"] = read_sliding_window(
            hf_config, values["num_layers"], source)
    values.update(arch.fixed)
    return arch, ArchitectureConfig(**values)
