"""Language-prior (MoE-LPR) and allocation losses against hand-computed values, and routing metrics."""

from __future__ import annotations

import math

import pytest
import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.megatron_ext.moe.allocation import ExpertAllocation
from deltamoe.megatron_ext.moe.routing_losses import (
    allocation_loss,
    lpr_loss,
    lpr_loss_over_layers,
    routing_metrics,
)

# 3 tokens x 3 experts; tokens 0 and 2 are original-language (F = 1).
PROBS = torch.tensor([[0.50, 0.30, 0.20],
                      [0.25, 0.25, 0.50],
                      [0.10, 0.60, 0.30]])
F = torch.tensor([1.0, 0.0, 1.0])
# -(log 0.5 + log 0.1) / 2 = (0.6931471805599453 + 2.302585092994046) / 2
LPR_EXPECTED = 1.4978661367769954

# A second layer: -(log 0.8 + log 0.4) / 2 = (0.2231435513142097 + 0.916290731874155) / 2
PROBS_2 = torch.tensor([[0.80, 0.10, 0.10],
                        [0.30, 0.30, 0.40],
                        [0.40, 0.40, 0.20]])
LPR_EXPECTED_2 = 0.5697171415941824
# A third layer: -(log 0.25 + log 0.5) / 2 = (1.3862943611198906 + 0.6931471805599453) / 2
PROBS_3 = torch.tensor([[0.25, 0.50, 0.25],
                        [0.20, 0.20, 0.60],
                        [0.50, 0.25, 0.25]])
LPR_EXPECTED_3 = 1.039720770839918
# The mean over the 3 layers: (1.4978661367769954 + 0.5697171415941824 + 1.039720770839918) / 3
LPR_MEAN_3_LAYERS = 1.035768016403699


def test_lpr_loss_equals_hand_computation():
    assert lpr_loss(PROBS, F).item() == pytest.approx(LPR_EXPECTED, rel=1e-6)
    assert lpr_loss(PROBS_3, F).item() == pytest.approx(LPR_EXPECTED_3, rel=1e-6)
    # the normaliser is the number of F=1 tokens (2), not all tokens (3)
    assert lpr_loss(PROBS, F, reduction="sum").item() == pytest.approx(2 * LPR_EXPECTED, rel=1e-6)
    # expert_index picks the prior's expert: -(log 0.3 + log 0.6) / 2
    assert lpr_loss(PROBS, F, expert_index=1).item() == pytest.approx(0.8573992140459634, rel=1e-6)
    # leading dims are flattened: [batch=1, seq=3, E]
    assert lpr_loss(PROBS[None], F[None]).item() == pytest.approx(LPR_EXPECTED, rel=1e-6)


def test_lpr_loss_from_logits_matches_and_is_stable():
    logits = torch.log(PROBS) + torch.tensor([[3.0], [-1.0], [7.0]])  # any per-token shift gives the same softmax
    assert lpr_loss(logits, F, from_logits=True).item() == pytest.approx(LPR_EXPECTED, rel=1e-6)
    extreme = torch.tensor([[-200.0, 0.0, 0.0]], dtype=torch.bfloat16)  # softmax(expert 0) underflows to 0
    value = lpr_loss(extreme, torch.ones(1), from_logits=True)
    assert torch.isfinite(value) and value.item() == pytest.approx(200.0 + math.log(2), rel=1e-3)
    from_probs = lpr_loss(torch.softmax(extreme.float(), -1), torch.ones(1))
    assert from_probs.item() == pytest.approx(-math.log(1e-12), rel=1e-6)  # clamped, not inf


def test_gradients_from_logits_and_from_probs_agree():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    mask = torch.tensor([1.0, 0, 1, 1, 0, 1])
    lpr_loss(logits, mask, from_logits=True).backward()
    grad_logits = logits.grad.clone()
    logits.grad = None
    lpr_loss(torch.softmax(logits, -1), mask).backward()
    torch.testing.assert_close(logits.grad, grad_logits)
    # the router is pushed toward expert 0 on F=1 tokens only
    assert (grad_logits[mask.bool(), 0] < 0).all() and (grad_logits[~mask.bool()] == 0).all()


