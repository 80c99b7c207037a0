"""Registry of supported dense architectures and reading a HF config into an `ArchitectureConfig`."""

from __future__ import annotations

from deltamoe.common.errors import DeltaMoEError
from deltamoe.architectures.base import Architecture, ArchitectureConfig
from deltamoe.architectures.llama import LLAMA
from deltamoe.architectures.qwen2 import QWEN2
from deltamoe.architectures.qwen3 import QWEN3

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLAMA, QWEN2, QWEN3)}

# Llama 3.1's RoPE scaling as megatron-core implements it (fixed low/high frequency factors and context).
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


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


def _rope(hf_config: dict, source: str) -> tuple[float, float | None]:
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        settings = {**scaling, **params}
        for key, expected in _LLAMA3_ROPE_FIXED.items():
            if float(settings.get(key, expected)) != expected:
                raise DeltaMoEError(
                    f"{source}: rope {key}={settings[key]} is not supported (megatron-core's llama3 RoPE scaling "
                    f"uses {key}={expected})"
                )
        return float(theta), float(settings["factor"])
    raise DeltaMoEError(f"{source}: rope_type {rope_type!r} is not supported (supported: default, llama3)")


def read_architecture_config(hf_config: dict, source: str = "config.json") -> tuple[Architecture, ArchitectureConfig]:
    """Map a HF config.json through the architecture's field table; every required field must be present."""
    arch = get_architecture(hf_config, source)
    values: dict = {"architecture": arch.name}
    for hf_name, ours in arch.config_fields.items():
        if hf_config.get(hf_name) is not None:
            values[ours] = hf_config[hf_name]
    values.setdefault("num_query_groups", values.get("num_attention_heads"))
    values.setdefault("tie_word_embeddings", False)
    for required in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size", "norm_epsilon"):
        if required not in values:
            hf_name = next(k for k, v in arch.config_fields.items() if v == required)
            raise DeltaMoEError(f"{source}: field {hf_name!r} is missing (needed for {arch.name})")
    values.setdefault("kv_channels", values["hidden_size"] // values["num_attention_heads"])
    values.setdefault("max_position_embeddings", 4096)
    values["rope_theta"], values["rope_scaling_factor"] = _rope(hf_config, source)
    values.update(arch.fixed)
    return arch, ArchitectureConfig(**values)
