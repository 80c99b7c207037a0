"""Recipe dataclasses: a model, an upcycle, a parallel layout, a precision and a training stage, validated together.

A recipe is data. `to_megatron_args(recipe)` expands it into the flags of Megatron-LM's trainer plus DeltaMoE's own
flags; `Recipe.__post_init__` applies the same divisibility rules megatron-core 0.19.2 checks at start-up
(`megatron/training/arguments.py`, `core/transformer/transformer_config.py`, `core/parallel_state.py`,
`core/num_microbatches_calculator.py`, `core/transformer/moe/moe_layer.py`), so a bad layout fails in a second on a
laptop instead of minutes into a cluster job. Errors name the field and the numbers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

from deltamoe.common.errors import DeltaMoEError


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise DeltaMoEError(f"{owner}.{name} must be positive, got {value}")


def _divides(what: str, numerator: int, divisor_name: str, divisor: int) -> None:
    if numerator % divisor:
        raise DeltaMoEError(f"{what} must be divisible by {divisor_name} ({divisor})"
                            f" — {numerator} % {divisor} = {numerator % divisor}")


@dataclass(kw_only=True)
class ModelRecipe:
    """The dense model being extended; sizes as in its Hugging Face config.json."""

    hf_model: str
    """Hugging Face id or local folder of the dense base model (also the tokenizer)."""
    architecture: Literal["llama", "qwen2", "qwen3"]
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA)."""
    vocab_size: int
    head_dim: int | None = None
    """Attention head size when it is not hidden_size / num_attention_heads (Qwen3)."""
    max_position_embeddings: int
    rope_theta: float
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    llama3_rope_scaling_factor: float | None = None
    """Llama-3.1's rope scaling (factor 8); None for plain RoPE."""

    def __post_init__(self):
        if self.architecture not in ("llama", "qwen2", "qwen3"):
            raise DeltaMoEError(f"model.architecture must be llama, qwen2 or qwen3, got {self.architecture!r}")
        _positive("model", num_layers=self.num_layers, hidden_size=self.hidden_size, ffn_hidden_size=self.ffn_hidden_size,
                  num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
                  vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings)
        _divides(f"model.num_attention_heads ({self.num_attention_heads})", self.num_attention_heads,
                 "model.num_query_groups", self.num_query_groups)
        if self.head_dim is None:
            _divides(f"model.hidden_size ({self.hidden_size})", self.hidden_size,
                     "model.num_attention_heads", self.num_attention_heads)

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass(kw_only=True)
class UpcycleRecipe:
    """How every FFN becomes a MoE layer (see deltamoe.megatron_ext.moe.plan.UpcyclePlan)."""

    num_experts: int = 6
    topk: int = 2
    variant: Literal["copy", "shared"] = "copy"
    """copy: expert 0 = the frozen original FFN, experts 1..E-1 copies (MoE-LPR). shared: FFN as an always-on shared expert."""
    granularity: int = 1
    """Each routed expert holds ffn_hidden_size / granularity intermediate rows (fine-grained experts)."""

    def __post_init__(self):
        _positive("upcycle", num_experts=self.num_experts, topk=self.topk, granularity=self.granularity)
        if self.variant not in ("copy", "shared"):
            raise DeltaMoEError(f"upcycle.variant must be 'copy' or 'shared', got {self.variant!r}")
        if self.topk > self.num_experts:
            raise DeltaMoEError(f"upcycle.topk ({self.topk}) must not exceed upcycle.num_experts ({self.num_experts})")
        if self.num_experts < 2:
            raise DeltaMoEError(f"upcycle.num_experts ({self.num_experts}) must be at least 2")
        # `deltamoe upcycle`'s own rules (megatron_ext/moe/upcycle.py build_plan), so a recipe fails before the run.
        if self.topk == 1:
            raise DeltaMoEError("upcycle.topk 1 is refused by `deltamoe upcycle`: megatron routes top-1 with softmax "
                                "before top-k, whose weight (< 1) scales the expert, so the MoE would not start as the "
                                "dense model; use topk >= 2")
        if self.variant == "copy" and self.granularity != 1:
            raise DeltaMoEError(f"upcycle.granularity ({self.granularity}) applies to the shared variant; the copy "
                                "variant copies the whole FFN")


