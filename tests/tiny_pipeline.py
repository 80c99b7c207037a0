"""`deltamoe pipeline` on the tiny models of tests/fault_fixtures.py: the demo recipe with its model, data and
suite swapped for the tiny ones (no assets, no SFT: I is given). Run as `python -m tests.tiny_pipeline --root R
--workdir W [--until STAGE]`; errors are printed as `deltamoe pipeline` prints them."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from deltamoe.common import faults
from deltamoe.common.errors import DeltaMoEError
from deltamoe.recipes.demo_pipeline import demo
from deltamoe.recipes.pipeline import PreparedData, run_pipeline


def tiny_recipe(root: Path, workdir: Path):
    recipe = demo(cache=root / "cache", workdir=workdir)
    return dataclasses.replace(recipe, name="tiny", base_model=str(root / "b"), post_model=str(root / "i"),
                               sft_data=None, data_root=str(root), fetch_assets=False, suite=str(root / "suite.yaml"),
                               prepare=[PreparedData(jsonl="text/es.jsonl", lang="es", prefix="pipeline-data/es")])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--until", default=None)
    args = parser.parse_args()
    faults.set_command("pipeline")
    try:
        run_pipeline(tiny_recipe(args.root, args.workdir), args.workdir, until=args.until)
    except DeltaMoEError as e:
        print(f"deltamoe pipeline: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
