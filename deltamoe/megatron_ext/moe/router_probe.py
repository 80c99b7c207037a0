"""Per-token language context for megatron's routers: capture their logits, add language-prior losses, mask by language.

`install_router_probe(model, probe)` wraps the `routing(logits)` method of every `TopKRouter` in the model (megatron
calls `gating -> routing` in `TopKRouter.forward`), so every MoE layer hands us its router logits [s, b, E] before
top-k. From those logits (the full softmax over all E experts, never a softmax of already-normalised top-k weights)
the probe
- masks experts outside each token's language allocation to -inf before top-k (`--expert-allocation by-language`,
  allocation.mask_router_logits);
- attaches MoE-LPR's language-prior loss (stage 2) and/or the allocation loss to the routing probabilities with
  megatron's `MoEAuxLossAutoScaler`, the mechanism megatron's own load-balancing loss uses: the gradient flows into
  the router of that layer at backward time, scaled by the schedule's loss scale (1/num_microbatches, or the
  per-token scale), so it works with any pipeline layout and needs no graph kept across layers. The paper's γ
  (DESIGN.md decision 13): each of the L MoE layers adds (coeff / L) * loss_layer, so the total is
  coeff * mean over MoE layers of the per-token mean (routing_losses.lpr_loss), as MoE-LPR's reference code
  computes it and whatever the pipeline split; `layer_reduction="sum"` (`--router-loss-layer-reduction sum`)
  instead adds coeff * loss_layer per layer, the per-layer sum of zjwang21/Megatron-LM-MoELPR (L times larger).
  Every layer of an upcycled checkpoint is an MoE layer (the trainer refuses --moe-layer-freq), so L = num_layers;
- accumulates, without gradient and in training forwards only, the mean router probability of expert 0 per layer
  and language (the metric that shows stage 2 working: original-language tokens move back to the frozen original FFN).

The forward step sets the batch context (`probe.set_batch(lang_ids, original_mask)`, both [b, s]) before calling the
model. With sequence parallelism a router sees only its tensor-parallel rank's chunk of the sequence, so the
context is chunked the same way; context parallelism reorders tokens and is refused.

Activation recomputation (`--recompute-granularity full`, or recomputed MoE modules) runs a layer's forward twice:
first without gradient, then again inside the backward pass, where the losses are attached. By then a pipeline
schedule (1F1B) has already set the context of later micro-batches, so a router's context is kept from its
no-gradient forward and replayed, first in first out (the schedule runs backward passes in forward order), when that
forward is recomputed; metrics count the first pass only.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.megatron_ext.internals import attach_router_loss, wrap_router_routing
from deltamoe.megatron_ext.moe.allocation import allowed_for_tokens, mask_router_logits
from deltamoe.megatron_ext.moe.routing_losses import allocation_loss, lpr_loss


SUMS_MIN_WIDTH = 4
"""RouterProbe.sums' last dimension holds at least the four router-loss counters of row 2."""


@dataclass(kw_only=True)
class ProbeSettings:
    num_languages: int
    num_layers: int
    """Global number of transformer layers (router.layer_number is 1-based and global)."""
    lpr_loss_coeff: float = 0.0
    """γ: the LPR loss's weight in the objective, L_lpr being a mean over MoE layers (or a sum, see layer_reduction)."""
    allocation_loss_coeff: float = 0.0
    layer_reduction: str = "mean"
    """mean: the router losses are means over the MoE layers (the paper's γ); sum: per-layer sums."""
    allocation_mask: torch.Tensor | None = None
    """[num_languages, E] bool: experts each language may use (None: no allocation)."""
    mask_by_language: bool = False
    """Hard routing constraint: forbidden experts' logits set to -inf before top-k."""

    def __post_init__(self):
        if self.lpr_loss_coeff < 0 or self.allocation_loss_coeff < 0:
            raise DeltaMoEError("--lpr-loss-coeff and --allocation-loss-coeff must be >= 0")
        if (self.mask_by_language or self.allocation_loss_coeff > 0) and self.allocation_mask is None:
            raise DeltaMoEError("--expert-allocation by-language and --allocation-loss-coeff need --expert-allocation-map")
        if self.layer_reduction not in ("mean", "sum"):
            raise DeltaMoEError(f"--router-loss-layer-reduction must be mean or sum, got {self.layer_reduction!r}")

    @property
    def layer_weight(self) -> float:
        """Each MoE layer's share of a router loss coefficient: 1 / L for the mean over layers, 1 for the sum."""
        return 1.0 / self.num_layers if self.layer_reduction == "mean" else 1.0


