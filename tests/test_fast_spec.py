"""The torch-native fast spec equals megatron's local spec, and frozen experts stay frozen (CPU, one process)."""

from __future__ import annotations

import os
from unittest import mock

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest
import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.architectures import read_architecture_config
from deltamoe.megatron_ext.layers import grouped_experts
from deltamoe.megatron_ext.internals import use_chunked_loss
from deltamoe.megatron_ext.layers.grouped_experts import (
    FrozenAwareGroupedMLP,
    grouped_linear,
)
from deltamoe.megatron_ext.layers.norm import FastNorm, SequenceParallelRMSNorm
from deltamoe.megatron_ext.layers.sdpa_attention import SDPAttention
from deltamoe.megatron_ext.runtime import model_builder, specs
from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
from deltamoe.megatron_ext.runtime.model_builder import MoESettings
from tests.tiny_models import tiny_config

MOE = {"num_experts": 4, "topk": 2}


def build_model(hf_config: dict, *, spec: str, moe: MoESettings | None = None, **parallel):
    """`model_builder.build_gpt_model` for one spec (it uses `specs.decoder_spec`: the fast final norm supports SP)."""
    _, arch = read_architecture_config(hf_config, "config.json")
    cfg = model_builder.transformer_config(arch, moe=moe, **parallel)
    return model_builder.build_gpt_model(arch, cfg, padded_vocab=model_builder.padded_vocab_size(arch.vocab_size),
                                         spec=spec)


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    init_distributed(ParallelLayout())


def _batch(seed=0, batch=2, seq=24, vocab=128):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    ids = tokens[:, :-1]
    return ids, torch.arange(seq).expand_as(ids), tokens[:, 1:]


def _pair(arch: str, moe: MoESettings | None):
    torch.manual_seed(0)
    cfg = tiny_config(arch).to_dict()
    local = build_model(cfg, spec="local", moe=moe)
    fast = build_model(cfg, spec="fast", moe=moe)
    assert sorted(local.state_dict()) == sorted(fast.state_dict())
    fast.load_state_dict(local.state_dict(), strict=True)
    return local, fast


def test_auto_spec_is_fast_without_transformer_engine_and_names_are_checked():
    assert specs.resolve_spec_name("auto") == ("te" if specs.HAVE_TE and torch.cuda.is_available() else "fast")
    assert specs.resolve_spec_name("local") == "local"
    with pytest.raises(DeltaMoEError, match="must be one of"):
        specs.resolve_spec_name("flash")
    if not (specs.HAVE_TE and torch.cuda.is_available()):
        with pytest.raises(DeltaMoEError, match="needs Transformer Engine and CUDA"):
            specs.resolve_spec_name("te")


@pytest.mark.parametrize("arch,moe", [
    ("llama", None),
    ("qwen2", MoESettings(**MOE, grouped_gemm=False)),
    ("qwen3", MoESettings(**MOE, grouped_gemm=True)),
])
def test_fast_spec_logits_and_gradients_equal_local_spec(arch, moe):
    local, fast = _pair(arch, moe)
    ids, pos, labels = _batch()
    torch.testing.assert_close(fast(ids, pos, None), local(ids, pos, None))
    local(ids, pos, None, labels=labels).mean().backward()
    fast(ids, pos, None, labels=labels).mean().backward()
    fast_params = dict(fast.named_parameters())
    for name, p in local.named_parameters():
        torch.testing.assert_close(fast_params[name].grad, p.grad, msg=name)
    layer = fast.decoder.layers[0]
    assert isinstance(layer.self_attention.core_attention, SDPAttention)
    assert isinstance(fast.decoder.final_layernorm, SequenceParallelRMSNorm)
    if moe:
        assert isinstance(layer.mlp.experts, FrozenAwareGroupedMLP)


def test_moe_checkpoint_names_equal_local_spec():
    local, fast = _pair("qwen3", MoESettings(**MOE, grouped_gemm=True))
    names = [sorted(v.key for v in m.sharded_state_dict().values()) for m in (local, fast)]
    assert names[0] == names[1]
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight" in names[1]


def test_chunked_loss_equals_megatron_cross_entropy():
    local, fast = _pair("qwen3", MoESettings(**MOE, grouped_gemm=True))  # tied embeddings
    use_chunked_loss(fast, chunk_bytes=4 * 128 * 7)  # 7 tokens per chunk: uneven last chunk
    ids, pos, labels = _batch(seed=1)
    ref, ours = local(ids, pos, None, labels=labels), fast(ids, pos, None, labels=labels)
    assert ours.shape == labels.shape
    torch.testing.assert_close(ours, ref)
    ref.mean().backward()
    ours.mean().backward()
    grads = dict(fast.named_parameters())
    torch.testing.assert_close(grads["embedding.word_embeddings.weight"].grad,
                               dict(local.named_parameters())["embedding.word_embeddings.weight"].grad)
    torch.testing.assert_close(fast(ids, pos, None), local(ids, pos, None))  # no labels: logits as before


