"""DeltaMoE's flags on top of Megatron-LM's, and the Megatron model flags a DeltaMoE checkpoint implies.

The architecture is a fact of the checkpoint (`deltamoe.json`), not a choice: `checkpoint_model_flags` turns it into
Megatron's own flags (--num-layers, --swiglu, --num-experts, ...), which the entry puts *before* the user's flags, so
the user may still set anything Megatron offers (parallel sizes, precision, recompute, --moe-aux-loss-coeff,
--moe-grouped-gemm, ...). After parsing, and before Megatron validates anything, `check_model_args` refuses
architecture flags that contradict the checkpoint and every routing flag whose function the Hugging Face MoE formats
cannot express (DESIGN.md decision 12; `REFUSED_ROUTING` lists them with the reason). Routing they can express is
recorded in the checkpoint the trainer saves (`recorded_metadata`) and written to the exported config:
`--moe-router-pre-softmax` (top-k of the full softmax, not renormalised) is Qwen2-/Qwen3-MoE's `norm_topk_prob: false`.
Flags that change a loss or the implementation, not the routed function, stay free: the load-balancing losses
(aux_loss, seq_aux_loss, global_aux_loss, none), --moe-aux-loss-coeff, --moe-z-loss-coeff, --moe-router-dtype,
--moe-router-fusion, the token dispatchers, --moe-permute-fusion, --moe-grouped-gemm, --moe-router-padding-for-*.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError

STAGE_AUX_LOSS = {0: 0.0, 1: 0.01, 2: 0.0}
"""Default load-balancing loss per stage: on while new experts learn (stage 1), off in the routers-only review (the
language prior decides routing there). --moe-aux-loss-coeff overrides."""


def add_deltamoe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("DeltaMoE")
    group.add_argument("--deltamoe-stage", type=int, choices=[0, 1, 2], required=True,
                       help="1: train new experts + routers (expert 0 frozen); 2: routers only (review); "
                            "0: dense continued pre-training of every parameter (the dense-CPT baseline)")
    group.add_argument("--lpr-loss-coeff", type=float, default=0.0,
                       help="gamma in L = L_lm + gamma * L_lpr (MoE-LPR language-prior loss; stage 2), L_lpr averaged "
                            "over MoE layers and original-language tokens: 0.1 is the paper's gamma")
    group.add_argument("--router-loss-layer-reduction", choices=["mean", "sum"], default="mean",
                       help="how the LPR and allocation losses combine over MoE layers: mean (MoE-LPR's reference "
                            "code; default) or sum (each layer adds the full coefficient, as zjwang21/Megatron-LM-MoELPR "
                            "attaches its LPR coefficient in every MoE layer: num_layers times the mean)")
    group.add_argument("--original-languages", type=str, default=None,
                       help="comma-separated languages the dense model already knows, e.g. 'en' (routed to expert 0)")
    group.add_argument("--languages", type=str, default=None,
                       help="comma-separated declared languages in lang_id order (default: the --data-path sidecars' "
                            "languages in order of appearance)")
    group.add_argument("--expert-allocation", choices=["learned", "by-language"], default="learned",
                       help="learned: routers choose freely; by-language: experts outside a token's language "
                            "allocation (--expert-allocation-map) are masked before top-k")
    group.add_argument("--expert-allocation-map", type=str, default=None,
                       help='JSON object or path to a JSON file: {"experts": {"en": [0], "es": [1, 2]}, '
                            '"shared_experts": []} (or just the "experts" object)')
    group.add_argument("--allocation-loss-coeff", type=float, default=0.0,
                       help="weight of the soft allocation loss pushing router mass onto each language's experts")
    group.add_argument("--routing-log-interval", type=int, default=None,
                       help="iterations between per-language routing/loss records (default: --log-interval)")
    group.add_argument("--routing-log-file", type=str, default=None,
                       help="JSONL file for per-language metrics (default: <--save>/deltamoe_routing.jsonl)")
    group.add_argument("--deltamoe-layer-spec", choices=["auto", "te", "fast", "local"], default="auto",
                       help="layer spec (auto: Transformer Engine when usable, else DeltaMoE's fast torch spec)")
    group.add_argument("--verbose", action="store_true",
                       help="show every warning of megatron-core, torch and transformers (also DELTAMOE_VERBOSE=1); "
                            "known harmless ones are filtered by default (deltamoe/common/quiet.py)")
    return parser


def split_languages(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def read_allocation_map(value: str) -> dict:
    """The --expert-allocation-map value: inline JSON or a JSON file."""
    inline = value.lstrip().startswith("{")
    where = "--expert-allocation-map" if inline else f"--expert-allocation-map {value}"
    if not inline:
        if not Path(value).is_file():
            raise DeltaMoEError(f"{where}: no such file (expected inline JSON such as "
                                '\'{"experts": {"es": [1, 2]}}\' or the path of a JSON file)')
        try:
            value = Path(value).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DeltaMoEError(f"{where}: cannot read ({e})") from None
    try:
        raw = json.loads(value)
    except json.JSONDecodeError as e:
        raise DeltaMoEError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DeltaMoEError(f"{where}: expected a JSON object")
    return raw if "experts" in raw else {"experts": raw}


def _argv_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def checkpoint_folder(argv: list[str]) -> Path:
    """Where the model facts come from: --load when it already holds DeltaMoE metadata (resume), else
    --pretrained-checkpoint (the upcycled MoE, or stage 1's output for stage 2)."""
    from deltamoe.megatron_ext.runtime.checkpoint import METADATA_FILE

    load, pretrained = _argv_value(argv, "--load"), _argv_value(argv, "--pretrained-checkpoint")
    for folder in (load, pretrained):
        if folder and (Path(folder) / METADATA_FILE).exists():
            return Path(folder)
    raise DeltaMoEError(
        f"no DeltaMoE checkpoint metadata ({METADATA_FILE}) in --load ({load}) or --pretrained-checkpoint ({pretrained}): "
        "start from `deltamoe upcycle`'s output with --pretrained-checkpoint UPCYCLED --load OUT --save OUT"
    )


def checkpoint_model_flags(meta, arch, *, stage: int, user_argv: list[str]) -> list[str]:
    """Megatron flags describing the checkpoint's model (architecture, MoE shape, vocabulary) plus stage defaults."""
    if stage == 0 and meta.is_moe:
        raise DeltaMoEError("--deltamoe-stage 0 (dense continued pre-training) needs a dense checkpoint; this one is an MoE")
    if stage != 0 and not meta.is_moe:
        raise DeltaMoEError(f"--deltamoe-stage {stage} trains upcycled MoE checkpoints; run `deltamoe upcycle` on this "
                            "dense one first (or --deltamoe-stage 0 for dense continued pre-training)")
    moe = meta.moe
    flags = architecture_flags(arch)
    if moe:
        flags += [
            "--num-experts", str(moe["num_experts"]), "--moe-router-topk", str(moe["topk"]),
            "--moe-ffn-hidden-size", str(moe.get("ffn_hidden_size") or arch.ffn_hidden_size),
            "--moe-router-score-function", "softmax", "--moe-router-dtype", "fp32",
            "--moe-token-dispatcher-type", moe.get("token_dispatcher", "alltoall"),
        ]
    if moe and moe.get("shared_expert_intermediate_size"):
        flags += ["--moe-shared-expert-intermediate-size", str(moe["shared_expert_intermediate_size"])]
        if moe.get("shared_expert_gate"):
            flags += ["--moe-shared-expert-gate"]
    if moe and moe.get("router_pre_softmax"):
        flags += ["--moe-router-pre-softmax"]  # recorded by an earlier stage: the routed function continues
    if _argv_value(user_argv, "--tokenizer-type") is None:
        flags += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(arch.vocab_size)]
    flags += ["--padded-vocab-size", str(meta.padded_vocab_size)]
    if moe:
        aux = STAGE_AUX_LOSS[stage]
        flags += ["--moe-router-load-balancing-type", "aux_loss" if aux > 0 else "none", "--moe-aux-loss-coeff", str(aux)]
    return flags


