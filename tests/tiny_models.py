"""Tiny random Hugging Face models built in-process (never downloaded), one per supported dense architecture.

Sizes keep every interesting feature: GQA (4 query heads, 2 KV heads), odd layer count, untied or tied embeddings,
qkv bias (Qwen2), q/k norm (Qwen3), non-default RoPE theta and RMSNorm epsilon.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

ARCHITECTURES = ("llama", "llama_tied", "qwen2", "qwen3")


def tiny_config(arch: str, **overrides):
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        common.update(tie_word_embeddings=False)
        cls = LlamaConfig
    elif arch == "llama_tied":
        common.update(tie_word_embeddings=True)
        cls = LlamaConfig
    elif arch == "qwen2":
        common.update(tie_word_embeddings=False, rms_norm_eps=1e-6)
        cls = Qwen2Config
    elif arch == "qwen3":
        common.update(tie_word_embeddings=True, head_dim=16, rms_norm_eps=1e-6)
        cls = Qwen3Config
    else:
        raise ValueError(arch)
    common.update(overrides)
    config = cls(**common)
    # rope_theta moved into rope_parameters in transformers 5; set both spellings so either version sees it.
    if getattr(config, "rope_parameters", None) is not None:
        config.rope_parameters["rope_theta"] = common["rope_theta"]
    return config


def make_tiny_hf(arch: str, folder: str | Path, *, seed: int = 0, perturb_norms: bool = True, **overrides) -> Path:
    """Save a random tiny model of `arch` (float32) to `folder` and return the folder."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if perturb_norms and p.ndim == 1:
                # Norm weights and biases start at 1/0; random values make a mapping mistake visible.
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
            elif p.ndim == 2:
                p.normal_(0.0, 0.05)
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder
