"""Every place DeltaMoE reaches into megatron-core's internals, in one module (DESIGN.md decision 14).

A patched method, a swapped private attribute, a replaced function or an overridden private method each depend on
code megatron-core does not promise to keep. They all live here, each listed in `INTERVENTIONS` with its target, the
megatron-core version it was written for, why it exists and the target's signature as of that version;
`tests/test_internals.py` fails, naming the target, when an installed megatron-core changes one. An upgrade then
means reading this file. The CPU compat module (`runtime/cpu_compat.py`) is the only other module that patches, and
only without CUDA.

Subclassing a public class and passing public config fields (`finalize_model_grads_func`, layer specs) are not
interventions; overriding a method of such a subclass whose signature megatron calls positionally is, and is listed.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import queue
import types
from dataclasses import dataclass

import torch

from deltamoe.common.errors import DeltaMoEError

WRITTEN_FOR = "0.19.2"
"""The megatron-core version every intervention below was written against (pyproject pins it)."""


@dataclass(frozen=True)
class Intervention:
    name: str
    target: str
    """Dotted path: module, then attribute path inside it (`pkg.module:Class.method`)."""
    kind: str
    """replace function | wrap method | swap attribute | override method | set attribute."""
    why: str
    signature: str | None = None
    """str(inspect.signature(target)) in `WRITTEN_FOR`; None for attributes."""
    written_for: str = WRITTEN_FOR


INTERVENTIONS: tuple[Intervention, ...] = (
    Intervention(
        name="dataset helpers are not compiled at run time",
        target="megatron.core.datasets.utils:compile_helpers",
        kind="replace function",
        signature="()",
        why="Megatron-LM's trainer (`megatron.training.initialize._compile_dependencies`) runs `make` in "
            "megatron/core/datasets; the wheel ships the compiled helpers_cpp but no Makefile, so every run stops with "
            "'Failed to compile the C++ dataset helper functions' (GPU machines too). We check helpers_cpp imports and "
            "make the call a no-op.",
    ),
    Intervention(
        name="torch AdamW resumes under the distributed optimizer (state_dict)",
        target="megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.state_dict",
        kind="wrap method",
        signature="(self)",
        why="Without apex/TE megatron falls back to torch's AdamW, which keeps a `step` per parameter; on resume the "
            "still-empty optimizer is asked for a state-dict template and megatron asserts exactly one step "
            "(`assert len(steps) == 1`). We give an empty AdamW the state its first step would create. Only when "
            "`distrib_optimizer.HAVE_APEX_OR_TE` is false (never in NGC containers).",
    ),
    Intervention(
        name="torch AdamW resumes under the distributed optimizer (load_state_dict)",
        target="megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
        kind="wrap method",
        signature="(self, state_dict)",
        why="Same fallback: the copy into main-parameter views must run under no_grad, and megatron hands every "
            "parameter state one shared `step` tensor (AdamW increments it once per parameter): each state gets its "
            "own tensor holding the checkpoint's step.",
    ),
    Intervention(
        name="fully reshardable optimizer checkpoints with frozen experts",
        target="megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.sharded_param_state_fully_reshardable",
        kind="wrap method",
        signature="(self, model_sharded_state_dict: Dict[str, Any], is_loading: bool = False, "
                  "metadata: Optional[dict] = None)",
        why="Resuming at another TP/PP size needs --dist-ckpt-optim-fully-reshardable (checkpointing.py refuses "
            "dp_reshardable then). That format stores optimizer state under the model's keys, where all experts of "
            "all layers form one global tensor; frozen expert 0 has no optimizer state, the tensor is only partly "
            "covered and torch_dist refuses the save ('Invalid access pattern'). We add zero-filled state for the "
            "frozen experts' shards so the tensor is whole; on load the loader reads states by parameter index "
            "(load_parameter_state_from_fully_reshardable) and never looks at them.",
    ),
    Intervention(
        name="torch AdamW resumes under the distributed optimizer (fully reshardable format)",
        target="megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_parameter_state_from_fully_reshardable",
        kind="wrap method",
        signature="(self, state_dict: dict)",
        why="Same fallback: that format stores no per-parameter `step`, yet megatron's copy "
            "(_set_main_param_and_optimizer_states) asks the checkpoint for every tensor of AdamW's state and stops "
            "with KeyError 'step'. The steps are hidden during the copy and then set from the param groups.",
    ),
    Intervention(
        name="the fallback's apex/TE switch",
        target="megatron.core.optimizer.distrib_optimizer:HAVE_APEX_OR_TE",
        kind="read attribute",
        why="Decides whether the AdamW resume fix applies at all.",
    ),
    Intervention(
        name="synchronous checkpoint saves write in this process",
        target="megatron.core.dist_checkpointing.strategies.filesystem_async:_results_queue",
        kind="swap attribute",
        why="Converters and the trainer (without --async-save) save torch_dist synchronously; megatron's default "
            "result queue is a spawned multiprocessing Manager, which costs an interpreter start per rank (about 20 s "
            "of an 8-process CPU run's first save) and breaks scripts without a __main__ guard. A plain queue.Queue "
            "serves the in-process writer threads; restored afterwards.",
    ),
    Intervention(
        name="chunked output-layer cross-entropy",
        target="megatron.core.models.gpt.gpt_model:GPTModel._postprocess",
        kind="override method",
        signature="(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb, rotary_pos_cos, "
                  "rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None, decoder_input=None, attention_mask=None, "
                  "padding_mask=None, inference_params=None, packed_seq_params=None, sequence_len_offset=None, "
                  "runtime_gather_output=None, extra_block_kwargs=None, inference_context=None, "
                  "output_processor=None, output_processor_context=None)",
        why="The fast spec computes the training loss chunk by chunk (layers/chunked_loss.py) so [tokens, vocab] "
            "float32 logits never exist whole; GPTModel has no hook for the loss, so a built model's class is "
            "switched to a subclass overriding `_postprocess` (same parameters and state dict).",
    ),
    Intervention(
        name="router probe: per-language context, LPR and allocation losses",
        target="megatron.core.transformer.moe.router:TopKRouter.routing",
        kind="wrap method",
        signature="(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None)",
        why="`TopKRouter.forward` calls `routing(logits)` after gating: wrapping it on each router instance hands us "
            "the logits before top-k (masking by language, the language-prior losses) without copying the router.",
    ),
    Intervention(
        name="router probe: attach a loss to the routing probabilities",
        target="megatron.core.transformer.moe.moe_utils:MoEAuxLossAutoScaler.apply",
        kind="call internal",
        why="The mechanism megatron's own load-balancing loss uses to add a router loss at backward time with the "
            "schedule's loss scale; not a public API.",
    ),
    Intervention(
        name="frozen-aware grouped experts",
        target="megatron.core.transformer.moe.experts:SequentialMLP.forward",
        kind="override method",
        signature="(self, permuted_local_hidden_states: 'torch.Tensor', tokens_per_expert: 'torch.Tensor', "
                  "permuted_probs: 'torch.Tensor')",
        why="layers/grouped_experts.py keeps SequentialMLP's parameters and checkpoint keys and replaces its "
            "forward; the token dispatcher calls it positionally.",
    ),
    Intervention(
        name="parameters marked deltamoe_no_weight_decay get no weight decay",
        target="megatron.training.training:get_megatron_optimizer_config",
        kind="replace function",
        signature="(args: Any) -> megatron.core.optimizer.optimizer_config.OptimizerConfig",
        why="Megatron-LM's trainer builds its optimizer's parameter-group overrides (`ParamKey` -> `wd_mult`, "
            "megatron/core/optimizer/__init__.py) in this function and `pretrain` takes no overrides of its own; we "
            "add one key, `ParamKey(attr=NO_WEIGHT_DECAY_ATTR)` -> wd_mult 0, so router weights whose rows of "
            "by-design idle experts get no gradient (by-language masking) are not shrunk by decoupled weight decay.",
    ),
    Intervention(
        name="trainer datasets built on every rank",
        target="megatron.training.training:build_train_valid_test_data_loaders",
        kind="set attribute",
        why="`datasets_provider.is_distributed = True` is how Megatron-LM's trainer learns to build datasets on "
            "every rank (the router probe needs each rank's batch); an attribute it reads, not an argument.",
    ),
)


_ORIGINALS: dict[str, object] = {}
"""What this module replaced, by target: the signature check reads megatron's own object, not ours."""


