"""Experts allocated to languages, through Megatron-LM's trainer on CPU (gloo) and in recipes.

The MoE is bench/allocation_compare.py's: a tiny upcycled Llama, 6 experts, top-2, allocation
{shared: [0], en: [5], es: [1, 2], ru: [3, 4]}, en/es/ru datasets over disjoint token ranges. The trainer runs are
subprocesses, as a user launches them (tests/test_training.py's helpers).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from bench.allocation_compare import (
    ALLOCATION,
    LANGUAGES,
    allocation,
    allocation_flags,
    build_workspace,
    evaluate,
    heldout_tokens,
)
from tests.test_training import REPO, _env, _expert, _is_router, train, weights

EXPERTS_OF = {"en": {0, 5}, "es": {0, 1, 2}, "ru": {0, 3, 4}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("allocation"))


def _one_language_stage1(ws, mode: str, name: str):
    """Stage 1 on Spanish only, at the recipes' weight decay (0.1)."""
    out = ws["root"] / name
    train(ws, out, iters=3, blend=["1.0", ws["data"]["es"]],
          extra=[*allocation_flags(mode), "--weight-decay", "0.1", "--lr", "3e-3", "--min-lr", "3e-3"])
    return out


@pytest.fixture(scope="module")
def by_language_es(ws):
    return _one_language_stage1(ws, "by-language", "by-language-es")


@pytest.mark.slow
def test_by_language_stage1_on_spanish_leaves_other_languages_experts_bit_identical(ws, by_language_es):
    """Spanish tokens may only reach experts {0, 1, 2}: the Russian (3, 4) and English (5) experts get exactly zero
    gradient, and so do their router rows (their logits are -inf before the softmax). Expert 0 is frozen.

    At weight decay 0.1: decoupled weight decay (AdamW) would shrink every trainable tensor each step whatever its
    gradient, so the trainer freezes the experts no language of the blend may use (3, 4, 5 here) and takes the routers
    out of weight decay; their rows for those experts then stay exactly as they were."""
    before, after = weights(ws["moe"]), weights(by_language_es)
    untouched, trained = {0, 3, 4, 5}, {1, 2}
    seen_router = 0
    for name in before:
        expert = _expert(name)
        if expert in untouched:
            assert torch.equal(before[name], after[name]), f"{name} (not a Spanish expert) changed"
        elif expert in trained:
            assert not torch.equal(before[name], after[name]), f"Spanish expert tensor {name} did not train"
        elif _is_router(name):
            seen_router += 1
            rows = sorted(untouched - {0})
            assert torch.equal(before[name][rows], after[name][rows]), f"{name}: rows of other languages' experts changed"
            assert not torch.equal(before[name][[0, 1, 2]], after[name][[0, 1, 2]]), f"{name}: Spanish rows did not train"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    assert seen_router == 2


@pytest.mark.slow
def test_learned_routing_on_spanish_trains_the_other_experts_too(ws):
    """The control for the test above: without the mask the same Spanish-only run trains experts 3, 4 and 5."""
    before, after = weights(ws["moe"]), weights(_one_language_stage1(ws, "learned", "learned-es"))
    for expert in (3, 4, 5):
        names = [n for n in before if _expert(n) == expert]
        assert names and any(not torch.equal(before[n], after[n]) for n in names), f"expert {expert} did not train"


@pytest.mark.slow
def test_allocation_loss_review_moves_untagged_router_mass_onto_each_languages_experts(ws, by_language_es):
    """Stage 2 (routers only, no mask) with the allocation loss: on held-out text of each language, run WITHOUT
    language tags, the router mass on that language's allocated experts rises, and only routers changed."""
    out = ws["root"] / "review"
    blend = ["1.0", ws["data"]["en"], "1.0", ws["data"]["es"], "1.0", ws["data"]["ru"]]
    records = train(ws, out, iters=6, stage=2, init=by_language_es, blend=blend,
                    extra=[*allocation_flags("learned", loss_coeff=2.0), "--lr", "3e-2", "--min-lr", "3e-2"])
    assert all(r["tokens"][lang] > 0 for r in records for lang in LANGUAGES)
    before_w, after_w = weights(by_language_es), weights(out)
    for name in before_w:
        assert torch.equal(before_w[name], after_w[name]) != _is_router(name), f"{name}: stage 2 trains routers only"
    heldout = {lang: heldout_tokens(lang) for lang in LANGUAGES}
    before, after = evaluate(by_language_es, heldout), evaluate(out, heldout)
    for lang in LANGUAGES:
        # At the start the routers are near-uniform: mass ~ |allowed| / E (2/6 for en, 3/6 for es and ru).
        assert before[lang]["allocated_mass"] < len(EXPERTS_OF[lang]) / 6 + 0.1, before
        assert after[lang]["allocated_mass"] > before[lang]["allocated_mass"] + 0.2, (lang, before, after)


