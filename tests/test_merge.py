"""deltamoe merge: each method's arithmetic on hand-computed tensors, and the streaming driver on tiny HF models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltamoe.cli import main as cli_main
from deltamoe.common.errors import DeltaMoEError
from deltamoe.converters.merge import combine, dare_drop, merge_models, tensor_generator, trim_by_magnitude
from deltamoe.converters.safetensors_io import SafetensorsReader
from tests.test_graft import perturbed_copy
from tests.tiny_models import make_tiny_hf

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
TAU1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
TAU2 = torch.tensor([-1.5, -1.0, 0.5, 2.0])
M1, M2 = BASE + TAU1, BASE + TAU2


def t(*values):
    return torch.tensor(values)


def test_task_arithmetic_by_hand():
    assert torch.equal(combine("task_arithmetic", "x", BASE, [M1, M2], [1.0, 0.5]), t(1.25, -1.5, 4.25, 2.5))


def test_param_delta_by_hand():
    cpt = t(5.0, 5.0, 5.0, 5.0)
    assert torch.equal(combine("param_delta", "x", BASE, [cpt, M2], [1.0, 0.5]), t(4.25, 4.5, 5.25, 6.0))


def test_ties_trim_elect_disjoint_mean_by_hand():
    assert torch.equal(trim_by_magnitude(TAU1, 0.75), t(1.0, -2.0, 3.0, 0.0))
    assert torch.equal(trim_by_magnitude(TAU2, 0.75), t(-1.5, -1.0, 0.0, 2.0))
    # signs of the trimmed sum: (-, -, +, +); entry 0: model 1's +1 disagrees and is left out.
    assert torch.equal(combine("ties", "x", BASE, [M1, M2], [1.0, 1.0], density=0.75), BASE + t(-1.5, -1.5, 3.0, 2.0))
    # weighted as mergekit: agreeing w_k * tau_k summed, divided by the agreeing weights
    got = combine("ties", "x", BASE, [M1, M2], [1.0, 2.0], density=0.75)
    torch.testing.assert_close(got, BASE + t(-1.5, -4.0 / 3.0, 3.0, 2.0))


def test_dare_drop_rescales_and_is_seeded_per_tensor():
    ones = torch.ones(20000)
    dropped = dare_drop(ones, 0.25, tensor_generator(0, "a", 0))
    assert set(dropped.unique().tolist()) == {0.0, 4.0}
    assert abs(dropped.mean().item() - 1.0) < 0.05  # rescale 1 / density keeps the expectation
    assert torch.equal(dropped, dare_drop(ones, 0.25, tensor_generator(0, "a", 0)))
    assert not torch.equal(dropped, dare_drop(ones, 0.25, tensor_generator(0, "b", 0)))
    assert not torch.equal(dropped, dare_drop(ones, 0.25, tensor_generator(1, "a", 0)))
    assert torch.equal(dare_drop(TAU1, 1.0, tensor_generator(0, "a", 0)), TAU1)


def test_dare_methods_by_hand():
    # density 1 keeps everything: dare_linear is task arithmetic, dare_ties is sign election + disjoint mean.
    assert torch.equal(combine("dare_linear", "x", BASE, [M1, M2], [1.0, 0.5], density=1.0), t(1.25, -1.5, 4.25, 2.5))
    assert torch.equal(combine("dare_ties", "x", BASE, [M1, M2], [1.0, 1.0], density=1.0), BASE + t(-1.5, -1.5, 1.75, 1.25))
    big_base, big = torch.zeros(1000), torch.ones(1000)
    got = combine("dare_linear", "w", big_base, [big], [1.0], density=0.5, seed=3)
    assert torch.equal(got, dare_drop(big, 0.5, tensor_generator(3, "w", 0)))


def test_merge_cli_streams_task_arithmetic(tmp_path):
    base = make_tiny_hf("qwen2", tmp_path / "B", seed=1)
    a = perturbed_copy(base, tmp_path / "A", seed=2)
    c = perturbed_copy(base, tmp_path / "C", seed=3)
    out = tmp_path / "O"
    assert cli_main(["merge", "--method", "task_arithmetic", "--base", str(base), "--models", str(a), str(c),
                     "--weights", "0.3", "0.6", "--out", str(out)]) == 0
    b, ta, tc = (load_file(p / "model.safetensors") for p in (base, a, c))
    got = SafetensorsReader(out)
    assert sorted(got.keys()) == sorted(b)
    for name in b:
        want = b[name] + 0.3 * (ta[name] - b[name]) + 0.6 * (tc[name] - b[name])
        torch.testing.assert_close(got.get(name), want)
    manifest = json.loads((out / "deltamoe_merge.json").read_text())
    assert manifest["method"] == "task_arithmetic" and manifest["weights"] == [0.3, 0.6]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "post-trained template"


def test_merge_dare_is_deterministic(tmp_path):
    base = make_tiny_hf("llama", tmp_path / "B", seed=1)
    a = perturbed_copy(base, tmp_path / "A", seed=2)
    runs = {}
    for name, seed in (("r1", 5), ("r2", 5), ("r3", 6)):
        merge_models(method="dare_ties", base=base, models=[a], density=0.3, seed=seed, out=tmp_path / name)
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(runs["r1"][key], runs["r2"][key]) and not torch.equal(runs["r1"][key], runs["r3"][key])


def test_merge_vocabulary_extension_and_param_delta(tmp_path):
    base = make_tiny_hf("llama", tmp_path / "B", seed=1)
    cpt = perturbed_copy(base, tmp_path / "CPT", seed=2)
    post = perturbed_copy(base, tmp_path / "I", seed=3, extra_rows=4)
    out = tmp_path / "O"
    manifest = merge_models(method="param_delta", base=base, models=[cpt, post], weights=[1.0, 1.0], out=out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 132
    assert manifest["vocab_rows"]["lm_head.weight"] == {"from": str(post), "rows": [128, 132]}
    got, i, c, b = (SafetensorsReader(p) for p in (out, post, cpt, base))
    emb = "model.embed_tokens.weight"
    assert torch.equal(got.get(emb)[128:], i.get(emb)[128:])
    torch.testing.assert_close(got.get(emb)[:128], c.get(emb) + i.get(emb)[:128] - b.get(emb))


def test_merge_refuses_bad_input(tmp_path):
    base = make_tiny_hf("llama", tmp_path / "B", seed=1)
    a = perturbed_copy(base, tmp_path / "A", seed=2, extra_rows=2)
    c = perturbed_copy(base, tmp_path / "C", seed=3, extra_rows=2)
    with pytest.raises(DeltaMoEError, match="2 weights for 1 --models"):
        merge_models(method="ties", base=base, models=[a], weights=[1, 1], out=tmp_path / "O")
    with pytest.raises(DeltaMoEError, match="several models add vocabulary rows"):
        merge_models(method="task_arithmetic", base=base, models=[a, c], out=tmp_path / "O")
    with pytest.raises(DeltaMoEError, match="weight of CPT must be 1"):
        merge_models(method="param_delta", base=base, models=[a, c], weights=[0.5, 1], out=tmp_path / "O")
    tensors = load_file(c / "model.safetensors")
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, c / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DeltaMoEError, match=f"{c}: tensor 'model.norm.weight' contains NaN or Inf"):
        merge_models(method="task_arithmetic", base=base, models=[c], out=tmp_path / "O")
    other = make_tiny_hf("qwen3", tmp_path / "Q")
    with pytest.raises(DeltaMoEError, match="model_type is 'qwen3'"):
        merge_models(method="task_arithmetic", base=base, models=[other], out=tmp_path / "O")
    assert not (tmp_path / "O").exists() and not list(tmp_path.glob(".O*"))
