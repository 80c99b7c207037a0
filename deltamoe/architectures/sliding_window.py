"""Sliding-window attention of Qwen2 / Qwen3, per layer, as transformers 5 computes it, in megatron-core's terms.

transformers (Qwen2Config / Qwen3Config.__post_init__, modeling_qwen2.py): the window is `sliding_window` only when
`use_sliding_window` is true (else None); `layer_types` names each layer's attention and, when config.json lacks it,
is derived: "sliding_attention" for layer i >= max_window_layers if there is a window, "full_attention" otherwise.
A sliding layer attends to the `sliding_window` most recent tokens, itself included (masking_utils.py:
`kv_idx > q_idx - sliding_window`).

megatron-core: `TransformerConfig.window_size = (left, right)` attends to keys in [q - left, q + right], so
(sliding_window - 1, 0); `window_attn_skip_freq` as a list marks the windowed layers (1) per layer
(transformer/utils.py `is_layer_window_attention`). The local and fast specs compute it with megatron's unfused
softmax (fused_softmax.py `get_sliding_window_causal_mask`), the TE spec with Transformer Engine's window_size.
"""

from __future__ import annotations

from deltamoe.common.errors import DeltaMoEError
from deltamoe.architectures.fields import Field, mapped

FULL, SLIDING = "full_attention", "sliding_attention"
_LEGACY_LAYER_TYPES = {"attention": FULL}  # configuration_utils._LEGACY_LAYER_TYPE_REMAP

SLIDING_WINDOW_FIELDS: tuple[Field, ...] = (
    mapped("use_sliding_window", "turns sliding_window on; off: every layer attends to the full context",
           default=False, accepts=(True, False)),
    mapped("sliding_window", "window_size = (sliding_window - 1, 0) on the sliding layers (ignored unless "
           "use_sliding_window)", default=4096),
    mapped("max_window_layers", "layers from this index on slide, when layer_types is absent", default=28),
    mapped("layer_types", "window_attn_skip_freq: 1 on sliding_attention layers, 0 on full_attention ones"),
)


def read_sliding_window(hf_config: dict, num_layers: int, source: str) -> tuple[int | None, tuple[int, ...] | None]:
    """(window in tokens, per-layer 0/1 pattern), or (None, None) when every layer attends to the full context."""
    use = hf_config.get("use_sliding_window", False)
    window = hf_config.get("sliding_window", 4096) if use else None
    layer_types = hf_config.get("layer_types")
    if layer_types is None:
        first = hf_config.get("max_window_layers", 28)
        layer_types = [SLIDING if window is not None and i >= first else FULL for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise DeltaMoEError(f"{source}: layer_types must list one entry per layer ({num_layers}), got {layer_types!r}")
    layer_types = [_LEGACY_LAYER_TYPES.get(t, t) for t in layer_types]
    other = sorted({t for t in layer_types if t not in (FULL, SLIDING)}, key=str)
    if other:
        raise DeltaMoEError(f"{source}: layer_types entry {other[0]!r} is not supported (megatron-core's GPTModel "
                            f"layers are attention layers); supported: {FULL!r}, {SLIDING!r}")
    sliding = tuple(int(t == SLIDING) for t in layer_types)
    if not any(sliding):
        return None, None
    if window is None:
        raise DeltaMoEError(f"{source}: layer_types has sliding_attention layers but use_sliding_window is "
                            f"{use!r} and sliding_window is {hf_config.get('sliding_window')!r}: transformers has no "
                            "window for them (it fails on this config); set use_sliding_window and sliding_window")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise DeltaMoEError(f"{source}: sliding_window={window!r} is not supported; supported: a positive integer")
    return window, sliding