def _replace(owner, attribute: str, new, target: str) -> None:
    _ORIGINALS.setdefault(target, getattr(owner, attribute))
    setattr(owner, attribute, new)


def resolve(target: str):
    """The object a `module:attr.path` target names (megatron's own, if this module replaced it); DeltaMoEError
    naming it when megatron-core lacks it."""
    if target in _ORIGINALS:
        return _ORIGINALS[target]
    module_name, _, path = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise DeltaMoEError(f"megatron-core internals: module {module_name} is gone ({e})") from None
    for part in path.split("."):
        if not hasattr(obj, part):
            raise DeltaMoEError(f"megatron-core internals: {target} is gone (written for megatron-core "
                                f"{WRITTEN_FOR})")
        obj = getattr(obj, part)
    return obj


def check_interventions() -> list[str]:
    """One message per intervention whose target is gone or whose signature changed; empty when all hold."""
    problems = []
    for item in INTERVENTIONS:
        try:
            target = resolve(item.target)
        except DeltaMoEError as e:
            problems.append(f"{item.name}: {e}")
            continue
        if item.signature is not None:
            found = str(inspect.signature(target))
            if found != item.signature:
                problems.append(f"{item.name}: {item.target} changed signature since megatron-core {item.written_for}:"
                                f" was {item.signature}, now {found}; re-read it before trusting this intervention")
    return problems


