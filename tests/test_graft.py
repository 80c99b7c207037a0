"""deltamoe graft: Delta = I - B grafted into every expert of an upcycled HF MoE, streamed, with strict input checks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltamoe.cli import main as cli_main
from deltamoe.common.errors import DeltaMoEError
from deltamoe.converters.graft import graft
from deltamoe.converters.hf_upcycle import upcycle_hf
from deltamoe.converters.merge import merge_models
from deltamoe.converters.safetensors_io import SafetensorsReader
from deltamoe.megatron_ext.moe.plan import PLAN_FILE, UpcyclePlan, copy_plan
from deltamoe.megatron_ext.moe.upcycle import build_plan
from tests.megatron_helpers import load_hf_strict
from tests.tiny_models import make_tiny_hf

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
PLAN = copy_plan(num_experts=4, topk=2, ffn_hidden_size=96)


def perturbed_copy(src: Path, dst: Path, *, seed: int = 7, noise: float = 0.02, extra_rows: int = 0) -> Path:
    """A "post-trained" model: every tensor of `src` plus noise, optionally with `extra_rows` added tokens."""
    dst.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(src / "model.safetensors")
    out = {}
    for name, t in sorted(tensors.items()):
        t = t + noise * torch.randn(t.shape, generator=gen)
        if extra_rows and name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t, 0.05 * torch.randn(extra_rows, t.shape[1], generator=gen)])
        out[name] = t.contiguous()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] += extra_rows
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": "post-trained template"}))
    (dst / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7}))
    return dst


def make_triple(tmp_path: Path, arch: str, *, plan: UpcyclePlan = PLAN, extra_rows: int = 0, **upcycle_kw):
    base = make_tiny_hf(arch, tmp_path / "B", seed=1)
    post = perturbed_copy(base, tmp_path / "I", extra_rows=extra_rows)
    moe = upcycle_hf(base, tmp_path / "M", plan, **upcycle_kw)
    return base, post, moe


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf_strict(folder)(ids).logits


IDS = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_graft_onto_untrained_upcycle_gives_post_logits(tmp_path, arch):
    base, post, moe = make_triple(tmp_path, arch, max_shard_bytes=80_000)
    out = tmp_path / "O"
    assert cli_main(["graft", "--base", str(base), "--post", str(post), "--moe", str(moe), "--out", str(out)]) == 0
    torch.testing.assert_close(logits(out, IDS), logits(post, IDS))
    assert not torch.allclose(logits(post, IDS), logits(base, IDS), atol=1e-3)  # the delta is not trivial
    manifest = json.loads((out / "deltamoe_graft.json").read_text())
    assert manifest["base_check"] == "sha256 of base files match the plan"
    assert manifest["inputs"]["post"]["sha256"]["model.safetensors"]
    assert manifest["peak_rss_gib"] > 0 and manifest["elapsed_s"] > 0
    # Tokenizer/chat template and generation config come from I, the plan and config from M.
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "post-trained template"
    assert (out / "generation_config.json").exists() and (out / PLAN_FILE).read_text() == (moe / PLAN_FILE).read_text()


def test_scale_zero_returns_m_bit_for_bit(tmp_path):
    base, post, moe = make_triple(tmp_path, "qwen2")
    out = tmp_path / "O"
    graft(base=base, post=post, moe=moe, out=out, scale=0.0)
    got, want = SafetensorsReader(out), SafetensorsReader(moe)
    assert sorted(got.keys()) == sorted(want.keys())
    for name in want.keys():
        assert torch.equal(got.get(name), want.get(name)), name


def test_non_expert_tensors_equal_task_arithmetic(tmp_path):
    """On an untrained upcycle (M's non-expert tensors are B's), graft = task arithmetic B + alpha (I - B) there."""
    base, post, moe = make_triple(tmp_path, "llama")
    graft(base=base, post=post, moe=moe, out=tmp_path / "O", scale=0.7)
    merge_models(method="task_arithmetic", base=base, models=[post], weights=[0.7], out=tmp_path / "TA")
    grafted, merged = SafetensorsReader(tmp_path / "O"), SafetensorsReader(tmp_path / "TA")
    non_expert = [n for n in merged.keys() if ".mlp." not in n]
    assert len(non_expert) == 3 * 6 + 3
    for name in non_expert:
        assert torch.equal(grafted.get(name), merged.get(name)), name
    # and every expert got the same 0.7 * Delta_FFN
    for e in range(4):
        assert torch.equal(grafted.get(f"model.layers.2.block_sparse_moe.experts.{e}.w2.weight"),
                           merged.get("model.layers.2.mlp.down_proj.weight"))


def test_non_expert_tensors_of_trained_moe_equal_param_delta(tmp_path):
    """A 'trained' M (non-expert tensors moved): its non-expert graft equals ParamDelta CPT + alpha (I - B)."""
    base, post, moe = make_triple(tmp_path, "qwen3")
    cpt = perturbed_copy(base, tmp_path / "CPT", seed=99)  # the dense view of a continually pre-trained M
    trained = tmp_path / "Mt"
    shutil.copytree(moe, trained)
    tensors = load_file(moe / "model.safetensors")
    cpt_tensors = load_file(cpt / "model.safetensors")
    tensors.update({n: t for n, t in cpt_tensors.items() if n in tensors})
    save_file(tensors, trained / "model.safetensors", metadata={"format": "pt"})
    plan = UpcyclePlan.load(trained)
    dataclasses.replace(plan, base_sha256={}).save(trained)  # hashes no longer describe M's files' origin alone
    graft(base=base, post=post, moe=trained, out=tmp_path / "O", scale=0.5)
    merge_models(method="param_delta", base=base, models=[cpt, post], weights=[1.0, 0.5], out=tmp_path / "PD")
    grafted, merged = SafetensorsReader(tmp_path / "O"), SafetensorsReader(tmp_path / "PD")
    names = [n for n in merged.keys() if ".mlp." not in n]
    for name in names:
        torch.testing.assert_close(grafted.get(name), merged.get(name), rtol=0, atol=1e-7)


def test_expert_selection(tmp_path):
    base, post, moe = make_triple(tmp_path, "llama")
    graft(base=base, post=post, moe=moe, out=tmp_path / "orig", experts="original")
    graft(base=base, post=post, moe=moe, out=tmp_path / "new", experts="new")
    m, orig, new = (SafetensorsReader(p) for p in (moe, tmp_path / "orig", tmp_path / "new"))
    i = SafetensorsReader(post)
    name = "model.layers.1.block_sparse_moe.experts.{}.w1.weight"
    torch.testing.assert_close(orig.get(name.format(0)), i.get("model.layers.1.mlp.gate_proj.weight"))
    assert torch.equal(new.get(name.format(0)), m.get(name.format(0)))
    for e in (1, 2, 3):
        assert torch.equal(orig.get(name.format(e)), m.get(name.format(e)))
        torch.testing.assert_close(new.get(name.format(e)), i.get("model.layers.1.mlp.gate_proj.weight"))
    # routers never change
    assert torch.equal(new.get("model.layers.1.block_sparse_moe.gate.weight"), m.get("model.layers.1.block_sparse_moe.gate.weight"))


def test_vocabulary_extension_policy(tmp_path):
    base, post, moe = make_triple(tmp_path, "qwen2", extra_rows=5)
    out = tmp_path / "O"
    manifest = graft(base=base, post=post, moe=moe, out=out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 133
    assert manifest["vocab_rows_from_post"] == {"model.embed_tokens.weight": [128, 133], "lm_head.weight": [128, 133]}
    got, i = SafetensorsReader(out), SafetensorsReader(post)
    assert torch.equal(got.get("lm_head.weight")[128:], i.get("lm_head.weight")[128:])
    ids = torch.cat([IDS, torch.tensor([[128, 132]] * 2)], dim=1)  # use the new tokens too
    torch.testing.assert_close(logits(out, ids), logits(post, ids))


def test_tied_embeddings(tmp_path):
    base, post, moe = make_triple(tmp_path, "llama_tied")
    out = tmp_path / "O"
    graft(base=base, post=post, moe=moe, out=out)
    assert "lm_head.weight" not in SafetensorsReader(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    torch.testing.assert_close(logits(out, IDS), logits(post, IDS))


def test_shared_variant_graft_gives_post_logits(tmp_path):
    plan = build_plan(variant="shared", num_experts=4, topk=2, ffn_hidden_size=96, granularity=2, router_init="zeros")
    base, post, moe = make_triple(tmp_path, "qwen2", plan=plan)
    graft(base=base, post=post, moe=moe, out=tmp_path / "O")
    torch.testing.assert_close(logits(tmp_path / "O", IDS), logits(post, IDS))


@pytest.mark.slow
def test_megatron_shared_variant_upcycle_export_graft_gives_post_logits(tmp_path):
    """The shared variant end to end, the way a user runs it: `deltamoe import` a Llama, `deltamoe upcycle --variant
    shared --granularity 2` in Megatron, `deltamoe export` (Qwen2-MoE, the one format with a shared expert, without
    qkv biases), `deltamoe graft`: at step 0 the grafted MoE gives I's logits. One fc2_scale convention carries the
    shared expert's factor 2 from the Megatron plan through export to graft."""
    from deltamoe.converters.hf_to_megatron import import_hf
    from deltamoe.converters.megatron_to_hf import export
    from deltamoe.megatron_ext.moe.upcycle_cli import upcycle

    base = make_tiny_hf("llama", tmp_path / "B", seed=1)
    post = perturbed_copy(base, tmp_path / "I")
    dense = import_hf(base, tmp_path / "dense")
    moe = upcycle(dense, tmp_path / "moe", num_experts=4, topk=2, variant="shared", granularity=2)
    hf_moe = export(moe, tmp_path / "M")
    config = json.loads((hf_moe / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["qkv_bias"] is False
    assert config["moe_intermediate_size"] == 48 and config["shared_expert_intermediate_size"] == 96
    plan = UpcyclePlan.load(hf_moe)
    assert plan == UpcyclePlan.load(moe) and plan.shared_expert.fc2_scale == 2.0
    torch.testing.assert_close(logits(hf_moe, IDS), logits(base, IDS))  # the upcycled MoE is B at step 0
    out = tmp_path / "O"
    manifest = graft(base=base, post=post, moe=hf_moe, out=out)
    assert manifest["base_check"] == "sha256 of base files match the plan"
    torch.testing.assert_close(logits(out, IDS), logits(post, IDS))
    assert "router alone" in (out / "README.md").read_text()


# ---- bad input: one DeltaMoEError naming the culprit, and no output left behind --------------------------------------

def assert_refused(tmp_path: Path, match: str, **kwargs):
    out = tmp_path / "O"
    before = set(tmp_path.iterdir())
    with pytest.raises(DeltaMoEError, match=match):
        graft(out=out, **kwargs)
    assert not out.exists() and set(tmp_path.iterdir()) == before  # no output, no temporary folder


def test_refuses_different_architecture_or_layer_count(tmp_path):
    base, post, moe = make_triple(tmp_path, "llama")
    other = make_tiny_hf("qwen3", tmp_path / "other")
    fewer = make_tiny_hf("llama", tmp_path / "fewer", num_hidden_layers=2)
    assert_refused(tmp_path, "model_type is 'qwen3'", base=base, post=other, moe=moe)
    assert_refused(tmp_path, "num_hidden_layers is 2", base=base, post=fewer, moe=moe)


def test_refuses_shape_mismatch_other_than_vocabulary(tmp_path):
    base, post, moe = make_triple(tmp_path, "llama")
    tensors = load_file(post / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, post / "model.safetensors", metadata={"format": "pt"})
    assert_refused(tmp_path, r"tensor 'model.layers.1.self_attn.k_proj.weight' has shape \[16, 64\], expected \[32, 64\]",
                   base=base, post=post, moe=moe)


@pytest.mark.parametrize("which", ["base", "post", "moe"])
def test_refuses_nan_or_inf(tmp_path, which):
    base, post, moe = make_triple(tmp_path, "qwen3")
    folder = {"base": base, "post": post, "moe": moe}[which]
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.2.mlp.experts.3.up_proj.weight" if which == "moe" else "model.layers.2.mlp.up_proj.weight"
    tensors[name][3, 4] = float("nan") if which != "post" else float("inf")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if which == "base":  # keep the plan's hash consistent so the NaN check, not the base check, speaks
        plan = UpcyclePlan.load(moe)
        dataclasses.replace(plan, base_sha256={}, frozen_experts=[1]).save(moe)
    assert_refused(tmp_path, f"{folder}: tensor '{name}' contains NaN or Inf", base=base, post=post, moe=moe)


def test_refuses_missing_shard(tmp_path):
    base, post, moe = make_triple(tmp_path, "llama", max_shard_bytes=80_000)
    shard = sorted(moe.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_refused(tmp_path, f"{shard}: shard listed in model.safetensors.index.json is missing",
                   base=base, post=post, moe=moe)


def test_refuses_dense_moe_and_missing_plan(tmp_path):
    base, post, _ = make_triple(tmp_path, "qwen2")
    assert_refused(tmp_path, "model_type 'qwen2' is not a supported MoE format", base=base, post=post, moe=post)
    shutil.copytree(tmp_path / "M", tmp_path / "noplan")
    (tmp_path / "noplan" / PLAN_FILE).unlink()
    assert_refused(tmp_path, "deltamoe_upcycle.json: missing", base=base, post=post, moe=tmp_path / "noplan")


def test_refuses_moe_of_another_base(tmp_path):
    base, post, _ = make_triple(tmp_path, "llama")
    other = make_tiny_hf("llama", tmp_path / "other", seed=5)
    moe = upcycle_hf(other, tmp_path / "M_other", PLAN)
    # Refused before the work by the frozen expert's weights, whether or not the plan records base hashes.
    assert_refused(tmp_path, r"experts.0.w1.weight' \(frozen expert 0\) differs from .* different base",
                   base=base, post=post, moe=moe)
    dataclasses.replace(UpcyclePlan.load(moe), base_sha256={}).save(moe)  # e.g. hashes of Megatron files only
    assert_refused(tmp_path, r"experts.0.w1.weight' \(frozen expert 0\) differs from .* different base",
                   base=base, post=post, moe=moe)


def test_refuses_base_whose_files_differ_from_the_plans_hashes(tmp_path):
    """The hashes are taken while the tensors stream; a mismatch is refused after the work, before the output exists."""
    base, post, moe = make_triple(tmp_path, "llama")
    plan = UpcyclePlan.load(moe)
    dataclasses.replace(plan, base_sha256={name: "0" * 64 for name in plan.base_sha256}).save(moe)
    assert_refused(tmp_path, "M was upcycled from a different base: its plan records sha256 000000000000",
                   base=base, post=post, moe=moe)


def test_refuses_existing_output(tmp_path, capsys):
    base, post, moe = make_triple(tmp_path, "llama")
    (tmp_path / "O").mkdir()
    with pytest.raises(DeltaMoEError, match="already exists"):
        graft(base=base, post=post, moe=moe, out=tmp_path / "O")
    argv = ["graft", "--base", str(base), "--post", str(post), "--moe", str(moe), "--out", str(tmp_path / "O")]
    assert cli_main(argv) == 1
    assert "deltamoe graft: error: output folder" in capsys.readouterr().err
    assert cli_main(["graft", "--base", str(base), "--post", str(post), "--moe", str(moe), "--out",
                     str(tmp_path / "O"), "--overwrite"]) == 0
    assert (tmp_path / "O" / "deltamoe_graft.json").exists()