@dataclass(kw_only=True)
class ParallelRecipe:
    """Where the ranks go. The data-parallel size is derived: world size / (tp × pp × cp)."""

    num_nodes: int = 1
    gpus_per_node: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    """Tensor parallelism inside experts; None = tensor_model_parallel_size (megatron's default)."""
    context_parallel_size: int = 1
    sequence_parallel: bool = True
    """Ignored (megatron turns it off) when tensor_model_parallel_size is 1; required for MoE with TP > 1."""
    use_distributed_optimizer: bool = True
    gpu_memory_gib: float | None = None
    """Memory of one accelerator (H100: 80); the launcher warns when the recipe's estimate exceeds it."""

    def __post_init__(self):
        _positive("parallel", num_nodes=self.num_nodes, gpus_per_node=self.gpus_per_node,
                  tensor_model_parallel_size=self.tensor_model_parallel_size,
                  pipeline_model_parallel_size=self.pipeline_model_parallel_size,
                  expert_model_parallel_size=self.expert_model_parallel_size,
                  context_parallel_size=self.context_parallel_size)
        if self.expert_tensor_parallel_size is not None:
            _positive("parallel", expert_tensor_parallel_size=self.expert_tensor_parallel_size)
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        _divides(f"world size ({self.world_size} = parallel.num_nodes {self.num_nodes} × parallel.gpus_per_node "
                 f"{self.gpus_per_node})", self.world_size, "tp × pp × cp", model_parallel)
        expert_grid = self.etp * self.expert_model_parallel_size * self.pipeline_model_parallel_size
        _divides(f"world size ({self.world_size})", self.world_size,
                 f"expert_tensor_parallel_size × expert_model_parallel_size × pipeline_model_parallel_size "
                 f"({self.etp} × {self.expert_model_parallel_size} × {self.pipeline_model_parallel_size})", expert_grid)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def etp(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size)

    @property
    def expert_data_parallel_size(self) -> int:
        return self.world_size // (self.etp * self.expert_model_parallel_size * self.pipeline_model_parallel_size)


@dataclass(kw_only=True)
class PrecisionRecipe:
    preset: Literal["bf16", "fp8", "fp32"]
    """bf16: bf16 weights and activations, fp32 grads and Adam. fp8: bf16 plus FP8 GEMMs (Transformer Engine, Hopper+).
    fp32: CPU runs and exact tests."""
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    """hybrid = E4M3 forward, E5M2 gradients."""
    fp8_recipe: Literal["tensorwise", "delayed", "blockwise", "mxfp8"] = "tensorwise"
    """mxfp8 needs Blackwell; tensorwise/delayed run on Hopper (H100/H200)."""

    def __post_init__(self):
        if self.preset not in ("bf16", "fp8", "fp32"):
            raise DeltaMoEError(f"precision.preset must be bf16, fp8 or fp32, got {self.preset!r}")
        if self.fp8_format not in ("hybrid", "e4m3"):
            raise DeltaMoEError(f"precision.fp8_format must be hybrid or e4m3, got {self.fp8_format!r}")
        if self.fp8_recipe not in ("tensorwise", "delayed", "blockwise", "mxfp8"):
            raise DeltaMoEError(f"precision.fp8_recipe must be tensorwise, delayed, blockwise or mxfp8, got {self.fp8_recipe!r}")

    @property
    def needs_transformer_engine(self) -> bool:
        return self.preset == "fp8"


@dataclass(kw_only=True)
class DataSource:
    prefix: str
    """Megatron indexed dataset prefix (`deltamoe prepare-data` output, without .bin/.idx), relative to data_root."""
    weight: float
    lang: str
    """Language tag, e.g. "en"; must match the tag `prepare-data` recorded for the dataset."""

    def __post_init__(self):
        _positive(f"data source {self.prefix!r}", weight=self.weight)
        if not self.lang:
            raise DeltaMoEError(f"data source {self.prefix!r}: lang must be set")


