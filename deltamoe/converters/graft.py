"""Graft the post-training delta of a dense model (instruct - base) into every expert of its upcycled HF MoE.

With Delta = I - B per tensor (mergekit's task-vector shape) and scale alpha:
- non-expert tensors (attention, norms, embeddings, lm_head): M + alpha * Delta, i.e. task arithmetic on M;
- each selected routed expert e: M_e + alpha * Delta_FFN, sliced and scaled as the upcycle plan made e from the FFN
  (`ExpertSource`: gate/up rows [ffn_start, ffn_stop) * fc1_scale, down columns * fc2_scale); the shared expert
  likewise, with the plan's shared source;
- routers and shared_expert_gate: unchanged (the delta has nothing to say about routing).
`--experts original` grafts only the plan's frozen experts (and the shared expert, which is the original FFN);
`--experts new` only the others. Vocabulary policy: if I has more rows than B in embed_tokens/lm_head (added tokens),
rows within B's vocabulary get M + alpha * Delta and rows beyond it are copied from I, so the output vocabulary (and
config vocab_size) is I's; every other shape mismatch is an error. Tokenizer and generation_config come from I (its chat
template is what users want), config.json and the upcycle plan from M. Everything streams tensor by tensor: memory is
bounded by one output shard plus a few tensors, whatever the model size.

Example:
  deltamoe graft --base Qwen2.5-1.5B/ --post Qwen2.5-1.5B-Instruct/ --moe exported-moe/ --out deltamoe-instruct/
  deltamoe graft --base B/ --post I/ --moe M/ --out O/ --scale 0.5 --experts new
"""

from __future__ import annotations

import argparse
import json
import math
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from deltamoe.architectures import read_architecture_config
from deltamoe.architectures.moe import MOE_FORMATS, format_problems
from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hashing import versions
from deltamoe.common.outputs import atomic_output_dir
from deltamoe.common.hf_folder import check_same_tokenizer, copy_tokenizer_files, read_config
from deltamoe.converters.hf_moe_layout import TensorRole, format_for_dense, format_of_config, parse_moe_name
from deltamoe.converters.hf_upcycle import ffn_slice
from deltamoe.converters.model_card import write_graft_card
from deltamoe.converters import blockwise
from deltamoe.converters.blockwise import (Scratch, TensorJobs, ThreadScratch, add_workers_argument, check_block,
                                            check_finite, one_torch_thread, row_blocks, worker_count)
from deltamoe.converters.merge import check_same_architecture, extra_vocab_rows, peak_rss_gib
from deltamoe.converters.safetensors_io import PlannedShardWriter, SafetensorsReader
from deltamoe.megatron_ext.moe.plan import PLAN_FILE, UpcyclePlan

log = logging.getLogger(__name__)
EXPERT_SELECTIONS = ("all", "original", "new")
BASE_CHECK_RTOL = 1e-2
"""Relative error allowed between a frozen expert and B's FFN (covers a bf16 round trip; another base is ~1)."""


