"""Strict accounting of a Hugging Face config.json, field by field, as the rule tables account for every tensor.

Every field an architecture's config.json can carry is a row of that architecture's table (llama.py, qwen2.py,
qwen3.py), in one of three roles:

    mapped    becomes an `ArchitectureConfig` setting, which model_builder and the trainer's flags both read
    neutral   known not to change the function the weights compute (use_cache, dtype, token ids, generation settings)
    refused   changes the function in a way megatron-core cannot reproduce: accepted only at its neutral value(s)

A field in no row (a newer transformers, a custom config) is refused too, unless the user names it with
`deltamoe import --ignore-config-field NAME`; the checkpoint's deltamoe.json records the names. Defaults are the
installed transformers' class defaults (tests/test_config_fields.py checks them against transformers 5), so a field
that config.json leaves out means what it means to transformers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from deltamoe.common.errors import DeltaMoEError


class Role(Enum):
    MAPPED = "mapped"
    NEUTRAL = "neutral"
    REFUSED = "refused"


@dataclass(frozen=True)
class Field:
    name: str
    """config.json key; a pattern with `*` covers a family (`*_token_id`)."""
    role: Role
    to: str
    """mapped: the megatron-core setting it becomes and how; neutral or refused: what the field does."""
    default: Any = None
    """What transformers uses when config.json lacks the field (or sets it to null); a callable derives it from the
    other mapped values (num_key_value_heads -> num_attention_heads). None: transformers has no default."""
    accepts: tuple = ()
    """refused: the values that leave the function unchanged. mapped: the values that map (empty: any)."""
    target: str | None = None
    """mapped one to one: the `ArchitectureConfig` field that takes the value."""
    null: Any = None
    """What transformers uses when config.json sets the field to null, where that differs from `default`."""

    def check(self, value, source: str) -> None:
        if self.role is Role.REFUSED and not _among(value, self.accepts):
            raise DeltaMoEError(f"{source}: {self.name}={value!r} is not supported: {self.to}; "
                                f"supported: {_choices(self.accepts)}")
        if self.role is Role.MAPPED and self.accepts and not _among(value, self.accepts):
            raise DeltaMoEError(f"{source}: {self.name}={value!r} is not supported ({self.to}); "
                                f"supported: {_choices(self.accepts)}")


def mapped(name: str, to: str, *, target: str | None = None, default: Any = None, null: Any = None,
           accepts: tuple = ()) -> Field:
    return Field(name, Role.MAPPED, to, default, accepts, target, null)


def neutral(name: str, why: str) -> Field:
    return Field(name, Role.NEUTRAL, why)


def refused(name: str, why: str, *, accepts: tuple, default: Any = None) -> Field:
    return Field(name, Role.REFUSED, why, default, accepts)


def _among(value, accepted: tuple) -> bool:
    for a in accepted:
        if isinstance(a, bool) or a is None or isinstance(value, bool):
            if value is a:  # `1 == True` in Python: booleans and null match only themselves
                return True
        elif value == a:
            return True
    return False


def _choices(values: tuple) -> str:
    return ", ".join(repr(v) for v in values)


# ---- fields every transformers config can carry (PreTrainedConfig in 5.x, PretrainedConfig in 4.x) ----

_GENERATION = (
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "epsilon_cutoff", "eta_cutoff", "encoder_repetition_penalty", "assistant_confidence_threshold",
    "assistant_lookbehind", "num_assistant_tokens", "num_assistant_tokens_schedule", "target_lookbehind",
)
"""Generation settings 4.x kept in config.json; transformers 5 drops them on load (GenerationConfig's defaults)."""

PRETRAINED_FIELDS: tuple[Field, ...] = (
    mapped("architectures", "selects this table (with model_type)"),
    mapped("model_type", "selects this table when architectures is absent"),
    neutral("transformers_version", "the writer's transformers version"),
    neutral("dtype", "dtype of the saved weights; import reads the tensors' own dtype (--dtype auto)"),
    neutral("torch_dtype", "transformers 4.x name of dtype"),
    neutral("use_bfloat16", "4.x dtype hint (TensorFlow/Flax)"),
    neutral("use_cache", "KV cache during generation"),
    neutral("return_dict", "output container type"),
    neutral("output_hidden_states", "extra outputs"),
    neutral("output_attentions", "extra outputs"),
    neutral("torchscript", "export mode; same weights and function"),
    neutral("chunk_size_feed_forward", "feed-forward chunking, same function in chunks (unused by these models)"),
    neutral("is_decoder", "decoder flag for encoder-decoder wrappers; causal LMs ignore it"),
    neutral("tie_encoder_decoder", "encoder-decoder models only"),
    neutral("id2label", "sequence-classification head labels; the causal LM has none"),
    neutral("label2id", "sequence-classification head labels"),
    neutral("num_labels", "sequence-classification head size"),
    neutral("problem_type", "sequence-classification loss"),
    neutral("finetuning_task", "metadata"),
    neutral("task_specific_params", "pipeline defaults"),
    neutral("tokenizer_class", "tokenizer metadata"),
    neutral("prefix", "pipeline prompt prefix"),
    neutral("tf_legacy_loss", "TensorFlow loss variant"),
    neutral("gradient_checkpointing", "4.x training memory switch"),
    neutral("initializer_range", "initialisation of new weights only (megatron's --init-method-std decides those)"),
    neutral("*_token_id", "token ids (bos, eos, pad, unk, ...): tokenizer and generation facts, no weight changes"),
    neutral("_*", "transformers' private bookkeeping (_name_or_path, _commit_hash, _attn_implementation, ...)"),
    *(neutral(name, "generation setting (transformers 5 moves it to generation_config)") for name in _GENERATION),
    refused("is_encoder_decoder", "an encoder-decoder model, not a causal LM", accepts=(False,)),
    refused("add_cross_attention", "cross-attention layers, which megatron-core's GPTModel has not", accepts=(False,)),
    refused("cross_attention_hidden_size", "cross-attention layers", accepts=(None,)),
    refused("pruned_heads", "pruned attention heads: megatron-core gives every layer the same head count",
            accepts=({}, None)),
    refused("quantization_config", "quantised weights: dequantise to float first (DeltaMoE imports float tensors)",
            accepts=(None,)),
    refused("per_layer_config", "per-layer overrides of the config: megatron-core layers share one config",
            accepts=(None,)),
    refused("attn_logit_softcapping", "attention logit soft-capping (Gemma 2): neither megatron-core's GPTModel nor "
            "this transformers class applies it, so the config describes another model", accepts=(None,)),
    refused("final_logit_softcapping", "final logit soft-capping (Gemma 2): neither megatron-core's GPTModel nor "
            "this transformers class applies it, so the config describes another model", accepts=(None,)),
)


NESTED_FIELDS = ("rope_parameters", "rope_scaling")
"""Fields whose keys are accounted for one by one (rope.py), so `--ignore-config-field rope_parameters.KEY` works."""


def account_fields(hf_config: dict, table: tuple[Field, ...], *, model: str, ignored: Iterable[str] = (),
                   source: str) -> dict[str, Any]:
    """Check every key of `hf_config` against `table`; return {field name: value or default} for mapped rows.

    Unknown keys are an error unless listed in `ignored`; a name in `ignored` that the table accounts for, or that
    config.json does not carry, is an error too (a typo would otherwise silently ignore nothing).
    """
    ignored = set(ignored)
    rows = {f.name: f for f in table if "*" not in f.name}
    patterns = [f for f in table if "*" in f.name]

    def row(key: str) -> Field | None:
        return rows.get(key) or next((f for f in patterns if fnmatch.fnmatchcase(key, f.name)), None)

    for name in sorted(ignored):
        base, _, key = name.partition(".")
        if not key and row(name) is not None:
            raise DeltaMoEError(f"--ignore-config-field {name}: {model}'s table accounts for {name!r} "
                                f"({row(name).role.value}: {row(name).to}); only unknown fields can be ignored")
        if base not in hf_config:
            raise DeltaMoEError(f"--ignore-config-field {name}: {source} has no field {base!r}")
        if key and (base not in NESTED_FIELDS or key not in (hf_config[base] or {})):
            raise DeltaMoEError(f"--ignore-config-field {name}: {source} has no {base}.{key} (a key can be ignored "
                                f"inside {' or '.join(NESTED_FIELDS)} only)")
    unknown = sorted(k for k in hf_config if row(k) is None and k not in ignored)
    if unknown:
        raise DeltaMoEError(
            f"{source}: field {unknown[0]!r} (= {hf_config[unknown[0]]!r}) is not a field DeltaMoE's {model} mapping "
            f"accounts for{f' (nor are {unknown[1:]})' if len(unknown) > 1 else ''}: it may change the model's "
            f"function. If it does not, import with --ignore-config-field {unknown[0]}")
    for key, value in hf_config.items():
        field = row(key)
        if field is not None:
            field.check(value, source)
    values = {}
    for field in table:
        if field.role is Role.MAPPED and "*" not in field.name:
            values[field.name] = hf_config.get(field.name)
    for field in table:
        if field.role is Role.MAPPED and values.get(field.name) is None:
            default = field.null if field.name in hf_config and field.null is not None else field.default
            if default is not None:
                values[field.name] = default(values) if callable(default) else default
    return values


def describe(table: tuple[Field, ...]) -> str:
    """The table as Markdown: field | role | megatron-core setting or reason | transformers default | accepted."""
    lines = ["| field | role | megatron-core / reason | default | accepted |", "|---|---|---|---|---|"]
    for f in table:
        default = "derived" if callable(f.default) else ("" if f.default is None else repr(f.default))
        lines.append(f"| `{f.name}` | {f.role.value} | {f.to} | {default} | {_choices(f.accepts)} |")
    return "\n".join(lines)
