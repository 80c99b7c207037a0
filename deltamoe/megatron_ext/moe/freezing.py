"""Which parameters train in each DeltaMoE stage (MoE-LPR, Zhou et al. 2024, arXiv:2408.11396).

- stage 1 (new-language continued pre-training): the routed experts that are not frozen in the upcycle plan
  (copy variant: experts 1..E-1; shared variant: every routed expert), the routers, and the shared-expert gate.
  Everything else stays frozen: embeddings, attention, norms, the output layer, expert 0 (the original FFN) on
  whichever expert-parallel rank holds it, and the shared expert (the original FFN in the shared variant).
- stage 2 (review with original-language replay): routers only, plus the shared-expert gate, which is the shared
  variant's router for the original FFN (zjwang21/Megatron-LM-MoELPR trains that gate in its stage 2 as well).

How the frozen experts stay bit-identical: by `requires_grad = False` on their own parameter tensors, set in the model
provider *before* megatron wraps the model. Megatron's DDP then leaves them out of its gradient buffers and the
(distributed) optimizer never sees them, so neither Adam's moments nor decoupled weight decay (which moves a weight
even when its gradient is zero) can touch them. That needs one tensor per expert, which every expert module DeltaMoE
uses has: megatron's SequentialMLP (`experts.local_experts.{i}.linear_fc1.weight`) and the fast spec's grouped
experts (the same names), on local or TE linears. Transformer Engine's TEGroupedMLP has one GroupedLinear weight per
GEMM (`experts.linear_fc1.weight{i}`) but decides weight gradients for all of them from `weight0.requires_grad`
(TE `_GroupedLinear`), so a frozen expert 0 would silently stop its rank's other experts from training: the TE spec
therefore builds DeltaMoE's experts on TE linears (runtime/specs.py), and a GroupedLinear whose weights are frozen
differently is refused here. A gradient mask on a stacked [E, ...] weight was rejected: it would also have to undo weight decay and the
moment updates every step, and with the distributed optimizer the fp32 master shard would still drift. So a stacked
layout (TE's `moe_single_grouped_weight`) is refused with an error instead of silently training expert 0.

Experts that receive no tokens by design stay bit-identical too, at any weight decay: with `--expert-allocation
by-language`, an expert that no language of the stage's data blend may use (the demo's English expert 5 in a stage 1
on Spanish and Russian) gets no gradient, but AdamW's decoupled weight decay would still shrink it by (1 - lr * wd)
per step. The trainer adds such experts to the frozen ones for that run (`allocation.idle_experts`), and marks the
routers weight-decay free (`internals.exempt_marked_parameters_from_weight_decay`): their rows for those experts see
-inf logits and so exactly zero gradient, and Adam's update of a zero-gradient entry is exactly zero.

Local expert j on expert-parallel rank r is global expert r * (E / EP) + j (megatron's contiguous expert placement).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from deltamoe.common.errors import DeltaMoEError

_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_TE_GROUPED = re.compile(r"\.mlp\.experts\.linear_fc[12]\.(?:weight|bias)(\d+)$")
_EXPERTS = re.compile(r"\.mlp\.experts\.")
_ROUTER = re.compile(r"\.mlp\.router\.")
_SHARED_GATE = re.compile(r"\.mlp\.shared_experts\.gate_weight$")

STAGES = (1, 2)
FROZEN_EXPERT_ATTR = "deltamoe_frozen_expert"
"""Set on a frozen expert's parameter when other experts of the same checkpoint tensor train (stage 1): megatron's
fully reshardable optimizer checkpoint must then cover it too (internals.complete_frozen_expert_optimizer_state)."""


@dataclass
class FreezeReport:
    stage: int
    trainable: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    trainable_numel: int = 0
    frozen_numel: int = 0

    def summary(self) -> str:
        total = self.trainable_numel + self.frozen_numel
        share = 100.0 * self.trainable_numel / max(total, 1)
        return (f"stage {self.stage}: {len(self.trainable)} trainable tensors ({self.trainable_numel:,} parameters, "
                f"{share:.2f}%), {len(self.frozen)} frozen ({self.frozen_numel:,})")


def global_expert_index(name: str, *, ep_rank: int, num_local_experts: int) -> int | None:
    """The global expert a parameter belongs to, or None for non-expert parameters; refuses stacked expert weights."""
    match = _LOCAL_EXPERT.search(name) or _TE_GROUPED.search(name)
    if match:
        return ep_rank * num_local_experts + int(match.group(1))
    if _EXPERTS.search(name):
        raise DeltaMoEError(
            f"parameter {name!r} holds several experts in one tensor, so expert 0 cannot be frozen on its own; use "
            "per-expert weights (SequentialMLP, the fast spec, or TEGroupedMLP without moe_single_grouped_weight)"
        )
    return None


def is_trainable(name: str, *, stage: int, frozen_experts: set[int], ep_rank: int, num_local_experts: int) -> bool:
    if stage not in STAGES:
        raise DeltaMoEError(f"--deltamoe-stage must be 1 or 2, got {stage}")
    if _ROUTER.search(name) or _SHARED_GATE.search(name):
        return True
    expert = global_expert_index(name, ep_rank=ep_rank, num_local_experts=num_local_experts)
    if stage == 1 and expert is not None:
        return expert not in frozen_experts
    return False


def apply_stage_freezing(model_chunks, *, stage: int, frozen_experts, num_experts: int, ep_rank: int | None = None,
                         ep_size: int | None = None) -> FreezeReport:
    """Set requires_grad on every parameter of the (unwrapped) model chunks for `stage`. Call before DDP wrapping."""
    if ep_rank is None or ep_size is None:
        from megatron.core import parallel_state

        ep_rank = parallel_state.get_expert_model_parallel_rank()
        ep_size = parallel_state.get_expert_model_parallel_world_size()
    if num_experts % ep_size:
        raise DeltaMoEError(f"num_experts ({num_experts}) must be divisible by expert_model_parallel_size ({ep_size})")
    frozen = set(frozen_experts)
    bad = sorted(e for e in frozen if not 0 <= e < num_experts)
    if bad:
        raise DeltaMoEError(f"frozen experts {bad} are outside 0..{num_experts - 1}")
    report = FreezeReport(stage=stage)
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            train = is_trainable(name, stage=stage, frozen_experts=frozen, ep_rank=ep_rank,
                                 num_local_experts=num_experts // ep_size)
            param.requires_grad_(train)
            if not train and stage == 1 and len(frozen) < num_experts and global_expert_index(
                    name, ep_rank=ep_rank, num_local_experts=num_experts // ep_size) is not None:
                setattr(param, FROZEN_EXPERT_ATTR, True)
            (report.trainable if train else report.frozen).append(name)
            if train:
                report.trainable_numel += param.numel()
            else:
                report.frozen_numel += param.numel()
    _check_grouped_linears(chunks)
    if not any("router" in n for n in report.trainable) and report.trainable + report.frozen:
        raise DeltaMoEError("stage freezing found no router parameter: is this checkpoint an upcycled MoE?")
    return report


def _check_grouped_linears(chunks) -> None:
    """A TE GroupedLinear (weights `weight0..weight{n-1}`) must be frozen all or none (see the module docstring)."""
    groups: dict[str, set[bool]] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            match = _TE_GROUPED.search(name)
            if match:
                groups.setdefault(name[: match.start(1)], set()).add(param.requires_grad)
    mixed = sorted(prefix for prefix, flags in groups.items() if len(flags) > 1)
    if mixed:
        raise DeltaMoEError(
            f"{mixed[0]}*: a Transformer Engine GroupedLinear holds frozen and trainable experts; TE computes weight "
            "gradients for all its experts or none (from weight0), so the trainable ones would not train. Build the "
            "MoE layers with DeltaMoE's experts (--deltamoe-layer-spec te or fast) instead of megatron's TEGroupedMLP")


def _require_grad(module, inputs, output):
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)
    return output


def let_gradients_pass_frozen_embeddings(model_chunks) -> int:
    """Make a frozen embedding's output require grad, so activation recomputation still trains the layers after it.

    Megatron's full recomputation (`--recompute-granularity full`) wraps layers in a reentrant autograd Function
    (tensor_parallel.random.CheckpointFunction), whose output requires grad only if one of its inputs does; params
    inside do not count. With the embedding frozen, nothing entering the first pipeline stage's layers requires grad,
    so none of them got a gradient (measured: grad norm 0.000 for stage 1 on one process, while the second pipeline
    stage's input, received from the first, does require grad). transformers' `enable_input_require_grads` is the
    same device for adapters. Costs one activation gradient at the embedding. Returns how many hooks were added.
    """
    count = 0
    for chunk in model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]:
        embedding = getattr(chunk, "embedding", None)
        if embedding is not None and not any(p.requires_grad for p in embedding.parameters()):
            embedding.register_forward_hook(_require_grad)
            count += 1
    return count