def test_lpr_over_layers_averages_or_sums():
    assert lpr_loss_over_layers([PROBS, PROBS_2, PROBS_3], F).item() == pytest.approx(LPR_MEAN_3_LAYERS, rel=1e-6)
    assert lpr_loss_over_layers([PROBS, PROBS_2], F).item() == pytest.approx((LPR_EXPECTED + LPR_EXPECTED_2) / 2, rel=1e-6)
    assert lpr_loss_over_layers([PROBS, PROBS_2], F, reduction="sum").item() == pytest.approx(
        LPR_EXPECTED + LPR_EXPECTED_2, rel=1e-6)


def test_no_original_tokens_gives_zero_not_nan():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = lpr_loss(logits, torch.zeros(4), from_logits=True)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(4, 3))


def test_shape_and_argument_errors():
    with pytest.raises(DeltaMoEError, match=r"original_mask shape \(2,\) must equal the router scores' token shape \(3,\)"):
        lpr_loss(PROBS, torch.ones(2))
    with pytest.raises(DeltaMoEError, match="expert_index 3 outside 0..2"):
        lpr_loss(PROBS, F, expert_index=3)
    with pytest.raises(DeltaMoEError, match="reduction must be"):
        lpr_loss(PROBS, F, reduction="max")


# Allocation: languages en, es, ru; E = 4; en -> {0}, es -> {1, 2}, ru has no entry (may use every expert).
ALLOC = ExpertAllocation(languages=["en", "es", "ru"], experts={"en": [0], "es": [1, 2]}, num_experts=4, topk=1)
A_PROBS = torch.tensor([[0.4, 0.3, 0.2, 0.1],   # en: -log 0.4
                        [0.1, 0.2, 0.3, 0.4],   # es: -log (0.2 + 0.3)
                        [0.9, 0.05, 0.03, 0.02],  # ru: unconstrained, not counted
                        [0.7, 0.1, 0.1, 0.1]])  # es: -log (0.1 + 0.1)
A_LANGS = torch.tensor([0, 1, 2, 1])
# (0.916290731874155 + 0.6931471805599453 + 1.6094379124341003) / 3
ALLOC_EXPECTED = 1.0729586082894002


def test_allocation_loss_equals_hand_computation():
    assert allocation_loss(A_PROBS, A_LANGS, ALLOC).item() == pytest.approx(ALLOC_EXPECTED, rel=1e-6)
    assert allocation_loss(A_PROBS, A_LANGS, ALLOC.mask()).item() == pytest.approx(ALLOC_EXPECTED, rel=1e-6)
    logits = torch.log(A_PROBS)
    assert allocation_loss(logits, A_LANGS, ALLOC, from_logits=True).item() == pytest.approx(ALLOC_EXPECTED, rel=1e-6)
    # token_mask drops token 3: (0.916290731874155 + 0.6931471805599453) / 2
    assert allocation_loss(A_PROBS, A_LANGS, ALLOC, token_mask=torch.tensor([1, 1, 1, 0])).item() == pytest.approx(
        0.8047189562170501, rel=1e-6)
    # lang_id -1 (no language) is unconstrained too
    assert allocation_loss(A_PROBS, torch.tensor([0, -1, -1, -1]), ALLOC).item() == pytest.approx(-math.log(0.4), rel=1e-6)


