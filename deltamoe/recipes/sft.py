"""A short supervised fine-tune that makes a post-trained model I from a base B, so the demo has a delta I − B.

No base/instruct pair ships offline, so the demo makes its own post-training delta (one legitimate kind of
post-training delta among those the paper grafts): chat-formatted prompt/response pairs, loss on response tokens only,
AdamW, a fixed number of steps, deterministic. Output is a HF folder written atomically.

    python -m deltamoe.recipes.sft --base B --data faq-sft.en.train.jsonl --out I --steps 40
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.outputs import atomic_output_dir


def read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row or "response" not in row:
            raise DeltaMoEError(f"{path}:{n}: expected fields 'prompt' and 'response'")
        pairs.append((row["prompt"], row["response"]))
    if not pairs:
        raise DeltaMoEError(f"{path}: no prompt/response pairs")
    return pairs


def encode(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt) in the tokenizer's chat format."""
    messages = [{"role": "user", "content": prompt}]
    prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids
    ids = tokenizer(full, add_special_tokens=False).input_ids[:max_length]
    labels = [-100] * min(len(prefix_ids), len(ids)) + ids[len(prefix_ids):]
    return ids, labels


def fine_tune(base: Path, data: Path, out: Path, *, steps: int, batch_size: int = 4, lr: float = 5e-5,
              max_length: int = 256, seed: int = 0, overwrite: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.chat_template is None:
        raise DeltaMoEError(f"{base}: the tokenizer has no chat template")
    pairs = read_pairs(data)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = []
    started = time.time()
    with atomic_output_dir(out, inputs=[base, data], overwrite=overwrite) as tmp:
        for step in range(steps):
            batch = [encode(tokenizer, *rng.choice(pairs), max_length) for _ in range(batch_size)]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            print(f"sft step {step + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        summary = {"base": str(base), "data": str(data), "steps": steps, "batch_size": batch_size, "lr": lr,
                   "seed": seed, "losses": losses, "seconds": round(time.time() - started, 1)}
        (tmp / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="JSONL with 'prompt' and 'response' fields")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        fine_tune(args.base, args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  max_length=args.max_length, seed=args.seed, overwrite=args.overwrite)
    except DeltaMoEError as e:
        print(f"sft: error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
