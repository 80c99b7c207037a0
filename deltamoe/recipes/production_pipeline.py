"""Production pipelines: a model's stage 1 and stage 2 recipes, plus the paths a cluster supplies, as one pipeline.

    deltamoe pipeline qwen2_5_7b_8gpu_h100_bf16 --workdir /checkpoints/qwen-el-hu-tr \\
        --base-model /models/Qwen2.5-7B --post-model /models/Qwen2.5-7B-Instruct \\
        --data-root /data/deltamoe --suite /data/deltamoe/suite.yaml --launcher slurm

A pipeline is named like its recipes without the stage (`qwen2_5_7b_stage1_cpt_8gpu_h100_bf16` and
`qwen2_5_7b_stage2_review_8gpu_h100_bf16` make `qwen2_5_7b_8gpu_h100_bf16`). It runs import -> upcycle -> stage 1 ->
stage 2 -> export -> graft -> eval (base, post, DeltaMoE) -> report. The data blends' prefixes are `deltamoe
prepare-data` outputs under --data-root (recipes/production.py names them); the base and post-trained models are local
Hugging Face folders (compute nodes are often offline); checkpoints, exports and results go under --workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError
from deltamoe.recipes.pipeline import MoEArm, PipelineRecipe, PreparedData


def _pipeline_names() -> dict[str, tuple[str, str]]:
    from deltamoe.recipes.production import RECIPES

    pairs = {}
    for name in RECIPES:
        if "_stage1_cpt_" in name:
            stage2 = name.replace("_stage1_cpt_", "_stage2_review_")
            if stage2 in RECIPES:
                pairs[name.replace("_stage1_cpt_", "_")] = (name, stage2)
    return pairs


PIPELINES: dict[str, tuple[str, str]] = _pipeline_names()
"""Pipeline name -> (stage 1 recipe, stage 2 recipe), e.g. qwen3_8b_16gpu_h100_fp8."""


def pipeline_from_recipes(name: str, stage1, stage2, *, base_model: str | Path, post_model: str | Path,
                          data_root: str | Path, suite: str | Path, workdir: str | Path,
                          prepare: list[PreparedData] = (), eval_args: list[str] = ()) -> PipelineRecipe:
    """The pipeline of one stage-1/stage-2 recipe pair with a cluster's paths: the recipes' checkpoints go under
    `workdir`, their data prefixes are read under `data_root`, their tokenizer is `base_model`'s."""
    if stage2.init_checkpoint != stage1.name:
        raise DeltaMoEError(f"pipeline {name}: stage 2 recipe {stage2.name} starts from {stage2.init_checkpoint!r}, "
                            f"not from stage 1 {stage1.name!r}")
    paths = {"base_model": base_model, "post_model": post_model, "data_root": data_root, "suite": suite, "workdir": workdir}
    missing = [f"--{k.replace('_', '-')}" for k, v in paths.items() if not v]
    if missing:
        raise DeltaMoEError(f"pipeline {name} needs {', '.join(missing)} (local folders and files; see "
                            f"`deltamoe pipeline --help`)")
    base_model, post_model, data_root, suite, workdir = (str(Path(v).resolve()) for v in paths.values())

    def placed(recipe):
        return dataclasses.replace(recipe, workdir=workdir, data_root=data_root,
                                   model=dataclasses.replace(recipe.model, hf_model=base_model))

    stage1, stage2 = placed(stage1), placed(stage2)
    return PipelineRecipe(name=name, base_model=base_model, post_model=post_model, data_root=data_root,
                          prepare=list(prepare), arms=[MoEArm(label="deltamoe", stage1=stage1, stage2=stage2)],
                          suite=suite, nproc_per_node=stage1.parallel.gpus_per_node, eval_args=list(eval_args))


