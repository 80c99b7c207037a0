"""Export of Megatron MoE checkpoints to Mixtral / Qwen2-MoE / Qwen3-MoE: transformers computes the same function.

The MoE here has random routers, experts and norms (not an untrained upcycle, whose experts are all equal), so a
swapped expert, a wrong gate/up order or a missing renormalisation shows up in the logits.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hf_folder import read_config
from deltamoe.converters.megatron_to_hf import export
from deltamoe.converters.safetensors_io import SafetensorsReader, ShardWriter
from deltamoe.megatron_ext.runtime.checkpoint import CheckpointMetadata, save_checkpoint
from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
from deltamoe.megatron_ext.runtime.model_builder import MoESettings, model_from_hf_config, padded_vocab_size
from tests.megatron_helpers import hf_logits, megatron_logits, run_torchrun
from tests.tiny_models import make_tiny_hf

INPUT = torch.tensor([[3, 17, 99, 5, 64, 8, 127, 42, 11, 2, 77, 31], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


@pytest.fixture(scope="module", autouse=True)
def megatron_process():
    init_distributed(ParallelLayout())


def random_moe_checkpoint(tmp_path, arch: str, moe: MoESettings, seed: int = 0, **hf_overrides):
    source, overrides = SOURCES.get(arch, (arch, {}))
    hf = make_tiny_hf(source, tmp_path / "dense-hf", **{**overrides, **hf_overrides})
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


# The source architectures of the (architecture x format x variant) table: every feature an HF MoE format may lack.
# (A Llama with attention_bias biases o_proj too, which megatron cannot hold: `import` refuses it, test_config_fields.)
SOURCES = {
    "llama": ("llama", {"head_dim": 24}),              # untied, head_dim != hidden / heads
    "llama_tied": ("llama_tied", {}),
    "qwen2": ("qwen2", {}),                             # q/k/v biases
    "qwen3": ("qwen3", {"head_dim": 24}),               # q/k norms, head_dim != hidden / heads
}
VARIANTS = {
    "copy": MoESettings(num_experts=4, topk=2),
    "shared": MoESettings(num_experts=4, topk=2, ffn_hidden_size=48, shared_expert_intermediate_size=96,
                          shared_expert_gate=True),
}
EXACT = "exact"
NO_QK_NORM_IN_QWEN3 = "Qwen3-MoE always applies RMSNorm to queries and keys"
# (architecture, format) -> outcome for the copy variant; the shared variant adds "no shared expert" where the format
# has none (Mixtral, Qwen3-MoE).
OUTCOMES = {
    ("llama", "mixtral"): EXACT, ("llama", "qwen2_moe"): EXACT, ("llama", "qwen3_moe"): NO_QK_NORM_IN_QWEN3,
    ("llama_tied", "mixtral"): EXACT, ("llama_tied", "qwen2_moe"): EXACT, ("llama_tied", "qwen3_moe"): NO_QK_NORM_IN_QWEN3,
    ("qwen2", "mixtral"): "Mixtral has no attention biases, and this Qwen2 model has q/k/v biases",
    ("qwen2", "qwen2_moe"): EXACT, ("qwen2", "qwen3_moe"): "Qwen3-MoE's attention_bias biases o_proj as well as q/k/v",
    ("qwen3", "mixtral"): "Mixtral has no q/k norms", ("qwen3", "qwen2_moe"): "Qwen2-MoE has no q/k norms",
    ("qwen3", "qwen3_moe"): EXACT,
}
HF_ARCHITECTURE = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def expected_outcome(arch: str, fmt: str, variant: str) -> str:
    outcome = OUTCOMES[(arch, fmt)]
    if variant == "shared" and fmt != "qwen2_moe":
        name = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3-MoE"}[fmt]
        return f"{name} has no shared expert" if outcome == EXACT else outcome
    return outcome


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One random Megatron MoE checkpoint per (architecture, variant), built on first use and shared by the formats."""
    made = {}

    def get(arch: str, variant: str):
        if (arch, variant) not in made:
            made[(arch, variant)] = random_moe_checkpoint(tmp_path_factory.mktemp(f"{arch}-{variant}"), arch,
                                                          VARIANTS[variant])
        return made[(arch, variant)]
    return get


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch, fmt", sorted(OUTCOMES))
def test_every_architecture_format_pair_exports_exactly_or_is_refused(checkpoints, tmp_path, arch, fmt, variant):
    """Exact: the HF model (loaded strictly: no tensor missing or left over) gives the Megatron model's float32 logits.
    Refused: one DeltaMoEError naming what the format cannot hold, before anything is written."""
    outcome = expected_outcome(arch, fmt, variant)
    folder, model = checkpoints(arch, variant)
    out = tmp_path / "hf-moe"
    if outcome != EXACT:
        with pytest.raises(DeltaMoEError, match=re.escape(outcome)):
            export(folder, out, fmt=fmt)
        assert not out.exists() and not list(tmp_path.glob(".hf-moe*"))
        return
    export(folder, out, fmt=fmt)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [HF_ARCHITECTURE[fmt]]
    assert config["head_dim"] == (24 if arch in ("llama", "qwen3") else 16)
    if fmt == "qwen2_moe":
        assert config["qkv_bias"] is (arch == "qwen2")
    torch.testing.assert_close(hf_logits(out, INPUT), megatron_logits(model, INPUT, 128))
    card = (out / "README.md").read_text()
    assert "routes every token by the router alone" in card