def test_allocation_loss_reduces_to_lpr_for_en_on_expert_0():
    torch.manual_seed(1)
    logits = torch.randn(2, 16, 6)
    lang_ids = torch.tensor([[0] * 16, [1] * 16])  # sample 0 English (original), sample 1 Spanish (new)
    original = (lang_ids == 0).float()
    en_only = ExpertAllocation(languages=["en", "es"], experts={"en": [0]}, num_experts=6, topk=2, shared_experts=[5])
    en_on_0 = ExpertAllocation(languages=["en", "es"], experts={"en": [0]}, num_experts=6, topk=1)
    probs = torch.softmax(logits, -1)
    expected = lpr_loss(probs, original)
    torch.testing.assert_close(allocation_loss(probs, lang_ids, en_on_0, token_mask=original), expected)
    torch.testing.assert_close(allocation_loss(probs, lang_ids, en_on_0), expected)  # es unconstrained: same tokens
    torch.testing.assert_close(allocation_loss(logits, lang_ids, en_on_0, from_logits=True), lpr_loss(logits, original, from_logits=True))
    # a shared expert makes it a different loss (mass on {0, 5}): the equality is not vacuous
    assert not torch.allclose(allocation_loss(probs, lang_ids, en_only), expected)


def test_routing_metrics_per_language_and_layer():
    metrics = routing_metrics([A_PROBS, torch.log(A_PROBS)], A_LANGS, ["en", "es", "ru"], allocation=ALLOC)
    assert metrics["en"]["num_tokens"] == 1 and metrics["es"]["num_tokens"] == 2 and metrics["ru"]["num_tokens"] == 1
    assert metrics["es"]["expert0_mass"][0] == pytest.approx((0.1 + 0.7) / 2)
    assert metrics["es"]["allocated_mass"][0] == pytest.approx((0.5 + 0.2) / 2)
    assert metrics["ru"]["allocated_mass"][0] == pytest.approx(1.0)
    assert metrics["en"]["expert0_mass"][0] == pytest.approx(0.4)
    # layer 2 was given log-probabilities: without from_logits they are not probabilities, so the means differ
    assert metrics["en"]["expert0_mass"][1] == pytest.approx(math.log(0.4))
    logits_metrics = routing_metrics([torch.log(A_PROBS)], A_LANGS, ["en", "es", "ru"], from_logits=True,
                                     token_mask=torch.tensor([1, 1, 1, 0]))
    assert logits_metrics["es"] == {"num_tokens": 1, "expert0_mass": [pytest.approx(0.1)]}


# ---- the paper's γ: router losses are means over MoE layers (DESIGN.md decision 13) ------------------------------------


class _StubRouter:
    """What RouterProbe.routing reads of a megatron TopKRouter, for layer `layer_number` (1-based, global)."""

    def __init__(self, layer_number: int):
        from types import SimpleNamespace

        self.layer_number, self.training, self.weight = layer_number, True, torch.zeros(1)
        self.config = SimpleNamespace(context_parallel_size=1, sequence_parallel=False, calculate_per_token_loss=False)