def test_sdpa_attention_equals_megatron_with_padding_mask_and_gqa():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    _, arch = read_architecture_config(tiny_config("llama").to_dict(), "config.json")
    cfg = model_builder.transformer_config(arch)
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    ours = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    s, b = 9, 2
    q = torch.randn(s, b, 4, 16, requires_grad=True)
    k, v = (torch.randn(s, b, 2, 16, requires_grad=True) for _ in range(2))
    torch.testing.assert_close(ours(q, k, v, None), ref(q, k, v, None))
    # A causal mask with the last three keys of batch 1 padded out (True = masked, megatron's convention).
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s).clone()
    mask[1, :, :, -3:] = True
    mask[1, :, -3:, :] = torch.triu(torch.ones(3, s, dtype=torch.bool), diagonal=s - 2)  # keep rows non-empty
    out_ref, out = ref(q, k, v, mask), ours(q, k, v, mask)
    torch.testing.assert_close(out, out_ref)
    g_ref = torch.autograd.grad(out_ref.sum(), (q, k, v))
    g = torch.autograd.grad(out.sum(), (q, k, v))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r)


def test_norm_flags_sequence_parallel_and_refuses_unsupported_options():
    _, arch = read_architecture_config(tiny_config("llama").to_dict(), "config.json")
    config = model_builder.transformer_config(arch)
    assert FastNorm(config, 64).weight.sequence_parallel is False
    config.sequence_parallel = True  # TransformerConfig refuses it at TP=1; the TP=2 run is test_fast_spec_tp.py
    norm = FastNorm(config, 64, 1e-5)
    assert isinstance(norm, SequenceParallelRMSNorm) and norm.weight.sequence_parallel is True
    with pytest.raises(DeltaMoEError, match="layernorm_zero_centered_gamma"):
        FastNorm(model_builder.transformer_config(arch, layernorm_zero_centered_gamma=True), 64)


@pytest.mark.parametrize("grouped", [False, True])
def test_grouped_linear_matches_reference_and_skips_frozen_weight_grads(grouped):
    counts = [3, 0, 5, 8]
    x = torch.randn(sum(counts), 16, requires_grad=True)
    weights = [torch.randn(32, 16, requires_grad=e != 1) for e in range(4)]
    weights[3].requires_grad_(False)  # trainable: 0 and 2, not contiguous
    y = grouped_linear(x, counts, weights, grouped=grouped)
    ref = torch.cat([xe @ w.t() for xe, w in zip(torch.split(x, counts), weights)])
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, weights[0], weights[2]], dy)
    want = torch.autograd.grad(ref, [x, weights[0], weights[2]], dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="sum to 16 but the input has 15 rows"):
        grouped_linear(x[:15], counts, weights, grouped=grouped)


def _freeze(model, stage: int):
    for name, p in model.named_parameters():
        trainable = ("router" in name) if stage == 2 else ("local_experts.0." not in name)
        p.requires_grad_(trainable)


@pytest.mark.parametrize("stage", [1, 2])
def test_frozen_experts_stay_bit_identical_and_get_no_weight_grad_work(stage):
    torch.manual_seed(0)
    model = build_model(tiny_config("qwen3").to_dict(), spec="fast", moe=MoESettings(**MOE, grouped_gemm=True))
    _freeze(model, stage)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # AdamW over *all* parameters with weight decay: a frozen tensor that received a zero gradient would decay.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    computed = []
    real = grouped_experts._weight_grads

    def spy(dy, x, counts, trainable, grouped):
        computed.append(tuple(trainable))
        return real(dy, x, counts, trainable, grouped)

    with mock.patch.object(grouped_experts, "_weight_grads", spy):
        for step in range(3):
            ids, pos, labels = _batch(seed=step)
            optimizer.zero_grad(set_to_none=True)
            model(ids, pos, None, labels=labels).mean().backward()
            optimizer.step()
    expected = [] if stage == 2 else [(1, 2, 3)] * (3 * tiny_config("qwen3").num_hidden_layers * 2)
    assert computed == expected  # fc1 and fc2 of every layer, experts 1-3 only (stage 2: none)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert p.grad is None, name
            assert torch.equal(p, before[name]), f"{name} changed although frozen"