@dataclass(kw_only=True)
class TrainRecipe:
    stage: Literal[0, 1, 2]
    """1: new-language CPT, trains new experts + routers. 2: review, trains routers only with the LPR loss and replay."""
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    lr: float
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    train_iters: int | None = None
    train_tokens: int | None = None
    """Alternative to train_iters: iterations = ceil(train_tokens / (global_batch_size × seq_length))."""
    lpr_loss_coeff: float | None = None
    """γ of the language-prior routing loss (MoE-LPR, Zhou et al. 2024, arXiv:2408.11396): stage 2 only; paper: 0.1.
    L_lpr is a mean over MoE layers and original-language tokens, as in MoE-LPR's code, so 0.1 is the paper's γ."""
    router_loss_layer_reduction: Literal["mean", "sum"] = "mean"
    """How the LPR and allocation losses combine over MoE layers: mean (the paper's γ) or sum (per-layer sums, as
    zjwang21/Megatron-LM-MoELPR: num_layers times the mean)."""
    moe_aux_loss_coeff: float = 0.01
    """Load-balancing loss; 0 turns it off (stage 2: the language prior decides routing)."""
    data_blend: list[DataSource]
    original_languages: list[str]
    """Languages the dense model already knows; in stage 2 their tokens are routed back to expert 0 by the LPR loss."""
    expert_allocation: Literal["learned", "by-language"] = "learned"
    """learned: routers choose experts freely. by-language: a token's router logits outside its language's experts
    (expert_allocation_map) are -inf before top-k, so each language trains only its own experts (docs/allocation.md)."""
    allocation_loss_coeff: float = 0.0
    """Weight of the soft allocation loss -log(router mass on the token's allocated experts); a routers-only stage 2
    with it teaches routers the allocation, so untagged inference routes by language (needs expert_allocation_map)."""
    expert_allocation_map: dict | None = None
    """{"experts": {"es": [1, 2], ...}, "shared_experts": [0]} (or just the "experts" object): language -> experts.
    Languages are train.declared_languages; checked against upcycle.num_experts / topk when the Recipe is built."""
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    recompute: Literal["none", "selective", "full"] = "none"
    save_interval: int = 500
    eval_interval: int = 500
    eval_iters: int = 10
    log_interval: int = 10
    routing_log_interval: int = 100
    seed: int = 1234

    def __post_init__(self):
        if self.stage not in (0, 1, 2):
            raise DeltaMoEError(f"train.stage must be 1, 2 or 0 (dense continued pre-training), got {self.stage!r}")
        _positive("train", seq_length=self.seq_length, micro_batch_size=self.micro_batch_size,
                  global_batch_size=self.global_batch_size, lr=self.lr, routing_log_interval=self.routing_log_interval)
        if (self.train_iters is None) == (self.train_tokens is None):
            raise DeltaMoEError(f"train: set exactly one of train_iters ({self.train_iters}) and train_tokens ({self.train_tokens})")
        if self.stage == 2 and self.lpr_loss_coeff is None:
            raise DeltaMoEError("train.lpr_loss_coeff must be set for stage 2 (the paper uses 0.1)")
        if self.stage in (0, 1) and self.lpr_loss_coeff is not None:
            raise DeltaMoEError(f"train.lpr_loss_coeff ({self.lpr_loss_coeff}) has no effect in stage {self.stage}: leave it None")
        if self.lpr_loss_coeff is not None and self.lpr_loss_coeff < 0:
            raise DeltaMoEError(f"train.lpr_loss_coeff must be >= 0, got {self.lpr_loss_coeff}")
        if self.router_loss_layer_reduction not in ("mean", "sum"):
            raise DeltaMoEError(f"train.router_loss_layer_reduction must be mean or sum, got {self.router_loss_layer_reduction!r}")
        if not self.data_blend:
            raise DeltaMoEError("train.data_blend is empty")
        self.data_blend = [d if isinstance(d, DataSource) else DataSource(**d) for d in self.data_blend]
        if not self.original_languages:
            raise DeltaMoEError("train.original_languages is empty: name the languages the base model already knows")
        blend_langs = {d.lang for d in self.data_blend}
        if self.stage == 2 and not blend_langs & set(self.original_languages):
            raise DeltaMoEError(f"train.data_blend ({sorted(blend_langs)}) has no original-language replay "
                                f"({self.original_languages}): stage 2's LPR loss needs it")
        if self.expert_allocation not in ("learned", "by-language"):
            raise DeltaMoEError(f"train.expert_allocation must be learned or by-language, got {self.expert_allocation!r}")
        self._check_allocation_fields()
        if self.lr_warmup_iters >= self.iterations:
            raise DeltaMoEError(f"train.lr_warmup_iters ({self.lr_warmup_iters}) must be below the training iterations "
                                f"({self.iterations}): megatron's scheduler decays after the warm-up")
        if self.min_lr > self.lr:
            raise DeltaMoEError(f"train.min_lr ({self.min_lr}) exceeds train.lr ({self.lr})")

    def _check_allocation_fields(self) -> None:
        if self.allocation_loss_coeff < 0:
            raise DeltaMoEError(f"train.allocation_loss_coeff must be >= 0, got {self.allocation_loss_coeff}")
        uses_map = self.expert_allocation == "by-language" or self.allocation_loss_coeff > 0
        if self.stage == 0 and (uses_map or self.expert_allocation_map is not None):
            raise DeltaMoEError("train.expert_allocation / allocation_loss_coeff / expert_allocation_map need experts; "
                                "stage 0 trains the dense model")
        if uses_map and self.expert_allocation_map is None:
            raise DeltaMoEError(f"train.expert_allocation {self.expert_allocation!r} with allocation_loss_coeff "
                                f"{self.allocation_loss_coeff} needs train.expert_allocation_map (language -> experts)")
        if self.expert_allocation_map is None:
            return
        raw = self.expert_allocation_map
        if not isinstance(raw, dict) or not raw:
            raise DeltaMoEError(f"train.expert_allocation_map must be a non-empty dict, got {raw!r}")
        raw = dict(raw) if "experts" in raw else {"experts": dict(raw)}
        unknown = set(raw) - {"experts", "shared_experts"}
        if unknown:
            raise DeltaMoEError(f"train.expert_allocation_map: unknown keys {sorted(unknown)} (expected experts, shared_experts)")
        self.expert_allocation_map = raw
        if not uses_map:
            warnings.warn("train.expert_allocation_map has no effect with expert_allocation 'learned' and "
                          "allocation_loss_coeff 0", stacklevel=3)

    @property
    def declared_languages(self) -> list[str]:
        """lang_id order of every stage: the original languages first, then the blend's (the trainer's --languages)."""
        return list(dict.fromkeys([*self.original_languages, *(d.lang for d in self.data_blend)]))

    def expert_allocation_for(self, upcycle: UpcycleRecipe, parallel: ParallelRecipe):
        """The validated ExpertAllocation of expert_allocation_map for this MoE shape (None without a map)."""
        from deltamoe.megatron_ext.moe.allocation import ExpertAllocation

        if self.expert_allocation_map is None:
            return None
        raw = self.expert_allocation_map
        return ExpertAllocation(languages=self.declared_languages, experts=raw["experts"],
                                shared_experts=raw.get("shared_experts", []), num_experts=upcycle.num_experts,
                                topk=upcycle.topk, expert_model_parallel_size=parallel.expert_model_parallel_size)

    @property
    def iterations(self) -> int:
        if self.train_iters is not None:
            return self.train_iters
        return math.ceil(self.train_tokens / (self.global_batch_size * self.seq_length))


