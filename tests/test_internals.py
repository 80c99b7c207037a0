"""megatron-core internals DeltaMoE touches (deltamoe/megatron_ext/internals.py): every target still exists with the
signature it was written for, and a change is reported naming the target."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from deltamoe.megatron_ext import internals

REPO = Path(__file__).resolve().parents[1]


def test_every_intervention_target_holds():
    problems = internals.check_interventions()
    assert not problems, "megatron-core internals changed:\n" + "\n".join(problems)


def test_written_for_the_pinned_megatron_core():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"megatron-core=={internals.WRITTEN_FOR}"' in pyproject
    assert importlib.metadata.version("megatron-core") == internals.WRITTEN_FOR


def test_changed_signature_is_reported_with_the_target(monkeypatch):
    from megatron.core.transformer.moe.router import TopKRouter

    def routing(self, logits, padding_mask=None, extra=None):  # a hypothetical newer megatron-core
        raise AssertionError

    monkeypatch.setattr(TopKRouter, "routing", routing)
    problems = internals.check_interventions()
    assert len(problems) == 1
    assert "megatron.core.transformer.moe.router:TopKRouter.routing changed signature" in problems[0]
    assert "0.19.2" in problems[0]


def test_missing_target_is_reported(monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    monkeypatch.delattr(filesystem_async, "_results_queue")
    problems = internals.check_interventions()
    assert len(problems) == 1 and "filesystem_async:_results_queue is gone" in problems[0]


def test_no_other_module_patches_megatron():
    """Interventions live in internals.py (and CPU-only ones in cpu_compat.py): no other module assigns to megatron
    attributes, swaps classes or wraps instance methods."""
    allowed = {REPO / "deltamoe/megatron_ext/internals.py", REPO / "deltamoe/megatron_ext/runtime/cpu_compat.py"}
    markers = ("__class__ =", "types.MethodType", "_results_queue", ".compile_helpers =", "DistributedOptimizer.",
               "MoEAuxLossAutoScaler.apply", ".is_distributed =", ".get_megatron_optimizer_config =")
    offenders = []
    for path in (REPO / "deltamoe").rglob("*.py"):
        if path in allowed:
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(REPO)}: {m}" for m in markers if m in text]
    assert not offenders, offenders


def test_megatron_ext_does_not_import_converters():
    """The ground floor (common, architectures) sits below megatron_ext and converters; megatron_ext never imports
    converters (STYLE.md: no import runs back up a floor)."""
    offenders = []
    for path in (REPO / "deltamoe").rglob("*.py"):
        rel = path.relative_to(REPO / "deltamoe")
        text = path.read_text()
        if rel.parts[0] in ("megatron_ext", "common", "architectures") and "deltamoe.converters" in text:
            offenders.append(str(rel))
        if rel.parts[0] in ("common", "architectures") and "deltamoe.megatron_ext" in text:
            offenders.append(str(rel))
    assert not offenders, offenders


@pytest.mark.parametrize("item", internals.INTERVENTIONS, ids=lambda i: i.target)
def test_each_intervention_is_documented(item):
    assert item.why and item.written_for == internals.WRITTEN_FOR
    assert item.kind in ("replace function", "wrap method", "swap attribute", "override method", "set attribute",
                         "read attribute", "call internal")
