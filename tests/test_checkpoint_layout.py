"""One torch_dist key layout, the Transformer Engine spec's (runtime/checkpoint_layout.py), whatever is installed.

- import, upcycle and (via the trainer) training write exactly the keys a TE-spec model requests, derived from
  megatron's own TE spec code (tests/te_contract.py), for dense and MoE layers of every architecture;
- conversion gives the same files with the module tree forced to `local` and to `fast`, and never consults `auto`
  (so an installed TE cannot change it);
- checkpoints in DeltaMoE's legacy layout still export (same HF tensors) and are refused by the trainer with the fix.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.megatron_ext.runtime import specs
from tests.te_contract import checkpoint_model_keys, requested_keys, te_layer_spec
from tests.tiny_models import make_tiny_hf

REPO = Path(__file__).resolve().parents[1]


def _file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _model_hashes(folder: Path) -> dict[str, str]:
    """The files that make the model (the model card also names the folders it came from and went to)."""
    hashes = _file_hashes(folder)
    assert hashes.pop("README.md")
    return hashes


def _dcp_metadata(torch_dist_dir: Path):
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(torch_dist_dir)).read_metadata()
    return meta.state_dict_metadata, meta.planner_data, meta.storage_data


def _same_checkpoint_files(a: dict, b: dict, folder_a: Path, folder_b: Path) -> None:
    """Byte-identical files, except torch DCP's `.metadata`, whose `storage_meta` records the writing folder and a
    fresh uuid per save: there everything else (keys, shapes, dtypes, byte offsets) must be equal."""
    assert a.keys() == b.keys()
    differing = sorted(k for k in a if a[k] != b[k])
    assert all(k.endswith("/.metadata") for k in differing), differing
    for k in differing:
        assert _dcp_metadata((folder_a / k).parent) == _dcp_metadata((folder_b / k).parent)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    return {arch: make_tiny_hf(arch, root / arch, num_hidden_layers=2)
            for arch in ("llama", "qwen2", "qwen3")}


def _convert(hf: Path, root: Path, spec: str):
    from deltamoe.converters.hf_to_megatron import import_hf
    from deltamoe.converters.megatron_to_hf import export
    from deltamoe.megatron_ext.moe.upcycle_cli import upcycle

    dense = import_hf(hf, root / "dense", spec=spec, overwrite=True)
    dense_files = _file_hashes(dense)
    moe = upcycle(dense, root / "moe", num_experts=4, topk=2, spec=spec, overwrite=True)
    moe_files = _file_hashes(moe)
    hf_out = export(moe, root / "hf", spec=spec, overwrite=True)
    return dense_files, moe_files, _file_hashes(hf_out)


def test_conversion_files_do_not_depend_on_the_module_tree(tiny_models, tmp_path):
    # Same output paths for both runs (deltamoe.json records them), one after the other.
    local = _convert(tiny_models["qwen3"], tmp_path, "local")
    snapshot = tmp_path.parent / f"{tmp_path.name}-local"
    import shutil

    shutil.copytree(tmp_path, snapshot)
    fast = _convert(tiny_models["qwen3"], tmp_path, "fast")
    for name, a, b in zip(("dense", "moe"), local[:2], fast[:2]):
        _same_checkpoint_files(a, b, snapshot / name, tmp_path / name)
    assert local[2] == fast[2]  # the exported HF folder: byte-identical
    shutil.rmtree(snapshot)


def test_conversion_never_resolves_auto(tiny_models, tmp_path, monkeypatch):
    """`auto` is what would pick TE when it is installed: conversion must not ask."""
    real = specs.resolve_spec_name

    def no_auto(requested="auto"):
        if requested == "auto":
            raise AssertionError("conversion resolved the 'auto' layer spec")
        return real(requested)

    monkeypatch.setattr(specs, "resolve_spec_name", no_auto)
    _convert(tiny_models["llama"], tmp_path, None)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_import_and_upcycle_write_the_te_spec_keys(tiny_models, tmp_path, arch):
    from deltamoe.architectures import read_architecture_config
    from deltamoe.common.hf_folder import read_config
    from deltamoe.converters.hf_to_megatron import import_hf
    from deltamoe.megatron_ext.moe.upcycle_cli import upcycle

    _, cfg = read_architecture_config(read_config(tiny_models[arch]))
    dense = import_hf(tiny_models[arch], tmp_path / "dense")
    moe = upcycle(dense, tmp_path / "moe", num_experts=4, topk=2)
    shared = upcycle(dense, tmp_path / "shared", num_experts=4, topk=2, variant="shared", granularity=2) \
        if arch != "qwen3" else None
    common = dict(qkv_bias=cfg.qkv_bias, tied=cfg.tie_word_embeddings)
    want_dense = requested_keys(te_layer_spec(num_experts=None, qk_layernorm=cfg.qk_layernorm), **common)
    want_moe = requested_keys(te_layer_spec(num_experts=4, qk_layernorm=cfg.qk_layernorm), **common)
    assert checkpoint_model_keys(dense / "release") == want_dense
    assert checkpoint_model_keys(moe / "release") == want_moe
    # The names the issue calls out, spelled out once.
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in want_dense & want_moe
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in want_dense - want_moe
    assert "decoder.layers.pre_mlp_layernorm.weight" in want_moe - want_dense
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight" in want_moe
    if shared is not None:
        want_shared = requested_keys(te_layer_spec(num_experts=4, qk_layernorm=cfg.qk_layernorm), **common,
                                     shared_expert=True, shared_expert_gate=True)
        assert checkpoint_model_keys(shared / "release") == want_shared


def test_deltamoe_te_spec_keeps_megatron_keys_with_frozen_aware_experts():
    """DeltaMoE's TE spec swaps only the experts' module (runtime/specs.py): same requested keys, and the experts are
    FrozenAwareGroupedMLP on TE linears (one module per expert, so per-expert requires_grad is honoured)."""
    from deltamoe.megatron_ext.layers.grouped_experts import FrozenAwareGroupedMLP

    megatron_spec = te_layer_spec(num_experts=4, qk_layernorm=True)
    ours = te_layer_spec(num_experts=4, qk_layernorm=True, frozen_aware_experts=True)
    experts = ours.submodules.mlp.keywords["submodules"].experts
    assert experts.func is FrozenAwareGroupedMLP
    mine, theirs = experts.keywords["submodules"], megatron_spec.submodules.mlp.keywords["submodules"].experts
    assert (mine.linear_fc1, mine.linear_fc2) == (theirs.keywords["submodules"].linear_fc1,
                                                  theirs.keywords["submodules"].linear_fc2)
    assert requested_keys(ours, qkv_bias=False, tied=True) == requested_keys(megatron_spec, qkv_bias=False, tied=True)


def test_te_grouped_experts_map_to_te_linears(monkeypatch):
    """With --moe-grouped-gemm megatron's TE spec picks TEGroupedMLP; ours replaces it by per-expert TE linears."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.extensions import transformer_engine_spec_provider as provider

    monkeypatch.setattr(provider, "TEColumnParallelGroupedLinear", object())  # "TE has grouped linears"
    monkeypatch.setattr(provider, "TERowParallelGroupedLinear", object())
    grouped = te_layer_spec(num_experts=4, qk_layernorm=False)
    assert grouped.submodules.mlp.keywords["submodules"].experts.func.__name__ == "TEGroupedMLP"
    ours = te_layer_spec(num_experts=4, qk_layernorm=False, frozen_aware_experts=True)
    linears = ours.submodules.mlp.keywords["submodules"].experts.keywords["submodules"]
    assert (linears.linear_fc1, linears.linear_fc2) == (te_ext.TEColumnParallelLinear, te_ext.TERowParallelLinear)


