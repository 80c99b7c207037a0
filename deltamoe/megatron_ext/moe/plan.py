"""The upcycle plan: how each expert of an upcycled MoE was made from the dense FFN.

`deltamoe upcycle` writes it next to the Megatron checkpoint; `deltamoe export` copies it into the Hugging Face folder;
`deltamoe graft` reads it to give every expert the same slice and scale of the FFN delta that the upcycle gave it the
FFN. This module imports nothing from megatron so the HF-side tools can use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from deltamoe.common.errors import DeltaMoEError

PLAN_FILE = "deltamoe_upcycle.json"


@dataclass(kw_only=True)
class ExpertSource:
    """Expert weights = scale * FFN weights restricted to intermediate rows [ffn_start, ffn_stop).

    gate/up (fc1) take rows [ffn_start, ffn_stop) times `fc1_scale`; down (fc2) takes the same columns times
    `fc2_scale`. The copy variant uses the whole FFN with both scales 1.
    """

    ffn_start: int
    ffn_stop: int
    fc1_scale: float = 1.0
    fc2_scale: float = 1.0


@dataclass(kw_only=True)
class UpcyclePlan:
    variant: Literal["copy", "shared"]
    """copy: expert 0 is the original FFN, experts 1..E-1 copies (MoE-LPR). shared: the FFN is an always-on shared expert."""
    num_experts: int
    """Routed experts."""
    topk: int
    granularity: int = 1
    ffn_hidden_size: int
    """Intermediate size of the dense FFN."""
    routed_experts: list[ExpertSource]
    shared_expert: ExpertSource | None = None
    frozen_experts: list[int] = field(default_factory=lambda: [0])
    """Routed experts that keep the original FFN and never train (copy variant: [0]; shared variant: [])."""
    noise_std: float = 0.0
    seed: int = 0
    router_init: str = "zeros"
    base_sha256: dict[str, str] = field(default_factory=dict)
    """sha256 of the dense checkpoint files the MoE was made from."""
    base_architecture: str = ""

    def __post_init__(self):
        if self.variant not in ("copy", "shared"):
            raise DeltaMoEError(f"upcycle plan: variant must be 'copy' or 'shared', got {self.variant!r}")
        if self.num_experts < 2 and self.variant == "copy":
            raise DeltaMoEError(f"upcycle plan: num_experts ({self.num_experts}) must be at least 2")
        if not 1 <= self.topk <= self.num_experts:
            raise DeltaMoEError(f"upcycle plan: topk ({self.topk}) must be between 1 and num_experts ({self.num_experts})")
        if len(self.routed_experts) != self.num_experts:
            raise DeltaMoEError(
                f"upcycle plan: {len(self.routed_experts)} routed expert sources for num_experts ({self.num_experts})"
            )
        self.routed_experts = [e if isinstance(e, ExpertSource) else ExpertSource(**e) for e in self.routed_experts]
        if isinstance(self.shared_expert, dict):
            self.shared_expert = ExpertSource(**self.shared_expert)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / PLAN_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "UpcyclePlan":
        path = Path(folder) / PLAN_FILE
        if not path.exists():
            raise DeltaMoEError(f"{path}: missing (is {folder} an upcycled DeltaMoE checkpoint?)")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise DeltaMoEError(f"{path}: not a valid upcycle plan: {e}") from None


def copy_plan(*, num_experts: int, topk: int, ffn_hidden_size: int, **kwargs) -> UpcyclePlan:
    """The MoE-LPR plan: every routed expert is a full copy of the FFN; expert 0 stays frozen."""
    return UpcyclePlan(
        variant="copy",
        num_experts=num_experts,
        topk=topk,
        ffn_hidden_size=ffn_hidden_size,
        routed_experts=[ExpertSource(ffn_start=0, ffn_stop=ffn_hidden_size) for _ in range(num_experts)],
        frozen_experts=[0],
        **kwargs,
    )
