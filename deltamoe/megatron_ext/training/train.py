"""Train an upcycled DeltaMoE checkpoint with Megatron-LM's trainer (`megatron.training.pretrain`): stage 1 or 2.

Megatron-LM's own flags do everything they usually do (parallel sizes, precision, optimizer, schedule, checkpoints,
logging); the architecture comes from the checkpoint's `deltamoe.json`. DeltaMoE adds the model provider (freezing
per stage, router probe), the forward step (LM loss + router losses, per-language metrics), the language-tagged
dataset provider and a few flags (see `flags.py`: --deltamoe-stage, --lpr-loss-coeff, --router-loss-layer-reduction,
--original-languages, --expert-allocation, --allocation-loss-coeff, --routing-log-interval, --routing-log-file).
Routing flags the Hugging Face MoE formats cannot express are refused before Megatron starts (flags.REFUSED_ROUTING);
the routing a run trains with is recorded in <--save>/deltamoe.json, which `deltamoe export` writes into the HF config.
With `--expert-allocation by-language`, experts that no language of the data may use are frozen for the run and the
routers carry no weight decay, so those experts and their router rows stay bit-identical (moe/freezing.py).

`deltamoe train --help` lists DeltaMoE's flags, then every Megatron-LM flag. `deltamoe train` and
`python -m deltamoe.megatron_ext.training.train` are the same entry; torchrun launches either (`-m deltamoe train`).

Stage 1, one process (CPU works: gloo and the CPU flags below are added when CUDA is absent):
    deltamoe train --deltamoe-stage 1 \
        --pretrained-checkpoint /ckpt/moe --load /ckpt/stage1 --save /ckpt/stage1 --ckpt-format torch_dist \
        --data-path 1.0 /data/es_text --original-languages en \
        --seq-length 1024 --micro-batch-size 4 --global-batch-size 64 --train-iters 2000 \
        --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters 100 --bf16 --save-interval 500

One node, 8 GPUs, expert parallel 4 (torchrun):
    torchrun --nproc-per-node 8 -m deltamoe train --deltamoe-stage 1 \
        --expert-model-parallel-size 4 --use-distributed-optimizer <the flags above>

Stage 2 (routers only, language-prior loss, original-language replay in the blend):
    torchrun --nproc-per-node 8 -m deltamoe train --deltamoe-stage 2 \
        --pretrained-checkpoint /ckpt/stage1 --load /ckpt/stage2 --save /ckpt/stage2 \
        --data-path 0.5 /data/en_replay 0.5 /data/es_text --original-languages en --lpr-loss-coeff 0.1 ...

A cluster (Slurm; one task per node, torchrun starts the local ranks):
    srun --nodes 4 --ntasks-per-node 1 torchrun --nnodes 4 --nproc-per-node 8 \
        --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:29500 -m deltamoe train <flags>

Restarting the same command resumes from the newest checkpoint in --save (--load = --save); the first run, with
nothing there yet, starts from --pretrained-checkpoint with a fresh optimizer (Megatron's finetune semantics).
With several processes the process group is made first and every rank's start-up checks (checkpoint, flags, data)
are agreed on: a rank that fails them stops every rank with an error before Megatron starts (docs/reliability.md).
Per-language LM loss and the router probability of expert 0 per layer go to --routing-log-file (JSONL, default
<--save>/deltamoe_routing.jsonl) and to TensorBoard with --tensorboard-dir; rank 0 prints them as one line per
--routing-log-interval with tokens/s and the ETA, next to Megatron's own iteration line (learning rate, grad norm,
loss scale, skipped iterations), which stays as Megatron users know it. What the run trained on (data, languages,
batch shape, iterations) goes to <--save>/deltamoe_training.json for model cards (`record.py`).

Optimizer and checkpoints (why the entry adds --use-distributed-optimizer by default):
- Frozen parameters have no optimizer state. Megatron's non-distributed optimizer writes its state under the model's
  checkpoint keys, where all experts of all layers form one global tensor; with expert 0 frozen that tensor is only
  partly covered and torch_dist refuses to save it. The distributed optimizer writes flat per-rank buffers instead,
  which only hold the trainable parameters, so it saves and resumes with frozen experts (and shards the optimizer
  state over data-parallel ranks, as large runs want anyway).
- Resuming at another TP or PP size (Megatron-LM's resharding resume) needs the run that saved to pass
  --dist-ckpt-optim-fully-reshardable: the default per-rank buffer format (`dp_reshardable`) reshards over data
  parallelism only, and checkpointing.py refuses it otherwise. That format writes optimizer state under the model's
  keys again; `internals.complete_frozen_expert_optimizer_state` fills the frozen experts' part of those tensors
  with zeros, which a load never reads. tests/test_parallel_layouts.py saves at TP 2 · PP 2 · EP 2 · ETP 2 and
  resumes at TP 1 · PP 1 · EP 2 on the unbroken loss curve. A new stage reshards freely (it loads weights only).
- Without apex/Transformer Engine megatron falls back to torch's AdamW, which keeps a `step` per parameter state.
  On resume megatron asks the still-empty optimizer for a state-dict template and asserts it has exactly one step
  (`assert len(steps) == 1`, distrib_optimizer.py; seen on CPU and on an H200 without TE). `internals.fix_torch_adam_resume`
  gives an empty torch AdamW the state it would create at its first step (step 0, zero moments) before that
  template is built; the loaded checkpoint then overwrites it, under torch.no_grad() (with float32 parameters the
  optimizer's main-parameter shards are views of leaf parameters). Megatron then leaves every parameter's `step`
  at the template's 0 (or one tensor shared by all parameters, which AdamW would increment once per parameter): each
  state gets its own tensor holding the checkpoint's step. With these three
  fixes a resumed run continues the unbroken loss curve exactly (tests/test_training.py). Production containers with
  apex/TE never take this path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path

import torch

from deltamoe.common import faults, quiet
from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.faults import fault_point
from deltamoe.megatron_ext.internals import build_datasets_on_every_rank

CPU_FLAGS = [
    "--distributed-backend", "gloo", "--use-cpu-initialization", "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
    "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
]
NO_TE_FLAGS = ["--transformer-impl", "local", "--no-rope-fusion", "--no-masked-softmax-fusion",
               "--no-gradient-accumulation-fusion", "--no-persist-layer-norm"]


class _State:
    """What the entry learns before `pretrain` and its callbacks need (Megatron calls them without context)."""

    meta = None
    arch = None
    source = None
    plan = None
    blend = None
    probe = None
    metrics = None
    idle_experts: list[int] = []
    """Experts no token of this run can reach (by-language masking): frozen, and the routers carry no weight decay."""
    freeze_reports: list = []


def _has_fused_adam() -> bool:
    for module in ("transformer_engine.pytorch.optimizers", "apex.optimizers"):
        try:
            __import__(module)
            return True
        except Exception:
            continue
    return False


def default_flags(argv: list[str], meta, arch, stage: int) -> list[str]:
    from deltamoe.megatron_ext.training.flags import checkpoint_model_flags

    flags = checkpoint_model_flags(meta, arch, stage=stage, user_argv=argv)
    flags += ["--split", "100,0,0", "--ckpt-format", "torch_dist", "--eval-iters", "0", "--eval-interval", "1000",
              "--use-distributed-optimizer"]
    if importlib.util.find_spec("one_logger") is None:  # NVIDIA-internal metrics package: say so once, not per run
        flags += ["--no-one-logger"]
    if not torch.cuda.is_available():
        flags += CPU_FLAGS
    else:
        from deltamoe.megatron_ext.runtime.specs import HAVE_TE

        if not HAVE_TE:
            flags += NO_TE_FLAGS
    return flags


def _to_device(t: torch.Tensor) -> torch.Tensor:
    return t.cuda(non_blocking=True) if torch.cuda.is_available() else t


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Build the checkpoint's MoE (weights come from --load / --pretrained-checkpoint), freeze for the stage, probe routers."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.training import get_args, print_rank_0
    from megatron.training.argument_utils import core_transformer_config_from_args

    from deltamoe.megatron_ext.internals import NO_WEIGHT_DECAY_ATTR
    from deltamoe.megatron_ext.moe.freezing import apply_stage_freezing, let_gradients_pass_frozen_embeddings
    from deltamoe.megatron_ext.moe.router_probe import install_router_probe, routers
    from deltamoe.megatron_ext.runtime.model_builder import build_gpt_model

    args = get_args()
    cfg = config or core_transformer_config_from_args(args)
    model = build_gpt_model(_State.arch, cfg, padded_vocab=_State.meta.padded_vocab_size, spec=args.deltamoe_layer_spec,
                            pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
    if args.deltamoe_stage > 0:  # stage 0 (dense continued pre-training) trains every parameter
        frozen = sorted({*_State.plan.frozen_experts, *_State.idle_experts})
        report = apply_stage_freezing(model, stage=args.deltamoe_stage, frozen_experts=frozen,
                                      num_experts=args.num_experts)
        _State.freeze_reports.append(report)
        print(f"[rank {torch.distributed.get_rank()}] {report.summary()}", flush=True)
        if _State.idle_experts:
            for router in routers(model):
                setattr(router.weight, NO_WEIGHT_DECAY_ATTR, True)
            print_rank_0(f"DeltaMoE: experts {_State.idle_experts} receive no tokens by design (by-language masking, "
                         "no language of the data may use them): frozen; routers without weight decay")
        let_gradients_pass_frozen_embeddings(model)
        install_router_probe(model, _State.probe)

    def finalize_and_report(*f_args, **f_kwargs):
        result = finalize_model_grads(*f_args, **f_kwargs)
        _State.probe.end_iteration()
        _State.metrics.maybe_report(get_args().curr_iteration + 1)
        return result

    cfg.finalize_model_grads_func = finalize_and_report
    frozen = _State.plan.frozen_experts if _State.plan else "none (dense)"
    print_rank_0(f"DeltaMoE stage {args.deltamoe_stage}: frozen experts {frozen}; {_runtime_summary(args.deltamoe_layer_spec)}")
    return model


def _runtime_summary(requested_spec: str) -> str:
    """The layer spec and optimizer implementation in one line (megatron-core's fallback warnings are filtered)."""
    from deltamoe.megatron_ext.runtime.environment import fused_adam_source, spec_choice

    name, why = spec_choice(requested_spec)
    fused = fused_adam_source()
    optimizer = f"fused Adam from {fused}" if fused else "torch AdamW (neither Transformer Engine nor apex is installed)"
    return f"layer spec {name} ({why}); optimizer {optimizer}"


def get_batch(data_iterator) -> dict[str, torch.Tensor]:
    batch = next(data_iterator)
    return {k: _to_device(v) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _tensor_parallel_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def loss_func(batch: dict, training: bool, output_tensor: torch.Tensor):
    """Megatron's per-token loss contract: (loss sum, token count, {name: [sum, count]} for logging)."""
    loss_mask = batch["loss_mask"].float()
    losses = output_tensor.float()
    loss_sum = (losses * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    if training and _tensor_parallel_rank() == 0:  # TP ranks hold the same per-token losses: count them once
        _State.metrics.add_lm(losses.detach(), loss_mask, batch["lang_id"])
    reporting = torch.cat([loss_sum.detach().view(1), num_tokens.float().view(1)])
    return loss_sum, num_tokens, {"lm loss": reporting}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    if _State.metrics.started is None:  # the first micro-batch starts the clock of tokens/s and the ETA
        from megatron.training import get_args

        _State.metrics.start_clock(get_args().curr_iteration)
    batch = get_batch(data_iterator)
    _State.probe.set_batch(batch["lang_id"], batch["original_language_mask"])
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(loss_func, batch, model.training)


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    from megatron.training import get_args

    from deltamoe.megatron_ext.data.blend import build_language_tagged_datasets, gpt_dataset_config

    args = get_args()
    config = gpt_dataset_config(
        _State.blend, sequence_length=args.seq_length, random_seed=args.seed, split=args.split,
        path_to_cache=args.data_cache_path, eod_mask_loss=args.eod_mask_loss,
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
    )
    sizes = [n if n else 0 for n in train_val_test_num_samples]
    return build_language_tagged_datasets(_State.blend, config, sizes)


# Every rank reads its own batches (the router probe needs them everywhere).
build_datasets_on_every_rank(datasets_provider)


def _prepare_save_folder(args, source: Path) -> None:
    """Make --save a DeltaMoE checkpoint folder too: the upcycle plan and tokenizer next to megatron's iterations, and
    the metadata with the routing this run trains with (what export writes into the HF config) and its record."""
    import dataclasses

    from deltamoe.common.hf_folder import TOKENIZER_FILES
    from deltamoe.megatron_ext.moe.plan import PLAN_FILE
    from deltamoe.megatron_ext.runtime.checkpoint import METADATA_FILE
    from deltamoe.megatron_ext.training.flags import recorded_moe, training_record
    from deltamoe.megatron_ext.training.record import stage_entry, write_training_record

    save = args.save
    if not save or int(os.environ.get("RANK", "0")) != 0:
        return
    Path(save).mkdir(parents=True, exist_ok=True)
    write_training_record(save, source, stage_entry(args, _State.blend, source))

    def replace(name: str, write) -> None:
        tmp = Path(save) / f".{name}.tmp-{os.getpid()}"
        write(tmp)
        os.replace(tmp, Path(save) / name)

    if Path(save).resolve() != source.resolve():
        for name in (PLAN_FILE, *TOKENIZER_FILES, "generation_config.json"):
            if (source / name).exists():
                replace(name, lambda tmp, name=name: shutil.copy2(source / name, tmp))
    meta = _State.meta
    history = {**(meta.source.get("training") or {}), f"stage{args.deltamoe_stage}": training_record(args)}
    recorded = dataclasses.replace(meta, moe=recorded_moe(meta, args), source={**meta.source, "training": history})
    replace(METADATA_FILE, lambda tmp: tmp.write_text(json.dumps(dataclasses.asdict(recorded), indent=2) + "\n"))


def _setup(args) -> None:
    """After Megatron parsed the flags: validate, read the data blend, build the probe and metrics."""
    from deltamoe.megatron_ext.data.blend import check_blend_fits_model, load_language_blend
    from deltamoe.megatron_ext.data.language_tag import read_language_tag
    from deltamoe.megatron_ext.moe.allocation import ExpertAllocation, idle_experts
    from deltamoe.megatron_ext.runtime.specs import resolve_spec_name
    from deltamoe.megatron_ext.moe.router_probe import ProbeSettings, RouterProbe
    from deltamoe.megatron_ext.training.flags import read_allocation_map, split_languages
    from deltamoe.megatron_ext.training.metrics import LanguageMetrics

    if not args.data_path:
        raise DeltaMoEError("--data-path is required: language-tagged datasets from `deltamoe prepare-data`")
    from deltamoe.megatron_ext.data.blend import parse_blend

    languages = split_languages(args.languages)
    if not languages:
        for _, prefix, _ in parse_blend(args.data_path):
            lang = read_language_tag(prefix).language
            if lang not in languages:
                languages.append(lang)
    _State.blend = load_language_blend(args.data_path, languages=languages,
                                       original_languages=split_languages(args.original_languages))
    check_blend_fits_model(_State.blend, vocab_size=_State.arch.vocab_size, checkpoint=_State.source)
    resolve_spec_name(args.deltamoe_layer_spec)  # 'te' without Transformer Engine fails here, not in the model build
    allocation_mask = None
    if args.expert_allocation_map:
        raw = read_allocation_map(args.expert_allocation_map)
        allocation = ExpertAllocation(languages=list(languages), experts=raw["experts"],
                                      shared_experts=raw.get("shared_experts", []), num_experts=args.num_experts,
                                      topk=args.moe_router_topk, expert_model_parallel_size=args.expert_model_parallel_size)
        allocation_mask = allocation.mask()
    if args.expert_allocation == "by-language" and allocation_mask is not None and args.deltamoe_stage == 1:
        _State.idle_experts = idle_experts(allocation_mask, _State.blend.dataset_language_ids)
    settings = ProbeSettings(num_languages=len(languages), num_layers=args.num_layers,
                             lpr_loss_coeff=args.lpr_loss_coeff, allocation_loss_coeff=args.allocation_loss_coeff,
                             layer_reduction=args.router_loss_layer_reduction,
                             allocation_mask=allocation_mask, mask_by_language=args.expert_allocation == "by-language")
    _State.probe = RouterProbe(settings)
    log_file = args.routing_log_file or (str(Path(args.save) / "deltamoe_routing.jsonl") if args.save else None)
    _State.metrics = LanguageMetrics(languages=languages, num_layers=args.num_layers, probe=_State.probe,
                                     log_file=log_file, interval=args.routing_log_interval or args.log_interval,
                                     stage=args.deltamoe_stage, train_iters=args.train_iters,
                                     tokens_per_iteration=args.global_batch_size * args.seq_length)


def print_help(prog: str = "deltamoe train") -> None:
    """DeltaMoE's flags first, then Megatron-LM's: the parser the trainer really uses, with its description."""
    from megatron.training.arguments import add_megatron_arguments

    from deltamoe.megatron_ext.training.flags import add_deltamoe_arguments

    usage = (f"{prog} --deltamoe-stage {{0,1,2}} --pretrained-checkpoint DIR --load DIR --save DIR "
             "--data-path [WEIGHT PREFIX ...] [DeltaMoE flags] [any Megatron-LM flag]")
    parser = argparse.ArgumentParser(prog=prog, usage=usage, description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Every flag after the DeltaMoE group is Megatron-LM's own (megatron-core "
                                            "0.19.2); the architecture flags come from the checkpoint.")
    add_megatron_arguments(add_deltamoe_arguments(parser))
    for action in parser._actions:
        # megatron-core 0.19.2 turns TransformerConfig docstrings into help texts, some with a bare "%"
        # (transformer_config.py:1278, "1.10 = 10%)"), which argparse's help formatting (help % params) rejects:
        # Megatron-LM's own --help fails on it. Escape what does not format.
        if action.help:
            try:
                action.help % {**vars(action), "prog": prog}
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")
    parser.print_help()


def main_argv(argv: list[str]) -> int:
    """`deltamoe train ARGV`: argv goes to Megatron-LM's parser as it is (plus --help and --verbose handling)."""
    if "--verbose" in argv:
        quiet.set_verbose()
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    main(argv)
    return 0


def check_user_flags(argv: list[str], meta, arch, plan, stage: int):
    """Put the checkpoint's model flags before the user's (sys.argv, which Megatron parses) and run DeltaMoE's checks on
    the parsed flags, before Megatron validates or starts anything: a routing flag the HF formats cannot express, or
    one contradicting the checkpoint, gets one error naming it instead of an assertion or a failure minutes later."""
    from megatron.training.arguments import parse_args

    from deltamoe.architectures.moe import check_exportable
    from deltamoe.megatron_ext.training.flags import add_deltamoe_arguments, check_model_args, recorded_moe

    sys.argv = [sys.argv[0], *default_flags(argv, meta, arch, stage), *argv]
    parsed = parse_args(extra_args_provider=add_deltamoe_arguments)
    check_model_args(parsed, meta, arch, plan=plan)
    if meta.is_moe:
        check_exportable(arch, recorded_moe(meta, parsed), "this training run")
    return parsed


def main(argv: list[str] | None = None) -> None:
    from megatron.core.enums import ModelType

    from deltamoe.megatron_ext.internals import disable_dataset_helper_compilation, in_process_write_results
    from deltamoe.megatron_ext.runtime import cpu_compat
    from deltamoe.megatron_ext.runtime.distributed import (
        DEFAULT_TIMEOUT_MINUTES, all_ranks_agree, init_process_group, world_size_from_env,
    )
    from deltamoe.megatron_ext.training.flags import _argv_value

    faults.set_command("train")
    faults.install_from_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    cpu_compat.install()  # no-op with CUDA
    disable_dataset_helper_compilation()
    # The process group exists before any input is read (Megatron keeps it, see runtime/distributed.py), so the
    # start-up checks below are agreed on by every rank: one rank failing stops all of them with an error.
    if world_size_from_env() > 1:
        timeout = float(_argv_value(argv, "--distributed-timeout-minutes") or DEFAULT_TIMEOUT_MINUTES)
        init_process_group(timeout_minutes=timeout, backend=_argv_value(argv, "--distributed-backend"))
    elif "RANK" not in os.environ:  # plain `python -m ...`: a one-process group, as torchrun would describe it
        from deltamoe.megatron_ext.runtime.distributed import _free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    with all_ranks_agree("training start-up checks"):
        args = _start_up(argv)
        fault_point("train:start-up-checked")

    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    cfg_container = pretrain_cfg_container_from_args(args)
    # Synchronous saves write from threads of this process; megatron's default result queue is a spawned Manager
    # process per rank (an interpreter start per rank at the first save). --async-save writes from another process
    # and keeps megatron's queue.
    with contextlib.nullcontext() if args.async_save else in_process_write_results():
        pretrain(cfg_container, datasets_provider, ModelType.encoder_or_decoder, forward_step,
                 model_provider=model_provider)


def _start_up(argv: list[str]):
    """Everything between the command line and `pretrain`: read the checkpoint, expand and parse the flags, check the
    inputs. Returns Megatron's parsed args."""
    from deltamoe.megatron_ext.internals import (
        complete_frozen_expert_optimizer_state,
        exempt_marked_parameters_from_weight_decay,
        fix_torch_adam_resume,
    )
    from deltamoe.megatron_ext.moe.plan import UpcyclePlan
    from deltamoe.megatron_ext.runtime.checkpoint import checkpoint_dir, read_metadata, read_tracker
    from deltamoe.megatron_ext.runtime.checkpoint_layout import check_trainer_can_load
    from deltamoe.megatron_ext.training.flags import _argv_value, add_deltamoe_arguments, checkpoint_folder

    stage = _argv_value(argv, "--deltamoe-stage")
    if stage not in ("0", "1", "2"):
        raise DeltaMoEError("--deltamoe-stage 1, 2 (or 0: dense continued pre-training) is required")
    load = _argv_value(argv, "--load")
    if load and read_tracker(load) is not None:
        checkpoint_dir(load)  # the iteration Megatron would resume from exists and is complete
    source = checkpoint_folder(argv)
    _State.source = source
    _State.meta = read_metadata(source)
    _, _State.arch = _State.meta.architecture(str(source / "deltamoe.json"))
    _State.plan = UpcyclePlan.load(source) if _State.meta.is_moe else None
    # The checkpoint Megatron will read: --load when it holds iterations (resume), else --pretrained-checkpoint.
    flag = "--load" if load and read_tracker(load) is not None else "--pretrained-checkpoint"
    if _argv_value(argv, flag):
        check_trainer_can_load(_argv_value(argv, flag), is_moe=_State.meta.is_moe, flag=flag)
    _check_sequence_length(argv, _State.arch, source)

    from megatron.training.arguments import parse_and_validate_args

    check_user_flags(argv, _State.meta, _State.arch, _State.plan, int(stage))  # puts the model flags into sys.argv

    try:
        args = parse_and_validate_args(extra_args_provider=add_deltamoe_arguments)
    except AssertionError as e:
        raise DeltaMoEError(f"Megatron-LM's argument check refused the flags: {_assertion_text(e)}") from None
    fix_torch_adam_resume()
    exempt_marked_parameters_from_weight_decay()
    complete_frozen_expert_optimizer_state()
    _setup(args)
    _prepare_save_folder(args, source)
    return args


def _check_sequence_length(argv: list[str], arch, source: Path) -> None:
    from deltamoe.megatron_ext.training.flags import _argv_value

    seq, positions = _argv_value(argv, "--seq-length"), _argv_value(argv, "--max-position-embeddings")
    if seq is not None and positions is None and seq.isdigit() and int(seq) > arch.max_position_embeddings:
        raise DeltaMoEError(f"--seq-length {seq} exceeds the model's max_position_embeddings "
                            f"({arch.max_position_embeddings}, {source}/deltamoe.json): the model never saw positions "
                            "past it; use a shorter --seq-length (or pass --max-position-embeddings to extend the "
                            "context on purpose)")


def _assertion_text(e: AssertionError) -> str:
    """The failed assert's message, or its source line when it has none."""
    import traceback

    frame = traceback.extract_tb(e.__traceback__)[-1]
    where = f"{Path(frame.filename).name}:{frame.lineno}"
    return f"{e} ({where})" if str(e) else f"{frame.line} ({where})"


def _cli() -> None:
    """`python -m deltamoe.megatron_ext.training.train`: bad input and machine faults are one line, no traceback."""
    from deltamoe.cli import environment_error

    try:
        sys.exit(main_argv(sys.argv[1:]))
    except DeltaMoEError as e:
        print(f"deltamoe train: error: {e}", file=sys.stderr)
        sys.exit(1)
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        from deltamoe.common.outputs import disk_is_full
        from deltamoe.megatron_ext.training.flags import _argv_value

        message = environment_error(e)
        save = _argv_value(sys.argv, "--save")
        if message is None and save and disk_is_full(save):  # Megatron's checkpoint writers drop the errno
            message = (f"no space left on device under --save {save} ({type(e).__name__}: {str(e).strip()[:200]}); "
                       "the newest complete checkpoint is the one latest_checkpointed_iteration.txt names: free space "
                       "and rerun the same command to resume from it")
        if message is None:
            raise
        print(f"deltamoe train: error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _cli()