@dataclass(frozen=True)
class _Context:
    """What one router needs about the tokens it routes, sequence-first like its logits."""

    lang: torch.Tensor
    """[s_local, b] lang_id of the positions this router sees (its sequence-parallel chunk)."""
    mask: torch.Tensor
    """[s_local, b] F(t) for those positions."""
    share: float
    """The chunk's share of the micro-batch's positions (1 without sequence parallelism)."""
    batch_lang: torch.Tensor
    """[s, b] the whole micro-batch's lang_ids and F(t): loss normalisers count the whole micro-batch."""
    batch_mask: torch.Tensor


@dataclass
class RouterProbe:
    settings: ProbeSettings
    lang_ids: torch.Tensor | None = None          # [s, b] for the current micro-batch
    original_mask: torch.Tensor | None = None     # [s, b] F(t), float
    sums: torch.Tensor | None = None
    """Running sums since the last report, kept on the model's device (no host sync per layer):
    [0] expert-0 probability and [1] token count, each [layers, languages]; [2, layer, 0] sum of that layer's LPR
    losses over micro-batches, [2, layer, 1] number of micro-batches (a sequence-parallel chunk counts as its share);
    [2, 0, 2] the router losses added to the objective (coefficients and layer weights applied, summed over layers and
    micro-batches), [2, 0, 3] micro-batches (first-layer calls)."""

    replay: dict = field(default_factory=lambda: defaultdict(deque))
    """Per layer: contexts of no-gradient training forwards, waiting for their recomputation."""

    def reset(self) -> None:
        self.sums = None

    def end_iteration(self) -> None:
        """Every recomputation of the iteration has run (its backward passes are done)."""
        self.replay.clear()

    def _sums(self, device) -> torch.Tensor:
        if self.sums is None:
            s = self.settings
            self.sums = torch.zeros(3, s.num_layers, max(s.num_languages, SUMS_MIN_WIDTH), dtype=torch.float64,
                                    device=device)
        return self.sums

    def set_batch(self, lang_ids: torch.Tensor, original_mask: torch.Tensor) -> None:
        """lang_ids [b] or [b, s] (per sample or per token), original_mask [b, s]; stored sequence-first like the router."""
        if lang_ids.dim() == 1:
            lang_ids = lang_ids.unsqueeze(1).expand_as(original_mask)
        self.lang_ids = lang_ids.t().contiguous()
        self.original_mask = original_mask.t().contiguous().float()

    def clear_batch(self) -> None:
        self.lang_ids = self.original_mask = None

    def _local_context(self, router, seq_len: int) -> _Context:
        """This router's chunk of the current batch context."""
        lang, mask = self.lang_ids, self.original_mask
        if lang is None:
            raise DeltaMoEError("router probe: the forward step did not set the batch's language context")
        if router.config.context_parallel_size > 1:
            raise DeltaMoEError("per-language routing (metrics, LPR, allocation) does not support context parallelism yet")
        if lang.shape[0] != seq_len:
            tp = router.tp_group.size()
            if not router.config.sequence_parallel or lang.shape[0] != seq_len * tp:
                raise DeltaMoEError(f"router probe: router sees {seq_len} positions, the batch has {lang.shape[0]}")
            rank = router.tp_group.rank()
            lang, mask = lang[rank * seq_len:(rank + 1) * seq_len], mask[rank * seq_len:(rank + 1) * seq_len]
        device = router.weight.device
        return _Context(lang=lang.to(device), mask=mask.to(device), share=seq_len / self.lang_ids.shape[0],
                        batch_lang=self.lang_ids.to(device), batch_mask=self.original_mask.to(device))

    def _context(self, router, seq_len: int) -> tuple[_Context, bool]:
        """The context of the tokens the router sees now, and whether this forward recomputes an earlier one."""
        layer = router.layer_number - 1
        if router.training and torch.is_grad_enabled() and self.replay[layer]:
            return self.replay[layer].popleft(), True
        context = self._local_context(router, seq_len)
        if router.training and not torch.is_grad_enabled():  # checkpointed: recomputed in the backward pass
            self.replay[layer].append(context)
        return context, False

    def routing(self, router, original_routing, logits: torch.Tensor, *args, **kwargs):
        s = self.settings
        context, recomputed = self._context(router, logits.shape[0])
        lang, mask = context.lang, context.mask
        if s.mask_by_language:
            logits = mask_router_logits(logits, lang, s.allocation_mask.to(logits.device))
        probs, routing_map = original_routing(logits, *args, **kwargs)
        if not router.training:
            # Only training forwards count: megatron's validation passes (--eval-interval) run between training
            # iterations, and their tokens would otherwise enter the next training report, whose LM loss and token
            # counts (LanguageMetrics.add_lm) are training-only. The mask above still applies (tags given).
            return probs, routing_map
        layer = router.layer_number - 1
        sums = self._sums(logits.device)
        if not recomputed:
            with torch.no_grad():
                p0 = torch.softmax(logits.float(), dim=-1)[..., 0].reshape(-1).double()
                flat_lang = lang.reshape(-1).long()
                valid = (flat_lang >= 0).double()
                index = flat_lang.clamp(min=0)
                sums[0, layer].index_add_(0, index, p0 * valid)
                sums[1, layer].index_add_(0, index, valid)
        if torch.is_grad_enabled():
            aux = None
            if layer == 0:
                sums[2, 0, 3] += context.share  # a sequence-parallel chunk counts as its share
            if s.lpr_loss_coeff > 0:
                lpr = (lpr_loss(logits, mask, 0, from_logits=True, reduction="sum")
                       / _micro_batch_count(context.batch_mask))
                sums[2, layer, 0] += lpr.detach().double()
                sums[2, layer, 1] += context.share
                aux = (s.lpr_loss_coeff * s.layer_weight) * lpr
            if s.allocation_loss_coeff > 0:
                allocation = s.allocation_mask.to(logits.device)
                constrained = (~allowed_for_tokens(context.batch_lang, allocation).all(dim=-1)).float()
                alloc = (allocation_loss(logits, lang, allocation, from_logits=True, reduction="sum")
                         / _micro_batch_count(constrained))
                weighted = (s.allocation_loss_coeff * s.layer_weight) * alloc
                aux = weighted if aux is None else aux + weighted
            if aux is not None:
                sums[2, 0, 2] += aux.detach().double()
                probs = _attach(router, probs, aux)
        return probs, routing_map


