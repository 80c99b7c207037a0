"""Core attention on `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels).

megatron-core's local `DotProductAttention` materialises the full [b, heads, s, s] score matrix with `baddbmm` and
an unfused softmax: on an H200 that doubled the memory of the upcycled Qwen2.5-0.5B MoE and made micro-batch 8 run out
of memory (../shared/notes/gpu-measurements.md). SDPA picks FlashAttention-2 (Dao, 2023, arXiv:2307.08691) or the
memory-efficient kernel (Rabe & Staats, 2021, arXiv:2112.05682), which never store the score matrix.

`SDPAttention` is a drop-in subclass: same constructor, same [s, b, heads, head_dim] tensors in, same
[s, b, heads * head_dim] out, same (empty) state dict. Features SDPA cannot express (a learnable or off-by-one softmax
offset, sliding windows) run megatron's own implementation instead of failing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

_HALF = (torch.float16, torch.bfloat16)


class SDPAttention(DotProductAttention):
    """megatron-core core attention computed by torch SDPA; causal, GQA and tensor parallel (heads per partition)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        # megatron divides the scale by layer_number and multiplies the fp32 scores back by it (a float16 overflow
        # guard); the product is the scale SDPA must apply.
        coeff = self.layer_number if self.config.apply_query_key_layer_scaling else 1
        self.sdpa_scale = self.softmax_scale * coeff
        self.dropout_p = float(self.attention_dropout.p)
        self.uses_megatron_softmax = self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self.uses_megatron_softmax or attention_bias is not None or packed_seq_params is not None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, batch, heads, head_dim = query.shape
        groups = key.size(2)
        # [s, b, n, d] -> [b, n, s, d]: a permuted view, SDPA only needs a unit stride on the last dimension.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        attn_mask, is_causal = None, False
        if attention_mask is not None:
            # megatron's mask marks positions to drop (True = masked); SDPA's boolean mask marks positions to keep.
            attn_mask = ~attention_mask.bool()
        elif mask_type == AttnMaskType.causal and sq > 1:
            is_causal = True
        gqa_kwargs = {}
        if heads != groups:
            # Only the flash kernel reads shared K/V heads in place (enable_gqa), and it takes no explicit mask and
            # no fp32; for every other kernel enable_gqa would mean the S x S math fallback, so expand K/V instead,
            # as megatron does.
            if (q.is_cuda and q.dtype in _HALF and attn_mask is None and head_dim <= 256
                    and torch.backends.cuda.flash_sdp_enabled()):
                gqa_kwargs["enable_gqa"] = True
            else:
                k = k.repeat_interleave(heads // groups, dim=1)
                v = v.repeat_interleave(heads // groups, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = self._sdpa(q, k, v, attn_mask, is_causal, dropout_p, gqa_kwargs)
        else:
            context = self._sdpa(q, k, v, attn_mask, is_causal, dropout_p, gqa_kwargs)
        # [b, n, s, d] -> [s, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)

    def _sdpa(self, q, k, v, attn_mask, is_causal, dropout_p, gqa_kwargs):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=self.sdpa_scale, **gqa_kwargs)

