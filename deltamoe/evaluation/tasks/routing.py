"""Routing analysis for MoE models: the share of tokens each expert receives, per layer, per language.

Data: the perplexity schema (column `text`). Each document is encoded without special tokens, truncated to the
suite's max_length, prefixed with the prefix token (BOS or EOS) which is *not* counted, and run through the model
while forward hooks on the router modules record the top-k experts chosen for every token (the model's own
choice, `*TopKRouter` in transformers 5 Mixtral / Qwen2-MoE / Qwen3-MoE; Qwen2-MoE's shared expert is not routed
and not counted). share[layer][expert] = choices of that expert / (tokens x top_k), so each layer's shares sum to 1.

With DeltaMoE, expert 0 is the original FFN: `expert_0_share` on original vs new languages shows whether the
router learnt to send new-language tokens to the new experts (the language-prior objective of stage 2).
A dense model (no router modules) gets a result with no metrics and `details.not_applicable`, so one suite
serves dense baselines and MoE models alike. Metrics: `expert_<e>_share` averaged over layers; `details.shares` holds the full layer x expert table.
"""

from __future__ import annotations

import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.evaluation.tasks.common import load_examples, task_result

REQUIRED = {"text": str}


def count_choices(indices: torch.Tensor, keep: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-expert counts of top-k choices (`indices`: [tokens, k]) over the tokens where `keep` ([tokens]) is true."""
    return torch.bincount(indices[keep].reshape(-1), minlength=num_experts)


@torch.no_grad()
def evaluate(spec, backend, suite) -> dict:
    examples, _ = load_examples(spec, REQUIRED)
    if not backend.router_modules():
        # A suite is shared by dense baselines and MoE models; for a dense model the task does not apply.
        return task_result(spec, suite, metrics={}, num_examples=0, samples=[],
                           details={"not_applicable": f"{type(backend.model).__name__} has no MoE routers"})
    seqs = []
    for ex in examples:
        ids = backend.tokenizer.encode(ex["text"], add_special_tokens=False)[:backend.max_length - 1]
        if not ids:
            raise DeltaMoEError(f"{spec.data}:{ex['_line']}: column 'text' encodes to no tokens")
        seqs.append([backend.prefix_token_id] + ids)
    num_experts = backend.num_experts
    counts = None
    num_tokens = 0
    with backend.record_router_choices() as records:
        for start in range(0, len(seqs), backend.batch_size):
            batch = seqs[start:start + backend.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), backend.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, s in enumerate(batch):
                ids[row, :len(s)] = torch.tensor(s)
                mask[row, :len(s)] = 1
            keep = mask.bool().clone()
            keep[:, 0] = False  # the prefix token is not part of the language's text
            for layer in records:
                layer.clear()
            backend.model(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device))
            flat_keep = keep.reshape(-1)
            layer_counts = torch.stack([count_choices(torch.cat(layer), flat_keep, num_experts) for layer in records])
            counts = layer_counts if counts is None else counts + layer_counts
            num_tokens += int(flat_keep.sum())
    shares = (counts.double() / counts.sum(dim=1, keepdim=True)).tolist()
    metrics = {f"expert_{e}_share": sum(row[e] for row in shares) / len(shares) for e in range(num_experts)}
    details = {"shares": shares, "num_tokens": num_tokens, "num_layers": len(shares), "num_experts": num_experts}
    return task_result(spec, suite, metrics=metrics, num_examples=len(examples), samples=[], details=details)
