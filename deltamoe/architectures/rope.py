"""RoPE as transformers computes it, mapped to megatron-core's rotary embeddings exactly or refused.

transformers 5 (modeling_rope_utils.py: `convert_rope_params_to_dict`, `standardize_rope_params`, the
`_compute_*_parameters` functions) resolves the RoPE settings in this order: `rope_scaling` (4.x name) over
`rope_parameters`; `rope_theta` / `partial_rotary_factor` inside the dict over the top-level fields; for llama3, yarn
and longrope a top-level `original_max_position_embeddings` over the dict's, else `max_position_embeddings`.
`read_rope` follows the same order. Outcome per rope_type (megatron-core 0.19.2):

    default       rotary_base = rope_theta (RotaryEmbedding: same inv_freq formula)
    linear        seq_len_interpolation_factor = factor (positions / factor; transformers divides inv_freq)
    proportional  as linear when partial_rotary_factor is 1 (the only case that is not a partial rotary)
    llama3        rope_scaling = True, rope_scaling_factor = factor, when low/high_freq_factor and
                  original_max_position_embeddings are megatron's fixed 1 / 4 / 8192 (RotaryEmbedding._apply_scaling)
    yarn          position_embedding_type = "yarn" with the config's yarn_* attributes
                  (yarn_rotary_pos_embedding.py: same correction range, ramp and concentration factor)
    dynamic       refused: its frequencies change with each batch's length beyond max_position_embeddings
    longrope      refused: per-frequency factors switching at original_max_position_embeddings
    anything else refused
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deltamoe.common.errors import DeltaMoEError
from deltamoe.architectures.fields import Field, mapped, refused

DEFAULT_THETA = 10000.0
"""transformers' RotaryEmbeddingConfigMixin.default_theta."""

MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""The llama3 constants megatron-core's RotaryEmbedding._apply_scaling uses (GPTModel passes only the factor)."""

_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_TYPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "proportional": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
}
_REFUSED_TYPES = {
    "dynamic": "dynamic NTK scaling recomputes the frequencies from each batch's length once it exceeds "
               "max_position_embeddings; megatron-core's rotary embeddings are fixed",
    "longrope": "LongRoPE switches between per-frequency short and long factors at original_max_position_embeddings; "
                "megatron-core has no LongRoPE",
}

ROPE_FIELDS: tuple[Field, ...] = (
    mapped("rope_parameters", "RoPE (rope.py): default -> rotary_base; linear -> seq_len_interpolation_factor; "
           "llama3 -> rope_scaling_factor; yarn -> position_embedding_type yarn; dynamic, longrope, others refused"),
    mapped("rope_scaling", "transformers 4.x name of rope_parameters (wins when both are set)"),
    mapped("rope_theta", "rotary_base (4.x top-level spelling; rope_parameters' value wins)"),
    mapped("original_max_position_embeddings", "pre-scaling context of llama3/yarn RoPE (wins over rope_parameters')"),
    refused("partial_rotary_factor", "partial rotary: transformers' rotary embedding of this model rotates the whole "
            "head (or fails), megatron's rotary_percent rotates a prefix", accepts=(1.0, None)),
)


@dataclass(frozen=True, kw_only=True)
class YarnRope:
    """megatron-core's YaRN settings: GPTModel reads them as `TransformerConfig.yarn_*` attributes."""

    scaling_factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float
    correction_range_round_to_int: bool

    def megatron_attributes(self) -> dict:
        """The attribute names megatron.training.argument_utils._apply_yarn_config_from_args sets."""
        return {
            "yarn_rotary_scaling_factor": self.scaling_factor,
            "yarn_original_max_position_embeddings": self.original_max_position_embeddings,
            "yarn_beta_fast": self.beta_fast,
            "yarn_beta_slow": self.beta_slow,
            "yarn_mscale": self.mscale,
            "yarn_mscale_all_dim": self.mscale_all_dim,
            "yarn_correction_range_round_to_int": self.correction_range_round_to_int,
        }


