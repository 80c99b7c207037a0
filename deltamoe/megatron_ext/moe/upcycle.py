"""Upcycling a dense Megatron state dict into an MoE state dict: a pure function of (dense tensors, plan).

Two variants, both preserving the dense model's function exactly at step 0 (logits equal in float32):

**copy** (MoE-LPR, Zhou et al. 2024, arXiv:2408.11396; sparse upcycling, Komatsuzaki et al. 2022, arXiv:2212.05055):
every routed expert is a copy of the FFN; expert 0 stays frozen as the original FFN, experts 1..E-1 learn the new
languages. The MoE output is sum_{i in top-k} p_i * FFN(x) with the renormalised top-k weights summing to 1
(`moe_router_score_function=softmax`, softmax over the chosen logits), so it equals FFN(x) for ANY router: the default
zero router (uniform softmax) and a seeded `normal` router both preserve the function. `noise_std` adds seeded
Gaussian noise to the copies 1..E-1 (never to expert 0), which breaks exactness by design.

**shared** (the shared-expert upcycling of zjwang21/Megatron-LM-MoELPR, with the granular experts of "Upcycling
Large Language Models into Mixture of Experts", He et al. 2024, arXiv:2410.07524): the FFN becomes an always-on,
frozen shared expert, and the E routed experts are granular slices of it (granularity G: expert e takes intermediate
rows [(e mod G) * F/G, (e mod G + 1) * F/G) of gate/up and the same columns of down).
- Exactness of the shared path: megatron's `moe_shared_expert_gate` multiplies the shared expert by
  sigmoid(x . w_gate). We zero w_gate (sigmoid(0) = 1/2) and double the shared expert's down-projection; both factors
  are powers of two, so 1/2 * (2 W_down) h is bit-identical to W_down h. This is also exactly Qwen2-MoE's shared expert
  convention (converters/hf_upcycle.py), so export is a rename and the plan's `fc2_scale = 2` tells graft to give the
  shared expert 2x the down-projection delta. The gate stays trainable so the model can learn to re-weight the
  original FFN against the new experts.
- Exactness of the routed path: megatron's gate sits on the shared expert, so the routed contribution has to be zero
  at step 0 by itself. We zero-initialise the routed experts' down-projections (`fc2_scale = 0` in the plan), the
  zero-initialised-residual-branch recipe of ReZero (Bachlechner et al. 2020) and LoRA's zero B (Hu et al. 2021): the
  routed experts start as FFN-slice feature detectors (gate/up copied) with a learned read-out, the output is exactly
  FFN(x) for any router, and the first optimizer step moves only the down-projections (gate/up and router gradients
  are zero while the read-out is zero). The granular scaling rule of arXiv:2410.07524 (multiply the routed output by
  G when the softmax runs after top-k, as megatron's upcycling_utils does with G^(1/3) on each of gate, up and down)
  would go on the down-projection only, because SiLU is not positively homogeneous (G^(1/3) on the gate input only
  approximates); with the zero read-out that factor is 0 * G = 0, so the plan records fc2_scale = 0.

The function maps *global* megatron names at TP=1 (local spec, SequentialMLP: `mlp.experts.local_experts.{e}`).
torch_dist gives SequentialMLP and Transformer Engine's grouped experts the same checkpoint keys, so the saved MoE
loads into either (in megatron-core 0.19.2 the local spec builds SequentialMLP even with moe_grouped_gemm=True; the
grouped kernel is TE's TEGroupedMLP).
"""

from __future__ import annotations

import re

import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.megatron_ext.moe.plan import ExpertSource, UpcyclePlan, copy_plan

SHARED_EXPERT_GATE_COMPENSATION = 2.0
"""1 / sigmoid(0): the factor on the shared expert's down-projection that cancels its zero gate."""

ROUTER_INITS = ("zeros", "normal")
_DENSE_MLP = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.linear_fc([12])\.weight$")
_ANY_MOE = re.compile(r"\.mlp\.(router|experts|shared_experts)\.")


def router_init_label(router_init: str, router_init_std: float) -> str:
    """How the router was initialised, as recorded in the plan ("zeros" or "normal(std=0.02)")."""
    if router_init not in ROUTER_INITS:
        raise DeltaMoEError(f"router init must be one of {ROUTER_INITS}, got {router_init!r}")
    return "zeros" if router_init == "zeros" else f"normal(std={router_init_std:g})"


