"""The 8-GPU recipe's parallel layout, run for real: 8 gloo processes on CPU, against one process.

A tiny Llama (4 layers, so each of 2 pipeline stages holds 2 MoE layers; 4 heads, 2 KV heads, FFN 96 and vocabulary
128 for tensor parallel 2; 4 experts for expert parallel 2) is imported and upcycled, then trained twice through
Megatron-LM's trainer with the same schedule, data order and seeds:

- reference: one process (TP 1 · PP 1 · EP 1), no recomputation: stage 1 for 5 iterations, stage 2 for 3;
- layouts: stage 1 iterations 1-3 at the stage-1 recipe's layout as `deltamoe.recipes` expands it (TP 2 · PP 2 ·
  EP 2 · ETP 2, sequence parallel, distributed optimizer, overlapped grad reduce / param gather, full
  recomputation, grouped experts: 8 processes, data parallel 2), saved with a fully reshardable optimizer and
  resumed for iterations 4-5 at TP 1 · PP 1 · EP 2 (2 processes: model and optimizer resharded); stage 2 (routers
  only, LPR loss, English replay tagged original) for 3 iterations at the 8-process layout again; then exported.

Global batch 4 = 4 micro-batches of 1 sample on one process, 2 per data-parallel rank on 8 (megatron's sampler hands
rank r samples r, r+2 of each global batch): the same samples and the same per-micro-batch means either way.
Precision is float32 (the recipe trains bf16), so the two runs differ only by the order of float32 sums (tensor
parallel splits matmul reductions, sequence parallel reduce-scatters, data parallel averages gradients): per-iteration
losses must agree to rtol 1e-6, about 8 float32 ulps (measured: under 3e-8 relative). Frozen tensors must be
bit-identical to the upcycled checkpoint, and the LPR loss, recorded per MoE layer by the rank that holds the
layer, must appear for the layers of both pipeline stages and equal the reference's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_training import write_dataset
from tests.tiny_models import make_tiny_hf

REPO = Path(__file__).resolve().parents[1]
STAGE1_ITERS, STAGE1_FIRST_PART, STAGE2_ITERS = 5, 3, 3
LPR = "0.5"
LR = 1e-3
LOSS_RTOL = 1e-6
RESUME_LAYOUT = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
                 "--expert-model-parallel-size", "2"]
RESUME_NPROC = 2  # data parallel 2 again, so each rank's micro-batches are the same samples


def recipe_layout() -> tuple[list[str], int]:
    """The 8-GPU stage-1 recipe's layout flags, recomputation and expert kernels as `deltamoe.recipes` expands them,
    and its world size."""
    from deltamoe.recipes import production
    from deltamoe.recipes.megatron_args import parallel_args, to_megatron_args

    recipe = production.qwen2_5_7b_stage1_cpt_8gpu_h100_bf16()
    assert recipe.parallel == production.H100_8
    flags = [str(a) for a in parallel_args(recipe)]
    expanded = [str(a) for a in to_megatron_args(recipe)]
    for name in ("--recompute-granularity", "--recompute-method", "--recompute-num-layers"):
        flags += [name, expanded[expanded.index(name) + 1]]
    assert "--moe-grouped-gemm" in expanded
    return flags + ["--moe-grouped-gemm"], recipe.parallel.world_size


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from deltamoe.converters.hf_to_megatron import import_hf
    from deltamoe.megatron_ext.moe.upcycle_cli import upcycle

    root = tmp_path_factory.mktemp("layouts")
    hf = make_tiny_hf("llama", root / "hf", num_hidden_layers=4)
    moe = upcycle(import_hf(hf, root / "dense"), root / "moe", num_experts=4, topk=2)
    (root / "data").mkdir()
    data = {"en": write_dataset(root / "data" / "en", "en", seed=1, lo=3, hi=60),
            "es": write_dataset(root / "data" / "es", "es", seed=2, lo=60, hi=120)}
    return {"root": root, "moe": moe, "data": data, "timings": {}}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    # CUDA_DEVICE_MAX_CONNECTIONS: megatron's argument checks demand it with tensor parallelism (our launchers set it).
    env.update(OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(ws, out: Path, *, stage: int, init: Path, iters: int, nproc: int = 1, extra: list[str] = ()) -> list[dict]:
    """One trainer run as a user launches it; returns the routing JSONL records."""
    data = ws["data"]
    blend = ["1.0", data["es"]] if stage == 1 else ["0.5", data["en"], "0.5", data["es"]]
    flags = ["--deltamoe-stage", str(stage), "--pretrained-checkpoint", str(init), "--load", str(out), "--save",
             str(out), "--data-path", *blend, "--original-languages", "en", "--languages", "en,es",
             "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(iters),
             "--lr", str(LR), "--min-lr", str(LR), "--lr-decay-style", "constant", "--weight-decay", "0.1",
             "--clip-grad", "0.3", "--log-interval", "1", "--save-interval", "1000", "--seed", "1234",
             *(["--lpr-loss-coeff", LPR] if stage == 2 else []), *extra]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                     str(nproc), "--master-port", str(_free_port())]
    started = time.time()
    result = subprocess.run([*launcher, "-m", "deltamoe.megatron_ext.training.train", *flags], env=_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    ws["timings"][f"{out.name} ({nproc} proc)"] = round(time.time() - started, 1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads(line) for line in (out / "deltamoe_routing.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, loaded into one process (resharded from whatever layout saved it)."""
    from deltamoe.megatron_ext.runtime.checkpoint import load_model
    from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    model, _ = load_model(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _trains(name: str, stage: int) -> bool:
    if ".mlp.router." in name:
        return True
    marker = ".local_experts."
    return stage == 1 and marker in name and int(name.split(marker)[1].split(".")[0]) != 0


def check_frozen(before: dict, after: dict, stage: int) -> None:
    """Frozen tensors bit-identical, every trained tensor changed."""
    assert before.keys() == after.keys()
    for name in before:
        if _trains(name, stage):
            assert not torch.equal(before[name], after[name]), f"stage {stage}: {name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"stage {stage}: frozen {name} changed"


def losses(records) -> list[float]:
    return [r["lm_loss"][lang] for r in records for lang in ("en", "es") if r["lm_loss"][lang] is not None]


@pytest.fixture(scope="module")
def reference(workspace):
    root = workspace["root"]
    stage1 = train(workspace, root / "ref-stage1", stage=1, init=workspace["moe"], iters=STAGE1_ITERS)
    stage2 = train(workspace, root / "ref-stage2", stage=2, init=root / "ref-stage1", iters=STAGE2_ITERS)
    return {"stage1": stage1, "stage2": stage2}


@pytest.fixture(scope="module")
def layouts(workspace):
    root = workspace["root"]
    layout, nproc = recipe_layout()
    first = train(workspace, root / "stage1", stage=1, init=workspace["moe"], iters=STAGE1_ITERS, nproc=nproc,
                  extra=[*layout, "--exit-interval", str(STAGE1_FIRST_PART), "--dist-ckpt-optim-fully-reshardable"])
    saved_at_recipe_layout = weights(root / "stage1")
    resumed = train(workspace, root / "stage1", stage=1, init=workspace["moe"], iters=STAGE1_ITERS,
                    nproc=RESUME_NPROC, extra=RESUME_LAYOUT)
    stage2 = train(workspace, root / "stage2", stage=2, init=root / "stage1", iters=STAGE2_ITERS, nproc=nproc,
                   extra=layout)
    return {"stage1_first": first, "stage1": resumed, "stage2": stage2, "nproc": nproc,
            "stage1_at_recipe_layout": saved_at_recipe_layout}


@pytest.mark.slow
def test_recipe_layout_trains_resumes_resharded_and_exports(workspace, reference, layouts):
    from transformers import AutoModelForCausalLM

    from deltamoe.converters.megatron_to_hf import export
    from deltamoe.megatron_ext.runtime.checkpoint import load_model
    from tests.megatron_helpers import megatron_logits

    root = workspace["root"]
    assert layouts["nproc"] == 8
    # Stage 1: iterations 1-3 at the recipe layout, then 4-5 resumed at TP 1 · PP 1 · EP 2, as one unbroken run.
    assert [r["iteration"] for r in layouts["stage1_first"]] == [1, 2, 3]
    assert [r["iteration"] for r in layouts["stage1"]] == [1, 2, 3, 4, 5]  # the JSONL keeps the first part's records
    for run in ("stage1", "stage2"):
        ours, ref = losses(layouts[run]), losses(reference[run])
        assert len(ours) == len(ref) > 0
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=LOSS_RTOL, atol=0,
                                   msg=lambda m, run=run: f"{run}: {m}\nlayouts {ours}\nreference {ref}")
        # Each token counted once: 4 samples x 32 positions per iteration, whatever the layout.
        assert all(sum(r["tokens"].values()) == 128 for r in layouts[run])
        assert [r["tokens"] for r in layouts[run]] == [r["tokens"] for r in reference[run]]

    # LPR: recorded per layer by the rank holding it; layers 0-1 live on pipeline stage 0, layers 2-3 on stage 1.
    for ours, ref in zip(layouts["stage2"], reference["stage2"], strict=True):
        assert all(v is not None and v > 0 for v in ours["lpr_loss_by_layer"]), ours["lpr_loss_by_layer"]
        torch.testing.assert_close(torch.tensor(ours["lpr_loss_by_layer"]), torch.tensor(ref["lpr_loss_by_layer"]),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(ours["lpr_loss_per_layer"], ref["lpr_loss_per_layer"], rtol=1e-5, atol=0)
        assert ours["tokens"]["en"] > 0  # English replay, tagged original, in every iteration's global batch

    # Frozen tensors bit-identical (expert 0 split over ETP ranks, attention over TP, layers over PP stages).
    upcycled, stage1 = weights(workspace["moe"]), weights(root / "stage1")
    check_frozen(upcycled, layouts["stage1_at_recipe_layout"], stage=1)
    check_frozen(upcycled, stage1, stage=1)
    stage2 = weights(root / "stage2")
    check_frozen(stage1, stage2, stage=2)
    # Trained tensors equal the reference's within rounding (both loaded into one process). Adam moves each element
    # by about lr per step whatever its gradient's size, so where a gradient is at rounding level the step's sign is
    # rounding too (measured: 1 element of 12,288 in one expert off by 1.3e-5, all others under 1e-6): allow a tenth
    # of one step.
    reference_stage2 = weights(root / "ref-stage2")
    for name, value in stage2.items():
        torch.testing.assert_close(value, reference_stage2[name], rtol=0, atol=0.1 * LR,
                                   msg=lambda m, n=name: f"{n}: {m}")
    worst = max(float((value - reference_stage2[name]).abs().max()) for name, value in stage2.items())

    # Export the stage-2 checkpoint saved at the recipe layout: the HF model loads strictly and computes its function.
    hf = export(root / "stage2", root / "hf-moe")
    model, info = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    megatron, _ = load_model(root / "stage2")
    model.eval()
    with torch.no_grad():
        hf_out = model(tokens).logits.float()
    torch.testing.assert_close(hf_out, megatron_logits(megatron, tokens, 128))
    print(f"\nlayout test: largest trained-tensor difference to the reference {worst:.2e}; timings (s) "
          f"{workspace['timings']}")
    for run in ("stage1", "stage2"):
        print(f"{run} LM losses (en, es per iteration): layouts {losses(layouts[run])}, reference "
              f"{losses(reference[run])}")


def test_full_recomputation_trains_behind_frozen_embeddings():
    """Megatron's full recomputation checkpoints each layer with a reentrant autograd Function, whose output needs an
    input that requires grad: with the embedding frozen (stages 1 and 2) no layer would get a gradient. After
    `let_gradients_pass_frozen_embeddings` the gradients equal those without recomputation."""
    from deltamoe.megatron_ext.moe.freezing import apply_stage_freezing, let_gradients_pass_frozen_embeddings
    from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed
    from deltamoe.megatron_ext.runtime.model_builder import MoESettings, model_from_hf_config
    from tests.tiny_models import tiny_config

    init_distributed(ParallelLayout())
    tokens = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand_as(tokens)

    def gradients(recompute: bool, hook: bool) -> dict[str, torch.Tensor] | None:
        torch.manual_seed(0)
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
        _, model = model_from_hf_config(tiny_config("llama").to_dict(), moe=MoESettings(num_experts=4, topk=2),
                                        spec="fast", **extra)
        apply_stage_freezing(model, stage=1, frozen_experts={0}, num_experts=4)
        if hook:
            assert let_gradients_pass_frozen_embeddings(model) == 1
        model.train()
        loss = model(tokens, positions, None, labels=tokens).sum()
        if not loss.requires_grad:
            return None
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert gradients(recompute=True, hook=False) is None  # the failure the hook exists for
    plain, recomputed = gradients(recompute=False, hook=False), gradients(recompute=True, hook=True)
    assert plain.keys() == recomputed.keys() and any(".router." in n for n in plain)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], msg=lambda m, n=name: f"{n}: {m}")


