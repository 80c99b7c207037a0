"""What a training checkpoint folder was trained on: `deltamoe_training.json`, written by the trainer into --save.

Megatron's torch_dist checkpoints keep the run's arguments inside the distcp shards, where only a full checkpoint load
reaches them; model cards and reports need a few facts without loading gigabytes. The trainer therefore writes one
JSON file next to `deltamoe.json`: one entry per stage that led to this checkpoint (stage 1's entry travels into stage
2's folder, as the upcycle plan does), each with its data (prefix, blend weight, language and size from the
`prepare-data` language tag), batch shape and the iterations it completed. Tokens seen = iterations x global batch x
sequence length (Megatron's accounting: packed sequences, every position a token).

    {"stages": [{"stage": 1, "checkpoint": "/ckpt/stage1", "source": "/ckpt/moe", "iterations": 2000,
                 "train_iters": 2000, "global_batch_size": 64, "seq_length": 4096,
                 "data": [{"prefix": "/data/es", "weight": 1.0, "language": "es", "num_tokens": 123456789}], ...}]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RECORD_FILE = "deltamoe_training.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"


def completed_iterations(folder: str | os.PathLike) -> int | None:
    """The iteration of the newest checkpoint in a Megatron folder (None: none, or a converted `release` one)."""
    tracker = Path(folder) / TRACKER_FILE
    if not tracker.exists():
        return None
    value = tracker.read_text().strip()
    return None if value == "release" else int(value)


def read_training_record(folder: str | os.PathLike) -> list[dict]:
    """The stages recorded in `folder` (a training checkpoint, or an HF folder exported from one); [] if none."""
    path = Path(folder) / RECORD_FILE
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("stages", []))


def stage_entry(args, blend, source: Path) -> dict:
    """This run's entry, from Megatron's parsed args and the language blend."""
    return {
        "stage": args.deltamoe_stage,
        "checkpoint": str(Path(args.save).resolve()) if args.save else None,
        "source": str(source.resolve()),
        "iterations": None,
        "train_iters": args.train_iters,
        "global_batch_size": args.global_batch_size,
        "seq_length": args.seq_length,
        "data": [{"prefix": e.prefix, "weight": e.weight, "language": e.tag.language, "num_tokens": e.tag.num_tokens,
                  "num_documents": e.tag.num_documents, "inputs": [i.path for i in e.tag.inputs]}
                 for e in blend.entries],
        "languages": list(blend.languages),
        "original_languages": sorted(blend.original_languages),
        "lr": args.lr,
        "lr_decay_style": args.lr_decay_style,
        "lpr_loss_coeff": args.lpr_loss_coeff,
        "moe_aux_loss_coeff": getattr(args, "moe_aux_loss_coeff", None),
        "expert_allocation": args.expert_allocation,
        "allocation_loss_coeff": args.allocation_loss_coeff,
        "routing_log_file": args.routing_log_file or (str(Path(args.save) / "deltamoe_routing.jsonl") if args.save else None),
        "parallel": {"tensor": args.tensor_model_parallel_size, "pipeline": args.pipeline_model_parallel_size,
                     "expert": getattr(args, "expert_model_parallel_size", 1), "world_size": args.world_size},
    }


def write_training_record(save: str | os.PathLike, source: str | os.PathLike, entry: dict) -> Path:
    """Write --save's record: the source's stages (each with its completed iterations), then this run's entry.

    A resumed run (source == save) replaces its own, last entry, and keeps that entry's source: the checkpoint the
    stage started from, not the folder it resumed from."""
    save, source = Path(save), Path(source)
    if save.resolve() == source.resolve():
        own = read_training_record(save)
        history = own[:-1]
        if own and own[-1].get("stage") == entry.get("stage") and own[-1].get("source"):
            entry = {**entry, "source": own[-1]["source"]}
    else:
        history = read_training_record(source)
        if history:
            history[-1] = {**history[-1], "iterations": completed_iterations(source)}
    path = save / RECORD_FILE
    tmp = save / f".{RECORD_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"stages": [*history, entry]}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def stages_with_iterations(folder: str | os.PathLike) -> list[dict]:
    """The record of a training folder with the last stage's completed iterations filled in from its tracker."""
    stages = read_training_record(folder)
    if stages and stages[-1].get("iterations") is None:
        stages[-1] = {**stages[-1], "iterations": completed_iterations(folder)}
    return stages