def test_by_language_probe_routes_tokens_only_to_their_languages_experts(ws):
    """In-process: the router probe installed with by-language masking makes top-k pick allowed experts only (per
    token of a mixed batch), and lang_id -1 (no tag) leaves a token free."""
    from deltamoe.megatron_ext.moe.router_probe import (
        ProbeSettings,
        RouterProbe,
        install_router_probe,
        routers,
    )
    from deltamoe.megatron_ext.runtime.checkpoint import load_model
    from deltamoe.megatron_ext.runtime.distributed import (
        ParallelLayout,
        init_distributed,
    )

    init_distributed(ParallelLayout())
    model, _ = load_model(ws["moe"])
    mask = allocation().mask()
    probe = RouterProbe(ProbeSettings(num_languages=3, num_layers=2, allocation_mask=mask, mask_by_language=True))
    assert install_router_probe(model, probe) == 2
    maps = []
    for router in routers(model):
        wrapped = router.routing

        def record(logits, *args, _wrapped=wrapped, **kwargs):
            probs, routing_map = _wrapped(logits, *args, **kwargs)
            maps.append(routing_map.reshape(*logits.shape[:-1], -1))
            return probs, routing_map

        router.routing = record
    tokens = torch.cat([heldout_tokens(lang, num=1, length=16) for lang in LANGUAGES] + [heldout_tokens("es", num=1, length=16)])
    lang_ids = torch.tensor([0, 1, 2, -1])
    probe.set_batch(lang_ids, torch.ones(4, 16))
    model.eval()  # as megatron's validation passes: the mask applies, the training metrics do not count them
    with torch.no_grad():
        model(tokens, torch.arange(16).expand_as(tokens), None)
    assert probe.sums is None
    model.train()
    with torch.no_grad():
        model(tokens, torch.arange(16).expand_as(tokens), None)
    assert probe.sums[1, :, :3].tolist() == [[16.0, 16.0, 16.0]] * 2  # tokens per (layer, language); -1 not counted
    assert len(maps) == 4
    for routing_map in maps:  # [s, b, E]
        assert routing_map.sum(-1).eq(2).all()
        for b, lang in enumerate(LANGUAGES):
            chosen = set(routing_map[:, b].nonzero()[:, 1].tolist())
            assert chosen <= EXPERTS_OF[lang], (lang, chosen)
    free = set().union(*(set(m[:, 3].nonzero()[:, 1].tolist()) for m in maps))
    assert free - EXPERTS_OF["es"], "an untagged token should be free to pick any expert"


@pytest.mark.slow
def test_trainer_refuses_bad_allocation_flags(ws, tmp_path):
    def run(*extra):
        flags = ["--deltamoe-stage", "1", "--pretrained-checkpoint", str(ws["moe"]), "--load", str(tmp_path / "o"),
                 "--data-path", ws["data"]["es"], "--original-languages", "en", "--languages", "en,es,ru",
                 "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1",
                 "--lr", "1e-3", *extra]
        result = subprocess.run([sys.executable, "-m", "deltamoe.megatron_ext.training.train", *flags], check=False, env=_env(),
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        return result.returncode, result.stderr

    code, err = run("--expert-allocation", "by-language", "--expert-allocation-map", json.dumps({"es": [1], "ru": [3, 4]}))
    assert code == 1 and "'es' may use 1 experts" in err and "topk is 2" in err, err[-2000:]
    code, err = run("--expert-allocation", "by-language")
    assert code == 1 and "need --expert-allocation-map" in err, err[-2000:]


# Recipes: the allocation fields validate against the MoE and expand to the trainer's flags.

def _stage1(**train_changes):
    import dataclasses

    from deltamoe.recipes.demo import smollm2_135m_demo_stage1_cpu

    recipe = smollm2_135m_demo_stage1_cpu(cache="/nonexistent")
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, **train_changes))


def test_recipe_expands_the_allocation_map_and_the_trainer_reads_it_back():
    from deltamoe.megatron_ext.training.flags import read_allocation_map
    from deltamoe.recipes.config import to_megatron_args
    from deltamoe.recipes.production import get_recipe

    for name in ("smollm2_135m_demo_stage1_by_language_cpu", "smollm2_135m_demo_stage2_allocation_cpu"):
        args = to_megatron_args(get_recipe(name, cache="/nonexistent"))
        raw = read_allocation_map(args[args.index("--expert-allocation-map") + 1])
        assert raw == ALLOCATION
        assert args[args.index("--languages") + 1] == "en,es,ru"
    args = to_megatron_args(get_recipe("smollm2_135m_demo_stage1_by_language_cpu", cache="/nonexistent"))
    assert args[args.index("--expert-allocation") + 1] == "by-language"
    args = to_megatron_args(get_recipe("smollm2_135m_demo_stage2_allocation_cpu", cache="/nonexistent"))
    assert args[args.index("--expert-allocation") + 1] == "learned"
    assert float(args[args.index("--allocation-loss-coeff") + 1]) > 0
    assert "--expert-allocation-map" not in to_megatron_args(_stage1())
    # Just the "experts" object is accepted too, and normalised.
    assert _stage1(expert_allocation="by-language", expert_allocation_map={"es": [1, 2]}).train.expert_allocation_map == \
        {"experts": {"es": [1, 2]}}


def test_recipe_refuses_allocation_maps_that_do_not_fit():
    from deltamoe.common.errors import DeltaMoEError

    with pytest.raises(DeltaMoEError, match="needs train.expert_allocation_map"):
        _stage1(expert_allocation="by-language")
    with pytest.raises(DeltaMoEError, match="needs train.expert_allocation_map"):
        _stage1(allocation_loss_coeff=0.1)
    with pytest.raises(DeltaMoEError, match="topk is 2"):
        _stage1(expert_allocation="by-language", expert_allocation_map={"es": [1]})
    with pytest.raises(DeltaMoEError, match=r"outside 0\.\.5"):
        _stage1(expert_allocation="by-language", expert_allocation_map={"es": [1, 6]})
    with pytest.raises(DeltaMoEError, match="unknown language 'fr'"):
        _stage1(expert_allocation="by-language", expert_allocation_map={"fr": [1, 2]})
    with pytest.raises(DeltaMoEError, match="unknown keys"):
        _stage1(expert_allocation="by-language", expert_allocation_map={"experts": {"es": [1, 2]}, "shared": [0]})
    with pytest.raises(DeltaMoEError, match="allocation_loss_coeff must be >= 0"):
        _stage1(allocation_loss_coeff=-1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _stage1(expert_allocation_map={"es": [1, 2]})
    assert any("has no effect" in str(w.message) for w in caught)
