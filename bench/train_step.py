"""Training-step throughput of the upcycled MoE: transformers vs megatron-core (local spec) vs DeltaMoE's fast spec.

Shape: Qwen2.5-0.5B (24 layers, hidden 896, FFN 4864, 14 heads / 2 KV heads, vocabulary 151,936, tied embeddings)
upcycled to 6 experts, top-2, sequence 2048, bf16, AdamW, random tokens, one GPU. All rows run in one process, at each
micro-batch size, and print one table: tokens/s, model TFLOP/s, MFU and peak memory. A row that runs out of memory
is reported as OOM; any other failure as `error: ...`; the run goes on.

Rows
- transformers: `MixtralForCausalLM` from config (SDPA attention, transformers' default grouped-mm experts).
- megatron local: megatron-core's local spec (unfused attention, `SequentialMLP`), megatron DDP + optimizer.
- fast: DeltaMoE's torch-native fast spec (SDPA, grouped experts, chunked loss), same trainer pieces.
- fast stage 1: only new experts (1..5) and routers train; expert 0, attention, norms, embeddings frozen.
- fast stage 2: only routers train.

Model FLOPs per token follow PaLM's MFU definition (Chowdhery et al., 2022, arXiv:2204.02311, appendix B):
6 x active matmul parameters (attention, top-2 experts, router, LM head) + 12 x layers x seq x attention width.
Frozen rows are charged the same model FLOPs (they do less work by design, so their MFU reads as "equivalent").
Peak bf16 dense tensor throughput: 989 TFLOP/s for H100 SXM and H200 (NVIDIA H100 / H200 datasheets: 1,979 TFLOP/s
"with sparsity", half of it dense), 756 TFLOP/s for H100 PCIe.

    python bench/train_step.py                       # GPU: all rows, micro-batch 2 and 8 (~4-6 min on an H200)
    python bench/train_step.py --tiny                # CPU smoke run of the same code (< 1 min)
    python bench/train_step.py --rows fast,transformers --micro-batches 8 --json out.json
    python bench/train_step.py --rows "fast stage 1,transformers" --micro-batches 8 --profile prof/
                                                     # + torch.profiler's top kernels per row (where the time goes)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = ("transformers", "megatron local", "fast", "fast stage 1", "fast stage 2")


@dataclass(kw_only=True)
class Shape:
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    num_experts: int = 6
    topk: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def flops_per_token(self) -> float:
        attn = self.hidden * self.head_dim * (self.heads * 2 + self.kv_heads * 2)  # q, o, k, v
        experts = self.topk * 3 * self.hidden * self.ffn + self.hidden * self.num_experts
        active = self.num_layers * (attn + experts) + self.hidden * self.vocab
        return 6 * active + 12 * self.num_layers * self.seq * self.heads * self.head_dim


FULL = Shape(num_layers=24, hidden=896, ffn=4864, heads=14, kv_heads=2, vocab=151936, seq=2048)
TINY = Shape(num_layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, vocab=512, seq=64)


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return 756.0
    if "H100" in name or "H200" in name:
        return 989.0
    return None


def hf_dense_config(shape: Shape) -> dict:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                       num_hidden_layers=shape.num_layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=max(shape.seq, 4096),
                       rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True).to_dict()


def build_transformers(shape: Shape, dtype, device):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                           num_hidden_layers=shape.num_layers, num_attention_heads=shape.heads,
                           num_key_value_heads=shape.kv_heads, num_local_experts=shape.num_experts,
                           num_experts_per_tok=shape.topk, max_position_embeddings=max(shape.seq, 4096),
                           tie_word_embeddings=True, attn_implementation="sdpa")
    with torch.device(device):  # initialise on the GPU: 2B parameters on the CPU take longer than the timed steps
        model = MixtralForCausalLM._from_config(config, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=device.type == "cuda")

    def step(ids, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        return loss

    return model, step


def build_megatron(shape: Shape, spec: str, stage: int | None, dtype):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from deltamoe.architectures import read_architecture_config
    from deltamoe.megatron_ext.runtime import model_builder

    _, arch = read_architecture_config(hf_dense_config(shape), "bench")
    moe = model_builder.MoESettings(num_experts=shape.num_experts, topk=shape.topk, grouped_gemm=True)
    cfg = model_builder.transformer_config(arch, moe=moe, params_dtype=dtype)
    # build_gpt_model picks the decoder spec and, for "fast", the chunked loss.
    model = model_builder.build_gpt_model(arch, cfg, padded_vocab=model_builder.padded_vocab_size(arch.vocab_size),
                                          spec=spec)
    if stage is not None:
        for name, p in model.named_parameters():
            expert = "local_experts." in name and "local_experts.0." not in name
            p.requires_grad_("router" in name or (stage == 1 and expert))
    if cfg.bf16:
        model = Float16Module(cfg, model)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, weight_decay=0.1, bf16=cfg.bf16,
                                                       params_dtype=dtype, clip_grad=1.0), [ddp])

    def step(ids, labels):
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(ids, positions, None, labels=labels).float().mean()
        loss.backward()
        finalize_model_grads([ddp])
        optimizer.step()
        return loss

    return ddp, step


def _memory_gb() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def profile_steps(step, ids, labels, file: Path, steps: int = 2) -> None:
    """Run `steps` more training steps under torch.profiler; write the top operators by self device time (CPU time
    without a GPU) to `file`: the table that says which kernels a faster step has to shrink."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            float(step(ids, labels))
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=40, max_name_column_width=60,
                                                               max_shapes_column_width=60)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(f"{steps} steps, sorted by {sort_by}\n{table}\n")


