"""GPU check of the conversion: Megatron logits on CUDA (NCCL) equal transformers' logits on CUDA, float32.

Run on a GPU machine: `make test-gpu` (pytest -m gpu). CPU CI deselects it; it never passes without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.megatron_helpers import run_torchrun
from tests.tiny_models import make_tiny_hf

pytestmark = pytest.mark.gpu

SCRIPT = """
import sys, torch
from tests.megatron_helpers import load_hf_strict
from deltamoe.converters.hf_to_megatron import import_hf
from deltamoe.megatron_ext.runtime.checkpoint import load_model
if __name__ == "__main__":
    hf, out = sys.argv[1], sys.argv[2]
    import_hf(hf, out)
    assert torch.distributed.get_backend() == "nccl", torch.distributed.get_backend()
    model, meta = load_model(out)
    model.eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    pos = torch.arange(16, device="cuda").unsqueeze(0).expand(2, 16)
    with torch.no_grad():
        ours = model(ids, pos, None)[..., :128].float()
        ref = load_hf_strict(hf).cuda()(ids).logits.float()
    # TF32 off on both sides so float32 means float32.
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    print("GPU_PARITY_OK", torch.cuda.get_device_name(0), (ours - ref).abs().max().item())
"""


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_parity_on_cuda_with_nccl(arch, tmp_path):
    assert torch.cuda.is_available(), "gpu-marked test needs CUDA"
    hf = make_tiny_hf(arch, tmp_path / "hf")
    script = tmp_path / "parity.py"
    script.write_text("import torch\ntorch.backends.cuda.matmul.allow_tf32 = False\ntorch.backends.cudnn.allow_tf32 = False\n" + SCRIPT)
    proc = run_torchrun(1, str(script), str(hf), str(tmp_path / "megatron"))
    assert "GPU_PARITY_OK" in proc.stdout
    print(proc.stdout.strip().splitlines()[-1])


EXPORT_SCRIPT = """
import sys, torch
from deltamoe.converters.hf_to_megatron import import_hf
from deltamoe.converters.megatron_to_hf import export
from deltamoe.converters.safetensors_io import SafetensorsReader
if __name__ == "__main__":
    hf, megatron, back = sys.argv[1:4]
    import_hf(hf, megatron)
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    export(megatron, back)  # streams from disk: the model is built on the meta device, nothing goes to the GPU
    assert torch.cuda.max_memory_allocated() == resident, (torch.cuda.max_memory_allocated(), resident)
    before, after = SafetensorsReader(hf).read_all(), SafetensorsReader(back).read_all()
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    print("GPU_EXPORT_OK", len(after))
"""


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_export_round_trip_on_a_cuda_machine(arch, tmp_path):
    """On a machine with CUDA megatron puts weights on the GPU unless told otherwise: export's meta-device model
    must not (a 72B MoE would not fit), and must still write the imported tensors bit for bit."""
    assert torch.cuda.is_available(), "gpu-marked test needs CUDA"
    hf = make_tiny_hf(arch, tmp_path / "hf")
    script = tmp_path / "export.py"
    script.write_text(EXPORT_SCRIPT)
    proc = run_torchrun(1, str(script), str(hf), str(tmp_path / "megatron"), str(tmp_path / "back"))
    assert "GPU_EXPORT_OK" in proc.stdout