def production_pipeline(name: str, *, base_model=None, post_model=None, data_root=None, suite=None,
                        workdir=None) -> PipelineRecipe:
    """A registered production pipeline (PIPELINES) with a cluster's paths; data_root defaults to the recipes'."""
    from deltamoe.recipes.production import get_recipe

    if name not in PIPELINES:
        raise DeltaMoEError(f"unknown production pipeline {name!r}; known: {', '.join(sorted(PIPELINES))}")
    stage1, stage2 = (get_recipe(n) for n in PIPELINES[name])
    return pipeline_from_recipes(name, stage1, stage2, base_model=base_model, post_model=post_model,
                                 data_root=data_root or stage1.data_root, suite=suite, workdir=workdir)


def missing_inputs(p: PipelineRecipe) -> list[str]:
    """What a pipeline reads but nothing in it makes: each problem names the path or field (empty: all there).

    Checked before anything is submitted, since on a cluster a missing data prefix would otherwise fail stage 1 hours
    after the import and upcycle jobs ran."""
    from deltamoe.architectures import read_architecture_config
    from deltamoe.common.hf_folder import read_config

    problems = []
    made = {str(Path(p.data_root) / d.prefix) for d in p.prepare}
    for label, folder in (("base model", p.base_model), ("post-trained model", p.post_model)):
        if folder is not None and not (Path(folder) / "config.json").exists():
            problems.append(f"{label} {folder}: no config.json (expected a local Hugging Face model folder)")
    if not Path(p.suite).exists() and not p.fetch_assets:
        problems.append(f"evaluation suite {p.suite}: no such file")
    if (Path(p.base_model) / "config.json").exists():
        try:
            _, arch = read_architecture_config(read_config(p.base_model), source=str(Path(p.base_model) / "config.json"))
        except DeltaMoEError as e:
            problems.append(str(e))
            arch = None
        if arch is not None:
            problems += _model_mismatches(p, arch)
    for arm in p.arms:
        for recipe in (arm.stage1, arm.stage2):
            for source in recipe.train.data_blend:
                prefix = str(Path(recipe.data_root) / source.prefix)
                if prefix not in made and not (Path(f"{prefix}.bin").exists() and Path(f"{prefix}.idx").exists()):
                    problems.append(f"recipe {recipe.name}: data prefix {prefix} ({source.lang}) has no .bin/.idx; make it "
                                    f"with `deltamoe prepare-data --input TEXT.jsonl --tokenizer {p.base_model} "
                                    f"--lang {source.lang} --out {prefix}`")
    return list(dict.fromkeys(problems))


def _model_mismatches(p: PipelineRecipe, arch) -> list[str]:
    recipe = p.arms[0].stage1
    m = recipe.model
    pairs = {"architecture": (m.architecture, arch.architecture), "num_layers": (m.num_layers, arch.num_layers),
             "hidden_size": (m.hidden_size, arch.hidden_size), "ffn_hidden_size": (m.ffn_hidden_size, arch.ffn_hidden_size),
             "num_attention_heads": (m.num_attention_heads, arch.num_attention_heads),
             "num_query_groups": (m.num_query_groups, arch.num_query_groups), "kv_channels": (m.kv_channels, arch.kv_channels),
             "vocab_size": (m.vocab_size, arch.vocab_size), "tie_word_embeddings": (m.tie_word_embeddings, arch.tie_word_embeddings)}
    return [f"base model {p.base_model}/config.json: {field} is {found}, recipe {recipe.name} says model.{field} = {expected}"
            for field, (expected, found) in pairs.items() if expected != found]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("production pipelines (a recipe pair, e.g. qwen2_5_7b_8gpu_h100_bf16)")
    group.add_argument("--base-model", help="local folder of the dense base model B (HF: config.json, safetensors, tokenizer)")
    group.add_argument("--post-model", help="local folder of the post-trained model I (e.g. the -Instruct release of B)")
    group.add_argument("--data-root", help="folder of the `deltamoe prepare-data` outputs the recipes name "
                                           "(default: the recipes' /data/deltamoe)")
    group.add_argument("--suite", help="evaluation suite file (deltamoe/evaluation/README.md)")