@pytest.mark.parametrize("reduction, layer_weight", [("mean", 1 / 3), ("sum", 1.0)])
def test_lpr_through_the_router_probe_is_gamma_times_the_layer_mean_by_hand(reduction, layer_weight):
    """Three MoE layers whose softmaxes are PROBS, PROBS_2, PROBS_3: the router probe adds γ × the mean of the three
    per-layer losses to the objective (γ = 0.1 is the paper's γ), or γ × their sum with --router-loss-layer-reduction
    sum; the gradient reaching each layer's logits is γ / 3 × (1/N) F(t) (p_t - e_0), N = 2 original-language tokens."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from deltamoe.megatron_ext.moe.router_probe import ProbeSettings, RouterProbe

    gamma = 0.1
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))  # one micro-batch: the schedule's scale is 1
    probe = RouterProbe(ProbeSettings(num_languages=2, num_layers=3, lpr_loss_coeff=gamma, layer_reduction=reduction))
    # One sample of 3 tokens ([s, b] = [3, 1] as a router sees them); tokens 0 and 2 are original-language.
    probe.set_batch(torch.tensor([[0, 1, 0]]), F.view(1, 3))
    logits = [torch.log(p).view(3, 1, 3).requires_grad_() for p in (PROBS, PROBS_2, PROBS_3)]
    total = 0
    for layer, z in enumerate(logits, start=1):
        probs, _ = probe.routing(_StubRouter(layer), lambda z: (torch.softmax(z.float(), -1).view(-1, 3), None), z)
        total = total + probs.sum()  # the softmax sums to 1 per token: only the attached router loss has a gradient
    total.backward()

    expected = gamma * (LPR_MEAN_3_LAYERS if reduction == "mean" else 3 * LPR_MEAN_3_LAYERS)
    assert probe.sums[2, 0, 2].item() == pytest.approx(expected, rel=1e-6)  # what the objective gained
    per_layer = probe.sums[2, :3, 0] / probe.sums[2, :3, 1]  # [2, layer, 0/1]: each layer's LPR sum and count
    assert per_layer.mean().item() == pytest.approx(LPR_MEAN_3_LAYERS, rel=1e-6)
    for z, p in zip(logits, (PROBS, PROBS_2, PROBS_3)):
        by_hand = gamma * layer_weight * (F / 2).unsqueeze(-1) * (p - torch.tensor([1.0, 0.0, 0.0]))
        torch.testing.assert_close(z.grad.view(3, 3), by_hand)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_router_losses_of_a_3_layer_megatron_moe_by_hand(tmp_path, reduction):
    """A real 3-layer megatron MoE (4 experts, top-2) with zero routers: every layer's softmax is uniform, so each layer's
    L_lpr is log 4 (original-language tokens on expert 0) and its L_alloc log 2 (Spanish allowed 2 of 4 experts). The
    objective gains γ log 4 + c log 2 (the layer mean), 3× that summed; the trainer's log reports the same."""
    from deltamoe.common.hf_folder import read_config
    from deltamoe.megatron_ext.moe.router_probe import ProbeSettings, RouterProbe, install_router_probe, routers
    from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
    from deltamoe.megatron_ext.runtime.model_builder import MoESettings, model_from_hf_config
    from deltamoe.megatron_ext.training.metrics import LanguageMetrics
    from tests.tiny_models import make_tiny_hf

    init_distributed(ParallelLayout())
    config = read_config(make_tiny_hf("llama", tmp_path / "hf", num_hidden_layers=3))
    _, model = model_from_hf_config(config, moe=MoESettings(num_experts=4, topk=2))
    mask = ExpertAllocation(languages=["en", "es"], experts={"es": [2, 3]}, num_experts=4, topk=2).mask()
    gamma, coeff = 0.1, 0.3
    probe = RouterProbe(ProbeSettings(num_languages=2, num_layers=3, lpr_loss_coeff=gamma, allocation_loss_coeff=coeff,
                                      allocation_mask=mask, layer_reduction=reduction))
    assert install_router_probe(model, probe) == 3
    with torch.no_grad():
        for router in routers(model):
            router.weight.zero_()
    tokens = torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(0))
    probe.set_batch(torch.tensor([0, 1]), torch.tensor([[1.0] * 8, [0.0] * 8]))  # sample 0 English, sample 1 Spanish
    model.train()
    model(tokens, torch.arange(8).expand_as(tokens), None).sum().backward()

    per_layer = gamma * math.log(4) + coeff * math.log(2)
    expected = per_layer if reduction == "mean" else 3 * per_layer
    assert probe.sums[2, 0, 2].item() == pytest.approx(expected, rel=1e-6)
    assert probe.sums[2, 0, 3].item() == 1.0  # one micro-batch
    record = LanguageMetrics(languages=["en", "es"], num_layers=3, probe=probe, log_file=None, interval=1,
                             stage=2).report(1)
    assert record["router_loss"] == pytest.approx(expected, rel=1e-6)
    assert record["lpr_loss_per_layer"] == pytest.approx(math.log(4), rel=1e-6)