def run_row(row: str, shape: Shape, micro_batch: int, *, warmup: int, iters: int, dtype, device,
            profile_dir: Path | None = None) -> dict:
    result = {"row": row, "micro_batch": micro_batch}
    model = step = None
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        if row == "transformers":
            model, step = build_transformers(shape, dtype, device)
        else:
            spec = "local" if row == "megatron local" else "fast"
            stage = {"fast stage 1": 1, "fast stage 2": 2}.get(row)
            model, step = build_megatron(shape, spec, stage, dtype)
        tokens = torch.randint(0, shape.vocab, (micro_batch, shape.seq + 1), device=device)
        ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        for _ in range(warmup):
            step(ids, labels)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            loss_value = float(step(ids, labels))  # float() waits for the GPU
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)  # robust to a stray slow step (other jobs, allocator growth)
        tokens_per_s = micro_batch * shape.seq / seconds
        tflops = tokens_per_s * shape.flops_per_token() / 1e12
        peak = peak_tflops()
        result.update(status="ok", tokens_per_s=tokens_per_s, tflops=tflops, loss=loss_value,
                      mfu=tflops / peak if peak else None, peak_gb=_memory_gb())
        if profile_dir is not None:
            result["profile"] = str(profile_dir / f"{row.replace(' ', '_')}_mb{micro_batch}.txt")
            profile_steps(step, ids, labels, Path(result["profile"]))
    except torch.cuda.OutOfMemoryError:
        result.update(status="OOM")
    except Exception as exc:  # noqa: BLE001 - one broken row must not hide the others
        traceback.print_exc()
        result.update(status=f"error: {type(exc).__name__}: {str(exc)[:80]}")
    finally:
        del model, step
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def format_table(results: list[dict], device_name: str) -> str:
    lines = [f"device: {device_name}", "",
             "| row | micro-batch | tokens/s | model TFLOP/s | MFU | peak GB | last loss |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("status") != "ok":
            lines.append(f"| {r['row']} | {r['micro_batch']} | {r.get('status')} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "n/a"
        lines.append(f"| {r['row']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.3g} | {mfu} | "
                     f"{peak} | {r['loss']:.3f} |")
    return "\n".join(lines)


def _run_row_subprocess(row: str, micro_batch: int, args) -> dict:
    """One row in a fresh process: what it allocated, and megatron's global state, die with it."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--in-process", "--rows", row, "--micro-batches", str(micro_batch),
               "--json", str(out)]
        for flag in ("warmup", "iters"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag}", str(getattr(args, flag))]
        if args.tiny:
            cmd.append("--tiny")
        if args.profile is not None:
            cmd += ["--profile", str(args.profile)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            return {"row": row, "micro_batch": micro_batch, "status": f"error: exit {proc.returncode}: {proc.stderr[-80:]}"}
        return json.loads(out.read_text())["results"][0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer, hidden-64 model (CPU smoke run)")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--warmup", type=int, default=None, help="default 2")
    parser.add_argument("--iters", type=int, default=None, help="timed steps; default 4 (GPU) / 8 (--tiny)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip rows that would start after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="after timing, profile 2 more steps per row; top operators to DIR/<row>_mb<N>.txt")
    parser.add_argument("--in-process", action="store_true",
                        help="run every row in this process (default on GPU: one subprocess per row, so a row's "
                             "memory, megatron's global state and an OOM cannot leak into the next row)")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")

    logging.getLogger("megatron").setLevel(logging.WARNING)  # DDP lists every parameter bucket at INFO
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY if args.tiny else FULL
    warmup = args.warmup if args.warmup is not None else 2
    iters = args.iters if args.iters is not None else (8 if args.tiny else 4)
    if any(r != "transformers" for r in rows) and not (cuda and not args.in_process and len(rows) * len(args.micro_batches) > 1):
        from deltamoe.megatron_ext.runtime.distributed import (
            ParallelLayout,
            init_distributed,
        )

        init_distributed(ParallelLayout())
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, float32)"

    isolate = cuda and not args.in_process and len(rows) * len(args.micro_batches) > 1
    started, results = time.perf_counter(), []
    for micro_batch in args.micro_batches:
        for row in rows:
            if time.perf_counter() - started > args.budget_s:
                results.append({"row": row, "micro_batch": micro_batch, "status": "skipped (time budget)"})
                continue
            if isolate:
                result = _run_row_subprocess(row, micro_batch, args)
            else:
                result = run_row(row, shape, micro_batch, warmup=warmup, iters=iters, dtype=dtype, device=device,
                                 profile_dir=args.profile)
            print(f"[{time.perf_counter() - started:6.1f}s] {row} mb={micro_batch}: {result.get('status')} "
                  f"{result.get('tokens_per_s', 0):,.0f} tokens/s", flush=True)
            results.append(result)
    table = format_table(results, device_name)
    print(f"\n{shape}\nwarmup {warmup}, timed steps {iters} (median step time), {dtype}\n\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "shape": vars(shape), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