def _micro_batch_count(weight: torch.Tensor) -> torch.Tensor:
    """The number of tokens a router loss averages over: the whole micro-batch's, also on a sequence-parallel chunk.

    Each tensor-parallel rank adds (its chunk's sum) / (the micro-batch's count), and megatron sums router gradients
    over the tensor-parallel group (the router weight is marked `sequence_parallel`, TopKRouter.reset_parameters in
    moe/router.py), so the loss is the micro-batch's mean at any TP size, not the sum of per-chunk means (which
    would scale γ by the TP size). Megatron's own load-balancing loss splits the same way (partial sums per chunk).
    """
    return weight.sum().clamp(min=1.0)


def _attach(router, probs: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Add `loss` to the training objective through megatron's aux-loss autograd hook (as its load-balancing loss)."""
    if router.config.calculate_per_token_loss:
        # As megatron's attach_and_log_load_balancing_loss: per-token mode divides every gradient by the global token
        # count, so the router loss is pre-multiplied by this rank's token count to keep the same effective weight.
        loss = loss * probs.shape[0] * router.tp_cp_group.size()
    return attach_router_loss(probs, loss)


def routers(model) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def install_router_probe(model_chunks, probe: RouterProbe) -> int:
    """Wrap every router's `routing` in the model chunks; returns how many routers were wrapped."""
    count = 0
    for chunk in model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]:
        for router in routers(chunk):
            if getattr(router, "_deltamoe_probe", None) is not None:
                raise DeltaMoEError("router probe already installed on this model")
            wrap_router_routing(router, probe.routing)
            router._deltamoe_probe = probe
            count += 1
    return count