def architecture_flags(arch) -> list[str]:
    """Megatron-LM flags for the function the checkpoint's HF config describes, the same settings
    `model_builder.transformer_config` uses (`build_gpt_model` refuses a TransformerConfig that differs).
    GPTModel's rotary settings come from the checkpoint in both paths (`build_gpt_model`); the rotary flags mirror
    them where Megatron-LM's parser can hold them (--rotary-base and --rotary-seq-len-interpolation-factor are ints)."""
    flags = [
        "--num-layers", str(arch.num_layers), "--hidden-size", str(arch.hidden_size),
        "--ffn-hidden-size", str(arch.ffn_hidden_size), "--num-attention-heads", str(arch.num_attention_heads),
        "--group-query-attention", "--num-query-groups", str(arch.num_query_groups),
        "--kv-channels", str(arch.kv_channels), "--max-position-embeddings", str(arch.max_position_embeddings),
        "--normalization", "RMSNorm", "--norm-epsilon", repr(arch.norm_epsilon), "--swiglu", "--disable-bias-linear",
        "--position-embedding-type", arch.position_embedding_type, "--rotary-base", str(int(arch.rope_theta)),
        "--attention-dropout", repr(arch.attention_dropout), "--hidden-dropout", "0.0",
    ]
    if arch.qkv_bias:
        flags += ["--add-qkv-bias"]
    if arch.qk_layernorm:
        flags += ["--qk-layernorm"]
    if not arch.tie_word_embeddings:
        flags += ["--untie-embeddings-and-output-weights"]
    if arch.rope_scaling_factor is not None:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", str(arch.rope_scaling_factor)]
    if arch.rope_linear_factor is not None and float(arch.rope_linear_factor).is_integer():
        flags += ["--rotary-seq-len-interpolation-factor", str(int(arch.rope_linear_factor))]
    if arch.yarn is not None:
        y = arch.yarn
        flags += ["--rotary-scaling-factor", repr(y.scaling_factor),
                  "--yarn-original-max-position-embeddings", str(y.original_max_position_embeddings),
                  "--yarn-beta-fast", repr(y.beta_fast), "--yarn-beta-slow", repr(y.beta_slow),
                  "--mscale", repr(y.mscale), "--mscale-all-dim", repr(y.mscale_all_dim),
                  "--yarn-correction-range-round-to-int" if y.correction_range_round_to_int
                  else "--no-yarn-correction-range-round-to-int",
                  # TE's fused RoPE refuses YaRN's mscale (rope_utils.apply_rotary_pos_emb)
                  "--no-rope-fusion"]
    if arch.sliding_window is not None:
        left, right = arch.window_size
        flags += ["--window-size", f"{left},{right}",
                  "--window-attn-skip-freq", "[" + ",".join(str(x) for x in arch.sliding_window_layers) + "]",
                  # megatron's fused causal softmax ignores window_size (fusions/fused_softmax.py)
                  "--no-masked-softmax-fusion"]
    return flags


