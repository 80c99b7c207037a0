"""The fast spec's parity and freezing checks on CUDA, in float32 and bfloat16 (run with `pytest -m gpu`).

On a GPU the fast spec takes other code paths than on CPU: SDPA's flash / memory-efficient kernels, the enable_gqa
flag, `torch._grouped_mm`'s Hopper kernels, NCCL. Each check here repeats a CPU check on those paths.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu  # deselected by default; no skip, so `-m gpu` without a GPU fails loudly

MOE = {"num_experts": 4, "topk": 2, "grouped_gemm": True}


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    # Without this, cpu_compat would quietly run every "cuda" tensor here on the CPU and the checks would pass.
    assert torch.cuda.is_available(), "tests/test_fast_spec_gpu.py needs a CUDA GPU"
    from deltamoe.megatron_ext.runtime.distributed import (
        ParallelLayout,
        init_distributed,
    )

    init_distributed(ParallelLayout())


def _models(arch, moe, dtype):
    from deltamoe.megatron_ext.runtime.model_builder import MoESettings
    from tests.test_fast_spec import build_model
    from tests.tiny_models import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(arch).to_dict()
    settings = MoESettings(**moe) if moe else None
    local = build_model(cfg, spec="local", moe=settings)
    fast = build_model(cfg, spec="fast", moe=settings)
    fast.load_state_dict(local.state_dict(), strict=True)
    return local.to(dtype), fast.to(dtype)


def _batch(seed=0, batch=2, seq=48):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (batch, seq + 1), generator=g).cuda()
    ids = tokens[:, :-1]
    return ids, torch.arange(seq, device="cuda").expand_as(ids), tokens[:, 1:]


@pytest.mark.parametrize("arch,moe", [("llama", None), ("qwen3", MOE)])
def test_fast_equals_local_float32_on_cuda(arch, moe):
    torch.backends.cuda.matmul.allow_tf32 = False
    local, fast = _models(arch, moe, torch.float32)
    ids, pos, _ = _batch()
    torch.testing.assert_close(fast(ids, pos, None), local(ids, pos, None), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,moe", [("llama", None), ("qwen3", MOE)])
def test_fast_bf16_error_is_no_worse_than_local_bf16(arch, moe):
    reference, _ = _models(arch, moe, torch.float32)
    local, fast = _models(arch, moe, torch.bfloat16)
    ids, pos, _ = _batch()
    ref = reference(ids, pos, None)
    local_err = (local(ids, pos, None).float() - ref).abs().max().item()
    fast_err = (fast(ids, pos, None).float() - ref).abs().max().item()
    assert fast_err <= 1.5 * local_err + 1e-3, (fast_err, local_err)


def test_grouped_mm_kernel_is_used_and_matches_loop_in_bf16():
    from types import SimpleNamespace

    from deltamoe.megatron_ext.layers.grouped_experts import (
        grouped_linear,
        grouped_mm_usable,
    )

    counts = [37, 0, 90, 5]
    x = torch.randn(sum(counts), 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = [torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=e > 0) for e in range(4)]
    assert grouped_mm_usable(SimpleNamespace(moe_grouped_gemm=True), weights), torch.cuda.get_device_name()
    y_grouped = grouped_linear(x, counts, weights, grouped=True)
    y_loop = grouped_linear(x, counts, weights, grouped=False)
    torch.testing.assert_close(y_grouped, y_loop)
    dy = torch.randn_like(y_grouped)
    g_grouped = torch.autograd.grad(y_grouped, [x, *weights[1:]], dy)
    g_loop = torch.autograd.grad(y_loop, [x, *weights[1:]], dy)
    for a, b in zip(g_grouped, g_loop):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_frozen_expert_stays_bit_identical_in_bf16_on_cuda():
    _, fast = _models("qwen3", MOE, torch.bfloat16)
    for name, p in fast.named_parameters():
        p.requires_grad_("local_experts.0." not in name)
    before = {n: p.detach().clone() for n, p in fast.named_parameters()}
    optimizer = torch.optim.AdamW(fast.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        ids, pos, labels = _batch(seed=step)
        optimizer.zero_grad(set_to_none=True)
        fast(ids, pos, None, labels=labels).float().mean().backward()
        optimizer.step()
    for name, p in fast.named_parameters():
        if "local_experts.0." in name:
            assert p.grad is None and torch.equal(p, before[name]), name
        elif "local_experts" in name:
            assert not torch.equal(p, before[name]), f"{name} did not train"


def test_chunked_loss_equals_megatron_loss_on_cuda():
    from deltamoe.megatron_ext.internals import use_chunked_loss

    torch.backends.cuda.matmul.allow_tf32 = False
    local, fast = _models("qwen3", MOE, torch.float32)
    use_chunked_loss(fast, chunk_bytes=4 * 128 * 13)
    ids, pos, labels = _batch(seed=3)
    torch.testing.assert_close(fast(ids, pos, None, labels=labels), local(ids, pos, None, labels=labels),
                               rtol=1e-4, atol=1e-4)


def test_sdpa_attention_never_materialises_scores():
    from megatron.core.transformer.enums import AttnMaskType

    from deltamoe.architectures import read_architecture_config
    from deltamoe.megatron_ext.layers.sdpa_attention import SDPAttention
    from deltamoe.megatron_ext.runtime import model_builder
    from tests.tiny_models import tiny_config

    _, arch = read_architecture_config(tiny_config("llama").to_dict(), "config.json")
    cfg = model_builder.transformer_config(arch, params_dtype=torch.bfloat16)
    attention = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    s, b = 8192, 1
    q = torch.randn(s, b, 4, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(s, b, 2, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    attention(q, k, v, None).sum().backward()
    torch.cuda.synchronize()
    scores_bytes = b * 4 * s * s * 2  # one bf16 [b, heads, s, s] score matrix: 512 MiB
    assert torch.cuda.max_memory_allocated() - base < scores_bytes / 8
