"""config.json is accounted for field by field: mapped fields give transformers' logits, the rest is refused.

Parity cases build a tiny HF model with the setting, convert it into a megatron GPTModel in this process (one gloo
rank) and compare float32 logits on a sequence longer than any window or original context in the config. Each case
also checks that the setting matters: the same weights without it give other logits, so the parity can fail.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from deltamoe.architectures import ARCHITECTURES, read_architecture_config
from deltamoe.architectures.fields import Role
from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hf_folder import read_config
from deltamoe.converters.hf_to_megatron import convert_into, import_hf
from deltamoe.converters.safetensors_io import SafetensorsReader
from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
from deltamoe.megatron_ext.runtime.model_builder import (
    architecture_settings, check_architecture_settings, model_from_hf_config, padded_vocab_size, transformer_config,
)
from tests.megatron_helpers import REPO, hf_logits, megatron_logits
from tests.tiny_models import make_tiny_hf, tiny_config

HF_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


@pytest.fixture(scope="module", autouse=True)
def megatron_process():
    init_distributed(ParallelLayout())
    yield


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))


def _edit_config(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _megatron(folder):
    config = read_config(folder)
    _, model = model_from_hf_config(config)
    convert_into(model, SafetensorsReader(folder), config, padded_vocab=padded_vocab_size(config["vocab_size"]),
                 source=str(folder))
    return model


# ---- mapped fields: megatron's logits are transformers' ----

def _rope(rope_type, theta=5000.0, **params):
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **params}}


def _no_rope_scaling(config):
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}


def _legacy_linear_rope(config):
    theta = config.pop("rope_parameters")["rope_theta"]
    config.update(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=theta, transformers_version="4.40.0")


def _yarn_from_top_level_context(config):
    # transformers: a top-level original_max_position_embeddings wins over rope_parameters' (standardize_rope_params)
    # and a null factor is max_position_embeddings / original_max_position_embeddings (= 4 here).
    config["rope_parameters"].update(factor=None, original_max_position_embeddings=128)
    config["original_max_position_embeddings"] = 64


def _no_sliding_window(config):
    config.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * 3)


def _neutral_fields(config):
    config.update(use_cache=False, pretraining_tp=2, initializer_range=0.5, torch_dtype="bfloat16", dtype="bfloat16",
                  transformers_version="4.43.0", unk_token_id=0, temperature=0.7, top_p=0.9, do_sample=True,
                  _attn_implementation_autoset=True, _name_or_path="some/model", tokenizer_class="LlamaTokenizer",
                  output_hidden_states=False, use_bfloat16=False, pruned_heads={}, is_encoder_decoder=False)


LLAMA3 = _rope("llama3", 500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)
YARN = _rope("yarn", factor=4.0, original_max_position_embeddings=64)
SLIDING = dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)

# (id, tiny architecture, sequence length, config overrides, config.json edit, edit that removes the setting)
PARITY_CASES = [
    *[(f"{a}-defaults", a, 300, {}, None, None) for a in ("llama", "llama_tied", "qwen2", "qwen3")],
    *[(f"{a}-head_dim-32", a, 64, {"head_dim": 32}, None, None) for a in ("llama", "qwen2", "qwen3")],
    ("qwen3-head_dim-absent-is-128", "qwen3", 64, {"head_dim": 128}, lambda c: c.pop("head_dim"), None),
    ("llama-hidden_act-swish", "llama", 64, {"hidden_act": "swish"}, None, None),
    ("qwen2-attention_dropout", "qwen2", 64, {"attention_dropout": 0.1}, None, None),
    ("llama-neutral-fields", "llama", 64, {}, _neutral_fields, None),
    *[(f"{a}-rope-linear", a, 300, _rope("linear", factor=4.0), None, _no_rope_scaling)
      for a in ("llama", "qwen2", "qwen3")],
    ("llama-rope-linear-4.x-rope_scaling", "llama", 300, {}, _legacy_linear_rope, lambda c: c.pop("rope_scaling")),
    ("llama-rope-proportional", "llama", 300, _rope("proportional", factor=2.0), None, _no_rope_scaling),
    *[(f"{a}-rope-llama3-past-8192", a, 8300, {**LLAMA3, "max_position_embeddings": 131072}, None, _no_rope_scaling)
      for a in ("llama", "qwen2", "qwen3")],
    *[(f"{a}-rope-yarn", a, 300, YARN, None, _no_rope_scaling) for a in ("llama", "qwen2", "qwen3")],
    ("llama-rope-yarn-mscale-beta-truncate", "llama", 300,
     _rope("yarn", factor=4.0, original_max_position_embeddings=64, mscale=2.0, mscale_all_dim=1.0, beta_fast=16.0,
           beta_slow=2.0, truncate=False), None, _no_rope_scaling),
    ("llama-rope-yarn-top-level-original", "llama", 300, YARN, _yarn_from_top_level_context, _no_rope_scaling),
    *[(f"{a}-sliding-window", a, 300, SLIDING, None, _no_sliding_window) for a in ("qwen2", "qwen3")],
    ("qwen2-sliding-window-layer_types", "qwen2", 300,
     {**SLIDING, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, None, _no_sliding_window),
]


@pytest.mark.parametrize("case", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_mapped_setting_gives_transformers_logits(case, tmp_path):
    _, arch, length, overrides, edit, remove = case
    hf = make_tiny_hf(arch, tmp_path / "hf", **overrides)
    if edit:
        _edit_config(hf, edit)
    ids = _ids(length)
    expected = hf_logits(hf, ids)
    torch.testing.assert_close(megatron_logits(_megatron(hf), ids, 128), expected)
    if remove:
        shutil.copytree(hf, tmp_path / "without")
        _edit_config(tmp_path / "without", remove)
        assert not torch.allclose(hf_logits(tmp_path / "without", ids), expected, atol=1e-3), "the setting had no effect"


# ---- defaults and tables ----

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_every_field_transformers_writes_is_accounted_for(arch):
    """A newer transformers adding a field makes this fail: the table then needs a row for it."""
    cls = HF_CLASSES[arch]
    written = json.loads(tiny_config(arch).to_json_string(use_diff=False))
    read_architecture_config(written, "config.json")
    table = {f.name for f in ARCHITECTURES[arch].config_table}
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(n for n in fields - table if not n.startswith("_") and not n.endswith("_token_id"))
    assert not missing, f"{cls.__name__} fields without a row: {missing}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_defaults_are_transformers_defaults(arch):
    """A config.json with only what identifies the model resolves to what transformers' class resolves it to."""
    minimal = {"architectures": [HF_CLASSES[arch].__name__.replace("Config", "ForCausalLM")], "model_type": arch}
    hf = AutoConfig.for_model(**minimal)
    _, ours = read_architecture_config(minimal)
    assert (ours.num_layers, ours.hidden_size, ours.ffn_hidden_size, ours.num_attention_heads, ours.num_query_groups,
            ours.kv_channels, ours.vocab_size, ours.max_position_embeddings, ours.norm_epsilon,
            ours.tie_word_embeddings, ours.attention_dropout, ours.rope_theta) == (
        hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, hf.num_attention_heads, hf.num_key_value_heads,
        getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads), hf.vocab_size, hf.max_position_embeddings,
        hf.rms_norm_eps, hf.tie_word_embeddings, hf.attention_dropout, hf.rope_parameters["rope_theta"])
    # null means something else than absent for Qwen2/Qwen3's num_key_value_heads (Qwen2Config.__post_init__)
    nulled = {**minimal, "num_key_value_heads": None}
    assert read_architecture_config(nulled)[1].num_query_groups == AutoConfig.for_model(**nulled).num_key_value_heads


