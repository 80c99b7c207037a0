"""HF-space upcycling: an upcycled Mixtral / Qwen2-MoE / Qwen3-MoE gives its dense model's logits, and the name table."""

from __future__ import annotations

import json
import os

import pytest
import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.converters.hf_moe_layout import FORMATS, TensorRole, dense_ffn_name, parse_moe_name
from deltamoe.converters.hf_upcycle import upcycle_hf
from deltamoe.converters.safetensors_io import SafetensorsReader
from deltamoe.megatron_ext.moe.plan import UpcyclePlan, copy_plan
from deltamoe.megatron_ext.moe.upcycle import build_plan
from tests.megatron_helpers import load_hf_strict
from tests.tiny_models import make_tiny_hf

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
EXPECTED_FORMAT = {"llama": "mixtral", "llama_tied": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


def logits(folder, ids):
    model = load_hf_strict(folder)
    with torch.no_grad():
        return model(ids).logits, model


def shared_plan(ffn: int, granularity: int = 1) -> UpcyclePlan:
    """The plan `deltamoe upcycle --variant shared` writes: the FFN as an always-on shared expert (fc2_scale 2 against
    its zero gate), routed experts FFN slices with a zero down projection."""
    return build_plan(variant="shared", num_experts=3 * granularity, topk=2, ffn_hidden_size=ffn,
                      granularity=granularity, router_init="zeros")


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen2", "qwen3"])
def test_upcycled_moe_gives_dense_logits(tmp_path, arch):
    dense = make_tiny_hf(arch, tmp_path / "dense", seed=1)
    moe = upcycle_hf(dense, tmp_path / "moe", copy_plan(num_experts=4, topk=2, ffn_hidden_size=96),
                     max_shard_bytes=60_000)
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(0))
    want, _ = logits(dense, ids)
    got, model = logits(moe, ids)
    assert model.config.model_type == EXPECTED_FORMAT[arch]
    assert len(SafetensorsReader(moe).shards) > 1
    torch.testing.assert_close(got, want)
    plan = UpcyclePlan.load(moe)
    assert plan.base_architecture == arch.removesuffix("_tied") and "model.safetensors" in plan.base_sha256


def test_renormalisation_is_what_makes_it_exact(tmp_path):
    """Without norm_topk_prob a zero-router top-2 of 4 experts returns half the FFN: the flag we write matters."""
    dense = make_tiny_hf("qwen3", tmp_path / "dense", seed=1)
    moe = upcycle_hf(dense, tmp_path / "moe", copy_plan(num_experts=4, topk=2, ffn_hidden_size=96))
    assert json.loads((moe / "config.json").read_text())["norm_topk_prob"] is True
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(0))
    want, _ = logits(dense, ids)
    model = load_hf_strict(moe, norm_topk_prob=False)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, want, atol=1e-3)


@pytest.mark.parametrize("granularity", [1, 2])
def test_qwen2_moe_shared_variant_gives_dense_logits(tmp_path, granularity):
    dense = make_tiny_hf("qwen2", tmp_path / "dense", seed=2)
    moe = upcycle_hf(dense, tmp_path / "moe", shared_plan(96, granularity))
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(moe, ids)[0], logits(dense, ids)[0])
    # One fc2_scale convention with the Megatron upcycle: the plan describes the tensors of its folder, and the plan
    # given is the plan saved (the shared down_proj carries 1 / sigmoid(0) = 2, the routed ones 0).
    assert UpcyclePlan.load(moe).shared_expert.fc2_scale == 2.0
    assert UpcyclePlan.load(moe).routed_experts == shared_plan(96, granularity).routed_experts
    reader, dense_reader = SafetensorsReader(moe), SafetensorsReader(dense)
    assert torch.equal(reader.get("model.layers.0.mlp.shared_expert.down_proj.weight"),
                       2 * dense_reader.get("model.layers.0.mlp.down_proj.weight"))


def test_copy_variant_qwen2_moe_shared_expert_is_exactly_zero(tmp_path):
    dense = make_tiny_hf("qwen2", tmp_path / "dense", seed=2)
    moe = upcycle_hf(dense, tmp_path / "moe", copy_plan(num_experts=2, topk=1, ffn_hidden_size=96))
    reader = SafetensorsReader(moe)
    for layer in range(3):
        assert not reader.get(f"model.layers.{layer}.mlp.shared_expert.down_proj.weight").any()
        assert not reader.get(f"model.layers.{layer}.mlp.gate.weight").any()


def test_upcycle_refuses_bad_plans(tmp_path):
    dense = make_tiny_hf("llama", tmp_path / "dense")
    with pytest.raises(DeltaMoEError, match="ffn_hidden_size \\(64\\) differs .* intermediate_size \\(96\\)"):
        upcycle_hf(dense, tmp_path / "a", copy_plan(num_experts=2, topk=1, ffn_hidden_size=64))
    with pytest.raises(DeltaMoEError, match="mixtral has none"):
        upcycle_hf(dense, tmp_path / "b", shared_plan(96))
    qwen2 = make_tiny_hf("qwen2", tmp_path / "dense-qwen2")
    halved = shared_plan(96)
    halved.shared_expert.fc2_scale = 1.0  # the old convention: would compute FFN / 2
    with pytest.raises(DeltaMoEError, match="must be the whole FFN with fc2_scale 2.0"):
        upcycle_hf(qwen2, tmp_path / "e", halved)
    with pytest.raises(DeltaMoEError, match="upcycles to mixtral, not qwen3_moe"):
        upcycle_hf(dense, tmp_path / "c", copy_plan(num_experts=2, topk=1, ffn_hidden_size=96), fmt="qwen3_moe")
    assert not any(p.name.startswith((".a", ".b", ".c", ".e", "a", "b", "c", "e")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_layout_names_round_trip(fmt):
    f = FORMATS[fmt]
    for proj in ("gate", "up", "down"):
        role = parse_moe_name(f, f.expert_name(5, 11, proj))
        assert role == TensorRole(kind="expert", dense_name=dense_ffn_name(5, proj), layer=5, expert=11, proj=proj)
        if f.has_shared_expert:
            assert parse_moe_name(f, f.shared_expert_name(2, proj)).dense_name == dense_ffn_name(2, proj)
    assert parse_moe_name(f, f.router_name(3)) == TensorRole(kind="router", dense_name=None, layer=3)
    attn = "model.layers.0.self_attn.q_proj.weight"
    assert parse_moe_name(f, attn) == TensorRole(kind="other", dense_name=attn)
    with pytest.raises(DeltaMoEError, match="not a known"):
        parse_moe_name(f, f"model.layers.0.{f.block}.experts.0.w9.weight")


def test_layout_matches_transformers_on_disk_names():
    """The exact names transformers 5 writes (also what the fact sheet of issue #4 lists)."""
    assert FORMATS["mixtral"].expert_name(1, 2, "up") == "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    assert FORMATS["mixtral"].expert_name(1, 2, "down") == "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    assert FORMATS["qwen2_moe"].shared_expert_gate_name(0) == "model.layers.0.mlp.shared_expert_gate.weight"
    assert FORMATS["qwen3_moe"].router_name(4) == "model.layers.4.mlp.gate.weight"
    # Qwen's dense MLP in mlp_only_layers keeps the dense name and is an ordinary tensor.
    dense_mlp = "model.layers.0.mlp.gate_proj.weight"
    assert parse_moe_name(FORMATS["qwen3_moe"], dense_mlp).kind == "other"
