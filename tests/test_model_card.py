"""Model cards (deltamoe/converters/model_card.py): `graft` and `merge` write a README.md that huggingface_hub's
ModelCard parses, naming the base model and saying how the model was made; transformers loads the folder as before.
`export` (whose card lists the training stages) is checked on a trained checkpoint in tests/test_training.py."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from deltamoe.converters.graft import graft
from deltamoe.converters.merge import merge_models
from deltamoe.converters.model_card import EVAL_BEGIN, add_evaluation, front_matter, hub_id
from tests.test_graft import make_triple, perturbed_copy
from tests.tiny_models import make_tiny_hf

BASE_CARD = "---\nlicense: apache-2.0\nlanguage:\n- en\nlibrary_name: transformers\n---\n# the base model\n"


def test_hub_ids_are_found_offline_or_not_invented(tmp_path):
    assert hub_id("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"
    cached = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    assert hub_id(cached) == "meta-llama/Llama-3.1-8B"
    local = make_tiny_hf("llama", tmp_path / "local")
    assert hub_id(local) is None
    config = json.loads((local / "config.json").read_text())
    (local / "config.json").write_text(json.dumps({**config, "_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    assert hub_id(local) == "HuggingFaceTB/SmolLM2-135M"


def test_graft_card_parses_and_says_how_the_model_was_made(tmp_path):
    base, post, moe = make_triple(tmp_path, "llama")
    (base / "README.md").write_text(BASE_CARD)
    out = tmp_path / "O"
    graft(base=base, post=post, moe=moe, out=out, scale=0.5)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == ["B", "I"] and data["base_model_relation"] == "merge"
    assert data["license"] == "apache-2.0" and data["language"] == ["en"] and data["library_name"] == "transformers"
    assert {"deltamoe", "moe", "mixtral"} <= set(data["tags"])
    text = card.text
    assert "scale α = 0.5" in text and f"I = `{post}`" in text and "4 routed experts, top-2" in text
    assert "frozen experts (the original FFN, never trained): [0]" in text
    assert "No DeltaMoE training record" in text  # this MoE was upcycled in HF space, never trained
    assert "local folder names (`B`, `I`)" in text  # no Hub id for tmp folders: said, not invented
    # transformers loads the folder as it did without a card; the card changed no other file.
    config = json.loads((out / "config.json").read_text())
    assert "license" not in config and "base_model" not in config
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_merge_card_names_every_input_and_the_method(tmp_path):
    base = make_tiny_hf("qwen2", tmp_path / "B", seed=1)
    cpt = perturbed_copy(base, tmp_path / "CPT", seed=2)
    post = perturbed_copy(base, tmp_path / "I", seed=3)
    out = tmp_path / "O"
    merge_models(method="param_delta", base=base, models=[cpt, post], weights=[1.0, 0.8], out=out)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == ["B", "CPT", "I"] and data["base_model_relation"] == "merge"
    assert "license" not in data and "merge" in data["tags"] and "param_delta" in data["tags"]
    assert "`I` (`" in card.text and "weight 0.8" in card.text
    assert f"{base}/README.md has no `license` field" in card.text  # omitted, with the reason


def test_evaluation_table_is_added_and_replaced(tmp_path):
    base = make_tiny_hf("qwen2", tmp_path / "B", seed=1)
    post = perturbed_copy(base, tmp_path / "I", seed=3)
    out = tmp_path / "O"
    merge_models(method="task_arithmetic", base=base, models=[post], out=out)
    results = tmp_path / "results.json"

    def write(bpb: float) -> None:
        results.write_text(json.dumps({"seed": 1, "backend": {"name": "transformers", "device": "cpu", "dtype": "float32"},
                                       "suite": {"content": {"name": "demo"}},
                                       "results": [{"task": "perplexity", "language": "es", "num_examples": 4,
                                                    "metrics": {"bits_per_byte": bpb, "note": "text"}}]}))

    write(1.2345)
    add_evaluation(out, results)
    write(0.5)
    add_evaluation(out, results)
    text = (out / "README.md").read_text()
    assert text.count(EVAL_BEGIN) == 1 and "| perplexity | es | 4 | bits_per_byte 0.5 |" in text
    assert "1.234" not in text and text.index("## Evaluation") < text.index("## License")
    assert front_matter(out)["base_model_relation"] == "merge"  # the front matter survived
    ModelCard.load(out / "README.md")


@pytest.mark.parametrize("bad", ["no front matter\n", "---\nlicense: [unclosed\n---\n"])
def test_a_base_card_without_usable_front_matter_gives_no_license(tmp_path, bad):
    base, post, moe = make_triple(tmp_path, "llama")
    (base / "README.md").write_text(bad)
    graft(base=base, post=post, moe=moe, out=tmp_path / "O")
    data = ModelCard.load(tmp_path / "O" / "README.md").data.to_dict()
    assert "license" not in data and data["base_model"] == ["B", "I"]
