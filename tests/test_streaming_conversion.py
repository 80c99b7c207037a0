"""Conversion at disk speed without changing a bit: hashing while streaming, block arithmetic, planned shard writes.

The oracles below are graft's and merge's arithmetic as it was before streaming (whole tensors, upcast to float32,
then cast back): every output tensor must equal them bit for bit, the files must equal what safetensors writes, and
the manifests must keep the same sha256 values.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hashing import FolderHasher, sha256_dir
from deltamoe.common.hf_folder import read_config
from deltamoe.converters import blockwise, merge
from deltamoe.converters import graft as graft_module
from deltamoe.converters.graft import graft
from deltamoe.converters.hf_moe_layout import format_of_config, parse_moe_name
from deltamoe.converters.hf_upcycle import ffn_slice, upcycle_hf
from deltamoe.converters.merge import METHODS, _trimmed_task_vector, combine, merge_models, trim_by_magnitude
from deltamoe.converters.safetensors_io import PlannedShardWriter, SafetensorsReader, ShardWriter
from deltamoe.megatron_ext.moe.plan import UpcyclePlan, copy_plan
from deltamoe.megatron_ext.moe.upcycle import build_plan
from tests.test_graft import perturbed_copy
from tests.tiny_models import make_tiny_hf


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 100 elements: every tiny tensor spans several blocks, and expert row slices cross block edges."""
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 100)


def rewrite(folder: Path, dtype: torch.dtype, *, perturb: float = 0.0, keep=lambda name: False, seed: int = 3) -> Path:
    """Cast a one-file model to `dtype`; optionally add noise to the tensors `keep` does not protect (training)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name, t in sorted(tensors.items()):
        if perturb and not keep(name):
            t = t + perturb * torch.randn(t.shape, generator=gen)
        out[name] = t.to(dtype).contiguous()
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def reference_graft(base: Path, post: Path, moe: Path, scale: float, experts: str) -> dict[str, torch.Tensor]:
    b, i, m = (SafetensorsReader(f).read_all() for f in (base, post, moe))
    plan = UpcyclePlan.load(moe)
    fmt = format_of_config(read_config(moe), "config.json")
    out = {}
    for name, t in m.items():
        role = parse_moe_name(fmt, name)
        source = (plan.routed_experts[role.expert] if role.kind == "expert"
                  else plan.shared_expert if role.kind == "shared_expert" else None)
        if role.kind == "shared_expert":
            selected = plan.shared_expert is not None and experts in ("all", "original")
        else:
            selected = experts == "all" or (experts == "original") == (role.expert in plan.frozen_experts)
        if role.kind in ("router", "shared_expert_gate") or (role.kind != "other" and not selected):
            out[name] = t
            continue
        bt, it = b[role.dense_name], i[role.dense_name]
        rows = bt.shape[0]
        delta = it[:rows].float() - bt.float()
        if role.kind == "other":
            o = torch.add(t.float(), delta, alpha=scale)
            if it.shape[0] > rows:
                o = torch.cat([o, it[rows:].float()])
        else:
            o = torch.add(t.float(), ffn_slice(delta, role.proj, source), alpha=scale)
        out[name] = o.to(t.dtype)
    return out


def assert_same_tensors(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    got = SafetensorsReader(folder).read_all()
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


GRAFT_CASES = [
    pytest.param("copy", torch.bfloat16, 1.0, "all", 0, id="copy-bf16"),
    pytest.param("copy", torch.float32, 0.5, "new", 3, id="copy-fp32-new-vocab"),
    pytest.param("copy", torch.bfloat16, 0.3, "original", 0, id="copy-bf16-original-scale0.3"),
    pytest.param("shared", torch.bfloat16, 1.0, "all", 2, id="shared-bf16-vocab"),
    pytest.param("shared", torch.float32, 0.7, "new", 0, id="shared-fp32-new"),
]


@pytest.mark.parametrize("variant,dtype,scale,experts,extra_rows", GRAFT_CASES)
def test_streamed_graft_equals_whole_tensor_arithmetic(tmp_path, small_blocks, variant, dtype, scale, experts, extra_rows):
    plan = (copy_plan(num_experts=4, topk=2, ffn_hidden_size=96) if variant == "copy" else
            build_plan(variant="shared", num_experts=4, topk=2, ffn_hidden_size=96, granularity=2, router_init="zeros"))
    arch = "llama" if variant == "copy" else "qwen2"  # a shared expert needs Qwen2-MoE
    base = rewrite(make_tiny_hf(arch, tmp_path / "B", seed=1), dtype)
    post = rewrite(perturbed_copy(base, tmp_path / "I", extra_rows=extra_rows), dtype)
    moe = upcycle_hf(base, tmp_path / "M", plan, max_shard_bytes=60_000)
    frozen = [f"experts.{e}." for e in plan.frozen_experts]
    rewrite_sharded(moe, perturb=0.01, keep=lambda n: any(f in n for f in frozen))  # M after training
    manifest = graft(base=base, post=post, moe=moe, out=tmp_path / "O", scale=scale, experts=experts,
                     max_shard_bytes=50_000)
    assert_same_tensors(tmp_path / "O", reference_graft(base, post, moe, scale, experts))
    assert manifest["inputs"]["moe"]["sha256"] == sha256_dir(moe)
    assert manifest["inputs"]["base"]["sha256"] == sha256_dir(base)
    assert manifest["inputs"]["post"]["sha256"] == sha256_dir(post)


def rewrite_sharded(folder: Path, *, perturb: float, keep) -> None:
    """Add noise to a sharded model's tensors in place, keeping its shard layout."""
    reader = SafetensorsReader(folder)
    gen = torch.Generator().manual_seed(11)
    for shard, names in reader.keys_by_shard().items():
        tensors = {n: reader.get(n).clone() for n in names}
        for n in sorted(names):
            if not keep(n) and tensors[n].is_floating_point():
                tensors[n] = (tensors[n].float() + perturb * torch.randn(tensors[n].shape, generator=gen)).to(tensors[n].dtype)
        del reader
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        reader = SafetensorsReader(folder)


