"""Language-allocated experts: validation of the map, the [languages, E] mask and router-logit masking."""

from __future__ import annotations

import warnings

import pytest
import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.megatron_ext.moe.allocation import (
    ExpertAllocation,
    check_lang_ids,
    mask_router_logits,
    token_lang_ids,
)

LANGS = ["en", "es", "ru", "de"]


def make(**overrides) -> ExpertAllocation:
    fields = {"languages": LANGS, "experts": {"en": [0], "es": [1, 2], "ru": [4, 3]}, "num_experts": 6, "topk": 1,
              "shared_experts": [5], **overrides}
    return ExpertAllocation(**fields)


def test_mask_rows_follow_language_order():
    alloc = make()
    assert alloc.experts["ru"] == [3, 4]  # sorted
    assert alloc.allowed_experts("es") == [1, 2, 5]
    assert alloc.allowed_experts("de") == [0, 1, 2, 3, 4, 5]  # no entry: every expert
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 1],  # en
        [0, 1, 1, 0, 0, 1],  # es
        [0, 0, 0, 1, 1, 1],  # ru
        [1, 1, 1, 1, 1, 1],  # de
    ], dtype=torch.bool)
    assert torch.equal(alloc.mask(), expected)


def test_languages_may_share_experts():
    alloc = make(experts={"en": [0], "de": [0], "es": [1, 2]}, shared_experts=[])
    assert alloc.allowed_experts("de") == alloc.allowed_experts("en") == [0]
    assert alloc.mask()[:, 0].tolist() == [True, False, True, True]  # en, es (no), ru (no entry: all), de


def test_masking_leaves_only_allowed_experts_in_the_topk():
    torch.manual_seed(0)
    alloc = make(topk=2)
    mask = alloc.mask()
    logits = torch.randn(3, 40, 6) * 4
    lang_ids = torch.randint(-1, len(LANGS), (3, 40))
    check_lang_ids(lang_ids, len(LANGS))
    masked = mask_router_logits(logits, lang_ids, mask)
    values, chosen = torch.topk(masked, k=2, dim=-1)
    for b in range(3):
        for t in range(40):
            lang = int(lang_ids[b, t])
            allowed = set(range(6)) if lang < 0 else set(alloc.allowed_experts(LANGS[lang]))
            assert set(chosen[b, t].tolist()) <= allowed
            if lang < 0:  # no language: logits untouched
                assert torch.equal(masked[b, t], logits[b, t])
    assert torch.isfinite(values).all()
    # softmax over all experts puts exactly 0 on forbidden ones and renormalises over the allowed set
    probs = torch.softmax(masked, dim=-1)
    allowed = torch.where(lang_ids.unsqueeze(-1) < 0, torch.ones_like(probs, dtype=torch.bool), mask[lang_ids.clamp(min=0)])
    assert (probs[~allowed] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 40))
    # the masked tokens would not all have picked allowed experts without the mask (the test is not vacuous)
    _, unmasked_choice = torch.topk(logits, k=2, dim=-1)
    assert not torch.equal(unmasked_choice, chosen)


def test_gradients_do_not_reach_forbidden_logits():
    alloc = make()
    logits = torch.randn(4, 6, requires_grad=True)
    lang_ids = torch.tensor([0, 1, 2, 3])
    probs = torch.softmax(mask_router_logits(logits, lang_ids, alloc.mask()), -1)
    (probs * torch.arange(6.0)).sum().backward()
    assert (logits.grad[~alloc.mask()[lang_ids]] == 0).all()
    assert logits.grad[3].abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"experts": {"en": [0], "fr": [1]}}, r"unknown language 'fr'; the declared languages are \['en', 'es', 'ru', 'de'\]"),
        ({"experts": {"en": [0], "es": []}}, r"experts\['es'\] is empty"),
        ({"experts": {"en": [0, 1], "es": [2]}, "topk": 3}, r"'es' may use 2 experts \(\[2\] \+ shared \[5\]\) but topk is 3"),
        ({"experts": {"en": [0], "es": [6]}}, r"experts\['es'\] has expert 6, outside 0..5"),
        ({"experts": {"en": [-1]}}, r"experts\['en'\] has expert -1, outside 0..5"),
        ({"experts": {"en": [0], "es": [1, 1, 2]}}, r"experts\['es'\] lists expert\(s\) \[1\] more than once"),
        ({"experts": {"en": [0, 5]}}, r"expert 5 is listed in both shared_experts and experts\['en'\]"),
        ({"expert_model_parallel_size": 4}, r"num_experts \(6\) must be divisible by expert_model_parallel_size \(4\)"),
        ({"topk": 7}, r"topk \(7\) must be between 1 and num_experts \(6\)"),
        ({"experts": {}}, "no language is allocated any expert"),
        ({"languages": ["en", "en"]}, "list a language twice"),
        ({"languages": ["English"], "experts": {"English": [0]}}, "is not a language code"),
        ({"experts": {"en": ["0"]}}, r"has expert '0', outside"),
    ],
)
def test_bad_allocations_each_give_one_clear_error(overrides, message):
    with pytest.raises(DeltaMoEError, match=message):
        make(**overrides)


def test_expert_parallel_placement_warning():
    with pytest.warns(UserWarning) as record:
        make(shared_experts=[], experts={"en": [0], "es": [1, 2], "ru": [3, 4]}, expert_model_parallel_size=2)
    assert [str(w.message).split(": ", 1)[1].split(";")[0] for w in record] == [
        "every expert allowed to 'en' lives on expert-parallel rank 0 of 2",
        "every expert allowed to 'es' lives on expert-parallel rank 0 of 2",
        "every expert allowed to 'ru' lives on expert-parallel rank 1 of 2",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a language spread over both ranks is not warned about
        make(shared_experts=[5], experts={"en": [0, 3]}, expert_model_parallel_size=2)


def test_bad_lang_ids_and_shapes():
    mask = make().mask()
    with pytest.raises(DeltaMoEError, match=r"lang_ids range 0..4 does not fit an allocation over 4 languages"):
        check_lang_ids(torch.tensor([0, 4]), 4)
    with pytest.raises(DeltaMoEError, match="must be an integer tensor"):
        check_lang_ids(torch.tensor([0.0]), 4)
    with pytest.raises(DeltaMoEError, match=r"lang_ids shape \(3,\) must equal the router logits' token shape \(2,\)"):
        mask_router_logits(torch.zeros(2, 6), torch.zeros(3, dtype=torch.long), mask)
    with pytest.raises(DeltaMoEError, match="router logits have 5 experts, the allocation mask 6"):
        mask_router_logits(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), mask)


def test_token_lang_ids_follow_megatrons_sequence_first_layout():
    lang_id = torch.tensor([2, 0, 1])  # three samples
    ids = token_lang_ids(lang_id, 4)
    assert ids.shape == (4, 3) and torch.equal(ids[:, 1], torch.zeros(4, dtype=torch.long))
    # flattened like the router's [s*b, E] logits: token (s, b) -> row s*B + b
    assert ids.reshape(-1).tolist() == [2, 0, 1] * 4
    assert torch.equal(token_lang_ids(lang_id, 4, sequence_first=False), ids.t())