class _Inputs:
    """The three input folders, validated against each other before any tensor is written."""

    def __init__(self, base: Path, post: Path, moe: Path):
        self.base, self.post, self.moe = base, post, moe
        check_same_architecture(base, post)
        check_same_tokenizer(base, post, flag="--post")
        self.base_config, self.moe_config = read_config(base), read_config(moe)
        self.fmt = format_of_config(self.moe_config, f"{moe}/config.json")
        format_for_dense(self.base_config.get("model_type"), f"{base}/config.json")  # a supported dense base
        # Any format that holds B's attention exactly may carry its experts (a Llama's shared variant is a Qwen2-MoE).
        _, base_arch = read_architecture_config(self.base_config, f"{base}/config.json")
        problems = format_problems(MOE_FORMATS[self.fmt.name], base_arch, {})
        if problems:
            raise DeltaMoEError(f"{moe}/config.json: a {self.fmt.name} MoE cannot hold the "
                                f"{self.base_config['model_type']} base {base}: {problems[0]}")
        for field in ("num_hidden_layers", "hidden_size"):
            if self.moe_config.get(field) != self.base_config.get(field):
                raise DeltaMoEError(f"{moe}/config.json: {field} is {self.moe_config.get(field)} but {base}/config.json "
                                    f"has {self.base_config.get(field)}")
        self.plan = UpcyclePlan.load(moe)
        if self.plan.num_experts != self.moe_config.get(self.fmt.num_experts_field):
            raise DeltaMoEError(f"{moe}/{PLAN_FILE}: num_experts {self.plan.num_experts} but config.json has "
                                f"{self.fmt.num_experts_field} = {self.moe_config.get(self.fmt.num_experts_field)}")
        self.b, self.i, self.m = SafetensorsReader(base), SafetensorsReader(post), SafetensorsReader(moe)
        if set(self.b.keys()) != set(self.i.keys()):
            diff = sorted(set(self.b.keys()) ^ set(self.i.keys()))
            raise DeltaMoEError(f"{post}: tensor names differ from {base}'s: {diff[:5]}")
        self.roles = {name: parse_moe_name(self.fmt, name) for name in self.m.keys()}
        self._check_names_and_shapes()

    def _check_names_and_shapes(self) -> None:
        if not any(r.kind == "expert" for r in self.roles.values()):
            raise DeltaMoEError(f"{self.moe}: no expert tensors found (is it an MoE checkpoint?)")
        used = {r.dense_name for r in self.roles.values() if r.dense_name}
        for name in sorted(used - set(self.b.keys())):
            raise DeltaMoEError(f"{self.moe}: tensor for {name!r} has no counterpart in {self.base}")
        for name in sorted(set(self.b.keys()) - used):
            raise DeltaMoEError(f"{self.base}: tensor {name!r} has no counterpart in {self.moe}")
        self.vocab_rows = {}
        for name in self.b.keys():
            extra = extra_vocab_rows(name, self.b.shape(name), self.i.shape(name), self.post)
            if extra:
                self.vocab_rows[name] = [self.b.shape(name)[0], self.b.shape(name)[0] + extra]
        for name, role in self.roles.items():
            if role.kind == "expert" and not 0 <= role.expert < self.plan.num_experts:
                raise DeltaMoEError(f"{self.moe}: tensor {name!r}: expert {role.expert} but the plan has "
                                    f"{self.plan.num_experts} experts")
            source = self.source_of(role)
            if role.dense_name is None:
                continue
            b_shape = self.b.shape(role.dense_name)
            expected = list(ffn_slice(torch.empty(b_shape, device="meta"), role.proj, source).shape) if source else b_shape
            if source is None and role.kind == "shared_expert":
                expected = self.m.shape(name)  # a shared expert the plan did not make from the FFN is left alone
            if self.m.shape(name) != expected:
                raise DeltaMoEError(f"{self.moe}: tensor {name!r} has shape {self.m.shape(name)}, expected {expected} "
                                    f"from {self.base}'s {role.dense_name!r} (was M upcycled from B?)")

    def source_of(self, role: TensorRole):
        if role.kind == "expert":
            return self.plan.routed_experts[role.expert]
        if role.kind == "shared_expert":
            return self.plan.shared_expert
        return None

    def check_base_weights(self) -> str | None:
        """Refuse an M whose first frozen expert is not B's FFN (cheap: three tensors); None without a frozen expert."""
        if not self.plan.frozen_experts:
            return None
        expert = self.plan.frozen_experts[0]
        for proj in ("gate", "up", "down"):
            name = self.fmt.expert_name(0, expert, proj)
            role = self.roles[name]
            want = ffn_slice(self.b.get(role.dense_name), proj, self.plan.routed_experts[expert])
            got = self.m.get(name).float()
            err = (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-12)).item()
            if not err <= BASE_CHECK_RTOL:
                raise DeltaMoEError(f"{self.moe}: tensor {name!r} (frozen expert {expert}) differs from "
                                    f"{self.base}'s {role.dense_name!r} (relative error {err:.3g}): M was upcycled "
                                    "from a different base")
        return f"layer 0 frozen expert {expert} equals base FFN"

    def check_base_hashes(self, base_hashes: dict[str, str]) -> str | None:
        """Refuse an M whose plan records other hashes for B's weight files; None when the plan records none of them."""
        # Only weight files: a plan written by the Megatron upcycle hashes Megatron files, which may include copies of
        # B's JSON files (config, tokenizer) rewritten on import.
        common = sorted(n for n in set(self.plan.base_sha256) & set(base_hashes) if n.endswith(".safetensors"))
        for name in common:
            if self.plan.base_sha256[name] != base_hashes[name]:
                raise DeltaMoEError(f"{self.moe}/{PLAN_FILE}: M was upcycled from a different base: its plan records "
                                    f"sha256 {self.plan.base_sha256[name][:12]}… for {name}, {self.base}/{name} has "
                                    f"{base_hashes[name][:12]}…")
        if common:
            return "sha256 of base files match the plan"
        return None