@pytest.mark.parametrize("method", METHODS)
def test_streamed_merge_equals_whole_tensor_arithmetic(tmp_path, small_blocks, method):
    base = rewrite(make_tiny_hf("llama", tmp_path / "B", seed=1), torch.bfloat16)
    a = rewrite(perturbed_copy(base, tmp_path / "A", seed=2, extra_rows=2), torch.bfloat16)
    c = rewrite(perturbed_copy(base, tmp_path / "C", seed=3), torch.bfloat16)
    weights = [1.0, 0.6] if method == "param_delta" else [0.7, 0.4]
    manifest = merge_models(method=method, base=base, models=[a, c], out=tmp_path / "O", weights=weights,
                            density=0.5, seed=4, max_shard_bytes=40_000)
    b_t, a_t, c_t = (SafetensorsReader(f).read_all() for f in (base, a, c))
    expected = {}
    for name, bt in b_t.items():
        rows = bt.shape[0]
        merged = combine(method, name, bt.float(), [a_t[name][:rows].float(), c_t[name][:rows].float()], weights,
                         density=0.5, seed=4)
        if a_t[name].shape[0] > rows:
            merged = torch.cat([merged, a_t[name][rows:].float()])
        expected[name] = merged.to(a_t[name].dtype)
    assert_same_tensors(tmp_path / "O", expected)
    assert manifest["inputs"]["base"]["sha256"] == sha256_dir(base)
    assert [m["sha256"] for m in manifest["inputs"]["models"]] == [sha256_dir(a), sha256_dir(c)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ties_of_three_models_in_row_blocks_equals_whole_tensor_ties(tmp_path, small_blocks, dtype):
    # Sign election and the disjoint mean reduce over the models: row blocks must sum them as the whole tensor does.
    # float32: the trim must not subtract in place from the model's own tensor (it reads the kept entries again).
    base = rewrite(make_tiny_hf("llama", tmp_path / "B", seed=1), dtype)
    models = [rewrite(perturbed_copy(base, tmp_path / f"M{k}", seed=5 + k), dtype) for k in range(3)]
    weights = [0.7, 0.4, 1.3]
    merge_models(method="ties", base=base, models=models, out=tmp_path / "O", weights=weights, density=0.3)
    b_t, *m_t = (SafetensorsReader(f).read_all() for f in (base, *models))
    expected = {name: combine("ties", name, bt.float(), [t[name].float() for t in m_t], weights, density=0.3)
                .to(bt.dtype) for name, bt in b_t.items()}
    assert_same_tensors(tmp_path / "O", expected)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dare_in_row_blocks_equals_whole_tensor_dare(tmp_path, small_blocks, method, dtype):
    # Each block draws the next stretch of its tensor's random stream: the drop mask must be the whole tensor's.
    base = rewrite(make_tiny_hf("llama", tmp_path / "B", seed=1), dtype)
    models = [rewrite(perturbed_copy(base, tmp_path / f"M{k}", seed=5 + k), dtype) for k in range(2)]
    weights = [0.7, 1.3]
    merge_models(method=method, base=base, models=models, out=tmp_path / "O", weights=weights, density=0.4, seed=11)
    b_t, *m_t = (SafetensorsReader(f).read_all() for f in (base, *models))
    expected = {name: combine(method, name, bt.float(), [t[name].float() for t in m_t], weights, density=0.4, seed=11)
                .to(bt.dtype) for name, bt in b_t.items()}
    assert_same_tensors(tmp_path / "O", expected)


def test_merge_refuses_an_unknown_method_before_writing(tmp_path):
    base = make_tiny_hf("llama", tmp_path / "B", seed=1)
    with pytest.raises(DeltaMoEError, match="--method: unknown method 'dare'"):
        merge_models(method="dare", base=base, models=[base], out=tmp_path / "O")
    assert not (tmp_path / "O").exists()


def reference_upcycle_files(dense: Path, out: Path, plan: UpcyclePlan, max_shard_bytes: int) -> dict[str, str]:
    """The HF upcycle as it was written before planned shards: ShardWriter, tensors in reading order."""
    from deltamoe.converters.hf_moe_layout import format_for_dense, parse_dense_name
    from deltamoe.converters.hf_upcycle import moe_config

    config_in = read_config(dense)
    fmt = format_for_dense(config_in["model_type"], "config.json")
    config = moe_config(config_in, fmt, plan)
    writer = ShardWriter(out, max_shard_bytes=max_shard_bytes)
    dtype = None
    for name, tensor in SafetensorsReader(dense).iter_tensors():
        dtype = dtype or tensor.dtype
        ffn = parse_dense_name(name)
        if ffn is None:
            writer.add(name, tensor)
            continue
        layer, proj = ffn
        for j, source in enumerate(plan.routed_experts):
            writer.add(fmt.expert_name(layer, j, proj), ffn_slice(tensor, proj, source).to(tensor.dtype))
        if fmt.has_shared_expert:
            if plan.shared_expert is not None:
                shared = ffn_slice(tensor, proj, plan.shared_expert)
            else:
                width = config["shared_expert_intermediate_size"]
                shared = torch.zeros((width, tensor.shape[1]) if proj != "down" else (tensor.shape[0], width))
            writer.add(fmt.shared_expert_name(layer, proj), shared.to(tensor.dtype))
    for layer in range(config_in["num_hidden_layers"]):
        writer.add(fmt.router_name(layer), torch.zeros(plan.num_experts, config_in["hidden_size"], dtype=dtype))
        if fmt.has_shared_expert:
            writer.add(fmt.shared_expert_gate_name(layer), torch.zeros(1, config_in["hidden_size"], dtype=dtype))
    writer.finish()
    return sha256_dir(out, patterns=("*.safetensors", "*.index.json"))


@pytest.mark.parametrize("arch,variant", [("llama", "copy"), ("qwen3", "copy"), ("qwen2", "shared"), ("qwen2", "copy")])
def test_hf_upcycle_files_are_byte_identical_to_the_buffered_writer(tmp_path, arch, variant):
    plan = (copy_plan(num_experts=3, topk=2, ffn_hidden_size=96) if variant == "copy" else
            build_plan(variant="shared", num_experts=4, topk=2, ffn_hidden_size=96, granularity=2, router_init="zeros"))
    base = rewrite(make_tiny_hf(arch, tmp_path / "B", seed=1), torch.bfloat16)
    upcycle_hf(base, tmp_path / "M", plan, max_shard_bytes=50_000)
    expected = reference_upcycle_files(base, tmp_path / "ref", plan, 50_000)
    assert len(expected) > 2 and sha256_dir(tmp_path / "M", patterns=("*.safetensors", "*.index.json")) == expected


def test_upcycle_records_the_base_hashes_it_streamed(tmp_path):
    base = make_tiny_hf("llama", tmp_path / "B", seed=1)
    moe = upcycle_hf(base, tmp_path / "M", copy_plan(num_experts=3, topk=2, ffn_hidden_size=96))
    assert UpcyclePlan.load(moe).base_sha256 == sha256_dir(base, patterns=("*.safetensors",))


def test_each_tensor_is_read_after_the_hashing_thread_read_its_bytes(tmp_path, monkeypatch):
    """What makes the disk read once: the arithmetic waits for the hashing thread and finds the bytes in memory."""
    from deltamoe.converters import safetensors_io

    base = make_tiny_hf("llama", tmp_path / "B", seed=1)
    post = perturbed_copy(base, tmp_path / "I")
    moe = upcycle_hf(base, tmp_path / "M", copy_plan(num_experts=4, topk=2, ffn_hidden_size=96), max_shard_bytes=60_000)
    checked = []
    original_get = SafetensorsReader.get

    def get(self, name):
        tensor = original_get(self, name)
        hasher = self._hasher
        if hasher is not None:
            shard = self.shard_of(name)
            end = self._data_start(shard) + self._entry(name)["data_offsets"][1]
            assert shard in hasher._hashes or hasher._progress.get(shard, 0) >= end, (self.folder, name)
            checked.append(name)
        return tensor

    monkeypatch.setattr(safetensors_io.SafetensorsReader, "get", get)
    graft(base=base, post=post, moe=moe, out=tmp_path / "O")
    assert len(checked) > 50


def make_shards(folder: Path, count: int, size: int = 4096) -> None:
    writer = ShardWriter(folder, max_shard_bytes=size)
    for k in range(count):
        writer.add(f"t{k}", torch.full((size // 4,), float(k)))
    writer.finish()


def test_folder_hasher_equals_sha256_dir_and_stays_within_its_lookahead(tmp_path):
    make_shards(tmp_path, 5)
    (tmp_path / "config.json").write_text("{}")
    reader = SafetensorsReader(tmp_path)
    with reader.hash_while_reading(lookahead=1) as hasher:
        deadline = time.monotonic() + 10
        while len(hasher._hashes) < 3 and time.monotonic() < deadline:  # the JSON files and the first shard
            time.sleep(0.01)
        time.sleep(0.1)
        # No further: the consumer has started no shard, and the thread may run one ahead of it.
        assert sorted(hasher._hashes) == ["config.json", reader.shards[0], "model.safetensors.index.json"]
        assert reader.shard_of("t2") == reader.shards[2]
        reader.get("t2")  # starts the third shard and waits for its bytes; the thread may now read the fourth
        # get() returns once the bytes are read; the file's digest is recorded a moment later, after its last chunk.
        while reader.shards[2] not in hasher._hashes and time.monotonic() < deadline + 10:
            time.sleep(0.01)
        time.sleep(0.1)
        assert reader.shards[2] in hasher._hashes and reader.shards[4] not in hasher._hashes
        assert hasher.result() == sha256_dir(tmp_path)


def test_folder_hasher_reports_an_unreadable_file_and_stops_on_error(tmp_path):
    make_shards(tmp_path, 3)
    hasher = FolderHasher(tmp_path, lookahead=0)
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(Exception, match=f"{tmp_path}: cannot read a file to hash it"):
        hasher.started(victim.name)
        hasher.result()
    with FolderHasher(tmp_path, lookahead=0):
        pass  # leaving the block after an error stops the thread instead of reading the rest
    assert not [t for t in threading.enumerate() if t.name.startswith("sha256")]


DTYPES = [torch.bfloat16, torch.float32, torch.float16, torch.int64, torch.int8, torch.bool, torch.float64]


@pytest.mark.parametrize("max_shard_bytes", [10**9, 64, 1])
def test_planned_writer_files_are_byte_identical_to_safetensors(tmp_path, max_shard_bytes):
    rng = random.Random(max_shard_bytes)
    gen = torch.Generator().manual_seed(0)
    specs = [(f"layer.{rng.randint(0, 99)}.w{i}", rng.choice(DTYPES), [rng.randint(0, 7) for _ in range(rng.randint(0, 3))])
             for i in range(40)]
    tensors = {n: (torch.randn(s, generator=gen) * 5).to(d) for n, d, s in specs}
    reference = ShardWriter(tmp_path / "ref", max_shard_bytes=max_shard_bytes)
    for name, _, _ in specs:
        reference.add(name, tensors[name])
    reference.finish()
    planned = PlannedShardWriter(tmp_path / "new", specs, max_shard_bytes=max_shard_bytes, max_pending_bytes=100)
    for name, _, _ in rng.sample(specs, len(specs)):  # any order
        out = planned.buffer(name)
        out.copy_(tensors[name])
        planned.add(name, out)
    planned.finish()
    assert sha256_dir(tmp_path / "new") == sha256_dir(tmp_path / "ref")
    assert len(list((tmp_path / "ref").glob("*.safetensors"))) > (1 if max_shard_bytes < 10**9 else 0)


def test_planned_writer_refuses_what_it_did_not_plan_and_what_is_missing(tmp_path):
    specs = [("a", torch.float32, [2]), ("b", torch.bfloat16, [3])]
    writer = PlannedShardWriter(tmp_path, specs)
    with pytest.raises(ValueError, match="'c' is not in the writer's plan"):
        writer.add("c", torch.zeros(2))
    with pytest.raises(ValueError, match=r"'a': planned torch.float32 \[2\], got torch.float32 \[3\]"):
        writer.add("a", torch.zeros(3))
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'a' written twice"):
        writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 planned tensors were never written, e.g. 'b'"):
        writer.finish()


def test_planned_writer_passes_a_write_error_to_the_caller(tmp_path, monkeypatch):
    from deltamoe.converters import safetensors_io

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    writer = PlannedShardWriter(tmp_path, [("a", torch.float32, [4]), ("b", torch.float32, [4])])
    monkeypatch.setattr(safetensors_io, "_pwrite_all", full)
    writer.add("a", torch.zeros(4))
    with pytest.raises(OSError, match="No space left"):
        writer.finish()
    writer.close()


@pytest.mark.parametrize("density", [0.01, 0.5])  # aten's partial_sort path (k * 64 <= n) and its nth_element path
def test_ties_trim_keeps_the_sorted_top_k_entries_when_magnitudes_tie(density):
    # The trim asks topk for unsorted indices (faster); the kept entries must still be the sorted top-k's, ties
    # included. Integer-valued deltas tie everywhere, and the ties straddle the threshold: which of them are kept
    # depends on the selection algorithm: at density 0.5 a different rule (say, lowest index first) fails.
    gen = torch.Generator().manual_seed(0)
    b = torch.randint(-4, 5, (200, 64), generator=gen).to(torch.bfloat16)
    t = (b.float() + torch.randint(-6, 7, b.shape, generator=gen)).to(torch.bfloat16)
    want = trim_by_magnitude(t.float() - b.float(), density)
    got = _trimmed_task_vector(t, b, density)
    magnitude = (t.float() - b.float()).abs()
    threshold = magnitude[want != 0].min()
    assert int((magnitude == threshold).sum()) > int(((want != 0) & (magnitude == threshold)).sum()) > 0
    assert torch.equal(got, want)


@pytest.fixture
def eager_thread_switches():
    """Python threads switch every microsecond instead of every 5 ms: state shared by worker threads collides."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def count_side_by_side(monkeypatch, module, attr: str) -> list[int]:
    """Wrap `module.attr` so that it lingers 5 ms and records the most calls running at once: [peak] (reset it)."""
    running, peak, lock = [0], [0], threading.Lock()
    wrapped = getattr(module, attr)

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.005)  # long enough for the main thread to hand the next jobs to the other workers
            return wrapped(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(module, attr, counted)
    return peak


def assert_same_files(first: Path, second: Path) -> None:
    shards = sorted(p.name for p in first.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in second.glob("*.safetensors"))
    for shard in [*shards, "model.safetensors.index.json"]:
        assert (first / shard).read_bytes() == (second / shard).read_bytes(), shard


@pytest.mark.parametrize("method", ["ties", "dare_linear", "task_arithmetic"])
def test_merge_output_is_the_same_for_any_number_of_workers(tmp_path, small_blocks, eager_thread_switches,
                                                            monkeypatch, method):
    # Tensors computed side by side on worker threads, finished out of order, and a working-set budget small enough
    # that the larger tensors run alone: the bytes written must be those of one worker.
    base = rewrite(make_tiny_hf("llama", tmp_path / "B", seed=1), torch.bfloat16)
    models = [rewrite(perturbed_copy(base, tmp_path / f"M{k}", seed=5 + k, extra_rows=2 * (k == 1)), torch.bfloat16)
              for k in range(2)]
    monkeypatch.setattr(blockwise, "WORKING_SET_BYTES", 500_000)  # TIES: never both 128 x 64 matrices at once
    peak = count_side_by_side(monkeypatch, merge, "_merge_tensor")
    outputs = []
    for workers in (1, 3):
        out = tmp_path / f"O{workers}"
        merge_models(method=method, base=base, models=models, out=out, weights=[0.7, 1.3], density=0.4, seed=2,
                     max_shard_bytes=30_000, workers=workers)
        outputs.append(out)
        assert peak[0] == 1 if workers == 1 else peak[0] >= 2  # one at a time, then side by side
    assert_same_files(*outputs)


@pytest.mark.parametrize("variant,extra_rows", [("copy", 0), ("shared", 2)])
def test_graft_output_is_the_same_for_any_number_of_workers(tmp_path, small_blocks, eager_thread_switches,
                                                            monkeypatch, variant, extra_rows):
    # Groups (a dense tensor and the M tensors made from it) computed side by side, finished out of order; M's small
    # shards split some dense tensor's experts over two shards, so that dense tensor heads two groups at once.
    plan = (copy_plan(num_experts=4, topk=2, ffn_hidden_size=96) if variant == "copy" else
            build_plan(variant="shared", num_experts=4, topk=2, ffn_hidden_size=96, granularity=2, router_init="zeros"))
    base = rewrite(make_tiny_hf("llama" if variant == "copy" else "qwen2", tmp_path / "B", seed=1), torch.bfloat16)
    post = rewrite(perturbed_copy(base, tmp_path / "I", extra_rows=extra_rows), torch.bfloat16)
    moe = upcycle_hf(base, tmp_path / "M", plan, max_shard_bytes=60_000)
    rewrite_sharded(moe, perturb=0.01, keep=lambda n: any(f"experts.{e}." in n for e in plan.frozen_experts))
    monkeypatch.setattr(blockwise, "WORKING_SET_BYTES", 3_300)  # 1_600 a group (four 100-element blocks): two at once
    peak = count_side_by_side(monkeypatch, graft_module, "_graft_group")
    outputs = []
    for workers in (1, 3):
        out, peak[0] = tmp_path / f"O{workers}", 0
        manifest = graft(base=base, post=post, moe=moe, out=out, scale=0.7, max_shard_bytes=50_000, workers=workers)
        outputs.append((out, manifest))
        assert peak[0] == (1 if workers == 1 else 2)  # one at a time, then two side by side (the budget's limit)
    assert_same_tensors(outputs[1][0], reference_graft(base, post, moe, 0.7, "all"))
    assert_same_files(outputs[0][0], outputs[1][0])
    first, second = (m for _, m in outputs)
    assert first["inputs"] == second["inputs"] and first["tensors"] == second["tensors"]
    assert first["bytes_read"] == second["bytes_read"]


def test_graft_refuses_zero_workers_before_writing(tmp_path):
    base = make_tiny_hf("llama", tmp_path / "B", seed=1)
    with pytest.raises(DeltaMoEError, match="--workers: must be at least 1, got 0"):
        graft(base=base, post=base, moe=base, out=tmp_path / "O", workers=0)
    assert not (tmp_path / "O").exists()


def test_merge_refuses_zero_workers_before_writing(tmp_path):
    base = make_tiny_hf("llama", tmp_path / "B", seed=1)
    with pytest.raises(DeltaMoEError, match="--workers: must be at least 1, got 0"):
        merge_models(method="ties", base=base, models=[base], out=tmp_path / "O", workers=0)
    assert not (tmp_path / "O").exists()


def test_tensor_jobs_run_side_by_side_within_their_budget():
    done: list[str] = []
    both = threading.Barrier(2, timeout=10)
    running, peak = [0], [0]
    lock = threading.Lock()

    def job(name: str, meet: bool) -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if meet:
            both.wait()  # times out (BrokenBarrierError) unless two jobs really run at once
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return name

    with blockwise.TensorJobs(2, done.append, budget=100) as jobs:
        jobs.submit(50, job, "a", True)
        jobs.submit(50, job, "b", True)
        jobs.submit(200, job, "big", False)  # over the budget: waits until a and b are done, then runs alone
        assert sorted(done) == ["a", "b"]
        jobs.submit(10, job, "c", False)  # within the budget but not beside "big" (its 200 already exceed it)
        assert done[-1] == "big"
        jobs.finish_all()
    assert done[-1] == "c" and peak[0] == 2


def test_tensor_jobs_raise_a_jobs_error_and_wait_for_the_others():
    finished = []

    def slow() -> str:
        time.sleep(0.2)
        finished.append("slow")
        return "slow"

    def failing() -> str:
        raise DeltaMoEError("tensor 'x' contains NaN or Inf values")

    with pytest.raises(DeltaMoEError, match="tensor 'x'"):
        with blockwise.TensorJobs(2, lambda result: None) as jobs:
            jobs.submit(0, slow)
            jobs.submit(0, failing)
            jobs.finish_all()
    assert finished == ["slow"]  # leaving the block waited for the running job: no thread outlives its buffers


def test_planned_writer_buffer_without_waiting(tmp_path):
    specs = [(f"t{k}", torch.float32, [256]) for k in range(3)]  # 1 KiB each
    writer = PlannedShardWriter(tmp_path / "out", specs, max_pending_bytes=1500)
    try:
        first = writer.buffer("t0").fill_(1.0)
        assert writer.buffer("t1", wait=False) is None  # 2 KiB out would pass the 1.5 KiB bound
        writer.add("t0", first)
        second = None
        for _ in range(200):  # the writer thread gives t0's memory back once it is written
            if (second := writer.buffer("t1", wait=False)) is not None:
                break
            time.sleep(0.01)
        assert second is not None
        writer.add("t1", second.fill_(2.0))
        writer.add("t2", writer.buffer("t2").fill_(3.0))
        writer.finish()
    finally:
        writer.close()
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert [float(got[f"t{k}"][0]) for k in range(3)] == [1.0, 2.0, 3.0]


def test_tensor_jobs_buffer_finishes_the_jobs_holding_the_writers_memory(tmp_path):
    # A job is filling t0's buffer; t1's would pass the writer's bound until t0 is added and written. Waiting on the
    # writer alone would wait forever (t0 is added by this thread, in `done`); `jobs.buffer` hands t0 over first.
    specs = [(f"t{k}", torch.float32, [256]) for k in range(2)]  # 1 KiB each
    writer = PlannedShardWriter(tmp_path / "out", specs, max_pending_bytes=1500)
    buffers, order, result = {}, [], {}

    def fill(name: str) -> str:
        time.sleep(0.05)
        buffers[name].fill_(float(name[1]) + 1)
        return name

    def done(name: str) -> None:
        order.append(name)
        writer.add(name, buffers[name])

    def main() -> None:
        with blockwise.TensorJobs(2, done) as jobs:
            buffers["t0"] = jobs.buffer(writer, "t0")
            jobs.submit(0, fill, "t0")
            buffers["t1"] = jobs.buffer(writer, "t1")
            order.append("got t1")
            jobs.submit(0, fill, "t1")
            jobs.finish_all()
        writer.finish()
        result["ok"] = True

    try:
        thread = threading.Thread(target=main, daemon=True)
        thread.start()
        thread.join(timeout=20)
        assert result.get("ok"), "jobs.buffer waited for memory its own finished job held"
    finally:
        writer.close()
    assert order == ["t0", "got t1", "t1"]
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert [float(got[f"t{k}"][0]) for k in range(2)] == [1.0, 2.0]
