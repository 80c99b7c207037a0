"""Export of Megatron MoE checkpoints to Mixtral / Qwen2-MoE / Qwen3-MoE: transformers computes the same function.

The MoE here has random routers, experts and norms (not an untrained upcycle, whose experts are all equal), so a
swapped expert, a wrong gate/up order or a missing renormalisation shows up in the logits.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hf_folder import read_config
from deltamoe.converters.megatron_to_hf import export
from deltamoe.converters.safetensors_io import SafetensorsReader
from deltamoe.megatron_ext.runtime.checkpoint import CheckpointMetadata, save_checkpoint
from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
from deltamoe.megatron_ext.runtime.model_builder import MoESettings, model_from_hf_config, padded_vocab_size
from tests.megatron_helpers import hf_logits, megatron_logits, run_torchrun
from tests.tiny_models import make_tiny_hf

INPUT = torch.tensor([[3, 17, 99, 5, 64, 8, 127, 42, 11, 2, 77, 31], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


@pytest.fixture(scope="module", autouse=True)
def megatron_process():
    init_distributed(ParallelLayout())


def random_moe_checkpoint(tmp_path, arch: str, moe: MoESettings, seed: int = 0):
    hf = make_tiny_hf(arch, tmp_path / "dense-hf")
    hf_config = read_config(hf)
    torch.manual_seed(seed)
    _, model = model_from_hf_config(hf_config, moe=moe)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("gate_weight") or name.endswith("router.weight"):
                p.normal_(0.0, 0.5)  # routers that really choose
            else:
                p.normal_(0.0, 0.05)
    folder = tmp_path / "moe-megatron"
    meta = CheckpointMetadata(hf_config=hf_config, padded_vocab_size=padded_vocab_size(hf_config["vocab_size"]),
                              moe=dataclasses.asdict(moe))
    save_checkpoint(model, folder, meta)
    return folder, model


@pytest.mark.parametrize(
    "arch, fmt, moe",
    [
        ("llama", "MixtralForCausalLM", MoESettings(num_experts=4, topk=2)),
        ("llama_tied", "MixtralForCausalLM", MoESettings(num_experts=3, topk=2)),
        ("qwen2", "Qwen2MoeForCausalLM", MoESettings(num_experts=4, topk=2)),
        ("qwen2", "Qwen2MoeForCausalLM", MoESettings(num_experts=4, topk=2, ffn_hidden_size=48,
                                                     shared_expert_intermediate_size=96, shared_expert_gate=True)),
        ("llama", "Qwen2MoeForCausalLM", MoESettings(num_experts=4, topk=2, ffn_hidden_size=48,
                                                     shared_expert_intermediate_size=96, shared_expert_gate=False)),
        ("qwen3", "Qwen3MoeForCausalLM", MoESettings(num_experts=6, topk=2)),
    ],
    ids=["mixtral", "mixtral-tied", "qwen2_moe", "qwen2_moe-shared", "llama-shared-ungated", "qwen3_moe"],
)
def test_export_logits_match_megatron(tmp_path, arch, fmt, moe):
    folder, model = random_moe_checkpoint(tmp_path, arch, moe)
    export(folder, tmp_path / "hf-moe")
    config = json.loads((tmp_path / "hf-moe" / "config.json").read_text())
    assert config["architectures"] == [fmt]
    expected = megatron_logits(model, INPUT, 128)
    torch.testing.assert_close(hf_logits(tmp_path / "hf-moe", INPUT), expected)


def test_export_refuses_unmatched_format(tmp_path):
    folder, _ = random_moe_checkpoint(tmp_path, "qwen3", MoESettings(num_experts=4, topk=2, shared_expert_intermediate_size=96,
                                                                     shared_expert_gate=True))
    with pytest.raises(DeltaMoEError, match="shared-expert variant of a Qwen3 model has no HF format"):
        export(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


RESAVE_EP2 = """
import sys
from deltamoe.megatron_ext.runtime.checkpoint import load_model, read_metadata, save_checkpoint
from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
if __name__ == "__main__":
    init_distributed(ParallelLayout(expert_model_parallel_size=2))
    model, meta = load_model(sys.argv[1])
    assert len(model.decoder.layers[0].mlp.experts.local_experts) == 2
    save_checkpoint(model, sys.argv[2], meta)
"""


@pytest.mark.slow
def test_export_from_ep2_checkpoint_equals_ep1(tmp_path):
    folder, _ = random_moe_checkpoint(tmp_path, "qwen3", MoESettings(num_experts=4, topk=2))
    script = tmp_path / "resave.py"
    script.write_text(RESAVE_EP2)
    run_torchrun(2, str(script), str(folder), str(tmp_path / "moe-ep2"))
    export(folder, tmp_path / "hf-ep1")
    export(tmp_path / "moe-ep2", tmp_path / "hf-ep2")
    a, b = SafetensorsReader(tmp_path / "hf-ep1").read_all(), SafetensorsReader(tmp_path / "hf-ep2").read_all()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