def test_mixed_frozen_te_grouped_linear_is_refused():
    from deltamoe.megatron_ext.moe.freezing import apply_stage_freezing

    class GroupedLinear(torch.nn.Module):  # TE's layout: one parameter per GEMM
        def __init__(self):
            super().__init__()
            for i in range(2):
                self.register_parameter(f"weight{i}", torch.nn.Parameter(torch.zeros(2, 2)))

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_fc1, self.linear_fc2 = GroupedLinear(), GroupedLinear()

    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.mlp = torch.nn.Module()
    model.decoder.mlp.experts = Experts()
    model.decoder.mlp.router = torch.nn.Linear(2, 4)
    with pytest.raises(DeltaMoEError, match="GroupedLinear holds frozen and trainable experts"):
        apply_stage_freezing(model, stage=1, frozen_experts=[0], num_experts=4, ep_rank=0, ep_size=2)
    report = apply_stage_freezing(model, stage=2, frozen_experts=[0], num_experts=4, ep_rank=0, ep_size=2)
    assert report.trainable == ["decoder.mlp.router.weight", "decoder.mlp.router.bias"]


def _write_legacy(monkeypatch, fn):
    """Write a checkpoint as DeltaMoE did before this layout: megatron's local keys map in every layer (MoE layers
    included) and norms without `_extra_state`."""
    from deltamoe.megatron_ext.layers import norm
    from deltamoe.megatron_ext.runtime import checkpoint_layout

    with monkeypatch.context() as m:
        m.setattr(checkpoint_layout, "keys_map", lambda *, is_moe: {**checkpoint_layout.FUSED_INPUT_NORM,
                                                                    **checkpoint_layout.FUSED_PRE_MLP_NORM})
        m.setattr(norm, "StandaloneFastNorm", norm.FastNorm)
        return fn()


