"""Expand an architecture's rule table into the concrete tensor names of one model, both ways, with strict accounting."""

from __future__ import annotations

import re
from dataclasses import dataclass

from deltamoe.common.errors import DeltaMoEError
from deltamoe.architectures.base import ArchitectureConfig, Rule, is_dropped, rule_applies


@dataclass(frozen=True)
class Binding:
    rule: Rule
    megatron: str
    hf: tuple[str, ...]


def expand_rules(rules: tuple[Rule, ...], config: ArchitectureConfig, *, num_experts: int = 0) -> dict[str, Binding]:
    """Megatron name (global layer and expert indices) -> its rule and HF names, for every tensor of the model."""
    out: dict[str, Binding] = {}
    for rule in rules:
        if not rule_applies(rule, config):
            continue
        layers = range(config.num_layers) if "{i}" in rule.megatron else [None]
        experts = range(num_experts) if "{e}" in rule.megatron else [None]
        for i in layers:
            for e in experts:
                fmt = {k: v for k, v in (("i", i), ("e", e)) if v is not None}
                name = rule.megatron.format(**fmt)
                out[name] = Binding(rule, name, tuple(h.format(**fmt) for h in rule.hf))
    return out


def check_hf_accounting(bindings: dict[str, Binding], hf_names: list[str], dropped: tuple[str, ...], source: str) -> None:
    """Every HF tensor is consumed by a rule or explicitly dropped; every tensor a rule needs is present."""
    needed = {h for b in bindings.values() for h in b.hf}
    present = set(hf_names)
    missing = sorted(needed - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DeltaMoEError(f"{source}: tensor {missing[0]!r} is missing{more}")
    leftover = sorted(n for n in present - needed if not is_dropped(n, dropped))
    if leftover:
        more = f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else ""
        raise DeltaMoEError(f"{source}: tensor {leftover[0]!r} is not used by the {bindings and 'mapping'} table{more}")


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(local_name: str, layer_offset: int) -> str:
    """Megatron state_dict names count layers from 0 on every pipeline stage; the tables use global indices."""
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{local_name[m.end():]}"