_ARCH_CHECKS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups", "kv_channels": "kv_channels",
}


def _load_balancing_types(value) -> list[str]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


REFUSED_ROUTING = (
    ("moe_router_score_function", lambda v: v != "softmax",
     "the HF MoE formats score experts with a softmax over the router logits"),
    ("moe_router_topk_scaling_factor", lambda v: v not in (None, 1.0), "no HF MoE format scales the routing weights"),
    ("moe_router_enable_expert_bias", bool,
     "the aux-loss-free expert bias changes which experts are chosen, and no HF MoE format has it"),
    ("moe_router_num_groups", lambda v: v is not None, "no HF MoE format limits top-k to groups of experts"),
    ("moe_router_group_topk", lambda v: v is not None, "no HF MoE format limits top-k to groups of experts"),
    ("moe_router_load_balancing_type", lambda v: bool({"sinkhorn", "quantile_balancing"} & set(_load_balancing_types(v))),
     "sinkhorn and quantile balancing choose experts by a balancing procedure, not by softmax top-k"),
    ("moe_expert_capacity_factor", lambda v: v is not None,
     "a capacity factor drops tokens in training, and the HF formats route every token"),
    ("moe_expert_rank_capacity_factor", lambda v: v is not None,
     "a rank capacity factor drops tokens in training, and the HF formats route every token"),
    ("moe_input_jitter_eps", lambda v: v is not None,
     "input jitter multiplies the router input by noise in every forward pass (Megatron applies it at evaluation too)"),
    ("moe_router_force_load_balancing", bool, "it routes by random logits (a benchmarking switch)"),
    ("moe_router_force_biased", lambda v: v is not None, "it adds random biases to the router logits (a benchmarking switch)"),
    ("moe_enable_routing_replay", bool, "it replays recorded routing instead of the router's"),
    ("moe_apply_probs_on_input", bool, "it weights each expert's input, and the HF formats weight its output"),
    ("moe_latent_size", lambda v: v is not None, "no HF MoE format has latent projections around the experts"),
    ("moe_layer_freq", lambda v: v != 1, "every layer of an upcycled checkpoint is an MoE layer"),
    ("moe_mlp_glu_interleave_size", lambda v: v is not None, "the checkpoint stores each expert's fc1 as [gate; up]"),
    ("moe_shared_expert_glu_interleave_size", lambda v: v is not None, "the checkpoint stores the shared fc1 as [gate; up]"),
    ("moe_use_upcycling", bool, "the checkpoint is already an upcycled MoE (`deltamoe upcycle` made it)"),
)
"""Megatron-LM routing flags (megatron/core/transformer/moe/router.py TopKRouter.routing / forward and
moe_utils.topk_routing_with_score_function, megatron-core 0.19.2) that change the routed function in a way
Mixtral / Qwen2-MoE / Qwen3-MoE (softmax -> top-k -> optional renormalisation, transformers 5) cannot express:
(attribute, refused(value), why). Each is refused when training starts, before any step."""