def test_legacy_layout_exports_and_is_refused_by_the_trainer(tiny_models, tmp_path, monkeypatch):
    from deltamoe.converters.hf_to_megatron import import_hf
    from deltamoe.converters.megatron_to_hf import export
    from deltamoe.megatron_ext.moe.upcycle_cli import upcycle
    from deltamoe.megatron_ext.runtime.checkpoint_layout import checkpoint_keys, legacy_layout_reasons
    from deltamoe.megatron_ext.runtime.rewrite_cli import rewrite_checkpoint

    hf = tiny_models["qwen3"]
    dense = import_hf(hf, tmp_path / "dense")
    current = upcycle(dense, tmp_path / "moe", num_experts=4, topk=2)
    legacy = _write_legacy(monkeypatch, lambda: upcycle(dense, tmp_path / "legacy", num_experts=4, topk=2))
    keys = checkpoint_keys(legacy / "release")
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert "decoder.layers.pre_mlp_layernorm.weight" not in keys
    assert "decoder.final_layernorm._extra_state" not in keys
    assert len(legacy_layout_reasons(keys, is_moe=True)) == 2
    assert legacy_layout_reasons(checkpoint_keys(current / "release"), is_moe=True) == []

    a = export(current, tmp_path / "hf-current")
    b = export(legacy, tmp_path / "hf-legacy")
    assert _model_hashes(a) == _model_hashes(b)

    # The trainer refuses it before Megatron starts, naming the flag, the folder and the fix.
    cmd = [sys.executable, "-m", "deltamoe.megatron_ext.training.train", "--deltamoe-stage", "1",
           "--pretrained-checkpoint", str(legacy), "--load", str(tmp_path / "run"), "--save", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"--pretrained-checkpoint {legacy}: written in DeltaMoE's legacy torch_dist key layout" in proc.stderr
    assert "deltamoe rewrite-checkpoint" in proc.stderr
    assert not (tmp_path / "run").exists()

    # The rewrite gives the current layout and the same weights.
    rewritten = rewrite_checkpoint(legacy, tmp_path / "rewritten")
    assert checkpoint_keys(rewritten / "release") == checkpoint_keys(current / "release")
    assert _model_hashes(export(rewritten, tmp_path / "hf-rewritten")) == _model_hashes(a)
