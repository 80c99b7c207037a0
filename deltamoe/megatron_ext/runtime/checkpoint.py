"""Megatron checkpoints in the layout Megatron-LM's trainer reads with `--load DIR --ckpt-format torch_dist`.

    DIR/latest_checkpointed_iteration.txt   "release" (a converted checkpoint has no training iteration)
    DIR/release/                            torch_dist shards (resharded on load: any TP/PP/EP)
    DIR/deltamoe.json                       what the model is: the source HF config, padded vocab, MoE settings
    DIR/deltamoe_upcycle.json               MoE only: the upcycle plan (see moe/plan.py)
    DIR/tokenizer files                     so `--tokenizer-model DIR` works

Training checkpoints that the trainer writes into the same folder (`iter_0000100/`) load the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltamoe.common import faults
from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hashing import versions
from deltamoe.common.outputs import disk_is_full, is_disk_full
from deltamoe.megatron_ext.internals import in_process_write_results
from deltamoe.megatron_ext.runtime.checkpoint_layout import checkpoint_keys, fit_request_to_checkpoint

METADATA_FILE = "deltamoe.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0


@dataclass(kw_only=True)
class CheckpointMetadata:
    hf_config: dict
    """config.json of the dense Hugging Face model the checkpoint came from."""
    padded_vocab_size: int
    params_dtype: str = "float32"
    moe: dict | None = None
    """MoESettings fields for an upcycled checkpoint; None for a dense one."""
    source: dict = field(default_factory=dict)
    """Where the weights came from: paths and sha256 of input files, command."""
    versions: dict = field(default_factory=versions)
    ignored_config_fields: list[str] = field(default_factory=list)
    """config.json fields no architecture table accounts for that the user accepted at import
    (`deltamoe import --ignore-config-field`); every later read of hf_config accepts the same ones."""

    def save(self, folder: str | os.PathLike) -> None:
        (Path(folder) / METADATA_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def architecture(self, source: str = METADATA_FILE):
        """(Architecture, ArchitectureConfig) of hf_config, read as strictly as at import."""
        from deltamoe.architectures import read_architecture_config

        return read_architecture_config(self.hf_config, source, ignored_fields=self.ignored_config_fields)


def read_metadata(folder: str | os.PathLike) -> CheckpointMetadata:
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        raise DeltaMoEError(f"{path}: missing (expected a DeltaMoE Megatron checkpoint made by `deltamoe import`)")
    try:
        return CheckpointMetadata(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise DeltaMoEError(f"{path}: not valid DeltaMoE checkpoint metadata: {e}") from None


def read_tracker(folder: str | os.PathLike) -> int | str | None:
    """The tracker file's content: an iteration (int), "release", or None when the folder has no tracker yet.

    Megatron-LM's trainer, given a tracker it cannot parse, prints an error and exits with status 0
    (megatron/training/checkpointing.py:353-371, `read_metadata` calls `sys.exit()`): every reader checks it here.
    """
    tracker = Path(folder) / TRACKER_FILE
    if not tracker.exists():
        return None
    try:
        value = tracker.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DeltaMoEError(f"{tracker}: cannot read ({e})") from None
    if value == "release":
        return value
    if value.isdigit():
        return int(value)
    shown = repr(value[:40]) if value else "an empty file"
    raise DeltaMoEError(f"{tracker}: corrupt checkpoint tracker: expected an iteration number or 'release', found "
                        f"{shown}; write into it the number of the newest complete iter_* folder next to it")


def checkpoint_dir(folder: str | os.PathLike) -> Path:
    """The torch_dist folder that `--load folder` would read: the tracker's iteration or `release`."""
    folder = Path(folder)
    value = read_tracker(folder)
    if value is None:
        raise DeltaMoEError(f"{folder / TRACKER_FILE}: missing (not a Megatron checkpoint folder)")
    sub = folder / ("release" if value == "release" else f"iter_{value:07d}")
    if not (sub / "metadata.json").exists():
        raise DeltaMoEError(f"{sub}: torch_dist checkpoint missing or incomplete (no metadata.json)")
    return sub