def test_tables_read_as_tables():
    from deltamoe.architectures.fields import describe

    for arch in ARCHITECTURES.values():
        text = describe(arch.config_table)
        roles = {r: sum(f.role is r for f in arch.config_table) for r in Role}
        assert text.count("\n") == len(arch.config_table) + 1 and all(roles.values()), roles


# ---- refused fields and values: one clear error each ----

def _config(arch, **changes):
    config = json.loads(tiny_config(arch).to_json_string(use_diff=False))
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    return config


_DELETE = object()
_ROPE = {"rope_theta": 10000.0}

REFUSED_CASES = [
    ("llama", {"hidden_act": "gelu"}, r"config.json: hidden_act='gelu' is not supported \(SwiGLU.*supported: 'silu', 'swish'"),
    ("qwen2", {"hidden_act": "gelu_pytorch_tanh"}, r"hidden_act='gelu_pytorch_tanh' is not supported"),
    ("qwen3", {"hidden_act": "relu2"}, r"hidden_act='relu2' is not supported"),
    ("llama", {"attention_bias": True}, r"attention_bias=True is not supported: bias on q, k, v and o_proj.*supported: False"),
    ("qwen3", {"attention_bias": True}, r"attention_bias=True is not supported"),
    ("llama", {"mlp_bias": True}, r"mlp_bias=True is not supported: bias on gate/up/down"),
    ("qwen2", {"use_mrope": True}, r"use_mrope=True is not supported: multimodal RoPE"),
    ("llama", {"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5 is not supported: partial rotary.*supported: 1.0, None"),
    ("qwen3", {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25, **_ROPE}},
     r"partial_rotary_factor=0.25 is not supported.*supported: 1.0"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, **_ROPE}},
     r"rope_parameters.rope_type='dynamic' is not supported: dynamic NTK scaling recomputes.*supported: 'default', 'linear', 'proportional', 'llama3', 'yarn'"),
    ("qwen2", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                   "original_max_position_embeddings": 64, **_ROPE}},
     r"rope_type='longrope' is not supported: LongRoPE"),
    ("llama", {"rope_parameters": _DELETE, "rope_scaling": {"type": "su", "factor": 2.0}},
     r"rope_scaling.rope_type='su' is not supported \(megatron-core has no such RoPE\)"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, **_ROPE}},
     r"llama3 RoPE with low_freq_factor=2.0 is not supported: megatron-core's llama3 scaling fixes low_freq_factor.*supported: 1.0"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 4096, **_ROPE}},
     r"original_max_position_embeddings=4096 is not supported.*supported: 8192"),
    ("llama", {"rope_parameters": {"rope_type": "linear", **_ROPE}}, r"rope_parameters of rope_type 'linear' lacks 'factor'"),
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": None, **_ROPE}},
     r"rope_parameters.original_max_position_embeddings=None is not supported; supported: a number"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                   "attention_factor": 2.0, **_ROPE}},
     r"rope_parameters.attention_factor=2.0 is not supported: megatron-core derives YaRN's attention factor"),
    ("qwen2", {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], **_ROPE}},
     r"rope_parameters.mrope_section \(= \[2, 3, 3\]\) is not a parameter of rope_type 'default'.*--ignore-config-field rope_parameters.mrope_section"),
    ("llama", {"is_encoder_decoder": True}, r"is_encoder_decoder=True is not supported: an encoder-decoder model"),
    ("llama", {"add_cross_attention": True}, r"add_cross_attention=True is not supported"),
    ("qwen2", {"pruned_heads": {"0": [1]}}, r"pruned_heads=\{'0': \[1\]\} is not supported: pruned attention heads"),
    ("qwen3", {"quantization_config": {"quant_method": "gptq", "bits": 4}}, r"quantization_config=.* is not supported: quantised weights"),
    ("llama", {"per_layer_config": {"0": {}}}, r"per_layer_config=.* is not supported"),
    ("llama", {"attn_logit_softcapping": 50.0}, r"attn_logit_softcapping=50.0 is not supported: attention logit soft-capping"),
    ("qwen2", {"final_logit_softcapping": 30.0}, r"final_logit_softcapping=30.0 is not supported: final logit soft-capping"),
    ("llama", {"logits_scaling": 2.0}, r"field 'logits_scaling' \(= 2.0\) is not a field DeltaMoE's LlamaForCausalLM mapping accounts for: it may change the model's function. If it does not, import with --ignore-config-field logits_scaling"),
    ("llama", {"sliding_window": 16}, r"field 'sliding_window' \(= 16\) is not a field DeltaMoE's LlamaForCausalLM"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]},
     r"layer_types has sliding_attention layers but use_sliding_window is False and sliding_window is None"),
    ("qwen3", {"layer_types": ["full_attention"] * 2}, r"layer_types must list one entry per layer \(3\)"),
    ("qwen2", {"layer_types": ["full_attention", "linear_attention", "full_attention"]},
     r"layer_types entry 'linear_attention' is not supported"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 0, "max_window_layers": 0, "layer_types": _DELETE},
     r"sliding_window=0 is not supported; supported: a positive integer"),
]