# ---- dataset helpers ---------------------------------------------------------------------------------------------
def _already_compiled():  # no annotation: the same signature as the target, "()"
    """Stand-in for compile_helpers: the helpers are imported (and so verified) when this is installed."""


def disable_dataset_helper_compilation() -> None:
    """Check the wheel's compiled dataset helpers import, then make `compile_helpers` a no-op. Idempotent."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as e:
        raise DeltaMoEError(
            f"megatron-core's compiled dataset helpers (megatron/core/datasets/helpers_cpp) do not import: {e}; "
            "reinstall megatron-core from its wheel for this Python version"
        ) from None
    import megatron.core.datasets.utils as dataset_utils

    _replace(dataset_utils, "compile_helpers", _already_compiled, "megatron.core.datasets.utils:compile_helpers")


# ---- torch AdamW under the distributed optimizer -----------------------------------------------------------------
def fix_torch_adam_resume() -> None:
    """Let megatron's DistributedOptimizer save and resume around torch's AdamW (see INTERVENTIONS). Idempotent."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE or getattr(distrib_optimizer.DistributedOptimizer, "_deltamoe_fixed", False):
        return
    original = distrib_optimizer.DistributedOptimizer.state_dict

    def state_dict(self):
        inner = self.optimizer
        if isinstance(inner, torch.optim.Optimizer) and not inner.state:
            for group in inner.param_groups:
                for p in group["params"]:
                    # Exactly what torch.optim.AdamW allocates at its first step; its math is unchanged.
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}
        return original(self)

    original_load = distrib_optimizer.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        # With float32 parameters the main-parameter shards are views of the model's leaf parameters; copying the
        # loaded values into them must not be recorded by autograd.
        with torch.no_grad():
            result = original_load(self, state_dict)
        # The iteration count torch's AdamW needs lives in the checkpoint's param groups (megatron's non-apex path).
        # megatron hands every state the *same* step tensor, which AdamW increments in place once per parameter, and
        # its dp_reshardable parameter-state copy then overwrites it with the template's value; set one tensor per
        # state from the checkpoint, as AdamW itself creates them.
        steps = {g["step"] for g in state_dict.get("optimizer", {}).get("param_groups", []) if g.get("step") is not None}
        inner = self.optimizer
        if "param_state" in state_dict and len(steps) == 1 and isinstance(inner, torch.optim.Optimizer):
            step = float(steps.pop())
            for state in inner.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step)
        return result

    original_fully_reshardable = distrib_optimizer.DistributedOptimizer.load_parameter_state_from_fully_reshardable

    def load_parameter_state_from_fully_reshardable(self, state_dict):
        # The fully reshardable format keeps no per-parameter `step` (it lives in the param groups, set above), but
        # megatron's copy asks the checkpoint for every tensor in AdamW's state, `step` included (KeyError 'step'):
        # hide the steps during the copy.
        inner = self.optimizer
        steps = {}
        if isinstance(inner, torch.optim.Optimizer):
            steps = {p: state.pop("step") for p, state in inner.state.items() if "step" in state}
        try:
            return original_fully_reshardable(self, state_dict)
        finally:
            for p, step in steps.items():
                inner.state[p]["step"] = step

    target = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer."
    _replace(distrib_optimizer.DistributedOptimizer, "state_dict", state_dict, target + "state_dict")
    _replace(distrib_optimizer.DistributedOptimizer, "load_state_dict", load_state_dict, target + "load_state_dict")
    _replace(distrib_optimizer.DistributedOptimizer, "load_parameter_state_from_fully_reshardable",
             load_parameter_state_from_fully_reshardable, target + "load_parameter_state_from_fully_reshardable")
    distrib_optimizer.DistributedOptimizer._deltamoe_fixed = True