def _sharded_metadata() -> dict:
    """The content metadata Megatron-LM's trainer uses for model state (checkpointing._build_sharded_state_dict_metadata)."""
    return {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def save_checkpoint(model, folder: str | os.PathLike, metadata: CheckpointMetadata) -> None:
    """Save `model` (every rank calls this) as a release checkpoint the trainer loads with --load."""
    from megatron.core import dist_checkpointing, parallel_state

    folder = Path(folder)
    release = folder / "release"
    if torch.distributed.get_rank() == 0:
        release.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    sharded_metadata = {**_sharded_metadata(), "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    state = {
        "model": model.sharded_state_dict(metadata=sharded_metadata),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": 0,
    }
    try:
        with in_process_write_results():
            dist_checkpointing.save(state, str(release), content_metadata=_sharded_metadata())
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        if not isinstance(e, (KeyboardInterrupt, SystemExit)) and not is_disk_full(e) and disk_is_full(release):
            # torch_dist's writers drop the errno
            raise OSError(errno.ENOSPC, "No space left on device while saving a torch_dist checkpoint", str(release)) from e
        raise
    faults.point("checkpoint-saved")
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (folder / TRACKER_FILE).write_text("release")
        metadata.save(folder)
    torch.distributed.barrier()


def load_request(folder: str | os.PathLike, *, spec: str = "local", params_dtype: torch.dtype | None = None,
                 moe_overrides: dict | None = None, device: str | None = None, **parallel):
    """Build the checkpoint's model in the current parallel state, weights uninitialised (`device="meta"`: none at
    all), and its torch_dist load request: (model, metadata, sharded state dict, torch_dist folder)."""
    from megatron.core import parallel_state

    from deltamoe.megatron_ext.runtime.model_builder import MoESettings, build_gpt_model, transformer_config

    meta = read_metadata(folder)
    _, arch_config = meta.architecture(str(Path(folder) / METADATA_FILE))
    moe = MoESettings(**{**meta.moe, **(moe_overrides or {})}) if meta.moe else None
    dtype = params_dtype or getattr(torch, meta.params_dtype)
    parallel.setdefault("tensor_model_parallel_size", parallel_state.get_tensor_model_parallel_world_size())
    parallel.setdefault("pipeline_model_parallel_size", parallel_state.get_pipeline_model_parallel_world_size())
    parallel.setdefault("expert_model_parallel_size", parallel_state.get_expert_model_parallel_world_size())
    # Every weight comes from the checkpoint (load_model loads strictly): megatron's random initialisation would be wasted
    # (measured: 7.6 s of a 45 s CPU export of a 2 GB MoE).
    if device == "meta":  # megatron puts weights on the GPU (an explicit device) unless told to initialise on CPU
        parallel["use_cpu_initialization"] = True
    cfg = transformer_config(arch_config, moe=moe, params_dtype=dtype, perform_initialization=False, **parallel)
    with torch.device(device) if device else contextlib.nullcontext():
        model = build_gpt_model(arch_config, cfg, padded_vocab=meta.padded_vocab_size, spec=spec)
    sharded_metadata = {**_sharded_metadata(), "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    sharded = model.sharded_state_dict(metadata=sharded_metadata)
    torch_dist_dir = checkpoint_dir(folder)
    # Reads the current (TE-spec) key layout and DeltaMoE's legacy one (runtime/checkpoint_layout.py).
    fit_request_to_checkpoint(sharded, checkpoint_keys(torch_dist_dir), source=str(torch_dist_dir))
    return model, meta, sharded, torch_dist_dir


def load_model(folder: str | os.PathLike, *, spec: str = "local", params_dtype: torch.dtype | None = None,
               moe_overrides: dict | None = None, **parallel):
    """Build the checkpoint's model in the current parallel state and load its weights (resharding as needed)."""
    from megatron.core import dist_checkpointing

    model, meta, sharded, torch_dist_dir = load_request(folder, spec=spec, params_dtype=params_dtype,
                                                        moe_overrides=moe_overrides, **parallel)
    state = dist_checkpointing.load({"model": sharded}, str(torch_dist_dir))["model"]
    # Extra state no checkpoint holds (absent in legacy checkpoints; TE's core attention never writes its own) is
    # empty: TE modules and megatron's linears take None as "no quantizer state", as Megatron-LM's loader does.
    state.update({k: None for k in model.state_dict() if k.endswith("._extra_state") and k not in state})
    model.load_state_dict(state, strict=True)
    return model, meta
