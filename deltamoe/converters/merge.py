"""Dense merge baselines, streamed shard by shard: ParamDelta, task arithmetic, TIES, DARE (linear and TIES).

Every method works on task vectors `tau_k = M_k - base`, tensor by tensor, in float32, and writes the result in the
first model's dtype. Methods (each `combine_*` function cites its paper):
  param_delta    M_1 + sum_{k>=2} w_k tau_k              (Jindal et al. 2024, arXiv 2504.21023: CPT model + (I - B))
  task_arithmetic base + sum_k w_k tau_k                  (Ilharco et al. 2023, "Editing models with task arithmetic")
  ties           trim, elect sign, disjoint mean          (Yadav et al. 2023, "TIES-Merging")
  dare_linear    random drop + rescale, then sum          (Yu et al. 2024, "Language models are Super Mario")
  dare_ties      random drop + rescale, then TIES sign election and disjoint mean

Vocabulary policy (also used by `deltamoe graft`): a model may have more rows than the base in the embedding and
lm_head (added tokens). Rows within the base vocabulary are merged; rows beyond it are taken from the one model that
has them (several models extending the vocabulary is refused); any other shape mismatch is an error.

Example (ParamDelta: continually pre-trained base plus the instruct delta):
  deltamoe merge --method param_delta --base B/ --models CPT/ INSTRUCT/ --out merged/
  deltamoe merge --method ties --base B/ --models A/ C/ --weights 1 1 --density 0.2 --out ties/
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hashing import versions
from deltamoe.common.outputs import atomic_output_dir
from deltamoe.common.hf_folder import check_same_tokenizer, copy_tokenizer_files, read_config
from deltamoe.converters import blockwise
from deltamoe.converters.blockwise import (Scratch, TensorJobs, ThreadScratch, add_workers_argument, check_block,
                                           check_finite, one_torch_thread, row_blocks, worker_count)
from deltamoe.converters.hf_moe_layout import VOCAB_TENSORS
from deltamoe.converters.model_card import write_merge_card
from deltamoe.converters.safetensors_io import PlannedShardWriter, SafetensorsReader

log = logging.getLogger(__name__)
METHODS = ("param_delta", "task_arithmetic", "ties", "dare_ties", "dare_linear")
BLOCKWISE_METHODS = ("task_arithmetic", "param_delta")
"""Element-wise methods, computed in row blocks; TIES ranks magnitudes over whole tensors."""
DARE_METHODS = ("dare_linear", "dare_ties")
"""Row blocks too, each model's random stream carried from block to block by one generator per tensor."""
ARCHITECTURE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                       "num_key_value_heads")


# ---- checks shared with graft ---------------------------------------------------------------------------------------

def extra_vocab_rows(name: str, base_shape: list[int], other_shape: list[int], other: Path) -> int:
    """Rows `other` adds beyond the base vocabulary (0 when shapes agree); every other mismatch is an error."""
    if list(base_shape) == list(other_shape):
        return 0
    if (name in VOCAB_TENSORS and len(base_shape) == len(other_shape) == 2
            and base_shape[1] == other_shape[1] and other_shape[0] > base_shape[0]):
        return other_shape[0] - base_shape[0]
    raise DeltaMoEError(f"{other}: tensor {name!r} has shape {list(other_shape)}, expected {list(base_shape)} "
                        f"(only {' and '.join(VOCAB_TENSORS)} may add vocabulary rows)")


def check_same_architecture(base: Path, other: Path) -> None:
    cb, co = read_config(base), read_config(other)
    for field in ARCHITECTURE_FIELDS:
        if cb.get(field) != co.get(field):
            raise DeltaMoEError(f"{other}/config.json: {field} is {co.get(field)!r} but {base}/config.json has "
                                f"{cb.get(field)!r} (models must share one architecture)")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


# ---- methods (pure functions on float32 tensors) --------------------------------------------------------------------