def build_plan(*, variant: str, num_experts: int, topk: int, ffn_hidden_size: int, granularity: int = 1,
               noise_std: float = 0.0, seed: int = 0, router_init: str = "zeros", router_init_std: float = 0.02,
               base_sha256: dict | None = None, base_architecture: str = "",
               expert_model_parallel_size: int = 1) -> UpcyclePlan:
    """Validate the user's choices and describe every expert's source (the record graft and export read)."""
    if num_experts < 2:
        raise DeltaMoEError(f"--num-experts ({num_experts}) must be at least 2 (one frozen original + new experts)")
    if not 1 <= topk <= num_experts:
        raise DeltaMoEError(f"--topk ({topk}) must be between 1 and --num-experts ({num_experts})")
    if topk == 1:
        # megatron refuses top-1 with softmax after top-k (the weight would be 1 and the router would get no
        # gradient); with softmax before top-k the weight p < 1 scales the expert, so step 0 would not be the dense model.
        raise DeltaMoEError("--topk 1 is not supported: megatron routes top-1 with softmax before top-k, whose weight "
                            "(< 1) scales the expert output, so the MoE would not start as the dense model; use --topk >= 2")
    if expert_model_parallel_size < 1 or num_experts % expert_model_parallel_size:
        raise DeltaMoEError(
            f"--num-experts ({num_experts}) must be divisible by --expert-parallel-size ({expert_model_parallel_size})"
        )
    if noise_std < 0 or router_init_std < 0:
        raise DeltaMoEError(f"--noise-std ({noise_std}) and --router-init-std ({router_init_std}) must be >= 0")
    common = dict(noise_std=noise_std, seed=seed, router_init=router_init_label(router_init, router_init_std),
                  base_sha256=dict(base_sha256 or {}), base_architecture=base_architecture)
    if variant == "copy":
        if granularity != 1:
            raise DeltaMoEError(f"--granularity {granularity} applies to the shared variant; the copy variant copies the whole FFN")
        return copy_plan(num_experts=num_experts, topk=topk, ffn_hidden_size=ffn_hidden_size, **common)
    if variant != "shared":
        raise DeltaMoEError(f"--variant must be 'copy' or 'shared', got {variant!r}")
    if granularity < 1 or ffn_hidden_size % granularity:
        raise DeltaMoEError(f"--granularity ({granularity}) must divide the FFN intermediate size ({ffn_hidden_size})")
    width = ffn_hidden_size // granularity
    routed = [ExpertSource(ffn_start=(e % granularity) * width, ffn_stop=(e % granularity + 1) * width,
                           fc1_scale=1.0, fc2_scale=0.0) for e in range(num_experts)]
    shared = ExpertSource(ffn_start=0, ffn_stop=ffn_hidden_size, fc1_scale=1.0, fc2_scale=SHARED_EXPERT_GATE_COMPENSATION)
    return UpcyclePlan(variant="shared", num_experts=num_experts, topk=topk, granularity=granularity,
                       ffn_hidden_size=ffn_hidden_size, routed_experts=routed, shared_expert=shared, frozen_experts=[],
                       **common)


def expert_width(plan: UpcyclePlan) -> int:
    widths = {e.ffn_stop - e.ffn_start for e in plan.routed_experts}
    if len(widths) != 1:
        raise DeltaMoEError(f"upcycle plan: routed experts have different widths {sorted(widths)}; megatron needs one")
    return widths.pop()


def moe_settings_for(plan: UpcyclePlan, *, grouped_gemm: bool = False):
    """The MoESettings (model_builder) of the MoE a plan describes."""
    from deltamoe.megatron_ext.runtime.model_builder import MoESettings

    shared = plan.shared_expert
    return MoESettings(
        num_experts=plan.num_experts, topk=plan.topk, grouped_gemm=grouped_gemm, ffn_hidden_size=expert_width(plan),
        shared_expert_intermediate_size=(shared.ffn_stop - shared.ffn_start) if shared else None,
        shared_expert_gate=shared is not None,
    )


def check_dense(dense_sd: dict[str, torch.Tensor], source: str = "dense checkpoint") -> None:
    moe_names = [k for k in dense_sd if _ANY_MOE.search(k)]
    if moe_names:
        raise DeltaMoEError(f"{source} is already an MoE (it has {moe_names[0]!r}); upcycle a dense checkpoint")