@dataclass(frozen=True, kw_only=True)
class Rope:
    """RoPE in megatron-core's terms (GPTModel's arguments)."""

    position_embedding_type: str = "rope"
    theta: float
    llama3_factor: float | None = None
    linear_factor: float | None = None
    yarn: YarnRope | None = None


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def read_rope(hf_config: dict, *, max_position_embeddings: int, ignored: set[str], source: str) -> Rope:
    scaling = hf_config.get("rope_scaling")
    field = "rope_scaling" if scaling else "rope_parameters"
    params = scaling or hf_config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise DeltaMoEError(f"{source}: {field} must be an object, got {params!r}")
    params = dict(params)
    top_theta = hf_config.get("rope_theta")
    params.setdefault("rope_theta", DEFAULT_THETA if top_theta is None else top_theta)
    if hf_config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", hf_config["partial_rotary_factor"])
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in hf_config:
            params["original_max_position_embeddings"] = hf_config["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", max_position_embeddings)

    if rope_type in _REFUSED_TYPES:
        raise DeltaMoEError(f"{source}: {field}.rope_type={rope_type!r} is not supported: {_REFUSED_TYPES[rope_type]}; "
                            f"supported: {', '.join(repr(t) for t in _TYPE_KEYS)}")
    if rope_type not in _TYPE_KEYS:
        raise DeltaMoEError(f"{source}: {field}.rope_type={rope_type!r} is not supported (megatron-core has no such "
                            f"RoPE); supported: {', '.join(repr(t) for t in _TYPE_KEYS)}")
    unknown = sorted(k for k in params if k not in _COMMON_KEYS | _TYPE_KEYS[rope_type] and f"{field}.{k}" not in ignored)
    if unknown:
        raise DeltaMoEError(
            f"{source}: {field}.{unknown[0]} (= {params[unknown[0]]!r}) is not a parameter of rope_type {rope_type!r} "
            f"that DeltaMoE maps; parameters: {', '.join(sorted(_TYPE_KEYS[rope_type] | {'rope_theta'}))}. If it does "
            f"not change the model's function, import with --ignore-config-field {field}.{unknown[0]}")
    partial = params.get("partial_rotary_factor")
    if partial is not None and partial != 1.0:
        raise DeltaMoEError(f"{source}: partial_rotary_factor={partial!r} is not supported: transformers' rotary "
                            "embedding of this model rotates the whole head (or fails), megatron's rotary_percent "
                            "rotates a prefix; supported: 1.0")
    theta = float(params["rope_theta"])

    def required(key: str, *, nullable: bool = False):
        if key not in params:
            raise DeltaMoEError(f"{source}: {field} of rope_type {rope_type!r} lacks {key!r} (transformers requires it)")
        value = params[key]
        if not (nullable and value is None) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DeltaMoEError(f"{source}: {field}.{key}={value!r} is not supported; supported: a number")
        return value

    if rope_type == "default":
        return Rope(theta=theta)
    if rope_type in ("linear", "proportional"):
        factor = float(required("factor") if rope_type == "linear" or "factor" in params else 1.0)
        return Rope(theta=theta, linear_factor=None if factor == 1.0 else factor)
    if rope_type == "llama3":
        settings = {key: required(key) for key in ("factor", *MEGATRON_LLAMA3)}
        for key, fixed in MEGATRON_LLAMA3.items():
            if float(settings[key]) != fixed:
                raise DeltaMoEError(f"{source}: llama3 RoPE with {key}={settings[key]!r} is not supported: "
                                    f"megatron-core's llama3 scaling fixes {key} (RotaryEmbedding._apply_scaling); "
                                    f"supported: {fixed!r}")
        return Rope(theta=theta, llama3_factor=float(settings["factor"]))
    return Rope(position_embedding_type="yarn", theta=theta,
                yarn=_read_yarn(params, max_position_embeddings, field, source, required))


def _read_yarn(params: dict, max_position_embeddings: int, field: str, source: str, required) -> YarnRope:
    """transformers' _compute_yarn_parameters, in megatron's YarnRotaryEmbedding arguments."""
    original = int(required("original_max_position_embeddings"))
    factor = required("factor", nullable=True)
    factor = float(max_position_embeddings / original if factor is None else factor)
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        concentration = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        megatron_mscale, megatron_mscale_all_dim = float(mscale), float(mscale_all_dim)
    else:
        # transformers uses mscale 1 then; megatron's (mscale 1, mscale_all_dim 0) gives the same factor, exactly.
        concentration = _yarn_mscale(factor)
        megatron_mscale, megatron_mscale_all_dim = 1.0, 0.0
    attention_factor = params.get("attention_factor")
    if attention_factor is not None and not math.isclose(attention_factor, concentration, rel_tol=1e-12):
        raise DeltaMoEError(
            f"{source}: {field}.attention_factor={attention_factor!r} is not supported: megatron-core derives YaRN's "
            f"attention factor from factor, mscale and mscale_all_dim; supported: the derived {concentration!r}")
    return YarnRope(
        scaling_factor=factor, original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=megatron_mscale, mscale_all_dim=megatron_mscale_all_dim,
        correction_range_round_to_int=bool(params.get("truncate", True)),
    )
