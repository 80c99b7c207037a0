"""HF <-> Megatron conversion of dense models: logits parity, bit-exact round trips, TP=2 import, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from deltamoe.common.errors import DeltaMoEError
from deltamoe.converters.hf_to_megatron import import_hf
from deltamoe.converters.megatron_to_hf import export
from deltamoe.converters.safetensors_io import SafetensorsReader
from deltamoe.megatron_ext.runtime.checkpoint import load_model
from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
from tests.megatron_helpers import REPO, hf_logits, load_hf_strict, megatron_logits, run_torchrun
from tests.tiny_models import ARCHITECTURES, make_tiny_hf

INPUT = torch.tensor([[3, 17, 99, 5, 64, 8, 127, 42, 11, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


@pytest.fixture(scope="module", autouse=True)
def megatron_process():
    init_distributed(ParallelLayout())
    yield


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers(arch, tmp_path):
    hf = make_tiny_hf(arch, tmp_path / "hf")
    import_hf(hf, tmp_path / "megatron")
    model, meta = load_model(tmp_path / "megatron")
    expected = hf_logits(hf, INPUT)
    actual = megatron_logits(model, INPUT, meta.hf_config["vocab_size"])
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_is_bit_exact(arch, tmp_path):
    hf = make_tiny_hf(arch, tmp_path / "hf")
    import_hf(hf, tmp_path / "megatron")
    export(tmp_path / "megatron", tmp_path / "back")
    before, after = SafetensorsReader(hf).read_all(), SafetensorsReader(tmp_path / "back").read_all()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert torch.equal(before[name], after[name]), name
    assert json.loads((hf / "config.json").read_text()) == json.loads((tmp_path / "back" / "config.json").read_text())


def test_llama3_rope_scaling_matches(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = make_tiny_hf("llama", tmp_path / "hf", rope_parameters=rope, max_position_embeddings=131072)
    import_hf(hf, tmp_path / "megatron")
    model, meta = load_model(tmp_path / "megatron")
    torch.testing.assert_close(megatron_logits(model, INPUT, 128), hf_logits(hf, INPUT))


def test_bfloat16_checkpoint_keeps_dtype(tmp_path):
    hf = make_tiny_hf("qwen2", tmp_path / "hf")
    load_hf_strict(hf, dtype=torch.bfloat16).save_pretrained(tmp_path / "hf_bf16")
    import_hf(tmp_path / "hf_bf16", tmp_path / "megatron")
    export(tmp_path / "megatron", tmp_path / "back")
    before, after = SafetensorsReader(tmp_path / "hf_bf16").read_all(), SafetensorsReader(tmp_path / "back").read_all()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(before[k], after[k]) for k in before)


PARALLEL_IMPORT_SCRIPT = """
import sys
from deltamoe.converters.hf_to_megatron import import_hf
if __name__ == "__main__":
    import_hf(sys.argv[1], sys.argv[2], tp=int(sys.argv[3]), pp=int(sys.argv[4]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch, tp, pp", [("llama_tied", 2, 1), ("qwen2", 2, 1), ("llama", 1, 2)])
def test_import_at_tp2_or_pp2_loads_at_tp1(arch, tp, pp, tmp_path):
    hf = make_tiny_hf(arch, tmp_path / "hf", num_hidden_layers=4 if pp > 1 else 3)
    script = tmp_path / "import_parallel.py"
    script.write_text(PARALLEL_IMPORT_SCRIPT)
    run_torchrun(tp * pp, str(script), str(hf), str(tmp_path / "megatron"), str(tp), str(pp))
    assert json.loads((tmp_path / "megatron" / "deltamoe.json").read_text())["source"]["imported_with"] == {"tp": tp, "pp": pp}
    model, meta = load_model(tmp_path / "megatron")
    torch.testing.assert_close(megatron_logits(model, INPUT, 128), hf_logits(hf, INPUT))


# ---- bad input: one clear error each, and no output left behind ----

def _expect_error(tmp_path, hf, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(DeltaMoEError, match=match):
        import_hf(hf, out, **kwargs)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_unsupported_architecture(tmp_path):
    hf = make_tiny_hf("llama", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (hf / "config.json").write_text(json.dumps(config))
    _expect_error(tmp_path, hf, r"unsupported architecture \['GPTNeoXForCausalLM'\]; supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM")


def test_missing_shard(tmp_path):
    hf = make_tiny_hf("llama", tmp_path / "hf")
    tensors = SafetensorsReader(hf).read_all()
    names = sorted(tensors)
    (hf / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[:5]}, hf / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {n: ("model-00001-of-00002.safetensors" if i < 5 else "model-00002-of-00002.safetensors") for i, n in enumerate(names)}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(tmp_path, hf, r"model-00002-of-00002.safetensors: shard listed in model.safetensors.index.json is missing")


def test_corrupt_shard(tmp_path):
    hf = make_tiny_hf("llama", tmp_path / "hf")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path, hf, r"model.safetensors: corrupt safetensors file")


def test_corrupt_index(tmp_path):
    hf = make_tiny_hf("llama", tmp_path / "hf")
    (hf / "model.safetensors.index.json").write_text("{not json")
    _expect_error(tmp_path, hf, r"model.safetensors.index.json: corrupt index")


def test_shape_not_matching_config(tmp_path):
    hf = make_tiny_hf("llama", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] = 80
    (hf / "config.json").write_text(json.dumps(config))
    _expect_error(tmp_path, hf, r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\), config.json implies \(80, 64\)")


def test_missing_and_leftover_tensors(tmp_path):
    hf = make_tiny_hf("llama", tmp_path / "hf")
    tensors = SafetensorsReader(hf).read_all()
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, hf / "model.safetensors")
    _expect_error(tmp_path, hf, r"tensor 'model.layers.0.mlp.extra.weight' is not used")
    del tensors["model.layers.0.mlp.extra.weight"], tensors["model.layers.2.self_attn.o_proj.weight"]
    save_file(tensors, hf / "model.safetensors")
    _expect_error(tmp_path, hf, r"tensor 'model.layers.2.self_attn.o_proj.weight' is missing")


@pytest.mark.parametrize("tp, field", [(3, r"num_attention_heads \(4\)"), (4, r"num_key_value_heads \(query groups\) \(2\)")])
def test_tensor_parallel_must_divide(tmp_path, tp, field):
    hf = make_tiny_hf("llama", tmp_path / "hf")
    _expect_error(tmp_path, hf, rf"tensor-parallel size {tp} does not divide {field}", tp=tp)


def test_output_exists_and_output_inside_input(tmp_path):
    hf = make_tiny_hf("llama", tmp_path / "hf")
    (tmp_path / "out").mkdir()
    with pytest.raises(DeltaMoEError, match=r"already exists: remove it or pass --overwrite"):
        import_hf(hf, tmp_path / "out")
    with pytest.raises(DeltaMoEError, match=r"is inside input"):
        import_hf(hf, hf / "megatron")
    assert not (hf / "megatron").exists()


def test_export_refuses_existing_output(tmp_path):
    hf = make_tiny_hf("llama", tmp_path / "hf")
    import_hf(hf, tmp_path / "megatron")
    (tmp_path / "back").mkdir()
    with pytest.raises(DeltaMoEError, match="already exists"):
        export(tmp_path / "megatron", tmp_path / "back")
    export(tmp_path / "megatron", tmp_path / "back", overwrite=True)
    assert (tmp_path / "back" / "model.safetensors").exists()


def test_cli_reports_errors_without_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "deltamoe", "import", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "deltamoe import: error:" in proc.stderr and "config.json: missing" in proc.stderr
    assert "Traceback" not in proc.stderr
