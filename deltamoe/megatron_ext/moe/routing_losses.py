"""Router losses that encode language priors, and per-language routing metrics. Plain torch, no megatron import.

Language-prior loss (MoE-LPR stage 2; Zhou et al. 2024, arXiv:2408.11396):

    L_lpr = -(1/N) * sum_t F(t) * log G_0(t),      N = sum_t F(t)

F(t) = 1 for tokens of original-language samples, G(t) = softmax of the router logits over ALL experts (before
top-k), expert 0 = the frozen original FFN. Normaliser: the number of tokens with F(t) = 1, as in MoE-LPR's code
(zjwang21/MoE-LPR, transformers/.../modeling_qwen2.py `lpr_loss_func`: CrossEntropyLoss averaged over the rows the
language mask selects); a batch without original-language tokens gives 0, not NaN. That code feeds the softmax
probabilities into CrossEntropyLoss, which applies a second (log-)softmax to them; we take log G_0 of the real
probabilities. It also averages over layers (`torch.stack` of every layer's router weights, then one mean over all
selected rows), and so does DeltaMoE (DESIGN.md decision 13, "the paper's γ"): the objective is
L_lm + γ * mean over MoE layers of L_lpr, so γ = 0.1 is the paper's γ. `lpr_loss_over_layers` defaults to that mean;
reduction="sum" is the per-layer sum of zjwang21/Megatron-LM-MoELPR, whose routers each attach the full coefficient
(L times the mean; the trainer's `--router-loss-layer-reduction sum`). The trainer applies the convention per layer
(router_probe.py: each layer adds coeff / L times its loss), the allocation loss likewise.

Allocation loss (language-allocated experts, allocation.py): the same prior for a SET of experts per language,

    L_alloc = -(1/N) * sum_t log sum_{e in A(lang(t))} G_e(t),

over the N tokens whose language has a proper allocation (not every expert) and that `token_mask` keeps. With
A = {en: {0}} and token_mask = F it equals L_lpr exactly.

Numerics: from logits (from_logits=True) the log mass is logsumexp(allowed logits) - logsumexp(all logits), exact
and stable in any dtype. From probabilities the mass is clamped below at PROB_EPS = 1e-12 before the log so a mass
that underflowed to 0 gives a large finite loss (-log 1e-12 = 27.6) instead of inf/NaN; below the clamp the gradient
is 0. Both paths compute in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltamoe.common.errors import DeltaMoEError

PROB_EPS = 1e-12


def _flat(scores: torch.Tensor, per_token: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.shape[:-1] != per_token.shape:
        raise DeltaMoEError(
            f"{name} shape {tuple(per_token.shape)} must equal the router scores' token shape {tuple(scores.shape[:-1])}"
        )
    return scores.reshape(-1, scores.shape[-1]).float(), per_token.reshape(-1)


def log_mass(scores: torch.Tensor, allowed: torch.Tensor, *, from_logits: bool = False) -> torch.Tensor:
    """log sum_{e allowed} G_e(t) for each token: scores [T, E] (probabilities, or logits if from_logits), allowed [T, E] bool."""
    if from_logits:
        return torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1) - torch.logsumexp(scores, dim=-1)
    return torch.log((scores * allowed).sum(dim=-1).clamp(min=PROB_EPS))


def _reduce(per_token_loss: torch.Tensor, weight: torch.Tensor, reduction: str) -> torch.Tensor:
    total = (per_token_loss * weight).sum()
    if reduction == "sum":
        return total  # the caller divides by a count gathered across ranks (data or context parallel)
    if reduction == "mean":
        return total / weight.sum().clamp(min=1.0)
    raise DeltaMoEError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def lpr_loss(router_probs: torch.Tensor, original_mask: torch.Tensor, expert_index: int = 0, *,
             from_logits: bool = False, reduction: str = "mean") -> torch.Tensor:
    """MoE-LPR's language-prior loss for one MoE layer.

    router_probs: [..., E] softmax over all experts before top-k (router logits if from_logits=True).
    original_mask: [...] F(t), 1 for original-language tokens (the data's `original_language_mask`).
    reduction="mean" divides by sum F(t); "sum" returns the unnormalised sum.
    Both must share the token layout: a Megatron router sees [S*B, E] in [s, b] order, so pass the batch's
    original_language_mask [B, S] transposed (`.t()`), or per-sample flags through allocation.token_lang_ids.
    """
    scores, mask = _flat(router_probs, original_mask, "original_mask")
    if not 0 <= expert_index < scores.shape[-1]:
        raise DeltaMoEError(f"expert_index {expert_index} outside 0..{scores.shape[-1] - 1}")
    if from_logits:
        log_g0 = torch.log_softmax(scores, dim=-1)[:, expert_index]
    else:
        log_g0 = torch.log(scores[:, expert_index].clamp(min=PROB_EPS))
    return _reduce(-log_g0, mask.to(log_g0.dtype), reduction)


def lpr_loss_over_layers(per_layer: Sequence[torch.Tensor], original_mask: torch.Tensor, expert_index: int = 0, *,
                         from_logits: bool = False, reduction: str = "mean") -> torch.Tensor:
    """lpr_loss of every MoE layer, averaged over layers ("mean", MoE-LPR's code, the default) or summed ("sum")."""
    if not per_layer:
        raise DeltaMoEError("lpr_loss_over_layers: no MoE layer router scores given")
    losses = torch.stack([lpr_loss(p, original_mask, expert_index, from_logits=from_logits) for p in per_layer])
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    raise DeltaMoEError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _allowed(lang_ids: torch.Tensor, allocation) -> torch.Tensor:
    from deltamoe.megatron_ext.moe.allocation import (
        ExpertAllocation,
        allowed_for_tokens,
    )

    mask = allocation.mask() if isinstance(allocation, ExpertAllocation) else allocation
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise DeltaMoEError(f"allocation must be an ExpertAllocation or a [num_languages, E] bool mask, got {mask.dtype} {tuple(mask.shape)}")
    return allowed_for_tokens(lang_ids, mask)


def allocation_loss(router_probs: torch.Tensor, lang_ids: torch.Tensor, allocation, *, token_mask: torch.Tensor | None = None,
                    from_logits: bool = False, reduction: str = "mean") -> torch.Tensor:
    """-mean over constrained tokens of log(router mass on the token's allowed experts), for one MoE layer.

    router_probs: [..., E] (logits if from_logits). lang_ids: [...] per-token lang_id (-1: no allocation).
    allocation: ExpertAllocation or its [num_languages, E] bool mask. token_mask: [...] extra 0/1 weight (e.g. the
    LM loss mask or F(t)). Tokens whose allowed set is every expert contribute nothing and are not counted.
    """
    scores, lang_flat = _flat(router_probs, lang_ids, "lang_ids")
    allowed = _allowed(lang_flat, allocation)
    if allowed.shape[-1] != scores.shape[-1]:
        raise DeltaMoEError(f"allocation covers {allowed.shape[-1]} experts, the router {scores.shape[-1]}")
    weight = (~allowed.all(dim=-1)).to(torch.float32)
    if token_mask is not None:
        weight = weight * _flat(router_probs, token_mask, "token_mask")[1].to(torch.float32)
    return _reduce(-log_mass(scores, allowed, from_logits=from_logits), weight, reduction)


@torch.no_grad()
def routing_metrics(per_layer: Sequence[torch.Tensor], lang_ids: torch.Tensor, languages: Sequence[str], *,
                    allocation=None, token_mask: torch.Tensor | None = None, expert_index: int = 0,
                    from_logits: bool = False) -> dict[str, dict]:
    """Per language, per layer: mean router probability on expert `expert_index` and on the allocated experts.

    Returns {language: {"num_tokens": n, "expert0_mass": [per layer], "allocated_mass": [per layer]}} for the
    languages present in the batch ("allocated_mass" only with an allocation). Values are Python floats for logging.
    """
    out: dict[str, dict] = {}
    lang_flat = lang_ids.reshape(-1)
    keep = torch.ones_like(lang_flat, dtype=torch.bool) if token_mask is None else token_mask.reshape(-1).bool()
    probs_per_layer = [
        torch.softmax(p.reshape(-1, p.shape[-1]).float(), dim=-1) if from_logits else p.reshape(-1, p.shape[-1]).float()
        for p in per_layer
    ]
    allowed = _allowed(lang_flat, allocation) if allocation is not None else None
    for lang_id, language in enumerate(languages):
        sel = keep & (lang_flat == lang_id)
        n = int(sel.sum())
        if n == 0:
            continue
        entry = {"num_tokens": n, "expert0_mass": [float(p[sel, expert_index].mean()) for p in probs_per_layer]}
        if allowed is not None:
            entry["allocated_mass"] = [float((p[sel] * allowed[sel]).sum(-1).mean()) for p in probs_per_layer]
        out[language] = entry
    return out