def _expert(fc1: torch.Tensor, fc2: torch.Tensor, src: ExpertSource, ffn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 = [gate; up] rows of the slice, fc2 = its columns, each times its scale (in the weights' dtype)."""
    if not 0 <= src.ffn_start < src.ffn_stop <= ffn:
        raise DeltaMoEError(f"upcycle plan: slice [{src.ffn_start}, {src.ffn_stop}) is outside the FFN ({ffn})")
    gate, up = fc1[:ffn], fc1[ffn:]
    rows = slice(src.ffn_start, src.ffn_stop)
    new_fc1 = torch.cat([gate[rows], up[rows]]) * src.fc1_scale
    new_fc2 = fc2[:, rows] * src.fc2_scale
    return new_fc1.contiguous(), new_fc2.contiguous()


def upcycle_state_dict(dense_sd: dict[str, torch.Tensor], plan: UpcyclePlan, num_layers: int) -> dict[str, torch.Tensor]:
    """Dense megatron tensors -> MoE megatron tensors (global names, TP=1). Non-tensor entries are dropped.

    Every dense FFN tensor must be present for every layer; everything else is carried over unchanged (cloned).
    Random draws (router `normal` init, noise) come from one generator seeded with `plan.seed`, in a fixed order
    (layer, then router, then experts), so the result depends only on the inputs.
    """
    dense = {k: v for k, v in dense_sd.items() if isinstance(v, torch.Tensor)}
    check_dense(dense)
    ffn = plan.ffn_hidden_size
    out: dict[str, torch.Tensor] = {}
    fc: dict[tuple[int, str], torch.Tensor] = {}
    for name, tensor in dense.items():
        match = _DENSE_MLP.match(name)
        if match:
            fc[(int(match.group(1)), match.group(2))] = tensor
        elif ".mlp." in name:
            raise DeltaMoEError(f"dense tensor {name!r} has no MoE counterpart (biases in the FFN are not supported)")
        else:
            out[name] = tensor.clone()
    generator = torch.Generator().manual_seed(plan.seed)
    router_std = _router_std(plan.router_init)
    for i in range(num_layers):
        if (i, "1") not in fc or (i, "2") not in fc:
            raise DeltaMoEError(f"dense state dict lacks decoder.layers.{i}.mlp.linear_fc1/linear_fc2.weight")
        fc1, fc2 = fc.pop((i, "1")), fc.pop((i, "2"))
        if fc1.shape[0] != 2 * ffn or fc2.shape[1] != ffn:
            raise DeltaMoEError(
                f"decoder.layers.{i}.mlp: FFN shapes {tuple(fc1.shape)} / {tuple(fc2.shape)} do not match the plan's "
                f"ffn_hidden_size {ffn} (gated MLP: fc1 has 2 x {ffn} rows)"
            )
        prefix = f"decoder.layers.{i}.mlp"
        hidden = fc1.shape[1]
        router = torch.zeros(plan.num_experts, hidden, dtype=torch.float32)
        if router_std is not None:
            router.normal_(0.0, router_std, generator=generator)
        out[f"{prefix}.router.weight"] = router.to(fc1.dtype)
        for e, src in enumerate(plan.routed_experts):
            w1, w2 = _expert(fc1, fc2, src, ffn)
            if plan.noise_std > 0 and e not in plan.frozen_experts:
                w1 = w1 + (torch.randn(w1.shape, generator=generator) * plan.noise_std).to(w1.dtype)
                if src.fc2_scale != 0:  # a zero read-out stays zero, so the shared variant keeps its exactness
                    w2 = w2 + (torch.randn(w2.shape, generator=generator) * plan.noise_std).to(w2.dtype)
            out[f"{prefix}.experts.local_experts.{e}.linear_fc1.weight"] = w1
            out[f"{prefix}.experts.local_experts.{e}.linear_fc2.weight"] = w2
        if plan.shared_expert is not None:
            w1, w2 = _expert(fc1, fc2, plan.shared_expert, ffn)
            out[f"{prefix}.shared_experts.linear_fc1.weight"] = w1
            out[f"{prefix}.shared_experts.linear_fc2.weight"] = w2
            out[f"{prefix}.shared_experts.gate_weight"] = torch.zeros(1, hidden, dtype=fc1.dtype)
    if fc:
        extra = sorted(f"decoder.layers.{i}.mlp.linear_fc{n}.weight" for i, n in fc)
        raise DeltaMoEError(f"dense state dict has FFN tensors beyond num_layers ({num_layers}): {extra[0]}")
    return out


def _router_std(label: str) -> float | None:
    if label == "zeros":
        return None
    match = re.fullmatch(r"normal\(std=([0-9.eE+-]+)\)", label)
    if not match:
        raise DeltaMoEError(f"upcycle plan: router_init {label!r} is neither 'zeros' nor 'normal(std=...)'")
    return float(match.group(1))
