"""Recipes: every registered recipe validates (ours and megatron-core's own checks), bad layouts fail clearly,
the Slurm scripts' recipes pass the dry run, and the Dockerfile's pins agree with pyproject.toml."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from deltamoe.common.errors import DeltaMoEError
from deltamoe.recipes import demo
from deltamoe.recipes.config import ParallelRecipe, estimate_memory, to_megatron_args
from deltamoe.recipes.launch import args as launch_args
from deltamoe.recipes.launch import local
from deltamoe.recipes.layout import GB
from deltamoe.recipes.production import RECIPES, get_recipe

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = sorted((REPO / "deltamoe/recipes/slurm").glob("stage*.sbatch"))  # training; step_1node: test_pipeline_slurm


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ---------------------------------------------------------------------------------------------------- registry
def test_registry_covers_models_stages_clusters_precisions():
    production_names = [n for n in RECIPES if not n.startswith("smollm2")]
    assert len(production_names) == 3 * 2 * 2 * 2
    for model in ("llama3_1_8b", "qwen2_5_7b", "qwen3_8b"):
        for stage in ("stage1_cpt", "stage2_review"):
            for gpus in ("8gpu", "16gpu"):
                for precision in ("bf16", "fp8"):
                    assert f"{model}_{stage}_{gpus}_h100_{precision}" in RECIPES
    with pytest.raises(DeltaMoEError, match="unknown recipe 'qwen3_8b_stage3'"):
        get_recipe("qwen3_8b_stage3")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_validates_with_megatron_core(name):
    recipe = get_recipe(name)
    namespace = local.megatron_validate(recipe)  # megatron's parser + validate_args
    assert namespace.data_parallel_size == recipe.parallel.data_parallel_size
    if recipe.train.stage == 0:  # the dense-CPT baseline trains the dense model
        assert namespace.num_experts is None
    else:
        assert namespace.num_experts == 6 and namespace.moe_router_topk == 2
    assert namespace.train_iters == recipe.train.iterations
    if recipe.parallel.gpu_memory_gib:
        assert estimate_memory(recipe).total < recipe.parallel.gpu_memory_gib * GB, estimate_memory(recipe).format()


def test_paper_settings_and_deltamoe_flags():
    stage1 = to_megatron_args(get_recipe("qwen2_5_7b_stage1_cpt_8gpu_h100_bf16"))
    stage2 = to_megatron_args(get_recipe("qwen2_5_7b_stage2_review_8gpu_h100_bf16"))
    fp8 = to_megatron_args(get_recipe("qwen2_5_7b_stage2_review_8gpu_h100_fp8"))
    assert flag(stage1, "--deltamoe-stage") == "1" and "--lpr-loss-coeff" not in stage1
    assert flag(stage2, "--deltamoe-stage") == "2" and flag(stage2, "--lpr-loss-coeff") == "0.1"
    assert flag(stage2, "--original-languages") == "en,zh,es"
    assert "--add-qkv-bias" in stage1 and "--qk-layernorm" not in stage1 and "--sequence-parallel" in stage1
    assert flag(fp8, "--fp8-format") == "hybrid" and flag(fp8, "--transformer-impl") == "transformer_engine"
    assert "--bf16" in stage1 and "--fp8-format" not in stage1
    # Stage 2 resumes from stage 1's checkpoint; data blend carries the replay with its weights.
    assert flag(stage2, "--pretrained-checkpoint").endswith("/qwen2_5_7b_stage1_cpt_8gpu_h100_bf16")
    data = stage2[stage2.index("--data-path") + 1 : stage2.index("--split")]
    assert data[:2] == ["1.0", "/data/deltamoe/el/review_text_document"] and "/data/deltamoe/zh/replay_text_document" in data
    assert "--qk-layernorm" in to_megatron_args(get_recipe("qwen3_8b_stage1_cpt_8gpu_h100_bf16"))
    assert "--use-rope-scaling" in to_megatron_args(get_recipe("llama3_1_8b_stage1_cpt_8gpu_h100_bf16"))


def test_demo_recipe_runs_on_one_cpu_process_and_scales():
    recipe = demo.smollm2_135m_demo_stage1_cpu(cache="/cache")
    args = to_megatron_args(recipe)
    assert recipe.parallel.world_size == 1 and flag(args, "--distributed-backend") == "gloo"
    assert "--untie-embeddings-and-output-weights" not in args and "--bf16" not in args
    assert flag(args, "--tokenizer-model") == "/cache/models/smollm2-135m-instruct"
    # Spanish from two genres (Bible, fortunes), half the Spanish tokens each; Russian from fortunes.
    assert flag(args, "--data-path", ) == "0.5" and "/cache/demo-data/indexed/es-rv1909.train" in args
    assert {(d.prefix, d.weight, d.lang) for d in recipe.train.data_blend} == {
        ("indexed/es-rv1909.train", 0.5, "es"), ("indexed/es-fortunes.train", 0.5, "es"), ("indexed/ru-fortunes.train", 1.0, "ru")}
    # The out-of-domain genre (the aptitude manual) is in no training blend.
    for make in (demo.smollm2_135m_demo_stage2_cpu, demo.smollm2_135m_demo_dense_cpt_cpu):
        assert not any("manual" in d.prefix for d in make(cache="/cache").train.data_blend)
    assert demo.smollm2_135m_demo_stage1_cpu(scale=3, cache="/cache").train.iterations == 3 * recipe.train.iterations
    for scale in (1, 4, 16):  # at most two ~7 GB checkpoints per stage, whatever the scale
        for make in (demo.smollm2_135m_demo_stage1_cpu, demo.smollm2_135m_demo_stage2_cpu, demo.smollm2_135m_demo_dense_cpt_cpu):
            t = make(scale=scale, cache="/cache").train
            assert -(-t.iterations // t.save_interval) <= 2 and t.save_interval >= 5, (make.__name__, scale)
    assert "en" in {d.lang for d in demo.smollm2_135m_demo_stage2_cpu(cache="/cache").train.data_blend}
    with pytest.raises(DeltaMoEError, match="scale must be positive, got 0"):
        demo.smollm2_135m_demo_stage1_cpu(scale=0)


def test_memory_estimate_counts_the_upcycled_parameters_exactly():
    # SmolLM2-135M has 134,515,008 parameters (its safetensors); upcycling adds 5 FFN copies and a router per layer.
    estimate = estimate_memory(demo.smollm2_135m_demo_stage1_cpu(cache="/cache"))
    ffn, router = 3 * 576 * 1536, 576 * 6
    assert estimate.params_per_gpu == 134_515_008 + 30 * (5 * ffn + router)
    assert estimate.trainable_per_gpu == 30 * (5 * ffn + router)  # stage 1: experts 1..5 and routers
    assert estimate_memory(demo.smollm2_135m_demo_stage2_cpu(cache="/cache")).trainable_per_gpu == 30 * router


# ---------------------------------------------------------------------------------------------------- bad layouts
def _with(recipe, **parallel):
    return dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, **parallel))


@pytest.mark.parametrize("name, change, message", [
    ("qwen2_5_7b_stage1_cpt_8gpu_h100_bf16", dict(tensor_model_parallel_size=8, expert_tensor_parallel_size=1,
                                                   pipeline_model_parallel_size=1),
     r"model\.num_attention_heads \(28\) must be divisible by parallel\.tensor_model_parallel_size \(8\)"),
    ("qwen2_5_7b_stage1_cpt_8gpu_h100_bf16", dict(gpus_per_node=7, tensor_model_parallel_size=7, pipeline_model_parallel_size=1,
                                                   expert_model_parallel_size=1, expert_tensor_parallel_size=1),
     r"model\.num_query_groups \(4\) must be a multiple or a divisor of parallel\.tensor_model_parallel_size \(7\)"),
    ("llama3_1_8b_stage1_cpt_8gpu_h100_bf16", dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                                    expert_model_parallel_size=4, expert_tensor_parallel_size=1),
     r"upcycle\.num_experts \(6\) must be divisible by parallel\.expert_model_parallel_size \(4\)"),
    ("qwen3_8b_stage1_cpt_8gpu_h100_bf16", dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=8,
                                                expert_model_parallel_size=1, expert_tensor_parallel_size=1),
     r"model\.num_layers \(36\) must be divisible by parallel\.pipeline_model_parallel_size \(8\)"),
    ("llama3_1_8b_stage2_review_8gpu_h100_bf16", dict(sequence_parallel=False),
     r"parallel\.sequence_parallel must be True for MoE training with parallel\.tensor_model_parallel_size \(2\)"),
])
def test_wrong_layout_names_the_field_and_numbers(name, change, message):
    with pytest.raises(DeltaMoEError, match=message):
        _with(get_recipe(name), **change)


def test_wrong_world_size_and_batch_name_the_numbers():
    with pytest.raises(DeltaMoEError, match=r"world size \(6 = parallel\.num_nodes 1 × parallel\.gpus_per_node 6\) must be "
                                            r"divisible by tp × pp × cp \(4\)"):
        ParallelRecipe(gpus_per_node=6, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    recipe = get_recipe("qwen3_8b_stage1_cpt_8gpu_h100_bf16")
    with pytest.raises(DeltaMoEError, match=r"train\.global_batch_size \(255\) must be divisible by train\.micro_batch_size "
                                            r"× data-parallel size \(1 × 2\) \(2\)"):
        dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, global_batch_size=255))


def test_stage_rules_are_checked():
    stage2 = get_recipe("qwen3_8b_stage2_review_8gpu_h100_bf16")
    new_only = [d for d in stage2.train.data_blend if d.lang not in stage2.train.original_languages]
    with pytest.raises(DeltaMoEError, match="no original-language replay"):
        dataclasses.replace(stage2.train, data_blend=new_only)
    with pytest.raises(DeltaMoEError, match="lpr_loss_coeff must be set for stage 2"):
        dataclasses.replace(stage2.train, lpr_loss_coeff=None)
    with pytest.raises(DeltaMoEError, match=r"lpr_loss_coeff \(0\.1\) has no effect in stage 1"):
        dataclasses.replace(stage2.train, stage=1)
    with pytest.raises(DeltaMoEError, match=r"set exactly one of train_iters \(10\) and train_tokens"):
        dataclasses.replace(stage2.train, train_iters=10)


# ---------------------------------------------------------------------------------------------------- launch
def test_args_cli_prints_flags_and_rejects_unknown_recipes(capsys):
    assert launch_args.main(["qwen3_8b_stage1_cpt_8gpu_h100_bf16", "--data-root", "/d", "--workdir", "/w"]) == 0
    printed = capsys.readouterr().out.split()
    assert flag(printed, "--load") == "/w/qwen3_8b_stage1_cpt_8gpu_h100_bf16" and "/d/el/cpt_text_document" in printed
    assert launch_args.main(["no_such_recipe"]) == 1
    assert "unknown recipe 'no_such_recipe'" in capsys.readouterr().err


def test_fp8_launch_without_transformer_engine_is_refused_before_starting(capsys, monkeypatch):
    monkeypatch.setattr(local.subprocess, "call", lambda *a, **k: pytest.fail("must not launch"))
    assert local.main(["llama3_1_8b_stage1_cpt_8gpu_h100_fp8"]) == 1
    assert "fp8 needs Transformer Engine" in capsys.readouterr().err
    assert local.main(["llama3_1_8b_stage1_cpt_16gpu_h100_bf16"]) == 1
    assert "needs 2 nodes: submit a Slurm script" in capsys.readouterr().err


def _script_recipe(script: Path) -> str:
    match = re.search(r"^RECIPE=\$\{RECIPE:-(\w+)\}$", script.read_text(), re.MULTILINE)
    assert match, f"{script.name}: no RECIPE=${{RECIPE:-name}} line"
    return match.group(1)


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_slurm_script_recipe_passes_the_dry_run(script):
    text = script.read_text()
    recipe = get_recipe(_script_recipe(script))
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", text, re.MULTILINE))
    assert int(sbatch["nodes"]) == recipe.parallel.num_nodes and int(sbatch["gpus-per-node"]) == recipe.parallel.gpus_per_node
    assert text.count("srun ") == 1 and "--container-image" in text
    assert "-m deltamoe train" in text and "python -m deltamoe.recipes.launch.args" in text
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    report = local.dry_run(recipe)
    assert "megatron-core accepts the flags" in report and "torchrun" in report and "warning" not in report


def test_at_least_one_script_per_stage_and_cluster_shape():
    shapes = {(get_recipe(_script_recipe(s)).train.stage, get_recipe(_script_recipe(s)).parallel.num_nodes) for s in SLURM_SCRIPTS}
    assert shapes == {(1, 1), (1, 2), (2, 1), (2, 2)}


# ---------------------------------------------------------------------------------------------------- container
def _requirement_specs(requirements: list[str]) -> dict[str, str]:
    specs = {}
    for requirement in requirements:
        requirement = requirement.split(";")[0].strip()
        name = re.match(r"[A-Za-z0-9_.\-\[\]]+", requirement).group(0)
        specs[re.sub(r"\[.*\]", "", name).lower()] = requirement[len(name):].replace(" ", "")
    return specs


def test_dockerfile_pins_agree_with_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", dockerfile, re.MULTILINE).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), f"unpinned or unexpected base image {base}"
    assert pyproject["project"]["requires-python"] == ">=3.12"  # the 25.xx NGC images ship Python 3.12
    installed = _requirement_specs(re.findall(r'"([A-Za-z][^"\s]*[<>=!~][^"]*)"', dockerfile))
    wanted = _requirement_specs(pyproject["project"]["dependencies"] + pyproject["project"]["optional-dependencies"]["demo"]
                                + pyproject["project"]["optional-dependencies"]["test"])
    assert "torch" not in installed, "the image must keep its own torch (TE and apex are built against it)"
    wanted.pop("torch")
    assert installed == wanted
    assert installed["megatron-core"] == "==0.19.2"


# ---------------------------------------------------------------------------------------------------- upcycle combinations
def _upcycled(recipe, **upcycle):
    return dataclasses.replace(recipe, upcycle=dataclasses.replace(recipe.upcycle, **upcycle))


def test_combinations_upcycle_or_export_would_refuse_are_refused_by_the_recipe():
    """Exact or refused, before anything runs: what `deltamoe upcycle`, the trainer or `deltamoe export` would refuse."""
    qwen3_stage1 = get_recipe("qwen3_8b_stage1_cpt_8gpu_h100_bf16")
    with pytest.raises(DeltaMoEError, match=r"upcycle\.variant 'shared' of a qwen3 model: no Hugging Face MoE format "
                                            r"could hold the result \(Qwen3-MoE has no shared expert"):
        _upcycled(qwen3_stage1, variant="shared", granularity=2)
    llama_stage1 = get_recipe("llama3_1_8b_stage1_cpt_8gpu_h100_bf16")
    assert _upcycled(llama_stage1, variant="shared", granularity=2).upcycle.variant == "shared"  # -> Qwen2-MoE
    llama_stage2 = get_recipe("llama3_1_8b_stage2_review_8gpu_h100_bf16")
    with pytest.raises(DeltaMoEError, match=r"train\.lpr_loss_coeff \(0\.1\) with upcycle\.variant 'shared'"):
        _upcycled(llama_stage2, variant="shared", granularity=2)
    shared_review = dataclasses.replace(_upcycled(llama_stage1, variant="shared", granularity=2),
                                        train=dataclasses.replace(llama_stage2.train, lpr_loss_coeff=0.0))
    assert shared_review.train.lpr_loss_coeff == 0.0
    with pytest.raises(DeltaMoEError, match="gives routed experts to original language 'en'"):
        dataclasses.replace(shared_review, train=dataclasses.replace(
            shared_review.train, allocation_loss_coeff=0.1, expert_allocation_map={"en": [0, 1], "el": [2, 3]}))
    with pytest.raises(DeltaMoEError, match="upcycle.topk 1 is refused"):
        _upcycled(llama_stage1, topk=1)
    with pytest.raises(DeltaMoEError, match=r"upcycle\.granularity \(2\) applies to the shared variant"):
        _upcycled(llama_stage1, granularity=2)


def test_router_losses_use_the_papers_gamma():
    stage2 = to_megatron_args(get_recipe("qwen2_5_7b_stage2_review_8gpu_h100_bf16"))
    assert flag(stage2, "--router-loss-layer-reduction") == "mean" and flag(stage2, "--lpr-loss-coeff") == "0.1"
    assert flag(to_megatron_args(demo.smollm2_135m_demo_stage2_cpu(cache="/c")), "--router-loss-layer-reduction") == "mean"
    recipe = get_recipe("qwen2_5_7b_stage2_review_8gpu_h100_bf16")
    summed = dataclasses.replace(recipe.train, router_loss_layer_reduction="sum")
    assert flag(to_megatron_args(dataclasses.replace(recipe, train=summed)), "--router-loss-layer-reduction") == "sum"
    with pytest.raises(DeltaMoEError, match="router_loss_layer_reduction must be mean or sum"):
        dataclasses.replace(recipe.train, router_loss_layer_reduction="max")