@pytest.mark.parametrize("arch, changes, message", REFUSED_CASES,
                         ids=[f"{a}-{'-'.join(c)}" for a, c, _ in REFUSED_CASES])
def test_refused_field_or_value(arch, changes, message):
    with pytest.raises(DeltaMoEError, match=message):
        read_architecture_config(_config(arch, **changes), "config.json")


def test_neutral_values_of_refused_fields_import():
    read_architecture_config(_config("llama", attention_bias=False, mlp_bias=False, partial_rotary_factor=1.0,
                                     attn_logit_softcapping=None, quantization_config=None, pruned_heads={}))
    read_architecture_config(_config("qwen2", use_mrope=False, use_sliding_window=False, sliding_window=131072,
                                     max_window_layers=0))


def test_ignore_config_field_is_explicit(tmp_path):
    config = _config("llama", logits_scaling=2.0)
    read_architecture_config(config, ignored_fields=["logits_scaling"])
    with pytest.raises(DeltaMoEError, match=r"--ignore-config-field hidden_act: LlamaForCausalLM's table accounts for "
                                            r"'hidden_act' \(mapped: SwiGLU.*only unknown fields can be ignored"):
        read_architecture_config(config, ignored_fields=["logits_scaling", "hidden_act"])
    with pytest.raises(DeltaMoEError, match=r"--ignore-config-field logit_scaling: config.json has no field 'logit_scaling'"):
        read_architecture_config(config, ignored_fields=["logit_scaling"])
    rope = _config("qwen2", rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], **_ROPE})
    assert read_architecture_config(rope, ignored_fields=["rope_parameters.mrope_section"])[1].rope_theta == 10000.0
    with pytest.raises(DeltaMoEError, match=r"--ignore-config-field rope_parameters.mrope: config.json has no "
                                            r"rope_parameters.mrope"):
        read_architecture_config(rope, ignored_fields=["rope_parameters.mrope"])


