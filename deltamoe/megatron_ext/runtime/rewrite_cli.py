"""Rewrite a DeltaMoE Megatron checkpoint's weights in the current torch_dist key layout.

Example (one process; a CPU is enough for models that fit in memory):
    deltamoe rewrite-checkpoint --megatron /ckpt/old-stage1 --out /ckpt/stage1-rewritten

Checkpoints from DeltaMoE before the Transformer Engine key layout (runtime/checkpoint_layout.py) still export, but the
trainer does not load them. This command loads the newest model weights of OLD (any layout, any TP/PP/EP it was saved
with) and saves them as a release checkpoint in the current layout, with OLD's metadata, upcycle plan and tokenizer.
Optimizer state and the iteration count are not carried: continue with `--pretrained-checkpoint OUT`, as a stage
starts. The weights are unchanged bit for bit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hf_folder import copy_tokenizer_files
from deltamoe.common.outputs import atomic_output_dir, check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--megatron", required=True, help="DeltaMoE Megatron checkpoint folder to rewrite")
    parser.add_argument("--out", required=True, help="output checkpoint folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true")


def rewrite_checkpoint(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    from deltamoe.megatron_ext.moe.plan import PLAN_FILE, UpcyclePlan
    from deltamoe.megatron_ext.runtime.checkpoint import load_model, read_metadata, save_checkpoint
    from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
    from deltamoe.megatron_ext.runtime.specs import CONVERSION_SPEC

    started = time.time()
    src = Path(src)
    meta = read_metadata(src)
    check_output_dir(out, inputs=[src], overwrite=overwrite)
    init_distributed(ParallelLayout())
    if torch.distributed.get_world_size() != 1:
        raise DeltaMoEError("rewrite-checkpoint runs in one process (torch_dist reshards any saved layout)")
    model, meta = load_model(src, spec=CONVERSION_SPEC)
    meta.source = {**meta.source, "rewritten_from": str(src.resolve())}
    with atomic_output_dir(out, inputs=[src], overwrite=overwrite) as tmp:
        save_checkpoint(model, tmp, meta)
        if (src / PLAN_FILE).exists():
            UpcyclePlan.load(src).save(tmp)
        copy_tokenizer_files(src, tmp)
    print(f"rewrote {src} -> {out} in the current layout ({time.time() - started:.1f}s)")
    return Path(out)


def main(args: argparse.Namespace) -> int:
    rewrite_checkpoint(args.megatron, args.out, overwrite=args.overwrite)
    return 0