def complete_frozen_expert_optimizer_state() -> None:
    """Let fully reshardable optimizer checkpoints cover frozen experts (see INTERVENTIONS). Idempotent."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from deltamoe.megatron_ext.moe.freezing import FROZEN_EXPERT_ATTR

    cls = distrib_optimizer.DistributedOptimizer
    if getattr(cls, "_deltamoe_frozen_experts_covered", False):
        return
    original = cls.sharded_param_state_fully_reshardable

    def sharded_param_state_fully_reshardable(self, model_sharded_state_dict, is_loading=False, metadata=None):
        state = original(self, model_sharded_state_dict, is_loading, metadata)
        # Megatron chains one DistributedOptimizer for dense and one for expert-parallel parameters (allreduce=False),
        # each given the whole model's sharded state dict: only the expert one writes the experts' states.
        holds_experts = any(not getattr(p, "allreduce", True) for buffer in self.buffers for p in buffer.param_index_map)
        if state is None or not holds_experts:  # None: memory-efficient mode on DP ranks > 0
            return state
        sharded, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
        for index, base in enumerate(nested_values(sharded)):
            if not getattr(base.data, FROZEN_EXPERT_ATTR, False):
                continue
            tensors = {}
            # The state keys and the float32 CPU tensors of megatron's own entries (get_parameter_state_dp_zero).
            for state_key in ("param", *self.optimizer_state_keys):
                kwargs = dict(key=f"optimizer.state.{state_key}.{base.key}", dtype=torch.float32,
                              data=torch.zeros(base.data.shape, dtype=torch.float32, device="cpu"))
                if isinstance(base, ShardedTensorFactory):
                    kwargs.pop("dtype")
                tensors[state_key] = replace(base, **kwargs)
            state[f"deltamoe_frozen_expert_{index}"] = tensors
        return state

    cls.sharded_param_state_fully_reshardable = sharded_param_state_fully_reshardable
    cls._deltamoe_frozen_experts_covered = True


# ---- checkpoint writes -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def in_process_write_results():
    """Synchronous torch_dist saves collect their writer results in a plain queue (see INTERVENTIONS)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


# ---- chunked loss ------------------------------------------------------------------------------------------------
def use_chunked_loss(model, *, chunk_bytes: int | None = None):
    """Switch a built `GPTModel` to the chunked loss in place (no parameter moves; same state dict)."""
    from megatron.core.models.gpt import GPTModel

    from deltamoe.megatron_ext.layers.chunked_loss import DEFAULT_CHUNK_BYTES, ChunkedLossGPTModel

    if not isinstance(model, GPTModel):
        raise TypeError(f"use_chunked_loss expects a megatron GPTModel, got {type(model).__name__}")
    model.__class__ = ChunkedLossGPTModel
    model.chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return model


# ---- routers -----------------------------------------------------------------------------------------------------
def wrap_router_routing(router, routing_fn) -> None:
    """Make `router.routing(logits, ...)` call `routing_fn(router, original_routing, logits, ...)` on this instance."""
    original = router.routing

    def routing(self, logits, *args, _original=original, **kwargs):
        return routing_fn(self, _original, logits, *args, **kwargs)

    router.routing = types.MethodType(routing, router)


def attach_router_loss(probs: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Add `loss` to the objective at backward time, as megatron's load-balancing loss is added."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    return MoEAuxLossAutoScaler.apply(probs, loss)


NO_WEIGHT_DECAY_ATTR = "deltamoe_no_weight_decay"
"""Parameter attribute: True puts the parameter in a weight-decay-free group of Megatron-LM's optimizer."""


def exempt_marked_parameters_from_weight_decay() -> None:
    """Megatron-LM's optimizer gives parameters with `NO_WEIGHT_DECAY_ATTR` set wd_mult 0 (see INTERVENTIONS). Idempotent."""
    from megatron.training import training

    original = training.get_megatron_optimizer_config
    if getattr(original, "_deltamoe_no_weight_decay", False):
        return
    from megatron.core.optimizer.optimizer_config import ParamKey

    def get_megatron_optimizer_config(args):
        config, overrides = original(args)
        return config, {**(overrides or {}), ParamKey(attr=NO_WEIGHT_DECAY_ATTR): {"wd_mult": 0.0}}

    get_megatron_optimizer_config._deltamoe_no_weight_decay = True
    training.get_megatron_optimizer_config = get_megatron_optimizer_config


def build_datasets_on_every_rank(datasets_provider):
    """Mark a trainer datasets provider so Megatron-LM builds datasets on every rank (see INTERVENTIONS)."""
    datasets_provider.is_distributed = True
    return datasets_provider
