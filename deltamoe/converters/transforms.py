"""The typed tensor transforms of the mapping tables. Each split is the exact inverse of its merge (pure functions)."""

from __future__ import annotations

import torch

from deltamoe.architectures.base import ArchitectureConfig, Transform


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ArchitectureConfig) -> torch.Tensor:
    """HF q/k/v -> megatron linear_qkv: for each query group, its query heads, then its key, then its value."""
    groups, d = config.num_query_groups, config.kv_channels
    heads_per_group = config.num_attention_heads // groups
    tail = q.shape[1:]
    merged = torch.cat(
        [q.reshape(groups, heads_per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)], dim=1
    )
    return merged.reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, config: ArchitectureConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d = config.num_query_groups, config.kv_channels
    heads_per_group = config.num_attention_heads // groups
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (heads_per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [heads_per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(), v.reshape(-1, *tail).contiguous()


def pad_vocab(t: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    if t.shape[0] == padded_vocab:
        return t
    return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])], dim=0)


def to_megatron(transform: Transform, hf: list[torch.Tensor], config: ArchitectureConfig, padded_vocab: int) -> torch.Tensor:
    if transform is Transform.DIRECT:
        return hf[0]
    if transform is Transform.VOCAB:
        return pad_vocab(hf[0], padded_vocab)
    if transform is Transform.QKV:
        return merge_qkv(*hf, config)
    if transform is Transform.GATED_FC1:
        return torch.cat(hf, dim=0)
    raise ValueError(transform)


def to_hf(transform: Transform, t: torch.Tensor, config: ArchitectureConfig) -> list[torch.Tensor]:
    if transform is Transform.DIRECT:
        return [t]
    if transform is Transform.VOCAB:
        return [t[: config.vocab_size].contiguous()]
    if transform is Transform.QKV:
        return list(split_qkv(t, config))
    if transform is Transform.GATED_FC1:
        gate, up = torch.chunk(t, 2, dim=0)
        return [gate.contiguous(), up.contiguous()]
    raise ValueError(transform)


def tensor_parallel_slice(full: torch.Tensor, *, partition_dim: int, rank: int, size: int, gated: bool) -> torch.Tensor:
    """This rank's shard of a whole tensor, as megatron's parallel linears hold it.

    A gated fc1 ([gate; up]) is sharded as [gate_r; up_r], so each rank applies SwiGLU to its own columns.
    """
    if size == 1:
        return full
    if gated:
        return torch.cat([torch.chunk(half, size, dim=partition_dim)[rank] for half in torch.chunk(full, 2, dim=0)], dim=0)
    return torch.chunk(full, size, dim=partition_dim)[rank]
