"""DeltaMoE's flags on top of Megatron-LM's, and the Megatron model flags a DeltaMoE checkpoint implies.

The architecture is a fact of the checkpoint (`deltamoe.json`), not a choice: `checkpoint_model_flags` turns it into
Megatron's own flags (--num-layers, --swiglu, --num-experts, ...), which the entry puts *before* the user's flags, so
the user may still set anything Megatron offers (parallel sizes, precision, recompute, --moe-aux-loss-coeff,
--moe-grouped-gemm, ...). After parsing, `check_model_args` refuses architecture flags that contradict the checkpoint.
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
                       help="gamma in L = L_lm + gamma * L_lpr (MoE-LPR language-prior loss; stage 2)")
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
    text = Path(value).read_text() if not value.lstrip().startswith("{") else value
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DeltaMoEError(f"--expert-allocation-map: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DeltaMoEError("--expert-allocation-map: expected a JSON object")
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
    flags = [
        "--num-layers", str(arch.num_layers), "--hidden-size", str(arch.hidden_size),
        "--ffn-hidden-size", str(arch.ffn_hidden_size), "--num-attention-heads", str(arch.num_attention_heads),
        "--group-query-attention", "--num-query-groups", str(arch.num_query_groups),
        "--kv-channels", str(arch.kv_channels), "--max-position-embeddings", str(arch.max_position_embeddings),
        "--normalization", "RMSNorm", "--norm-epsilon", repr(arch.norm_epsilon), "--swiglu", "--disable-bias-linear",
        "--position-embedding-type", "rope", "--rotary-base", str(int(arch.rope_theta)),
        "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
    ]
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
    if arch.qkv_bias:
        flags += ["--add-qkv-bias"]
    if arch.qk_layernorm:
        flags += ["--qk-layernorm"]
    if not arch.tie_word_embeddings:
        flags += ["--untie-embeddings-and-output-weights"]
    if arch.rope_scaling_factor is not None:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", str(arch.rope_scaling_factor)]
    if _argv_value(user_argv, "--tokenizer-type") is None:
        flags += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(arch.vocab_size)]
    flags += ["--padded-vocab-size", str(meta.padded_vocab_size)]
    if moe:
        aux = STAGE_AUX_LOSS[stage]
        flags += ["--moe-router-load-balancing-type", "aux_loss" if aux > 0 else "none", "--moe-aux-loss-coeff", str(aux)]
    return flags


_ARCH_CHECKS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups", "kv_channels": "kv_channels",
}


def check_model_args(args, meta, arch) -> None:
    """Refuse Megatron flags that contradict the checkpoint's architecture (they would fail at load, less clearly)."""
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
    if args.num_experts % args.expert_model_parallel_size:
        raise DeltaMoEError(f"--num-experts ({args.num_experts}) must be divisible by --expert-model-parallel-size "
                            f"({args.expert_model_parallel_size})")
    if args.lpr_loss_coeff > 0 and not split_languages(args.original_languages):
        raise DeltaMoEError("--lpr-loss-coeff needs --original-languages (e.g. 'en')")
