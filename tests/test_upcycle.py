"""Upcycling: the pure state-dict transform, the plan it records, function preservation at step 0, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.megatron_ext.moe.plan import UpcyclePlan
from deltamoe.megatron_ext.moe.upcycle import build_plan, upcycle_state_dict
from tests.tiny_models import make_tiny_hf

FFN, HIDDEN, LAYERS = 8, 4, 2


def _dense_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"embedding.word_embeddings.weight": torch.randn(16, HIDDEN, generator=g)}
    for i in range(LAYERS):
        sd[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.randn(2 * FFN, HIDDEN, generator=g)
        sd[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = torch.randn(HIDDEN, FFN, generator=g)
        sd[f"decoder.layers.{i}.pre_mlp_layernorm.weight"] = torch.randn(HIDDEN, generator=g)
    return sd


def test_copy_variant_copies_ffn_into_every_expert_and_zero_router():
    dense = _dense_sd()
    plan = build_plan(variant="copy", num_experts=3, topk=2, ffn_hidden_size=FFN)
    moe = upcycle_state_dict(dense, plan, LAYERS)
    for i in range(LAYERS):
        for e in range(3):
            assert torch.equal(moe[f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight"],
                               dense[f"decoder.layers.{i}.mlp.linear_fc1.weight"])
            assert torch.equal(moe[f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight"],
                               dense[f"decoder.layers.{i}.mlp.linear_fc2.weight"])
        assert torch.equal(moe[f"decoder.layers.{i}.mlp.router.weight"], torch.zeros(3, HIDDEN))
        assert f"decoder.layers.{i}.mlp.linear_fc1.weight" not in moe
    assert torch.equal(moe["embedding.word_embeddings.weight"], dense["embedding.word_embeddings.weight"])
    assert plan.frozen_experts == [0] and plan.router_init == "zeros"


def test_noise_and_normal_router_are_seeded_and_spare_expert_zero():
    dense = _dense_sd()
    kwargs = dict(variant="copy", num_experts=3, topk=2, ffn_hidden_size=FFN, noise_std=0.1, router_init="normal",
                  router_init_std=0.5, seed=7)
    a = upcycle_state_dict(dense, build_plan(**kwargs), LAYERS)
    b = upcycle_state_dict(dense, build_plan(**kwargs), LAYERS)
    c = upcycle_state_dict(dense, build_plan(**{**kwargs, "seed": 8}), LAYERS)
    name = "decoder.layers.1.mlp.experts.local_experts.{}.linear_fc1.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[name.format(1)], c[name.format(1)])
    assert torch.equal(a[name.format(0)], dense["decoder.layers.1.mlp.linear_fc1.weight"])  # expert 0 untouched
    assert not torch.equal(a[name.format(1)], a[name.format(2)])
    assert 0.2 < float(a["decoder.layers.0.mlp.router.weight"].std()) < 1.0
    assert build_plan(**kwargs).router_init == "normal(std=0.5)"


def test_shared_variant_slices_scales_and_zero_gate():
    dense = _dense_sd()
    plan = build_plan(variant="shared", num_experts=4, topk=2, ffn_hidden_size=FFN, granularity=2)
    moe = upcycle_state_dict(dense, plan, LAYERS)
    fc1, fc2 = dense["decoder.layers.0.mlp.linear_fc1.weight"], dense["decoder.layers.0.mlp.linear_fc2.weight"]
    half = FFN // 2
    for e in range(4):
        s = (e % 2) * half
        w1 = moe[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight"]
        assert torch.equal(w1, torch.cat([fc1[s:s + half], fc1[FFN + s:FFN + s + half]]))
        assert torch.equal(moe[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc2.weight"], torch.zeros(HIDDEN, half))
    assert torch.equal(moe["decoder.layers.0.mlp.shared_experts.linear_fc1.weight"], fc1)
    assert torch.equal(moe["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"], 2 * fc2)
    assert torch.equal(moe["decoder.layers.0.mlp.shared_experts.gate_weight"], torch.zeros(1, HIDDEN))
    assert plan.frozen_experts == [] and plan.shared_expert.fc2_scale == 2.0
    assert [(e.ffn_start, e.ffn_stop, e.fc2_scale) for e in plan.routed_experts] == [(0, 4, 0.0), (4, 8, 0.0)] * 2
    # The plan round-trips through its JSON file (graft and export read it).
    assert UpcyclePlan(**json.loads(plan.to_json())) == plan


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=1, topk=1), "at least 2"),
    (dict(num_experts=4, topk=1), "--topk 1 is not supported"),
    (dict(num_experts=4, topk=5), "between 1 and --num-experts"),
    (dict(num_experts=6, topk=2, expert_model_parallel_size=4), "divisible by --expert-parallel-size"),
    (dict(num_experts=4, topk=2, variant="shared", granularity=3), "must divide the FFN"),
    (dict(num_experts=4, topk=2, granularity=2), "applies to the shared variant"),
])
def test_bad_plan_arguments(kwargs, message):
    kwargs = {"variant": "copy", "ffn_hidden_size": FFN, **kwargs}
    with pytest.raises(DeltaMoEError, match=message):
        build_plan(**kwargs)


def test_already_moe_state_dict_refused():
    plan = build_plan(variant="copy", num_experts=2, topk=2, ffn_hidden_size=FFN)
    moe = upcycle_state_dict(_dense_sd(), plan, LAYERS)
    with pytest.raises(DeltaMoEError, match="already an MoE"):
        upcycle_state_dict(moe, plan, LAYERS)


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    from deltamoe.converters.hf_to_megatron import import_hf

    root = tmp_path_factory.mktemp("upcycle")
    hf = make_tiny_hf("qwen2", root / "hf", num_hidden_layers=2)
    return import_hf(hf, root / "dense")


def _logits(folder, tokens):
    from deltamoe.megatron_ext.runtime.checkpoint import load_model

    model, meta = load_model(folder)
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None), meta


@pytest.mark.parametrize("variant, extra", [("copy", {}), ("copy", {"router_init": "normal", "router_init_std": 0.5}),
                                            ("shared", {"granularity": 2})])
def test_function_preservation_through_the_cli(dense_checkpoint, tmp_path, variant, extra):
    """The upcycled MoE's logits equal the dense model's at step 0 (float32, assert_close default tolerances)."""
    from deltamoe.megatron_ext.moe.upcycle_cli import upcycle

    out = upcycle(dense_checkpoint, tmp_path / "moe", num_experts=4, topk=2, variant=variant, **extra)
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    dense_logits, _ = _logits(dense_checkpoint, tokens)
    moe_logits, meta = _logits(out, tokens)
    torch.testing.assert_close(moe_logits, dense_logits)
    assert meta.moe["num_experts"] == 4 and meta.moe["topk"] == 2
    plan = UpcyclePlan.load(out)
    # The plan names the HF base's files (what `deltamoe graft --base` is checked against).
    from deltamoe.megatron_ext.runtime.checkpoint import read_metadata

    assert plan.variant == variant and plan.base_sha256 == read_metadata(dense_checkpoint).source["sha256"]
    assert "model.safetensors" in plan.base_sha256
    if variant == "shared":
        assert meta.moe["shared_expert_intermediate_size"] == 96 and meta.moe["ffn_hidden_size"] == 48


def test_cli_refuses_moe_input_and_bad_sizes(dense_checkpoint, tmp_path, capsys):
    from deltamoe.cli import main as cli_main
    from deltamoe.megatron_ext.moe.upcycle_cli import upcycle

    moe = tmp_path / "moe"
    assert cli_main(["upcycle", "--dense", str(dense_checkpoint), "--out", str(moe), "--num-experts", "2", "--topk", "2"]) == 0
    # An MoE input is refused with one clear error line (exit 1) and no output folder.
    assert cli_main(["upcycle", "--dense", str(moe), "--out", str(tmp_path / "x"), "--num-experts", "4", "--topk", "2"]) == 1
    assert "already an MoE checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    for kwargs, message in ((dict(num_experts=1, topk=1), "at least 2"),
                            (dict(num_experts=2, topk=3), "between 1"),
                            (dict(num_experts=6, topk=2, expert_parallel_size=4), "divisible by --expert-parallel-size")):
        with pytest.raises(DeltaMoEError, match=message):
            upcycle(dense_checkpoint, tmp_path / "y", **kwargs)
        assert not (tmp_path / "y").exists()
    with pytest.raises(DeltaMoEError, match="exists"):
        upcycle(dense_checkpoint, moe, num_experts=2, topk=2)


def test_shared_variant_of_qwen3_is_refused_before_any_weight_is_read(tmp_path, capsys):
    """No HF format holds a Qwen3 shared variant (Qwen2-MoE has no q/k norms, Qwen3-MoE no shared expert): `upcycle`
    refuses it with one error, before reading weights or writing anything, instead of `export` after training."""
    from deltamoe.cli import main as cli_main
    from deltamoe.megatron_ext.runtime.checkpoint import CheckpointMetadata
    from deltamoe.common.hf_folder import read_config

    dense = tmp_path / "dense"  # metadata only: the refusal must come before any tensor is loaded
    dense.mkdir()
    config = read_config(make_tiny_hf("qwen3", tmp_path / "hf", num_hidden_layers=2))
    CheckpointMetadata(hf_config=config, padded_vocab_size=128).save(dense)
    code = cli_main(["upcycle", "--dense", str(dense), "--out", str(tmp_path / "moe"), "--num-experts", "4", "--topk", "2",
                     "--variant", "shared", "--granularity", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "upcycle --variant shared of a qwen3 model: no Hugging Face MoE format could hold the result" in err
    assert "Qwen3-MoE has no shared expert" in err and "Traceback" not in err
    assert not (tmp_path / "moe").exists()