def test_import_refuses_before_any_output_and_records_ignored_fields(tmp_path):
    hf = make_tiny_hf("qwen2", tmp_path / "hf")
    _edit_config(hf, lambda c: c.update(hidden_act="gelu", custom_flag=True))
    with pytest.raises(DeltaMoEError, match=r"field 'custom_flag' \(= True\) is not a field"):
        import_hf(hf, tmp_path / "out")
    with pytest.raises(DeltaMoEError, match=r"hidden_act='gelu' is not supported"):
        import_hf(hf, tmp_path / "out", ignore_config_fields=["custom_flag"])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))

    _edit_config(hf, lambda c: c.update(hidden_act="silu"))
    import_hf(hf, tmp_path / "out", ignore_config_fields=["custom_flag"])
    meta = json.loads((tmp_path / "out" / "deltamoe.json").read_text())
    assert meta["ignored_config_fields"] == ["custom_flag"] and meta["hf_config"]["custom_flag"] is True
    from deltamoe.megatron_ext.runtime.checkpoint import load_model

    model, _ = load_model(tmp_path / "out")  # later reads accept the recorded field
    torch.testing.assert_close(megatron_logits(model, _ids(40), 128), hf_logits(hf, _ids(40)))


def test_cli_flag_and_message(tmp_path):
    hf = make_tiny_hf("llama", tmp_path / "hf")
    _edit_config(hf, lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0, **_ROPE}))
    proc = subprocess.run([sys.executable, "-m", "deltamoe", "import", "--hf", str(hf), "--out", str(tmp_path / "o"),
                           "--ignore-config-field", "nothing"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "deltamoe import: error: --ignore-config-field nothing:" in proc.stderr and "has no field 'nothing'" in proc.stderr
    help_text = subprocess.run([sys.executable, "-m", "deltamoe", "import", "--help"], capture_output=True, text=True,
                               cwd=REPO).stdout
    assert "--ignore-config-field FIELD" in help_text


# ---- dense export writes back the imported config.json ----

def test_dense_export_writes_back_exactly_the_imported_config(tmp_path):
    """Field for field and in order, 4.x spellings and an ignored field included; only the dtype field follows
    --dtype, under the source's own name; a source without a dtype field gets none."""
    from deltamoe.converters.megatron_to_hf import export

    hf = make_tiny_hf("llama", tmp_path / "hf", **LLAMA3, max_position_embeddings=131072)

    def as_4x(config):
        rope = config.pop("rope_parameters")
        config.pop("dtype")
        config.update(rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"}, rope_theta=rope["rope_theta"],
                      torch_dtype="float32", transformers_version="4.43.0.dev0", custom_flag=True)

    _edit_config(hf, as_4x)
    imported = json.loads((hf / "config.json").read_text())
    import_hf(hf, tmp_path / "megatron", ignore_config_fields=["custom_flag"])
    export(tmp_path / "megatron", tmp_path / "back")
    assert list(json.loads((tmp_path / "back" / "config.json").read_text()).items()) == list(imported.items())
    export(tmp_path / "megatron", tmp_path / "back16", dtype="bfloat16")
    assert json.loads((tmp_path / "back16" / "config.json").read_text()) == {**imported, "torch_dtype": "bfloat16"}

    _edit_config(hf, lambda c: c.pop("torch_dtype"))
    import_hf(hf, tmp_path / "megatron2", ignore_config_fields=["custom_flag"])
    export(tmp_path / "megatron2", tmp_path / "back2", dtype="bfloat16")
    assert not {"dtype", "torch_dtype"} & set(json.loads((tmp_path / "back2" / "config.json").read_text()))
    assert SafetensorsReader(tmp_path / "back2").get("model.norm.weight").dtype == torch.bfloat16


# ---- the trainer builds the same function: Megatron-LM's TransformerConfig from our flags = model_builder's ----

TRAINER_CASES = {
    "llama-defaults": ("llama", {}),
    "qwen3-head_dim-yarn": ("qwen3", {"head_dim": 32, **YARN}),
    "llama-yarn-mscale-no-truncate": ("llama", _rope("yarn", factor=4.0, original_max_position_embeddings=64,
                                                     mscale=2.0, mscale_all_dim=1.0, truncate=False)),
    "qwen2-sliding-window-dropout": ("qwen2", {**SLIDING, "attention_dropout": 0.1}),
    "llama-llama3": ("llama", {**LLAMA3, "max_position_embeddings": 131072}),
    "qwen2-linear": ("qwen2", _rope("linear", factor=4.0)),
}


def _trainer_config(flags: list[str]):
    import megatron.training.arguments as megatron_arguments
    from megatron.training.argument_utils import core_transformer_config_from_args

    parser = megatron_arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(flags + ["--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
                                      "--train-iters", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
                                      "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
                                      "--no-persist-layer-norm", "--no-rope-fusion", "--no-bias-swiglu-fusion"])
    args.world_size, args.rank = 1, 0
    with contextlib.redirect_stdout(io.StringIO()):
        megatron_arguments.validate_args(args, {})
    return args, core_transformer_config_from_args(args)


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_flags_build_model_builders_transformer_config(case):
    from deltamoe.megatron_ext.training.flags import architecture_flags

    arch_name, overrides = TRAINER_CASES[case]
    _, arch = read_architecture_config(tiny_config(arch_name, **overrides).to_dict())
    args, trainer = _trainer_config(architecture_flags(arch))
    ours = transformer_config(arch)
    check_architecture_settings(arch, trainer)  # what build_gpt_model checks in the trainer
    for name in [*architecture_settings(arch), "attention_dropout", "hidden_dropout"]:
        assert getattr(trainer, name) == getattr(ours, name), name
    assert not trainer.masked_softmax_fusion if arch.sliding_window else True
    # GPTModel's own rotary arguments come from the checkpoint in both paths; the flags agree with them.
    assert args.position_embedding_type == arch.position_embedding_type and args.rotary_base == int(arch.rope_theta)
    assert args.use_rope_scaling == (arch.rope_scaling_factor is not None)
    assert args.rotary_seq_len_interpolation_factor == arch.rope_linear_factor


def test_trainer_refuses_flags_that_change_the_function():
    from deltamoe.megatron_ext.training.flags import architecture_flags

    _, arch = read_architecture_config(tiny_config("qwen2", **SLIDING).to_dict())
    _, trainer = _trainer_config(architecture_flags(arch) + ["--window-size", "7,0"])
    with pytest.raises(DeltaMoEError, match=r"TransformerConfig.window_size is \(7, 0\), the checkpoint's architecture "
                                            r"needs \(15, 0\)"):
        check_architecture_settings(arch, trainer)
    _, yarn = read_architecture_config(tiny_config("llama", **YARN).to_dict())
    _, trainer = _trainer_config([f if f != "yarn" else "rope" for f in architecture_flags(yarn)])
    with pytest.raises(DeltaMoEError, match=r"TransformerConfig.yarn_rotary_scaling_factor is None"):
        check_architecture_settings(yarn, trainer)
    cfg = transformer_config(arch, masked_softmax_fusion=True)
    with pytest.raises(DeltaMoEError, match=r"sliding-window attention needs --no-masked-softmax-fusion"):
        check_architecture_settings(arch, cfg)


def test_trainer_takes_an_epsilon_written_as_float32_and_refuses_another():
    """The demo's HF config stores rms_norm_eps as float32 (9.999999747378752e-06) while its recipe passes
    --norm-epsilon 1e-5: the same float32 scalar in RMSNorm, so the same function; 1e-6 is another function."""
    from deltamoe.megatron_ext.training.flags import architecture_flags

    _, arch = read_architecture_config(tiny_config("llama", rms_norm_eps=9.999999747378752e-06).to_dict())
    _, trainer = _trainer_config(architecture_flags(arch) + ["--norm-epsilon", "1e-5"])
    assert trainer.layernorm_epsilon == 1e-5 != arch.norm_epsilon
    check_architecture_settings(arch, trainer)
    _, trainer = _trainer_config(architecture_flags(arch) + ["--norm-epsilon", "1e-6"])
    with pytest.raises(DeltaMoEError, match=r"TransformerConfig.layernorm_epsilon is 1e-06, the checkpoint's "
                                            r"architecture needs 9.99999974737875\de-06"):
        check_architecture_settings(arch, trainer)


# ---- published configs of the production recipes' models import as the recipes describe them ----

PUBLISHED = {
    # meta-llama/Llama-3.1-8B
    "llama3_1_8b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256},
    # Qwen/Qwen2.5-7B: a window is named but off (use_sliding_window false): every layer attends to everything.
    "qwen2_5_7b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2",
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
        "vocab_size": 152064},
    # Qwen/Qwen3-8B-Base
    "qwen3_8b": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 32768,
        "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_import_as_the_recipes_say(name):
    from deltamoe.recipes import production

    recipe = {"llama3_1_8b": production.LLAMA3_1_8B, "qwen2_5_7b": production.QWEN2_5_7B,
              "qwen3_8b": production.QWEN3_8B}[name]
    arch_name, arch = read_architecture_config(PUBLISHED[name])
    assert (arch_name.name, arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads,
            arch.num_query_groups, arch.kv_channels, arch.vocab_size, arch.max_position_embeddings, arch.rope_theta,
            arch.norm_epsilon, arch.tie_word_embeddings, arch.qkv_bias, arch.qk_layernorm, arch.rope_scaling_factor) == (
        recipe.architecture, recipe.num_layers, recipe.hidden_size, recipe.ffn_hidden_size, recipe.num_attention_heads,
        recipe.num_query_groups, recipe.kv_channels, recipe.vocab_size, recipe.max_position_embeddings,
        recipe.rope_theta, recipe.norm_epsilon, recipe.tie_word_embeddings, recipe.qkv_bias, recipe.qk_layernorm,
        recipe.llama3_rope_scaling_factor)
    assert arch.sliding_window is None and arch.yarn is None and arch.rope_linear_factor is None


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_at_tiny_size_give_transformers_logits(name, tmp_path):
    """Everything but the sizes as published (4.x field spellings included), through transformers itself."""
    config = {**PUBLISHED[name], "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "torch_dtype": "float32"}
    config.update({k: v for k, v in (("head_dim", 16), ("max_window_layers", 2)) if k in config})
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "cfg"), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05) if p.ndim == 2 else p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))  # the 4.x spellings, as published
    ids = _ids(300)
    torch.testing.assert_close(megatron_logits(_megatron(tmp_path / "hf"), ids, 128), hf_logits(tmp_path / "hf", ids))