def combine_task_arithmetic(base: torch.Tensor, models: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Ilharco et al. 2023, "Editing Models with Task Arithmetic" (ICLR): base + sum_k w_k (M_k - base)."""
    out = base.clone()
    for m, w in zip(models, weights):
        out.add_(m - base, alpha=w)  # the same kernel as graft's M + alpha * Delta, so both round alike
    return out


def combine_param_delta(base: torch.Tensor, models: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Jindal et al. 2024, "ParamΔ for Direct Weight Mixing" (arXiv 2504.21023): theta_cpt + sum_k w_k (M_k - base).

    The first model (the continually pre-trained one) is kept as is; its weight must be 1.
    """
    out = models[0].clone()
    for m, w in zip(models[1:], weights[1:]):
        out.add_(m - base, alpha=w)
    return out


def _disjoint_mean(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES sign election + disjoint mean: sign of the summed (weighted) deltas wins; average only agreeing entries.

    Weighted as mergekit does (sum of w_k tau_k over agreeing k, divided by the sum of their w_k); with unit weights
    this is the paper's disjoint mean.
    """
    weighted = torch.stack([w * d for d, w in zip(deltas, weights)])
    sign = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(weighted) == sign) & (weighted != 0)
    w = torch.tensor(weights, dtype=weighted.dtype).view(-1, *([1] * (weighted.ndim - 1)))
    num = (weighted * agree).sum(dim=0)
    den = (w * agree).sum(dim=0)
    return torch.where(den != 0, num / den.where(den != 0, torch.ones_like(den)), torch.zeros_like(num))


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * numel) entries of largest magnitude (TIES "trim"), zero the rest."""
    k = int(round(density * delta.numel()))
    if k >= delta.numel():
        return delta.clone()
    out = torch.zeros_like(delta).flatten()
    if k > 0:
        idx = torch.topk(delta.abs().flatten(), k).indices
        out[idx] = delta.flatten()[idx]
    return out.view_as(delta)


def combine_ties(base: torch.Tensor, models: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS): trim, elect, merge."""
    deltas = [trim_by_magnitude(m - base, density) for m in models]
    return base + _disjoint_mean(deltas, weights)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Yu et al. 2024, "Language Models are Super Mario" (ICML): drop with p = 1 - density, rescale by 1 / density."""
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def tensor_generator(seed: int, name: str, model_index: int) -> torch.Generator:
    """A generator seeded from (seed, tensor name, model): results do not depend on shard layout or order."""
    digest = hashlib.sha256(f"{seed}:{model_index}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def combine(method: str, name: str, base: torch.Tensor, models: list[torch.Tensor], weights: list[float], *,
            density: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Merge one tensor (all float32, same shape)."""
    if method == "task_arithmetic":
        return combine_task_arithmetic(base, models, weights)
    if method == "param_delta":
        return combine_param_delta(base, models, weights)
    if method == "ties":
        return combine_ties(base, models, weights, density)
    if method in DARE_METHODS:
        generators = [tensor_generator(seed, name, k) for k in range(len(models))]
        return _combine_dare(method, base, models, weights, density, generators)
    raise DeltaMoEError(f"--method: unknown method {method!r} (expected one of {METHODS})")


def _combine_dare(method: str, base: torch.Tensor, models: list[torch.Tensor], weights: list[float], density: float,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """DARE on a tensor or on consecutive row blocks of one: `generators` (one per model) carry the stream on."""
    deltas = [dare_drop(m - base, density, g) for m, g in zip(models, generators)]
    if method == "dare_linear":
        return base + sum(w * d for d, w in zip(deltas, weights))
    return base + _disjoint_mean(deltas, weights)


# ---- streaming driver -----------------------------------------------------------------------------------------------

def merge_models(*, method: str, base: Path, models: list[Path], out: Path, weights: list[float] | None = None,
                 density: float = 1.0, seed: int = 0, overwrite: bool = False,
                 max_shard_bytes: int = 2 * 1024**3, workers: int | None = None) -> dict:
    """Merge HF dense folders tensor by tensor into `out`; returns the manifest written as deltamoe_merge.json.

    `workers` threads (default: the CPUs this process may use) compute different tensors side by side; the output
    does not depend on it.
    """
    start = time.perf_counter()
    base, models, out = Path(base), [Path(m) for m in models], Path(out)
    weights = [1.0] * len(models) if weights is None else list(weights)
    if method not in METHODS:
        raise DeltaMoEError(f"--method: unknown method {method!r} (expected one of {METHODS})")
    if len(weights) != len(models):
        raise DeltaMoEError(f"--weights: {len(weights)} weights for {len(models)} --models")
    if method == "param_delta" and (len(models) < 2 or weights[0] != 1.0):
        raise DeltaMoEError("--method param_delta: needs --models CPT POST [POST ...] and the weight of CPT must be 1")
    if not 0.0 < density <= 1.0:
        raise DeltaMoEError(f"--density: must be in (0, 1], got {density}")
    workers = worker_count(workers)
    for m in models:
        check_same_architecture(base, m)
        check_same_tokenizer(base, m, flag="--models")
    base_reader = SafetensorsReader(base)
    readers = [SafetensorsReader(m) for m in models]
    for m, r in zip(models, readers):
        if set(r.keys()) != set(base_reader.keys()):
            diff = sorted(set(r.keys()) ^ set(base_reader.keys()))
            raise DeltaMoEError(f"{m}: tensor names differ from {base}: {diff[:5]}")
    vocab_rows = _vocab_rows(base_reader, readers, models)
    names = [n for names in base_reader.keys_by_shard().values() for n in names]
    specs = [(n, readers[0].dtype(n), [vocab_rows[n]["rows"][1], *base_reader.shape(n)[1:]] if n in vocab_rows
              else base_reader.shape(n)) for n in names]
    for name, rows in vocab_rows.items():
        log.warning("%s: rows %d..%d beyond the base vocabulary copied from %s", name, *rows["rows"], rows["from"])
    with atomic_output_dir(out, inputs=[base, *models], overwrite=overwrite) as tmp:
        scratch = ThreadScratch()
        with contextlib.ExitStack() as hashing:
            hash_base = hashing.enter_context(base_reader.hash_while_reading())
            hash_models = [hashing.enter_context(r.hash_while_reading(list(dict.fromkeys(r.shard_of(n) for n in names))))
                           for r in readers]
            writer = PlannedShardWriter(tmp, specs, max_shard_bytes=max_shard_bytes)
            progress = tqdm(total=len(names), desc=f"merge ({method})", unit="tensor")

            def merge_one(name: str, b: torch.Tensor, ts: list[torch.Tensor], merged: torch.Tensor) -> str:
                _merge_tensor(method, name, b, ts, merged, weights, density=density, seed=seed, base=base,
                              models=models, scratch=scratch.scratch)
                if name in vocab_rows:
                    k = [str(m) for m in models].index(vocab_rows[name]["from"])
                    merged[b.shape[0]:].copy_(ts[k][b.shape[0]:].float())
                return name

            def written(name: str) -> None:
                writer.add(name, outputs.pop(name))
                for r in (base_reader, *readers):
                    r.release(name)
                progress.update()

            outputs: dict[str, torch.Tensor] = {}
            try:
                with one_torch_thread(), TensorJobs(workers, written) as jobs:
                    for name in names:
                        b, ts = base_reader.get(name), [r.get(name) for r in readers]  # page-cache views
                        cost = working_set_bytes(method, base_reader.shape(name), len(models), density)
                        jobs.make_room(cost)
                        merged = outputs[name] = jobs.buffer(writer, name)
                        jobs.submit(cost, merge_one, name, b, ts, merged)
                    jobs.finish_all()
                writer.finish()
            finally:
                progress.close()
                writer.close()
            hashes = {"base": hash_base.result(), "models": [h.result() for h in hash_models]}
        config = read_config(models[0] if method == "param_delta" else base)
        if vocab_rows:
            config["vocab_size"] = max(v["rows"][1] for v in vocab_rows.values())
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # Users want the post-trained model's tokenizer and chat template: the last model, or the one adding tokens.
        token_source = Path(next(iter(vocab_rows.values()))["from"]) if vocab_rows else models[-1]
        copied = copy_tokenizer_files(token_source, tmp)
        manifest = {
            "command": "merge", "method": method, "weights": weights, "density": density, "seed": seed,
            "inputs": {"base": {"path": str(base), "sha256": hashes["base"]},
                       "models": [{"path": str(m), "sha256": h} for m, h in zip(models, hashes["models"])]},
            "vocab_policy": "rows within the base vocabulary merged; rows beyond it from the model that adds them",
            "vocab_rows": vocab_rows, "tokenizer_from": str(token_source), "tokenizer_files": copied,
            "versions": versions(), "elapsed_s": round(time.perf_counter() - start, 3),
            "peak_rss_gib": round(peak_rss_gib(), 3),
        }
        (tmp / "deltamoe_merge.json").write_text(json.dumps(manifest, indent=2) + "\n")
        write_merge_card(tmp, manifest, name=out.name)
    return manifest


def _vocab_rows(base_reader: SafetensorsReader, readers: list[SafetensorsReader], models: list[Path]) -> dict[str, dict]:
    """Tensors to which one model adds vocabulary rows, checked before any tensor is read."""
    vocab_rows = {}
    for name in base_reader.keys():
        b_shape = base_reader.shape(name)
        extra = [extra_vocab_rows(name, b_shape, r.shape(name), m) for r, m in zip(readers, models)]
        extenders = [k for k, e in enumerate(extra) if e]
        if len(extenders) > 1:
            raise DeltaMoEError(f"tensor {name!r}: several models add vocabulary rows "
                                f"({', '.join(str(models[k]) for k in extenders)}); merging new-token rows is undefined")
        if extenders:
            k = extenders[0]
            vocab_rows[name] = {"from": str(models[k]), "rows": [b_shape[0], b_shape[0] + extra[k]]}
    return vocab_rows


def working_set_bytes(method: str, shape: list[int], n_models: int, density: float) -> int:
    """Memory one tensor's merge holds beyond its inputs and output (an upper estimate, for `TensorJobs`).

    TIES: the trimmed float32 task vectors (4 bytes per element and model), the one being ranked (4) and top-k's
    (value, index) pairs (16: aten's CPU topk copies the whole row into a vector of them), plus the k kept entries'
    indices, values and gathers (24 per kept entry). The other methods hold a few float32 row blocks per model.
    """
    n = math.prod(shape)
    if method == "ties":
        return (4 * n_models + 20) * n + 24 * int(round(density * n))
    return 4 * blockwise.BLOCK_ELEMENTS * (2 * n_models + 6)


def _merge_tensor(method: str, name: str, b: torch.Tensor, ts: list[torch.Tensor], out: torch.Tensor,
                  weights: list[float], *, density: float, seed: int, base: Path, models: list[Path],
                  scratch: Scratch) -> None:
    """Merge one tensor's rows within the base vocabulary into `out` (the model's dtype).

    Task arithmetic and ParamDelta are element-wise: row blocks with the very operations of their `combine_*`
    function. TIES ranks magnitudes over the whole tensor (`_ties_into`: whole task vectors one at a time, the rest in
    row blocks); DARE draws one random stream per tensor and model, which row blocks continue (`_dare_into`).
    """
    rows = b.shape[0]
    if method in BLOCKWISE_METHODS:
        for start, stop in row_blocks(rows, b[0].numel() if b.ndim > 1 else 1):
            base_block = scratch.upcast(0, b[start:stop])
            blocks = [t[start:stop] for t in ts]
            first = 0 if method == "task_arithmetic" else 1
            acc = scratch.upcast(1, b[start:stop] if method == "task_arithmetic" else blocks[0])
            for k in range(first, len(ts)):
                diff = torch.sub(scratch.upcast(2, blocks[k]), base_block, out=scratch.like(3, base_block.shape))
                acc.add_(diff, alpha=weights[k])
            check_block(acc, [(b[start:stop], name, base), *[(blk, name, m) for blk, m in zip(blocks, models)]])
            out[start:stop].copy_(acc)
        return
    check_finite(b, name, base)
    for t, m in zip(ts, models):
        check_finite(t, name, m)
    if method == "ties":
        _ties_into(out[:rows], b, [t[:rows] for t in ts], weights, density)
        return
    _dare_into(method, name, out[:rows], b, [t[:rows] for t in ts], weights, density, seed)


def _dare_into(method: str, name: str, out: torch.Tensor, b: torch.Tensor, ts: list[torch.Tensor],
               weights: list[float], density: float, seed: int) -> None:
    """`combine` for DARE in row blocks, bit-identical to it on the whole tensor.

    torch's CPU generator (mt19937) fills a tensor in order, one draw per element, so blocks drawn one after another
    from one generator per model are the whole tensor's stream; the rest is element-wise. The identity is torch's
    behaviour, not its documented contract: tests/test_streaming_conversion.py compares against `combine`.
    """
    generators = [tensor_generator(seed, name, k) for k in range(len(ts))]
    for start, stop in row_blocks(b.shape[0], b[0].numel() if b.ndim > 1 else 1):
        base = b[start:stop].float()
        merged = _combine_dare(method, base, [t[start:stop].float() for t in ts], weights, density, generators)
        out[start:stop].copy_(merged)


def _ties_into(out: torch.Tensor, b: torch.Tensor, ts: list[torch.Tensor], weights: list[float], density: float) -> None:
    """`combine_ties` with few whole float32 tensors alive at once, bit-identical to it.

    The trim ranks each whole task vector (one top-k over the tensor): one model at a time, on a magnitude tensor made
    in place and freed before the kept entries are recomputed from the inputs (the same subtraction, so the same bits).
    Sign election and the disjoint mean are element-wise over models: row blocks, with the very function
    `combine_ties` calls, written straight into `out`.
    """
    trimmed = [_trimmed_task_vector(t, b, density) for t in ts]
    base = b.float()
    for start, stop in row_blocks(b.shape[0], b[0].numel() if b.ndim > 1 else 1):
        out[start:stop].copy_(base[start:stop] + _disjoint_mean([d[start:stop] for d in trimmed], weights))


def _trimmed_task_vector(t: torch.Tensor, b: torch.Tensor, density: float) -> torch.Tensor:
    """`trim_by_magnitude(t.float() - b.float(), density)` in float32, holding one whole float32 tensor during the top-k."""
    k = int(round(density * b.numel()))
    delta = t.to(torch.float32, copy=True)  # a copy even when t is float32: t is read again below
    delta.sub_(b.float())  # t.float() - b.float(), in place
    if k >= b.numel():
        return delta
    if k == 0:
        return torch.zeros(b.shape, dtype=torch.float32)
    # The same entries as trim_by_magnitude's sorted top-k, ties included: aten's CPU topk selects with
    # std::nth_element (or std::partial_sort when k * 64 <= n), and `sorted` only orders the k selected entries
    # afterwards (aten/src/ATen/native/TopKImpl.h); sorting them took half the trim's time at density 0.5.
    idx = torch.topk(delta.abs_().view(-1), k, sorted=False).indices  # ranks |t - b|; the values are dropped at once
    del delta
    trimmed_flat = torch.zeros(b.numel(), dtype=torch.float32)
    trimmed_flat[idx] = t.reshape(-1)[idx].float() - b.reshape(-1)[idx].float()
    return trimmed_flat.view(b.shape)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--base", required=True, type=Path, help="the common base model B (HF folder)")
    parser.add_argument("--models", required=True, nargs="+", type=Path,
                        help="models to merge; param_delta: the continually pre-trained model first, then post-trained ones")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per --models entry (default 1 each)")
    parser.add_argument("--density", type=float, default=1.0, help="fraction of delta entries kept (ties, dare_*)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random drop (per tensor name)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_workers_argument(parser)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = merge_models(method=args.method, base=args.base, models=args.models, out=args.out, weights=args.weights,
                            density=args.density, seed=args.seed, overwrite=args.overwrite,
                            workers=args.workers)
    print(f"merged {len(args.models)} models ({args.method}) into {args.out} in {manifest['elapsed_s']:.1f} s, "
          f"peak RSS {manifest['peak_rss_gib']:.2f} GiB")
    return 0