@dataclass(kw_only=True)
class Recipe:
    name: str
    model: ModelRecipe
    upcycle: UpcycleRecipe = field(default_factory=UpcycleRecipe)
    parallel: ParallelRecipe
    precision: PrecisionRecipe
    train: TrainRecipe
    data_root: str = "/data/deltamoe"
    """Folder the data blend prefixes are relative to."""
    workdir: str = "/checkpoints/deltamoe"
    """Checkpoints go to <workdir>/<name>; the initial checkpoint is read from init_checkpoint."""
    init_checkpoint: str
    """Checkpoint the stage starts from (relative to workdir unless absolute): the upcycled MoE for stage 1,
    stage 1's output for stage 2. Resuming reads <workdir>/<name> first (megatron --pretrained-checkpoint)."""
    device: Literal["cuda", "cpu"] = "cuda"
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        from deltamoe.recipes.layout import check_layout

        if self.device not in ("cuda", "cpu"):
            raise DeltaMoEError(f"recipe.device must be cuda or cpu, got {self.device!r}")
        if self.device == "cpu" and self.precision.preset != "fp32":
            raise DeltaMoEError(f"recipe {self.name}: device cpu needs precision.preset fp32, got {self.precision.preset}")
        self.train.expert_allocation_for(self.upcycle, self.parallel)  # raises on a map that does not fit the MoE
        self._check_variant()
        check_layout(self)

    def _check_variant(self) -> None:
        """Combinations `deltamoe upcycle` or the trainer would refuse, refused when the recipe is built."""
        from deltamoe.architectures.moe import check_exportable

        u, t = self.upcycle, self.train
        if t.stage == 0:
            return
        shared = self.model.ffn_hidden_size if u.variant == "shared" else None
        check_exportable(self.model, {"shared_expert_intermediate_size": shared},
                         f"recipe {self.name}: upcycle.variant {u.variant!r} of a {self.model.architecture} model")
        if u.variant != "shared":
            return
        if t.lpr_loss_coeff:
            raise DeltaMoEError(f"recipe {self.name}: train.lpr_loss_coeff ({t.lpr_loss_coeff}) with upcycle.variant "
                                "'shared': that variant has no routed original expert (the original FFN is the shared "
                                "expert), so MoE-LPR's prior has no target; set it to 0.0 or use the copy variant")
        experts = (t.expert_allocation_map or {}).get("experts", {})
        originals = sorted(set(t.original_languages) & set(experts))
        if originals:
            raise DeltaMoEError(f"recipe {self.name}: train.expert_allocation_map gives routed experts to original "
                                f"language {originals[0]!r}, but with upcycle.variant 'shared' every routed expert is new "
                                "(the original FFN is the shared expert every token uses); leave it out of the map")


# The expansion lives next door to keep this module about the data; re-exported for `from ...config import`.
from deltamoe.recipes.layout import estimate_memory  # noqa: F401
from deltamoe.recipes.megatron_args import to_megatron_args  # noqa: F401
