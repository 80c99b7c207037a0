"""Print a recipe's trainer flags, shell-quoted on one line, for `torchrun ... -m deltamoe train $(...)`.

Example:
    python -m deltamoe.recipes.launch.args llama3_1_8b_stage1_cpt_8gpu_h100_bf16 --data-root /data --workdir /ckpt
    torchrun --nproc-per-node 8 -m deltamoe train \\
        $(python -m deltamoe.recipes.launch.args qwen3_8b_stage2_review_8gpu_h100_bf16)
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from deltamoe.common.errors import DeltaMoEError
from deltamoe.recipes.config import Recipe, to_megatron_args


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="registered recipe name (see deltamoe.recipes.production.RECIPES)")
    parser.add_argument("--data-root", help="folder the recipe's data prefixes are relative to (default: the recipe's)")
    parser.add_argument("--workdir", help="checkpoint root (default: the recipe's)")
    parser.add_argument("--hf-model", help="local folder of the base model / tokenizer instead of the hub id")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The named recipe with the paths a cluster overrides; everything else stays as the recipe says."""
    from deltamoe.recipes.production import get_recipe

    recipe = get_recipe(args.recipe)
    changes = {k: v for k, v in (("data_root", args.data_root), ("workdir", args.workdir)) if v}
    if args.hf_model:
        changes["model"] = dataclasses.replace(recipe.model, hf_model=args.hf_model)
    return dataclasses.replace(recipe, **changes) if changes else recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltamoe.recipes.launch.args", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    try:
        print(shlex.join(to_megatron_args(recipe_from_args(args))))
    except DeltaMoEError as e:
        print(f"deltamoe.recipes.launch.args: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
