"""Learned routing vs experts allocated to languages, on a tiny upcycled Llama, through Megatron-LM's trainer (CPU).

Two arms, each two stages of `python -m deltamoe.megatron_ext.training.train` (the real entry, gloo, one process):
- learned:     stage 1 `--expert-allocation learned` on es+ru, then stage 2 (routers only) with MoE-LPR's
               language-prior loss on en+es+ru (the default DeltaMoE pipeline).
- by-language: stage 1 `--expert-allocation by-language` (router logits outside the token's language allocation are
               -inf before top-k), then stage 2 (routers only, NO mask) with the allocation loss
               L_alloc = -mean_t log sum_{e in A(lang(t))} G_e(t), so that untagged inference routes by language.

The allocation (E = 6, top-2): expert 0 (the frozen original FFN) is shared by every language, es owns experts 1-2,
ru owns 3-4, en owns 5. Why: every language keeps the base model's FFN (MoE-LPR's reason for freezing it); each new
language gets two experts of its own so its top-2 still has a choice (3 allowed >= K); en needs a second expert for
top-2, and expert 5 never sees a stage-1 token (the stage-1 blend has no en), so it stays the original FFN's copy.

Evaluation, on held-out documents of each language drawn from the same synthetic bigram chains as the training data
(disjoint token ranges per language, so a router can tell languages apart): every checkpoint is loaded with
`load_model` and run WITHOUT language tags (no mask, as after export), capturing each router's logits. Reported per
language: held-out LM loss (no tags), LM loss with the by-language mask (what stage 1 trained under; only for that
arm), and the router probability mass on the language's allocated experts (softmax over all E logits, averaged over
tokens and layers). For the learned arm the same mass is what its routers put on those experts unprompted.

    OMP_NUM_THREADS=1 .venv/bin/python bench/allocation_compare.py            # ~2 min on 2 CPU cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/allocation_compare.py --json out.json --workdir /tmp/alloc
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LANGUAGES = ["en", "es", "ru"]
TOKEN_RANGES = {"en": (3, 45), "es": (45, 86), "ru": (86, 128)}
DATA_SEEDS = {"en": 1, "es": 2, "ru": 3}
ALLOCATION = {"experts": {"en": [5], "es": [1, 2], "ru": [3, 4]}, "shared_experts": [0]}
NUM_EXPERTS, TOPK = 6, 2


def allocation():
    from deltamoe.megatron_ext.moe.allocation import ExpertAllocation

    return ExpertAllocation(languages=LANGUAGES, experts=ALLOCATION["experts"], shared_experts=ALLOCATION["shared_experts"],
                            num_experts=NUM_EXPERTS, topk=TOPK)


def allocation_flags(mode: str, *, loss_coeff: float = 0.0) -> list[str]:
    """The trainer flags of one allocation setting (languages in ALLOCATION's lang_id order)."""
    return ["--languages", ",".join(LANGUAGES), "--expert-allocation", mode,
            "--expert-allocation-map", json.dumps(ALLOCATION), "--allocation-loss-coeff", str(loss_coeff)]


def build_workspace(root: Path) -> dict:
    """Tiny Llama (2 layers) -> Megatron -> copy upcycle (6 experts, top-2) + tagged en/es/ru datasets."""
    from deltamoe.converters.hf_to_megatron import import_hf
    from deltamoe.megatron_ext.moe.upcycle_cli import upcycle
    from tests.test_training import write_dataset
    from tests.tiny_models import make_tiny_hf

    root.mkdir(parents=True, exist_ok=True)
    hf = make_tiny_hf("llama", root / "hf", num_hidden_layers=2)
    dense = import_hf(hf, root / "dense")
    moe = upcycle(dense, root / "moe", num_experts=NUM_EXPERTS, topk=TOPK)
    (root / "data").mkdir(exist_ok=True)
    data = {lang: write_dataset(root / "data" / lang, lang, seed=DATA_SEEDS[lang], lo=lo, hi=hi)
            for lang, (lo, hi) in TOKEN_RANGES.items()}
    return {"root": root, "dense": dense, "moe": moe, "data": data}


def heldout_tokens(language: str, *, num: int = 16, length: int = 33, seed: int = 999) -> torch.Tensor:
    """[num, length] documents from the SAME bigram chain as `write_dataset(seed=DATA_SEEDS[language])` (its first
    draw is the successor table), sampled with a different generator: unseen text of that language."""
    lo, hi = TOKEN_RANGES[language]
    width = hi - lo
    successors = np.random.default_rng(DATA_SEEDS[language]).integers(0, width, size=(width, 2))
    rng = np.random.default_rng(seed + DATA_SEEDS[language])
    out = np.empty((num, length), dtype=np.int64)
    for row in range(num):
        t = int(rng.integers(0, width))
        for col in range(length):
            out[row, col] = lo + t
            t = int(successors[t, rng.integers(0, 2)])
    return torch.from_numpy(out)


@contextlib.contextmanager
def captured_router_logits(model, *, mask_lang_id: int | None = None, allocation_mask: torch.Tensor | None = None):
    """Record every router's logits (before top-k) per forward; with mask_lang_id, apply the by-language mask first."""
    from deltamoe.megatron_ext.moe.allocation import mask_router_logits
    from deltamoe.megatron_ext.moe.router_probe import routers

    records: list[torch.Tensor] = []
    wrapped = routers(model)
    originals = [r.routing for r in wrapped]
    for router, original in zip(wrapped, originals):
        def routing(self, logits, *args, _original=original, **kwargs):
            records.append(logits.detach().reshape(-1, logits.shape[-1]).float())
            if mask_lang_id is not None:
                lang = torch.full(logits.shape[:-1], mask_lang_id, dtype=torch.long)
                logits = mask_router_logits(logits, lang, allocation_mask)
            return _original(logits, *args, **kwargs)

        router.routing = types.MethodType(routing, router)
    try:
        yield records
    finally:
        for router, original in zip(wrapped, originals):
            router.routing = original


@torch.no_grad()
def evaluate(folder: Path, heldout: dict[str, torch.Tensor], *, tagged: bool = False) -> dict[str, dict]:
    """Per language: held-out LM loss and router mass on its allocated experts / on expert 0 (no tags), from `folder`.

    tagged=True also reports the LM loss under the by-language mask (`lm_loss_tagged`)."""
    from deltamoe.megatron_ext.runtime.checkpoint import load_model
    from deltamoe.megatron_ext.runtime.distributed import (
        ParallelLayout,
        init_distributed,
    )

    init_distributed(ParallelLayout())
    model, _ = load_model(folder)
    model.eval()
    alloc = allocation()
    mask = alloc.mask()
    results = {}
    for lang_id, lang in enumerate(LANGUAGES):
        seqs = heldout[lang]
        tokens, labels = seqs[:, :-1], seqs[:, 1:]
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with captured_router_logits(model) as logits:
            loss = model(tokens, positions, None, labels=labels).float().mean()
        probs = [torch.softmax(layer, dim=-1) for layer in logits]
        entry = {"lm_loss": float(loss),
                 "allocated_mass": float(torch.stack([p[:, mask[lang_id]].sum(-1).mean() for p in probs]).mean()),
                 "expert0_mass": float(torch.stack([p[:, 0].mean() for p in probs]).mean())}
        if tagged:
            with captured_router_logits(model, mask_lang_id=lang_id, allocation_mask=mask):
                entry["lm_loss_tagged"] = float(model(tokens, positions, None, labels=labels).float().mean())
        results[lang] = entry
    return results


def run_arms(ws: dict, *, stage1_iters: int, stage2_iters: int, gamma: float, alloc_coeff: float) -> dict:
    """Train both arms (four trainer runs) and evaluate the upcycled start and every stage's checkpoint."""
    from tests.test_training import train

    root, data = ws["root"], ws["data"]
    new = ["1.0", data["es"], "1.0", data["ru"]]
    replay = ["1.0", data["en"], *new]
    stage1 = ["--lr", "1e-3", "--min-lr", "1e-3"]
    stage2 = ["--lr", "3e-2", "--min-lr", "3e-2"]
    heldout = {lang: heldout_tokens(lang) for lang in LANGUAGES}
    runs = {}
    timings = {}
    plan = [
        ("learned", 1, ws["moe"], new, stage1 + allocation_flags("learned")),
        ("learned", 2, None, replay, stage2 + allocation_flags("learned") + ["--lpr-loss-coeff", str(gamma)]),
        ("by-language", 1, ws["moe"], new, stage1 + allocation_flags("by-language")),
        ("by-language", 2, None, replay, stage2 + allocation_flags("learned", loss_coeff=alloc_coeff)),
    ]
    for arm, stage, init, blend, extra in plan:
        out = root / f"{arm}-stage{stage}"
        init = init or root / f"{arm}-stage1"
        started = time.time()
        train(ws, out, iters=stage1_iters if stage == 1 else stage2_iters, stage=stage, init=init, blend=blend, extra=extra)
        timings[f"{arm} stage {stage}"] = round(time.time() - started, 1)
        runs[(arm, stage)] = evaluate(out, heldout, tagged=arm == "by-language")
    runs[("upcycled", 0)] = evaluate(ws["moe"], heldout, tagged=True)
    return {"runs": runs, "timings_s": timings}


def table(runs: dict) -> str:
    rows = ["| arm | after | lang | LM loss (no tags) | LM loss (by-language mask) | mass on allocated experts | mass on expert 0 |",
            "|---|---|---|---|---|---|---|"]
    order = [("upcycled", 0), ("learned", 1), ("learned", 2), ("by-language", 1), ("by-language", 2)]
    names = {0: "upcycle", 1: "stage 1", 2: "stage 2 review"}
    for arm, stage in order:
        for lang, r in runs[(arm, stage)].items():
            tagged = f"{r['lm_loss_tagged']:.3f}" if "lm_loss_tagged" in r else "-"
            rows.append(f"| {arm if stage else '-'} | {names[stage]} | {lang} | {r['lm_loss']:.3f} | {tagged} | "
                        f"{r['allocated_mass']:.3f} | {r['expert0_mass']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="keep checkpoints here (default: a temporary folder)")
    parser.add_argument("--stage1-iters", type=int, default=20)
    parser.add_argument("--stage2-iters", type=int, default=15)
    parser.add_argument("--lpr-loss-coeff", type=float, default=0.1, help="γ of the learned arm's review (MoE-LPR: 0.1)")
    parser.add_argument("--allocation-loss-coeff", type=float, default=0.1, help="the by-language arm's review loss weight")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    # The in-process evaluation loads checkpoints with megatron-core, which warns about deprecations on every load.
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ws = build_workspace(args.workdir or Path(tmp) / "alloc")
        result = run_arms(ws, stage1_iters=args.stage1_iters, stage2_iters=args.stage2_iters, gamma=args.lpr_loss_coeff,
                          alloc_coeff=args.allocation_loss_coeff)
    print(f"allocation {json.dumps(ALLOCATION)}, E={NUM_EXPERTS}, top-{TOPK}; stage 1 {args.stage1_iters} iterations "
          f"(es+ru), stage 2 {args.stage2_iters} (en+es+ru); learned review γ={args.lpr_loss_coeff}, by-language review "
          f"allocation loss {args.allocation_loss_coeff}")
    print(table(result["runs"]))
    print(f"trainer runs (s): {result['timings_s']}; total {time.time() - started:.0f} s")
    if args.json:
        serial = {f"{arm}/stage{stage}": r for (arm, stage), r in result["runs"].items()}
        args.json.write_text(json.dumps({"allocation": ALLOCATION, "runs": serial, "timings_s": result["timings_s"],
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