def _selected(inputs: _Inputs, role: TensorRole, experts: str) -> bool:
    if role.kind == "shared_expert":
        return inputs.plan.shared_expert is not None and experts in ("all", "original")
    frozen = role.expert in inputs.plan.frozen_experts
    return experts == "all" or (experts == "original") == frozen


def _plan(inputs: _Inputs, experts: str) -> list[tuple[str | None, list[str]]]:
    """M's tensors as (dense tensor they derive from, M tensors), in the order they are written.

    The order is M's shards, and within a shard the tensors grouped by their dense tensor, so one block of I - B
    serves every expert made from it.
    """
    groups: list[tuple[str | None, list[str]]] = []
    for names in inputs.m.keys_by_shard().values():
        for name in sorted(names, key=lambda n: (inputs.roles[n].dense_name or n, n)):
            role = inputs.roles[name]
            kept = role.kind in ("router", "shared_expert_gate") or (role.kind != "other" and not _selected(inputs, role, experts))
            key = None if kept else role.dense_name
            if key is not None and groups and groups[-1][0] == key:
                groups[-1][1].append(name)
            else:
                groups.append((key, [name]))
    return groups


def _output_spec(inputs: _Inputs, name: str) -> tuple[str, torch.dtype, list[int]]:
    role = inputs.roles[name]
    shape = inputs.m.shape(name)
    if role.kind == "other" and role.dense_name in inputs.vocab_rows:
        shape = [inputs.vocab_rows[role.dense_name][1], *shape[1:]]
    return name, inputs.m.dtype(name), shape


def _graft_group(inputs: _Inputs, dense_name: str, b: torch.Tensor, i: torch.Tensor, m: dict[str, torch.Tensor],
                 out: dict[str, torch.Tensor], scale: float, scratch: Scratch) -> None:
    """Fill `out` with M + scale * (I - B) for the M tensors made from `dense_name`, in row blocks of the dense tensor.

    Per element this is what graft computed on whole tensors: (i.float() - b.float()) sliced and scaled as the plan
    made the expert (`ffn_slice`), then torch.add(m.float(), part, alpha=scale) cast to M's dtype. Reads only its
    arguments and writes only `out` and `scratch`, so groups run on `TensorJobs` threads side by side.
    """
    rows = b.shape[0]
    names = list(m)
    sources = {name: inputs.source_of(inputs.roles[name]) for name in names}
    for start, stop in row_blocks(rows, b[0].numel() if b.ndim > 1 else 1):
        delta = scratch.upcast(0, i[start:stop]).sub_(scratch.upcast(1, b[start:stop]))
        check_block(delta, [(b[start:stop], dense_name, inputs.base), (i[start:stop], dense_name, inputs.post)])
        for name in names:
            role, source = inputs.roles[name], sources[name]
            if role.kind == "other":
                part, rows_out, fc_scale = delta, (start, stop), 1.0
            elif role.proj in ("gate", "up"):
                lo, hi = max(start, source.ffn_start), min(stop, source.ffn_stop)
                if lo >= hi:
                    continue
                part, rows_out, fc_scale = delta[lo - start:hi - start], (lo - source.ffn_start, hi - source.ffn_start), source.fc1_scale
            else:
                part, rows_out, fc_scale = delta[:, source.ffn_start:source.ffn_stop], (start, stop), source.fc2_scale
            if fc_scale != 1.0:
                part = torch.mul(part, fc_scale, out=scratch.like(2, part.shape))
            m_block = m[name][rows_out[0]:rows_out[1]]
            acc = scratch.upcast(3, m_block).add_(part, alpha=scale)
            check_block(acc, [(m_block, name, inputs.moe)])
            out[name][rows_out[0]:rows_out[1]].copy_(acc)
    for name in names:
        if inputs.roles[name].kind == "other" and dense_name in inputs.vocab_rows:
            extra = i[rows:]
            check_finite(extra, dense_name, inputs.post)
            out[name][rows:].copy_(extra.float())  # rows beyond B's vocabulary: I's


