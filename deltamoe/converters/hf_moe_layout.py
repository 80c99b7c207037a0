"""Where the MoE pieces live in Hugging Face checkpoints: Mixtral, Qwen2-MoE, Qwen3-MoE and their dense sources.

transformers 5 keeps experts fused in memory (`mlp.experts.gate_up_proj`, 3-D) but `save_pretrained` writes, and
`from_pretrained` reads, one tensor per expert and projection; those on-disk names are what this table describes
(checked by saving tiny models with transformers 5.24):

| format    | router                         | routed expert j                        | shared expert                  |
|-----------|--------------------------------|----------------------------------------|--------------------------------|
| mixtral   | block_sparse_moe.gate.weight   | block_sparse_moe.experts.j.w1/w3/w2     | none                           |
| qwen2_moe | mlp.gate.weight                | mlp.experts.j.gate_proj/up_proj/down_proj | mlp.shared_expert.*_proj, mlp.shared_expert_gate |
| qwen3_moe | mlp.gate.weight                | mlp.experts.j.gate_proj/up_proj/down_proj | none                         |

(w1 = gate, w3 = up, w2 = down.) Routing, from transformers 5 source: softmax over all experts, top-k, then the top-k
weights are renormalised to sum to 1 — always in Mixtral, only with `norm_topk_prob: true` in Qwen2-MoE/Qwen3-MoE.
Qwen2-MoE always adds `sigmoid(shared_expert_gate(x)) * shared_expert(x)`. Every other tensor (attention, norms,
embeddings, lm_head, and the dense MLP of Qwen `mlp_only_layers`) has the same name as in the dense model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from deltamoe.common.errors import DeltaMoEError

PROJECTIONS = ("gate", "up", "down")
DENSE_FFN_PATTERN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
VOCAB_TENSORS = (EMBEDDING, LM_HEAD)
"""Tensors whose rows are the vocabulary: the only ones allowed to differ in shape (added tokens)."""


@dataclass(frozen=True)
class MoEFormat:
    """One HF MoE checkpoint format and the dense format it is upcycled from."""

    name: str
    architecture: str
    dense_model_types: tuple[str, ...]
    block: str
    """Module of the MoE block inside a decoder layer."""
    expert_proj: dict[str, str]
    """Our projection name (gate/up/down) -> HF module name inside an expert."""
    num_experts_field: str
    expert_size_field: str
    has_shared_expert: bool
    always_renormalises: bool
    """Whether top-k weights are renormalised regardless of config (else `norm_topk_prob` decides)."""

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def expert_name(self, layer: int, expert: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{self.expert_proj[proj]}.weight"

    def shared_expert_name(self, layer: int, proj: str) -> str:
        self._need_shared()
        return f"model.layers.{layer}.{self.block}.shared_expert.{proj}_proj.weight"

    def shared_expert_gate_name(self, layer: int) -> str:
        self._need_shared()
        return f"model.layers.{layer}.{self.block}.shared_expert_gate.weight"

    def _need_shared(self) -> None:
        if not self.has_shared_expert:
            raise DeltaMoEError(f"{self.name}: this format has no shared expert")


FORMATS: dict[str, MoEFormat] = {
    "mixtral": MoEFormat(
        name="mixtral", architecture="MixtralForCausalLM", dense_model_types=("llama", "mistral"),
        block="block_sparse_moe", expert_proj={"gate": "w1", "up": "w3", "down": "w2"},
        num_experts_field="num_local_experts", expert_size_field="intermediate_size",
        has_shared_expert=False, always_renormalises=True,
    ),
    "qwen2_moe": MoEFormat(
        name="qwen2_moe", architecture="Qwen2MoeForCausalLM", dense_model_types=("qwen2",),
        block="mlp", expert_proj={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
        num_experts_field="num_experts", expert_size_field="moe_intermediate_size",
        has_shared_expert=True, always_renormalises=False,
    ),
    "qwen3_moe": MoEFormat(
        name="qwen3_moe", architecture="Qwen3MoeForCausalLM", dense_model_types=("qwen3",),
        block="mlp", expert_proj={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
        num_experts_field="num_experts", expert_size_field="moe_intermediate_size",
        has_shared_expert=False, always_renormalises=False,
    ),
}
DENSE_TO_FORMAT = {dense: fmt.name for fmt in FORMATS.values() for dense in fmt.dense_model_types}


@dataclass(frozen=True)
class TensorRole:
    """What one MoE tensor is, and which dense tensor it derives from (`dense_name`, None for routers/gates)."""

    kind: Literal["router", "expert", "shared_expert", "shared_expert_gate", "other"]
    dense_name: str | None
    layer: int | None = None
    expert: int | None = None
    proj: str | None = None


def _compile(fmt: MoEFormat) -> list[tuple[re.Pattern, str]]:
    block = re.escape(fmt.block)
    proj_names = "|".join(re.escape(v) for v in fmt.expert_proj.values())
    patterns = [
        (rf"^model\.layers\.(?P<layer>\d+)\.{block}\.gate\.weight$", "router"),
        (rf"^model\.layers\.(?P<layer>\d+)\.{block}\.experts\.(?P<expert>\d+)\.(?P<proj>{proj_names})\.weight$", "expert"),
    ]
    if fmt.has_shared_expert:
        patterns += [
            (rf"^model\.layers\.(?P<layer>\d+)\.{block}\.shared_expert\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$",
             "shared_expert"),
            (rf"^model\.layers\.(?P<layer>\d+)\.{block}\.shared_expert_gate\.weight$", "shared_expert_gate"),
        ]
    return [(re.compile(p), kind) for p, kind in patterns]


_PATTERNS = {name: _compile(fmt) for name, fmt in FORMATS.items()}


def dense_ffn_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}_proj.weight"


def parse_moe_name(fmt: MoEFormat, name: str) -> TensorRole:
    """Classify a tensor of an HF MoE checkpoint of format `fmt`; unknown names inside the MoE block are an error."""
    for pattern, kind in _PATTERNS[fmt.name]:
        m = pattern.match(name)
        if not m:
            continue
        layer = int(m["layer"])
        if kind in ("router", "shared_expert_gate"):
            return TensorRole(kind=kind, dense_name=None, layer=layer)
        if kind == "expert":
            proj = {v: k for k, v in fmt.expert_proj.items()}[m["proj"]]
            return TensorRole(kind=kind, dense_name=dense_ffn_name(layer, proj), layer=layer,
                              expert=int(m["expert"]), proj=proj)
        proj = m["proj"].removesuffix("_proj")
        return TensorRole(kind=kind, dense_name=dense_ffn_name(layer, proj), layer=layer, proj=proj)
    # Qwen's mlp_only_layers keep a dense MLP under the same names as the dense model; anything else under the
    # MoE block is a tensor we do not understand, and guessing would silently graft the wrong thing.
    if f".{fmt.block}." in name and not DENSE_FFN_PATTERN.match(name):
        raise DeltaMoEError(f"tensor {name!r}: not a known {fmt.name} MoE tensor (router, expert, shared expert)")
    return TensorRole(kind="other", dense_name=name)


def parse_dense_name(name: str) -> tuple[int, str] | None:
    """(layer, proj) for a dense FFN tensor, None for every other tensor."""
    m = DENSE_FFN_PATTERN.match(name)
    return (int(m[1]), m[2]) if m else None


def format_of_config(config: dict, where: str) -> MoEFormat:
    """The MoE format of an HF config, or a DeltaMoEError saying the model is not a supported MoE."""
    model_type = config.get("model_type")
    if model_type not in FORMATS:
        raise DeltaMoEError(
            f"{where}: model_type {model_type!r} is not a supported MoE format (expected one of {sorted(FORMATS)})"
        )
    return FORMATS[model_type]


def format_for_dense(model_type: str, where: str) -> MoEFormat:
    if model_type not in DENSE_TO_FORMAT:
        raise DeltaMoEError(
            f"{where}: model_type {model_type!r} has no MoE counterpart (supported dense types: {sorted(DENSE_TO_FORMAT)})"
        )
    return FORMATS[DENSE_TO_FORMAT[model_type]]


def renormalises_topk(fmt: MoEFormat, config: dict) -> bool:
    """Whether the model's top-k routing weights sum to 1 (needed for an upcycled MoE to equal its dense FFN)."""
    return fmt.always_renormalises or bool(config.get("norm_topk_prob", False))