def test_recomputed_router_uses_its_own_micro_batch_context():
    """1F1B with recomputation: stage 0 runs the no-gradient forwards of micro-batches 0 and 1, then recomputes 0 in
    its backward pass. The LPR loss of that recomputation must use micro-batch 0's tags (all original-language),
    not the current ones (micro-batch 1: none), and metrics must count each forward once."""
    from types import SimpleNamespace

    from deltamoe.megatron_ext.moe.router_probe import ProbeSettings, RouterProbe
    from deltamoe.megatron_ext.moe.routing_losses import lpr_loss

    config = SimpleNamespace(context_parallel_size=1, sequence_parallel=False, calculate_per_token_loss=False)
    router = SimpleNamespace(training=True, layer_number=1, config=config, weight=torch.zeros(1),
                             tp_group=SimpleNamespace(size=lambda: 1, rank=lambda: 0))
    probe = RouterProbe(ProbeSettings(num_languages=2, num_layers=1, lpr_loss_coeff=1.0))

    def original(logits):
        return torch.softmax(logits, dim=-1), torch.ones_like(logits, dtype=torch.bool)

    batches = [(torch.zeros(1, dtype=torch.long), torch.ones(1, 8)), (torch.ones(1, dtype=torch.long), torch.zeros(1, 8))]
    logits = [torch.randn(8, 1, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for (lang, mask), mb_logits in zip(batches, logits, strict=True):
        probe.set_batch(lang, mask)
        with torch.no_grad():
            probe.routing(router, original, mb_logits)
    assert probe.sums[2, 0, 1] == 0  # no loss without gradient
    recomputed = logits[0].clone().requires_grad_(True)
    probe.routing(router, original, recomputed)  # the backward pass recomputes micro-batch 0
    expected = lpr_loss(logits[0], torch.ones(8, 1), 0, from_logits=True)
    torch.testing.assert_close(probe.sums[2, 0, 0].float(), expected)
    assert probe.sums[2, 0, 1] == 1
    assert probe.sums[1, 0, :2].tolist() == [8.0, 8.0]  # 8 English and 8 Spanish tokens, each counted once
    probe.end_iteration()
    assert not any(probe.replay.values())