def _working_set_bytes(b: torch.Tensor, i: torch.Tensor) -> int:
    """Memory one group's graft holds beyond its inputs and outputs: four float32 row blocks of scratch, and I's
    rows beyond B's vocabulary upcast (an upper estimate, for `TensorJobs`)."""
    row = b[0].numel() if b.ndim > 1 else 1
    extra = (i.shape[0] - b.shape[0]) * row if i.ndim and i.shape[0] > b.shape[0] else 0
    return 4 * 4 * max(blockwise.BLOCK_ELEMENTS, row) + 4 * extra


def _first_use_order(reader: SafetensorsReader, dense_names: list[str]) -> list[str]:
    return list(dict.fromkeys(reader.shard_of(n) for n in dense_names))


def graft(*, base: Path, post: Path, moe: Path, out: Path, scale: float = 1.0, experts: str = "all",
          overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3, workers: int | None = None) -> dict:
    """Write `out` = M with alpha * (I - B) grafted; returns the manifest (also written as deltamoe_graft.json).

    Each input byte is read once: the inputs are hashed (for the manifest and the plan's base check) by background
    threads that read each shard just ahead of the arithmetic, which works on row blocks and hands each finished
    tensor to a writer thread that puts it at its place in the output shard. `workers` threads (default: the CPUs
    this process may use) compute different dense tensors' groups side by side; the output is the same for any value.
    """
    start = time.perf_counter()
    base, post, moe, out = Path(base), Path(post), Path(moe), Path(out)
    if experts not in EXPERT_SELECTIONS:
        raise DeltaMoEError(f"--experts: expected one of {EXPERT_SELECTIONS}, got {experts!r}")
    if not math.isfinite(scale):
        raise DeltaMoEError(f"--scale: expected a finite number, got {scale}")
    workers = worker_count(workers)
    with atomic_output_dir(out, inputs=[base, post, moe], overwrite=overwrite) as tmp:
        inputs = _Inputs(base, post, moe)
        weight_check = inputs.check_base_weights()  # cheap, before the work; file hashes are compared after it
        for name, rows in inputs.vocab_rows.items():
            log.warning("vocabulary policy: %s rows %d..%d are beyond %s's vocabulary and are copied from %s",
                        name, rows[0], rows[1], base, post)
        groups = _plan(inputs, experts)
        dense_order = [d for d, _ in groups if d is not None]
        bytes_read = 0
        counts = {"grafted": 0, "unchanged": 0}
        scratch = ThreadScratch()
        with inputs.m.hash_while_reading() as hash_m, \
                inputs.b.hash_while_reading(_first_use_order(inputs.b, dense_order)) as hash_b, \
                inputs.i.hash_while_reading(_first_use_order(inputs.i, dense_order)) as hash_i:
            writer = PlannedShardWriter(tmp, [_output_spec(inputs, n) for _, names in groups for n in names],
                                        max_shard_bytes=max_shard_bytes)
            progress = tqdm(total=sum(len(names) for _, names in groups), desc="graft", unit="tensor")
            outputs: dict[int, dict[str, torch.Tensor]] = {}  # by group (a dense tensor may head two groups)

            def compute(k: int, b, i, m, out) -> int:
                _graft_group(inputs, groups[k][0], b, i, m, out, scale, scratch.scratch)
                return k

            def written(k: int) -> None:  # in this thread, in completion order
                nonlocal bytes_read
                dense_name, names = groups[k]
                for name, tensor in outputs.pop(k).items():
                    writer.add(name, tensor)
                    inputs.m.release(name)
                    bytes_read += inputs.m.nbytes(name)
                bytes_read += inputs.b.nbytes(dense_name) + inputs.i.nbytes(dense_name)
                inputs.b.release(dense_name)
                inputs.i.release(dense_name)
                counts["grafted"] += len(names)
                progress.update(len(names))

            try:
                with one_torch_thread(), TensorJobs(workers, written) as jobs:
                    for k, (dense_name, names) in enumerate(groups):
                        if dense_name is None:  # routers, gates and experts not selected: M's tensor as it is
                            m = inputs.m.get(names[0])
                            check_finite(m, names[0], moe)
                            writer.add(names[0], m)
                            bytes_read += m.nbytes
                            counts["unchanged"] += 1
                            progress.update(1)
                            continue
                        b, i = inputs.b.get(dense_name), inputs.i.get(dense_name)  # page-cache views
                        m = {name: inputs.m.get(name) for name in names}
                        cost = _working_set_bytes(b, i)
                        jobs.make_room(cost)
                        buffers = outputs[k] = {name: jobs.buffer(writer, name) for name in names}
                        jobs.submit(cost, compute, k, b, i, m, buffers)
                    jobs.finish_all()
                writer.finish()
            finally:
                progress.close()
                writer.close()
            hashes = {"base": hash_b.result(), "post": hash_i.result(), "moe": hash_m.result()}
        base_check = inputs.check_base_hashes(hashes["base"]) or weight_check
        if base_check is None:
            log.warning("cannot verify that %s was upcycled from %s (no base hashes, no frozen expert)", moe, base)
            base_check = "not verifiable (no matching base hashes, no frozen expert)"
        config = dict(inputs.moe_config)
        if inputs.vocab_rows:
            config["vocab_size"] = max(r[1] for r in inputs.vocab_rows.values())
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / PLAN_FILE).write_text((moe / PLAN_FILE).read_text())
        copied = copy_tokenizer_files(post, tmp)
        if "generation_config.json" not in copied and (moe / "generation_config.json").exists():
            shutil.copy2(moe / "generation_config.json", tmp / "generation_config.json")
            copied.append("generation_config.json (from --moe: --post has none)")
        elapsed = time.perf_counter() - start
        manifest = {
            "command": "graft", "scale": scale, "experts": experts, "format": inputs.fmt.name,
            "inputs": {k: {"path": str(p), "sha256": hashes[k]} for k, p in (("base", base), ("post", post), ("moe", moe))},
            "base_check": base_check,
            "vocab_policy": "rows within B's vocabulary: M + scale * (I - B); rows beyond it: copied from I",
            "vocab_rows_from_post": inputs.vocab_rows,
            "tensors": counts, "tokenizer_files_from_post": copied,
            "bytes_read": bytes_read, "bytes_written": writer.total_bytes,
            "elapsed_s": round(elapsed, 3), "peak_rss_gib": round(peak_rss_gib(), 3), "versions": versions(),
        }
        (tmp / "deltamoe_graft.json").write_text(json.dumps(manifest, indent=2) + "\n")
        write_graft_card(tmp, manifest, name=out.name, base=base, post=post, moe=moe)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="dense base model B (HF folder)")
    parser.add_argument("--post", required=True, type=Path, help="post-trained dense model I, e.g. B's instruct version")
    parser.add_argument("--moe", required=True, type=Path, help="HF MoE upcycled from B, with deltamoe_upcycle.json")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--scale", type=float, default=1.0, help="alpha: the delta is multiplied by it (default 1)")
    parser.add_argument("--experts", choices=EXPERT_SELECTIONS, default="all",
                        help="which experts get the delta: all, original (the plan's frozen ones), new (the others)")
    parser.add_argument("--max-shard-size", type=float, default=2.0, help="output shard size in GiB (memory bound)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_workers_argument(parser)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = graft(base=args.base, post=args.post, moe=args.moe, out=args.out, scale=args.scale,
                     experts=args.experts, overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_size * 1024**3),
                     workers=args.workers)
    gb = manifest["bytes_read"] / 1e9
    print(f"grafted {manifest['tensors']['grafted']} tensors ({manifest['tensors']['unchanged']} unchanged) into "
          f"{args.out}: {manifest['elapsed_s']:.1f} s, {gb:.2f} GB read, peak RSS {manifest['peak_rss_gib']:.2f} GiB")
    return 0
