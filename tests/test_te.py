"""The Transformer Engine path, for real: run inside the project's container on a GPU (`pytest -m te`, or
`bash bench/container_check.sh OUT`). Not run on CPU CI; fails, not skips, where TE or CUDA is missing.

The chain a user takes there: HF model -> `deltamoe import` -> `deltamoe upcycle` (files made without TE; conversion
never builds TE modules) -> stage 1 with the TE spec for 3 iterations (bf16, and FP8 where the GPU has FP8 tensor
cores) -> expert 0 and every frozen tensor bit-identical, every other expert trained (TE's GroupedLinear would leave
them untrained: runtime/specs.py) -> `deltamoe export` -> HF logits equal the TE model's.
"""

from __future__ import annotations

import pytest
import torch

from tests.megatron_helpers import hf_logits, megatron_logits
from tests.test_training import check_stage1_changes, lm_losses, train, weights, workspace  # noqa: F401 (fixture)

pytestmark = pytest.mark.te

TE_FLAGS = ["--deltamoe-layer-spec", "te", "--bf16", "--moe-grouped-gemm", "--transformer-impl", "transformer_engine"]


def _require_te():
    from deltamoe.megatron_ext.runtime import specs

    assert torch.cuda.is_available() and specs.HAVE_TE, (
        "te-marked test needs Transformer Engine and CUDA: run it in the project's container on a GPU "
        "(bash bench/container_check.sh OUT)")


def _fp8_capable() -> bool:
    major, minor = torch.cuda.get_device_capability()
    return (major, minor) >= (8, 9)


def test_te_model_loads_the_upcycled_checkpoint_and_matches_the_local_spec(workspace):  # noqa: F811
    """The key contract for real: a TE-spec model loads what `upcycle` wrote (no missing key) and computes the same."""
    _require_te()
    from deltamoe.megatron_ext.runtime.checkpoint import load_model
    from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    te_model, meta = load_model(workspace["moe"], spec="te")
    local_model, _ = load_model(workspace["moe"], spec="local")
    ids = torch.randint(3, 120, (2, 24), device="cuda")
    vocab = meta.hf_config["vocab_size"]
    torch.testing.assert_close(megatron_logits(te_model, ids, vocab), megatron_logits(local_model, ids, vocab),
                               rtol=2e-3, atol=2e-3)  # TE's fused kernels (TF32 off by default) vs torch


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_te_stage1_keeps_expert0_and_trains_every_other_expert(workspace, precision, tmp_path):  # noqa: F811
    _require_te()
    if precision == "fp8" and not _fp8_capable():
        pytest.fail(f"FP8 needs compute capability >= 8.9; this GPU has {torch.cuda.get_device_capability()} "
                    "(deselect with -k bf16 on such GPUs)")
    extra = list(TE_FLAGS)
    if precision == "fp8":
        extra += ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]
    out = workspace["root"] / f"stage1_te_{precision}"
    records = train(workspace, out, iters=3, extra=extra)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(lm_losses(records))))
    check_stage1_changes(weights(workspace["moe"]), weights(out))


def test_te_trained_checkpoint_exports_to_the_same_function(workspace, tmp_path):  # noqa: F811
    _require_te()
    from deltamoe.converters.megatron_to_hf import export
    from deltamoe.megatron_ext.runtime.checkpoint import load_model
    from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed

    out = workspace["root"] / "stage1_te_export"
    train(workspace, out, iters=3, extra=list(TE_FLAGS))
    hf = export(out, tmp_path / "hf", dtype="float32")
    init_distributed(ParallelLayout())
    model, meta = load_model(out, spec="te", params_dtype=torch.float32)
    ids = torch.randint(3, 120, (2, 24))
    vocab = meta.hf_config["vocab_size"]
    torch.testing.assert_close(hf_logits(hf, ids), megatron_logits(model, ids.cuda(), vocab).cpu(),
                               rtol=2e-3, atol=2e-3)
