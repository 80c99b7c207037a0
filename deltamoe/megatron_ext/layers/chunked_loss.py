"""Output projection + cross-entropy computed chunk by chunk, so [tokens, vocab] float32 logits never exist whole.

With a 151,936-token vocabulary, micro-batch 8 and sequence 2048, megatron's output layer materialises 2.5 billion
logits (5 GB in bf16) and its cross-entropy keeps float32 copies of them (10 GB more) until backward. Here the
projection and the loss run over chunks of tokens: the forward keeps only each token's log-sum-exp, and the backward
recomputes one chunk's logits at a time (the same recomputation idea as Liger Kernel's fused linear cross-entropy,
Hsu et al., 2024, arXiv:2410.10989, and Wijmans et al., 2024, "Cut Your Losses", arXiv:2411.09009).

The vocabulary stays tensor-parallel exactly as in megatron's `vocab_parallel_cross_entropy`: each rank holds a vocab
shard, maxima, sums of exponentials and target logits are all-reduced over the TP group. Numerics follow megatron:
logits in the parameter dtype, softmax in float32.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

DEFAULT_CHUNK_BYTES = 1 << 30
"""Float32 logits held per chunk (1 GiB: ~1,800 tokens of a 151,936-word vocabulary on one TP rank)."""


def _all_reduce(tensor, op, group):
    if group is not None and group.size() > 1:
        torch.distributed.all_reduce(tensor, op=op, group=group)
    return tensor


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, chunk_tokens):
        vocab_local = weight.shape[0]
        vocab_start = (tp_group.rank() if tp_group is not None else 0) * vocab_local
        loss = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(loss)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = torch.matmul(hidden[rows], weight.t()).float()
            row_max = _all_reduce(logits.max(dim=-1).values, torch.distributed.ReduceOp.MAX, tp_group)
            sum_exp = _all_reduce(torch.exp(logits - row_max.unsqueeze(-1)).sum(dim=-1),
                                  torch.distributed.ReduceOp.SUM, tp_group)
            local = labels[rows] - vocab_start
            in_shard = (local >= 0) & (local < vocab_local)
            target = logits.gather(1, local.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1)
            target = _all_reduce(torch.where(in_shard, target, 0.0), torch.distributed.ReduceOp.SUM, tp_group)
            lse[rows] = torch.log(sum_exp) + row_max
            loss[rows] = lse[rows] - target
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.vocab_start, ctx.chunk_tokens = vocab_start, chunk_tokens
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        vocab_local = weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            logits = torch.matmul(hidden[rows], weight.t()).float()
            # d loss / d logits = softmax - one_hot(target), scaled by the incoming gradient.
            grad_logits = torch.exp(logits - lse[rows].unsqueeze(-1))
            local = labels[rows] - ctx.vocab_start
            in_shard = (local >= 0) & (local < vocab_local)
            rows_in_shard = torch.nonzero(in_shard).squeeze(-1)
            grad_logits[rows_in_shard, local[rows_in_shard]] -= 1.0
            grad_logits = (grad_logits * grad_loss[rows].unsqueeze(-1)).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = torch.matmul(grad_logits, weight)
            if grad_weight is not None:
                grad_weight += torch.matmul(grad_logits.t(), hidden[rows]).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_vocab_parallel_cross_entropy(hidden, weight, labels, *, tp_group=None, sequence_parallel=False,
                                         chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """Per-token loss [s, b] (float32) of `labels` [s, b] under logits `hidden @ weight.T`, vocab split over TP.

    `hidden` is [s, b, h] as the decoder leaves it ([s / tp, b, h] under sequence parallel); `weight` is this rank's
    [vocab / tp, h] shard of the output layer (or the tied embedding).
    """
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, group=tp_group)
    elif tp_group is not None and tp_group.size() > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    seq, batch, width = hidden.shape
    if labels.shape != (seq, batch):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {(seq, batch)} to match hidden states")
    chunk_tokens = max(1, chunk_bytes // (4 * weight.shape[0]))
    loss = _ChunkedLinearCrossEntropy.apply(hidden.reshape(seq * batch, width), weight, labels.reshape(-1),
                                            tp_group, chunk_tokens)
    return loss.view(seq, batch)


class ChunkedLossGPTModel(GPTModel):
    """megatron's `GPTModel` whose training loss uses `chunked_vocab_parallel_cross_entropy`.

    A built model is switched to it by `internals.use_chunked_loss` (it overrides the private `_postprocess`).

    Same parameters, state dict and checkpoints as `GPTModel`; without labels (inference, logits) and with features
    this path does not cover (multi-token prediction, MuP output scaling) it is `GPTModel` unchanged.
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, **kwargs):
        from megatron.core.inference.utils import InferenceMode

        if (labels is None or not self.post_process or self.config.mtp_num_layers or InferenceMode.is_active()
                or getattr(self.config, "use_mup", False)):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, **kwargs)
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        loss = chunked_vocab_parallel_cross_entropy(
            hidden_states, weight, labels.transpose(0, 1), tp_group=self.output_layer.tp_group,
            sequence_parallel=self.output_layer.sequence_parallel, chunk_bytes=self.chunk_bytes,
        )
        return loss.transpose(0, 1).contiguous()  # [s, b] -> [b, s], as GPTModel returns it