@pytest.mark.parametrize("arch, variant, fmt", [("llama", "copy", "mixtral"), ("llama", "shared", "qwen2_moe"),
                                                ("qwen2", "shared", "qwen2_moe"),
                                                ("qwen3", "copy", "qwen3_moe")])
def test_auto_format_is_the_first_that_holds_the_model(checkpoints, arch, variant, fmt):
    from deltamoe.architectures import read_architecture_config
    from deltamoe.architectures.moe import choose_format
    from deltamoe.megatron_ext.runtime.checkpoint import read_metadata

    folder, _ = checkpoints(arch, variant)
    meta = read_metadata(folder)
    assert choose_format("auto", read_architecture_config(meta.hf_config)[1], meta.moe) == fmt


def test_export_logits_match_megatron_for_an_ungated_shared_expert(tmp_path):
    """An ungated Megatron shared expert becomes Qwen2-MoE's gated one: zero gate, doubled down-projection."""
    moe = MoESettings(num_experts=4, topk=2, ffn_hidden_size=48, shared_expert_intermediate_size=96,
                      shared_expert_gate=False)
    folder, model = random_moe_checkpoint(tmp_path, "llama", moe)
    export(folder, tmp_path / "hf-moe")
    assert json.loads((tmp_path / "hf-moe" / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    torch.testing.assert_close(hf_logits(tmp_path / "hf-moe", INPUT), megatron_logits(model, INPUT, 128))


def test_auto_refuses_the_shared_variant_of_qwen3(checkpoints, tmp_path):
    folder, _ = checkpoints("qwen3", "shared")
    with pytest.raises(DeltaMoEError, match="no HF MoE format holds this model: Qwen3-MoE has no shared expert"):
        export(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch, fmt", [("qwen3", "qwen3_moe"), ("qwen2", "qwen2_moe"), ("llama", "auto")])
def test_routing_without_renormalisation_exports_as_norm_topk_prob_false(tmp_path, arch, fmt):
    """--moe-router-pre-softmax (recorded as router_pre_softmax) is Qwen-MoE's norm_topk_prob: false; Mixtral always
    renormalises, so a Llama goes to Qwen2-MoE under --format auto and --format mixtral is refused."""
    moe = MoESettings(num_experts=4, topk=2, router_pre_softmax=True)
    folder, model = random_moe_checkpoint(tmp_path, arch, moe)
    export(folder, tmp_path / "hf-moe", fmt=fmt)
    config = json.loads((tmp_path / "hf-moe" / "config.json").read_text())
    assert config["norm_topk_prob"] is False
    assert config["architectures"] == [HF_ARCHITECTURE[fmt if fmt != "auto" else "qwen2_moe"]]
    expected = megatron_logits(model, INPUT, 128)
    torch.testing.assert_close(hf_logits(tmp_path / "hf-moe", INPUT), expected)
    # The flag matters: renormalised routing computes something else.
    assert not torch.allclose(hf_logits(tmp_path / "hf-moe", INPUT, norm_topk_prob=True), expected, atol=1e-4)
    if arch == "llama":
        with pytest.raises(DeltaMoEError, match="Mixtral always renormalises the top-k routing weights"):
            export(folder, tmp_path / "mixtral", fmt="mixtral")


def test_model_card_says_a_by_language_mask_was_training_only():
    from deltamoe.converters.megatron_to_hf import routing_section

    meta = CheckpointMetadata(hf_config={}, padded_vocab_size=128, moe={"num_experts": 6, "topk": 2},
                              source={"training": {"stage1": {"expert_allocation": "by-language"},
                                                   "stage2": {"expert_allocation": "learned"}}})
    card = "\n".join(routing_section(meta, {}))
    assert "routes every token by the router alone" in card and "renormalised to sum to 1" in card
    assert "Training (stage1) masked each token's router to its language's experts" in card
    assert "not part of this model" in card
    assert "without renormalising" in "\n".join(routing_section(meta, {"norm_topk_prob": False}))
    learned = CheckpointMetadata(hf_config={}, padded_vocab_size=128, moe={"num_experts": 6, "topk": 2},
                                 source={"training": {"stage1": {"expert_allocation": "learned"}}})
    assert "masked" not in "\n".join(routing_section(learned, {}))


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


RESAVE_TP2_EP2 = RESAVE_EP2.replace("ParallelLayout(expert_model_parallel_size=2)",
                                    "ParallelLayout(tensor_model_parallel_size=2, expert_model_parallel_size=2, "
                                    "expert_tensor_parallel_size=1)")


def _loaded_tensors(folder) -> dict[str, torch.Tensor]:
    from deltamoe.megatron_ext.runtime.checkpoint import load_model

    model, _ = load_model(folder)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}


@pytest.mark.slow
def test_streamed_checkpoint_reassembles_a_tp2_ep2_checkpoint(tmp_path):
    """Each tensor read alone from a TP=2 x EP=2 checkpoint (qkv, gated fc1 halves and experts split over ranks)
    equals the tensor megatron's whole-model load gives for the checkpoint it was resaved from."""
    from deltamoe.megatron_ext.runtime.streamed_checkpoint import StreamedCheckpoint

    folder, _ = random_moe_checkpoint(tmp_path, "qwen2", VARIANTS["shared"])
    script = tmp_path / "resave.py"
    script.write_text(RESAVE_TP2_EP2)
    run_torchrun(2, str(script), str(folder), str(tmp_path / "moe-tp2-ep2"))
    expected = _loaded_tensors(folder)
    streamed = StreamedCheckpoint(tmp_path / "moe-tp2-ep2", spec="local")
    assert set(streamed) == set(expected)
    for name in streamed:
        got = streamed[name]
        assert got.dtype == expected[name].dtype and torch.equal(got, expected[name]), name


def test_export_reads_each_tensor_once_and_writes_what_the_loaded_model_holds(checkpoints, tmp_path, monkeypatch):
    """The streamed export's shards are byte for byte those of hf_tensors() over megatron's whole-model load (the
    path export took before it streamed), and every checkpoint tensor is read from disk once."""
    from deltamoe.converters.megatron_to_hf import hf_tensors
    from deltamoe.megatron_ext.runtime.checkpoint import read_metadata
    from deltamoe.megatron_ext.runtime.streamed_checkpoint import StreamedCheckpoint

    folder, _ = checkpoints("qwen2", "shared")
    reads = []
    original = StreamedCheckpoint._read
    monkeypatch.setattr(StreamedCheckpoint, "_read", lambda self, shards: (reads.extend({s.key for s in shards}),
                                                                           original(self, shards))[1])
    export(folder, tmp_path / "hf", fmt="qwen2_moe", max_shard_bytes=100_000)
    meta = read_metadata(folder)
    writer = ShardWriter(tmp_path / "whole", max_shard_bytes=100_000)
    for name, t in hf_tensors(_loaded_tensors(folder), meta.hf_config, moe=meta.moe, fmt_name="qwen2_moe"):
        writer.add(name, t.to(getattr(torch, meta.params_dtype)))
    writer.finish()
    shards = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    for shard in [*shards, "model.safetensors.index.json"]:
        assert (tmp_path / "hf" / shard).read_bytes() == (tmp_path / "whole" / shard).read_bytes(), shard
    # One request per state-dict entry: a key stored once per layer/expert is requested as often as it has entries.
    assert len(reads) == len(StreamedCheckpoint(folder, spec="local"))


def test_export_refuses_a_checkpoint_whose_tensors_do_not_have_the_recorded_shapes(checkpoints, tmp_path):
    folder, _ = checkpoints("qwen3", "copy")
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    meta = json.loads((tampered / "deltamoe.json").read_text())
    meta["moe"]["num_experts"] = 3
    (tampered / "deltamoe.json").write_text(json.dumps(meta))
    with pytest.raises(DeltaMoEError, match=r"tensor 'decoder\.layers\.mlp\.router\.weight' is stored with shape "
                                            r"\(3, 4, 64\); the model described by deltamoe\.json needs \(3, 3, 64\)"):
        export(tampered, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_streamed_checkpoint_refuses_a_tensor_the_checkpoint_covers_only_in_part(checkpoints):
    from deltamoe.megatron_ext.runtime.streamed_checkpoint import StreamedCheckpoint

    folder, _ = checkpoints("qwen3", "copy")
    streamed = StreamedCheckpoint(folder, spec="local")
    key = "decoder.layers.self_attention.linear_proj.weight"
    streamed._metadata.state_dict_metadata[key].chunks.pop()  # as if one layer's shard were missing
    with pytest.raises(DeltaMoEError, match=f"holds only part of tensor '{key}'"):
        [streamed[name] for name in streamed if name.endswith("self_attention.linear_proj.weight")]