def _flag(attribute: str) -> str:
    return "--" + attribute.replace("_", "-")


def check_routing_args(args, moe: dict) -> None:
    """Refuse, with one error naming the flag, routing the HF formats cannot express or that contradicts the checkpoint."""
    for attribute, refused, why in REFUSED_ROUTING:
        value = getattr(args, attribute, None)
        if refused(value):
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            raise DeltaMoEError(f"{_flag(attribute)} {shown}: not supported: {why}, so the exported model could not "
                                "compute the trained one (exact or refused, DESIGN.md decision 12)")
    expected = {"moe_ffn_hidden_size": moe.get("ffn_hidden_size") or args.ffn_hidden_size,
                "moe_shared_expert_intermediate_size": moe.get("shared_expert_intermediate_size"),
                "moe_shared_expert_gate": bool(moe.get("shared_expert_gate"))}
    for attribute, value in expected.items():
        if getattr(args, attribute) != value:
            raise DeltaMoEError(f"{_flag(attribute)} {getattr(args, attribute)} contradicts the checkpoint ({value}); "
                                "leave MoE shape flags to the checkpoint")


def check_variant_args(args, plan) -> None:
    """The shared variant has no routed original FFN: LPR (routed expert 0) and original-language allocations are refused."""
    if plan is None or plan.variant != "shared":
        return
    if args.lpr_loss_coeff > 0:
        raise DeltaMoEError(
            "--lpr-loss-coeff: the shared variant has no routed original expert (its original FFN is the always-on "
            "shared expert, and routed expert 0 is a granular slice with a zero read-out), so MoE-LPR's prior has "
            "nothing to route original-language tokens to; use --lpr-loss-coeff 0, or upcycle with --variant copy")
    if args.expert_allocation_map:
        raw = read_allocation_map(args.expert_allocation_map)
        originals = sorted(set(split_languages(args.original_languages)) & set(raw["experts"]))
        if originals:
            raise DeltaMoEError(
                f"--expert-allocation-map gives routed experts to original language {originals[0]!r}, but in the shared "
                "variant every routed expert is new (the original FFN is the shared expert every token uses); leave "
                "the original languages out of the map")


def check_model_args(args, meta, arch, plan=None) -> None:
    """Refuse Megatron flags that contradict the checkpoint's architecture (they would fail at load, less clearly) and
    routing the HF formats cannot express. Runs on the parsed flags before Megatron's own validation."""
    for ours, theirs in _ARCH_CHECKS.items():
        if getattr(args, theirs) != getattr(arch, ours):
            raise DeltaMoEError(f"--{theirs.replace('_', '-')} {getattr(args, theirs)} contradicts the checkpoint "
                                f"({getattr(arch, ours)}); leave architecture flags to the checkpoint")
    if args.lpr_loss_coeff > 0 and args.deltamoe_stage != 2:
        raise DeltaMoEError("--lpr-loss-coeff is the stage-2 (review) loss; use it with --deltamoe-stage 2")
    moe = meta.moe
    if moe is None:
        if args.num_experts:
            raise DeltaMoEError(f"--num-experts {args.num_experts} contradicts the dense checkpoint")
        return
    if args.num_experts != moe["num_experts"] or args.moe_router_topk != moe["topk"]:
        raise DeltaMoEError(f"--num-experts/--moe-router-topk ({args.num_experts}/{args.moe_router_topk}) contradict the "
                            f"checkpoint ({moe['num_experts']}/{moe['topk']})")
    check_routing_args(args, moe)
    if args.num_experts % args.expert_model_parallel_size:
        raise DeltaMoEError(f"--num-experts ({args.num_experts}) must be divisible by --expert-model-parallel-size "
                            f"({args.expert_model_parallel_size})")
    if args.lpr_loss_coeff > 0 and not split_languages(args.original_languages):
        raise DeltaMoEError("--lpr-loss-coeff needs --original-languages (e.g. 'en')")
    check_variant_args(args, plan)


def recorded_moe(meta, args) -> dict | None:
    """The MoE settings the trainer's checkpoints record: the source's, with the routing this run trains with."""
    if meta.moe is None:
        return None
    return {**meta.moe, "router_pre_softmax": bool(args.moe_router_pre_softmax)}


def training_record(args) -> dict:
    """What this stage did to routing, for the checkpoint's `source.training` (the export's model card reads it)."""
    return {"expert_allocation": args.expert_allocation, "lpr_loss_coeff": args.lpr_loss_coeff,
            "allocation_loss_coeff": args.allocation_loss_coeff,
            "router_loss_layer_reduction": args.router_loss_layer_reduction,
            "router_pre_softmax": bool(args.moe_router_pre_softmax)}
