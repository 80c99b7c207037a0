"""Router mass on each language's allocated experts, and held-out LM loss, of trained Megatron checkpoints on real text.

The probe of bench/allocation_compare.py (checkpoints loaded with `load_model`, run WITHOUT language tags, router
logits captured; mass = softmax over all E logits summed over the language's allowed experts, mean over tokens and
layers) applied to the demo's checkpoints and its held-out files, with the demo's allocation (E = 6, top-2; shared
expert 0, es 1-2, ru 3-4, en 5). Unlike the report's routing section (top-k choices of the exported HF model), this
reads router probabilities straight from the training checkpoints, so any stage's output can be compared.

    .venv/bin/python bench/allocation_probe.py runs/demo/smollm2_135m_demo_stage2_cpu \\
        runs/demo/smollm2_135m_demo_stage2_allocation_cpu         # ~1 min per checkpoint on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import allocation_compare  # noqa: E402

HELDOUT = {"en": "en-kjv.heldout.jsonl", "es": "es-rv1909.heldout.jsonl", "ru": "ru-fortunes.heldout.jsonl"}


def heldout_tokens(tokenizer, data_root: Path, *, docs: int, length: int) -> dict[str, torch.Tensor]:
    """The first `docs` held-out documents of each language with at least length+1 tokens, cut to length+1."""
    out = {}
    for lang, name in HELDOUT.items():
        seqs = []
        with open(data_root / name, encoding="utf-8") as f:
            for line in f:
                ids = tokenizer.encode(json.loads(line)["text"], add_special_tokens=False)
                if len(ids) > length:
                    seqs.append(ids[:length + 1])
                if len(seqs) == docs:
                    break
        if len(seqs) < docs:
            sys.exit(f"{data_root / name}: only {len(seqs)} documents of more than {length} tokens, {docs} needed")
        out[lang] = torch.tensor(seqs)
    return out


def main() -> None:
    from deltamoe.recipes.demo_assets import MODEL_NAME, default_cache

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="Megatron checkpoint folders (a trainer's --save)")
    parser.add_argument("--cache", type=Path, default=None, help="demo asset cache (default $DELTAMOE_CACHE or ~/.cache/deltamoe)")
    parser.add_argument("--docs", type=int, default=8, help="held-out documents per language")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per document")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    cache = args.cache or default_cache()
    tokenizer = AutoTokenizer.from_pretrained(cache / "models" / MODEL_NAME)
    held = heldout_tokens(tokenizer, cache / "demo-data", docs=args.docs, length=args.tokens)
    print("| checkpoint | lang | LM loss (no tags) | mass on allocated experts | mass on expert 0 |\n|---|---|---|---|---|")
    for folder in args.checkpoints:
        for lang, entry in allocation_compare.evaluate(folder, held).items():
            print(f"| {folder.name} | {lang} | {entry['lm_loss']:.3f} | {entry['allocated_mass']:.3f} | {entry['expert0_mass']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
