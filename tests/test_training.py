"""Both training stages through Megatron-LM's trainer on CPU (gloo), on a tiny upcycled Llama.

Each trainer run is a subprocess (`python -m deltamoe.megatron_ext.training.train`, torchrun for two processes, and
`torchrun -m deltamoe train` once, checked against the module entry), as a user would launch it; the checks read the checkpoints it writes (loaded back with torch_dist) and the per-language
JSONL metrics. Dropout is 0 and seeds are fixed, so resumed runs must match unbroken ones bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_models import make_tiny_hf

REPO = Path(__file__).resolve().parents[1]
VOCAB, EOD = 128, 2


def write_dataset(prefix: Path, language: str, *, seed: int, lo: int, hi: int, num_docs: int = 64, doc_len: int = 40) -> str:
    """A tagged Megatron indexed dataset of documents from a fixed random bigram chain over token ids [lo, hi)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from deltamoe.megatron_ext.data.language_tag import LanguageTag, TokenizerInfo, write_language_tag

    rng = np.random.default_rng(seed)
    width = hi - lo
    successors = rng.integers(0, width, size=(width, 2))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    total = 0
    for _ in range(num_docs):
        t, ids = int(rng.integers(0, width)), []
        for _ in range(doc_len):
            ids.append(lo + t)
            t = int(successors[t, rng.integers(0, 2)])
        ids.append(EOD)
        builder.add_document(torch.tensor(ids), [len(ids)])
        total += len(ids)
    builder.finalize(f"{prefix}.idx")
    tokenizer = TokenizerInfo(name="synthetic", vocab_size=VOCAB, eod_id=EOD, fingerprint="synthetic")
    write_language_tag(prefix, LanguageTag(language=language, tokenizer=tokenizer, num_documents=num_docs,
                                           num_sequences=num_docs, num_tokens=total, dtype="uint16", inputs=[]))
    return str(prefix)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny Llama -> dense Megatron checkpoint -> upcycled copy-variant MoE (4 experts, top-2) + en/es datasets."""
    from deltamoe.converters.hf_to_megatron import import_hf
    from deltamoe.megatron_ext.moe.upcycle_cli import upcycle

    root = tmp_path_factory.mktemp("training")
    hf = make_tiny_hf("llama", root / "hf", num_hidden_layers=2)
    dense = import_hf(hf, root / "dense")
    moe = upcycle(dense, root / "moe", num_experts=4, topk=2)
    (root / "data").mkdir()
    data = {"en": write_dataset(root / "data" / "en", "en", seed=1, lo=3, hi=60),
            "es": write_dataset(root / "data" / "es", "es", seed=2, lo=60, hi=120)}
    return {"root": root, "dense": dense, "moe": moe, "data": data}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


MODULE_ENTRY = ("-m", "deltamoe.megatron_ext.training.train")


def run_trainer(ws, out: Path, *, iters: int, stage: int = 1, init: Path | None = None, blend=None, nproc: int = 1,
                extra: list[str] = (), entry=MODULE_ENTRY, torchrun: bool = False) -> subprocess.CompletedProcess:
    """Run a training entry (plain python for one process unless `torchrun`); the finished process."""
    blend = blend or ["1.0", ws["data"]["es"]]
    flags = ["--deltamoe-stage", str(stage), "--pretrained-checkpoint", str(init or ws["moe"]), "--load", str(out),
             "--save", str(out), "--data-path", *blend, "--original-languages", "en", "--languages", "en,es",
             "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
             "--lr", "1e-3", "--min-lr", "1e-3", "--lr-decay-style", "constant", "--log-interval", "1",
             "--save-interval", "1000", "--seed", "1234", *extra]
    launcher = [sys.executable] if nproc == 1 and not torchrun else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_free_port())]
    result = subprocess.run([*launcher, *entry, *flags], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def train(ws, out: Path, **kwargs) -> list[dict]:
    """Run the training entry; returns the JSONL records (one per iteration)."""
    run_trainer(ws, out, **kwargs)
    return [json.loads(line) for line in (out / "deltamoe_routing.jsonl").read_text().splitlines()]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from deltamoe.megatron_ext.runtime.checkpoint import load_model
    from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    model, _ = load_model(folder)
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def lm_losses(records, lang="es") -> list[float]:
    return [r["lm_loss"][lang] for r in records]


def _is_router(name: str) -> bool:
    return ".mlp.router." in name


def _expert(name: str) -> int | None:
    marker = ".local_experts."
    return int(name.split(marker)[1].split(".")[0]) if marker in name else None


def check_stage1_changes(before: dict, after: dict) -> None:
    """Everything but experts 1..E-1 and routers is bit-identical; those all changed."""
    assert before.keys() == after.keys()
    for name in before:
        expert = _expert(name)
        trainable = _is_router(name) or (expert is not None and expert != 0)
        if trainable:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"


@pytest.fixture(scope="module")
def stage1(workspace):
    out = workspace["root"] / "stage1"
    return out, train(workspace, out, iters=6)


@pytest.mark.slow
def test_stage1_trains_new_experts_only_and_loss_falls(workspace, stage1):
    out, records = stage1
    check_stage1_changes(weights(workspace["moe"]), weights(out))
    losses = lm_losses(records)
    assert [r["iteration"] for r in records] == list(range(1, 7))
    assert all(r["tokens"]["en"] == 0 and r["tokens"]["es"] == 128 for r in records)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    # The trainer's save folder is a DeltaMoE checkpoint too (metadata + plan next to megatron's iterations).
    assert (out / "deltamoe.json").exists() and (out / "deltamoe_upcycle.json").exists()
    # The trainer (fast spec here) writes the Transformer Engine spec's keys (tests/te_contract.py), as upcycle does.
    from deltamoe.megatron_ext.runtime.checkpoint import checkpoint_dir
    from tests.te_contract import checkpoint_model_keys, requested_keys, te_layer_spec

    want = requested_keys(te_layer_spec(num_experts=4, qk_layernorm=False), qkv_bias=False, tied=False)
    assert checkpoint_model_keys(checkpoint_dir(out)) == want


@pytest.mark.slow
def test_deltamoe_train_under_torchrun_equals_the_module_entry(workspace, stage1):
    """`torchrun -m deltamoe train FLAGS` (the CLI users launch) trains exactly what `-m ...training.train FLAGS` does:
    the same losses and bit-identical weights; rank 0 prints one progress line per log interval."""
    module_out, module_records = stage1
    out = workspace["root"] / "cli-train"
    result = run_trainer(workspace, out, iters=6, entry=("-m", "deltamoe", "train"), torchrun=True)
    records = [json.loads(line) for line in (out / "deltamoe_routing.jsonl").read_text().splitlines()]
    assert lm_losses(records) == lm_losses(module_records)
    cli, module = weights(out), weights(module_out)
    assert cli.keys() == module.keys() and all(torch.equal(cli[k], module[k]) for k in cli)
    progress = [line for line in result.stdout.splitlines() if line.startswith("deltamoe stage 1 | iteration ")]
    assert [line.split(" | ")[1] for line in progress] == [f"iteration {i}/6" for i in range(1, 7)]
    assert all("tokens/s" in line and "ETA" in line and "lm loss es " in line for line in progress), progress
    assert " iteration        6/       6 |" in result.stdout  # Megatron's own line stays
    assert "layer spec fast" in result.stdout or "layer spec te" in result.stdout


@pytest.mark.slow
def test_export_card_lists_the_training_stages(workspace, stage1, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    from deltamoe.converters.megatron_to_hf import export

    init, _ = stage1
    hf = workspace["root"] / "hf"
    (hf / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# tiny base\n")
    try:
        out = export(init, tmp_path / "hf-moe")
    finally:
        (hf / "README.md").unlink()
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "hf" and data["base_model_relation"] == "finetune" and data["license"] == "apache-2.0"
    assert data["language"] == ["en", "es"] and {"deltamoe", "moe", "mixtral"} <= set(data["tags"])
    # 6 iterations x global batch 4 x sequence 32 = 768 tokens, all Spanish by the trainer's own count.
    row = next(line for line in card.text.splitlines() if line.startswith("| 1 |"))
    assert "| 6 of 6 |" in row and "| 4 x 32 |" in row and "| 768 |" in row and "`es` (es, 1, " in row and "es 768" in row
    record = json.loads((out / "deltamoe_training.json").read_text())["stages"]
    assert [(s["stage"], s["iterations"]) for s in record] == [(1, 6)]
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_dense_continued_pretraining_from_imported_checkpoint(workspace):
    """Megatron-LM's trainer starts from `deltamoe import`'s output (the dense-CPT baseline): every tensor trains,
    the loss falls, and the saved iteration is a DeltaMoE checkpoint that exports."""
    out = workspace["root"] / "dense-cpt"
    records = train(workspace, out, iters=5, stage=0, init=workspace["dense"], extra=["--lr", "3e-3", "--min-lr", "3e-3"])
    losses = lm_losses(records)
    assert [r["iteration"] for r in records] == list(range(1, 6))
    assert losses[-1] < losses[0], losses
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    from deltamoe.megatron_ext.runtime.checkpoint import checkpoint_dir
    from tests.te_contract import checkpoint_model_keys, requested_keys, te_layer_spec

    want = requested_keys(te_layer_spec(num_experts=None, qk_layernorm=False), qkv_bias=False, tied=False)
    assert checkpoint_model_keys(checkpoint_dir(out)) == want
    before, after = weights(workspace["dense"]), weights(out)
    assert before.keys() == after.keys()
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, unchanged


@pytest.mark.slow
def test_resume_continues_the_unbroken_loss_curve(workspace, stage1):
    _, unbroken = stage1
    out = workspace["root"] / "resumed"
    first = train(workspace, out, iters=6, extra=["--exit-interval", "3"])
    assert [r["iteration"] for r in first] == [1, 2, 3]
    both = train(workspace, out, iters=6)
    assert lm_losses(both) == lm_losses(unbroken)  # exactly: same data, optimizer state (step included), weights


@pytest.mark.slow
def test_ep2_on_two_processes_matches_ep1(workspace, stage1):
    _, unbroken = stage1
    ep2 = workspace["root"] / "ep2"
    ep2_losses = lm_losses(train(workspace, ep2, iters=3, nproc=2, extra=["--expert-model-parallel-size", "2"]))
    torch.testing.assert_close(torch.tensor(ep2_losses), torch.tensor(lm_losses(unbroken)[:3]), rtol=1e-5, atol=0)
    check_stage1_changes(weights(workspace["moe"]), weights(ep2))


@pytest.mark.slow
def test_stage1_with_grouped_gemm_matches_sequential_and_keeps_expert0(workspace, stage1):
    _, sequential = stage1
    out = workspace["root"] / "grouped"
    grouped = lm_losses(train(workspace, out, iters=3, extra=["--moe-grouped-gemm"]))
    torch.testing.assert_close(torch.tensor(grouped), torch.tensor(lm_losses(sequential)[:3]), rtol=1e-5, atol=0)
    check_stage1_changes(weights(workspace["moe"]), weights(out))


def test_grouped_and_sequential_experts_load_the_same_checkpoint_and_agree(workspace):
    """The same torch_dist checkpoint loads into sequential and grouped experts: same logits and gradients."""
    from deltamoe.megatron_ext.runtime.checkpoint import load_model
    from deltamoe.megatron_ext.runtime.distributed import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    tokens = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand_as(tokens)
    results = []
    for grouped in (False, True):
        model, _ = load_model(workspace["moe"], moe_overrides={"grouped_gemm": grouped})
        loss = model(tokens, positions, None, labels=tokens).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "local_experts.1." in n}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name])


@pytest.mark.slow
def test_stage2_trains_routers_only_and_lpr_moves_original_language_to_expert0(workspace, stage1):
    init, _ = stage1
    out = workspace["root"] / "stage2"
    blend = ["0.5", workspace["data"]["en"], "0.5", workspace["data"]["es"]]
    records = train(workspace, out, iters=8, stage=2, init=init, blend=blend,
                    extra=["--lpr-loss-coeff", "2.0", "--lr", "3e-2", "--min-lr", "3e-2"])
    before, after = weights(init), weights(out)
    for name in before:
        if _is_router(name):
            assert not torch.equal(before[name], after[name]), f"router {name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed in stage 2"
    assert all(r["tokens"]["en"] > 0 for r in records)
    # The training record carries stage 1 (with the iterations it completed) into stage 2's folder.
    from deltamoe.megatron_ext.training.record import read_training_record

    assert [(s["stage"], s["iterations"]) for s in read_training_record(out)] == [(1, 6), (2, None)]
    p0_en = [sum(r["expert0_prob"]["en"]) / len(r["expert0_prob"]["en"]) for r in records]
    assert p0_en[-1] > p0_en[0] + 0.05, p0_en
    # L_lpr = -mean log p0 over original-language tokens: the recorded per-layer value matches the probabilities'
    # direction (it is logged for every iteration of stage 2).
    assert all(r["lpr_loss_per_layer"] > 0 for r in records)


def test_freezing_policy_maps_local_experts_to_global_on_each_ep_rank():
    from deltamoe.common.errors import DeltaMoEError
    from deltamoe.megatron_ext.moe.freezing import global_expert_index, is_trainable

    seq = "decoder.layers.3.mlp.experts.local_experts.{}.linear_fc1.weight"
    te = "decoder.layers.3.mlp.experts.linear_fc2.weight{}"
    # 4 experts on 2 expert-parallel ranks: rank 1 holds global experts 2 and 3.
    assert [global_expert_index(seq.format(j), ep_rank=1, num_local_experts=2) for j in (0, 1)] == [2, 3]
    assert global_expert_index(te.format(1), ep_rank=1, num_local_experts=2) == 3
    common = dict(frozen_experts={0}, num_local_experts=2)
    assert not is_trainable(seq.format(0), stage=1, ep_rank=0, **common)       # expert 0 on rank 0
    assert is_trainable(seq.format(0), stage=1, ep_rank=1, **common)           # expert 2 on rank 1
    assert not is_trainable(te.format(0), stage=1, ep_rank=0, **common)
    assert is_trainable("decoder.layers.0.mlp.router.weight", stage=2, ep_rank=0, **common)
    assert is_trainable("decoder.layers.0.mlp.shared_experts.gate_weight", stage=1, ep_rank=0, **common)
    for frozen in ("decoder.layers.0.mlp.shared_experts.linear_fc1.weight", "embedding.word_embeddings.weight",
                   "decoder.layers.0.pre_mlp_layernorm.weight", "output_layer.weight"):
        assert not is_trainable(frozen, stage=1, ep_rank=0, **common)
    assert not is_trainable(seq.format(1), stage=2, ep_rank=0, **common)      # stage 2: no expert trains
    with pytest.raises(DeltaMoEError, match="several experts in one tensor"):
        is_trainable("decoder.layers.0.mlp.experts.linear_fc1.weight", stage=1, ep_rank=0, **common)
    with pytest.raises(DeltaMoEError, match="must be 1 or 2"):
        is_trainable(seq.format(1), stage=3, ep_rank=0, **common)


@pytest.mark.slow
def test_entry_refuses_contradicting_or_missing_inputs(workspace, tmp_path):
    """Bad input stops the entry with one `deltamoe train: error:` line, before any training."""
    def run(*flags):
        result = subprocess.run([sys.executable, "-m", "deltamoe.megatron_ext.training.train", *flags], env=_env(),
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        return result.returncode, result.stderr

    base = ["--deltamoe-stage", "1", "--pretrained-checkpoint", str(workspace["moe"]), "--load", str(tmp_path / "o"),
            "--data-path", workspace["data"]["es"], "--original-languages", "en", "--languages", "en,es",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1",
            "--lr", "1e-3"]
    code, err = run(*base, "--num-layers", "5")
    assert code == 1 and "contradicts the checkpoint" in err
    code, err = run(*base, "--lpr-loss-coeff", "0.1")
    assert code == 1 and "stage-2" in err
    # A routing flag the HF formats cannot express: one error line naming it, before Megatron validates anything.
    code, err = run(*base, "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias")
    assert code == 1 and "deltamoe train: error: --moe-router-score-function sigmoid: not supported" in err
    assert "Traceback" not in err
    code, err = run(*[a if a != str(workspace["moe"]) else str(tmp_path / "none") for a in base])
    assert code == 1 and "no DeltaMoE checkpoint metadata" in err


# ---- routing the HF formats cannot express is refused when training starts; what they can express is recorded ------
REFUSED_ROUTING_FLAGS = [
    (["--moe-router-score-function", "sigmoid"], "--moe-router-score-function sigmoid: not supported"),
    (["--moe-router-score-function", "sqrtsoftplus"], "--moe-router-score-function sqrtsoftplus: not supported"),
    (["--moe-router-topk-scaling-factor", "2.5"], "--moe-router-topk-scaling-factor 2.5: not supported"),
    (["--moe-router-enable-expert-bias"], "--moe-router-enable-expert-bias True: not supported"),
    (["--moe-router-num-groups", "2", "--moe-router-group-topk", "1"], "--moe-router-num-groups 2: not supported"),
    (["--moe-router-group-topk", "1"], "--moe-router-group-topk 1: not supported"),
    (["--moe-router-load-balancing-type", "sinkhorn"], "--moe-router-load-balancing-type sinkhorn: not supported"),
    (["--moe-router-load-balancing-type", "quantile_balancing"],
     "--moe-router-load-balancing-type quantile_balancing: not supported"),
    (["--moe-expert-capacity-factor", "1.0"], "--moe-expert-capacity-factor 1.0: not supported"),
    (["--moe-expert-rank-capacity-factor", "1.0"], "--moe-expert-rank-capacity-factor 1.0: not supported"),
    (["--moe-input-jitter-eps", "0.01"], "--moe-input-jitter-eps 0.01: not supported"),
    (["--moe-router-force-load-balancing"], "--moe-router-force-load-balancing True: not supported"),
    (["--moe-router-force-biased", "0.1"], "--moe-router-force-biased 0.1: not supported"),
    (["--moe-enable-routing-replay"], "--moe-enable-routing-replay True: not supported"),
    (["--moe-apply-probs-on-input"], "--moe-apply-probs-on-input True: not supported"),
    (["--moe-latent-size", "16"], "--moe-latent-size 16: not supported"),
    (["--moe-layer-freq", "2"], "--moe-layer-freq 2: not supported"),
    (["--moe-mlp-glu-interleave-size", "8"], "--moe-mlp-glu-interleave-size 8: not supported"),
    (["--moe-shared-expert-glu-interleave-size", "8"], "--moe-shared-expert-glu-interleave-size 8: not supported"),
    (["--moe-use-upcycling"], "--moe-use-upcycling True: not supported"),
    (["--moe-ffn-hidden-size", "48"], "--moe-ffn-hidden-size 48 contradicts the checkpoint (96)"),
    (["--moe-shared-expert-intermediate-size", "96"], "--moe-shared-expert-intermediate-size 96 contradicts the checkpoint"),
]


def _entry_flags(ws, *extra: str, stage: str = "1") -> list[str]:
    return ["--deltamoe-stage", stage, "--pretrained-checkpoint", str(ws["moe"]), "--load", str(ws["root"] / "unused"),
            "--data-path", ws["data"]["es"], "--original-languages", "en", "--languages", "en,es", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-3", *extra]


def _check_entry_flags(ws, monkeypatch, *extra: str, plan=None, stage: str = "1"):
    """The trainer entry's start-up checks (train.check_user_flags, what `main` runs before Megatron validates), in
    process: the checkpoint's flags, then the user's, parsed by Megatron-LM's own parser."""
    from deltamoe.architectures import read_architecture_config
    from deltamoe.megatron_ext.moe.plan import UpcyclePlan
    from deltamoe.megatron_ext.runtime.checkpoint import read_metadata
    from deltamoe.megatron_ext.training.train import check_user_flags

    monkeypatch.setattr(sys, "argv", ["train"])
    meta = read_metadata(ws["moe"])
    _, arch = read_architecture_config(meta.hf_config)
    return check_user_flags(_entry_flags(ws, *extra, stage=stage), meta, arch, plan or UpcyclePlan.load(ws["moe"]),
                            int(stage))


@pytest.mark.parametrize("extra, message", REFUSED_ROUTING_FLAGS, ids=lambda x: x[0] if isinstance(x, list) else "")
def test_entry_refuses_routing_the_hf_formats_cannot_express(workspace, monkeypatch, extra, message):
    from deltamoe.common.errors import DeltaMoEError

    with pytest.raises(DeltaMoEError, match=re.escape(message)):
        _check_entry_flags(workspace, monkeypatch, *extra)


def test_entry_accepts_routing_that_changes_no_function_and_records_pre_softmax(workspace, monkeypatch):
    from deltamoe.megatron_ext.runtime.checkpoint import read_metadata
    from deltamoe.megatron_ext.training.flags import recorded_moe

    free = ["--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff",
            "1e-3", "--moe-router-dtype", "fp64", "--moe-token-dispatcher-type", "allgather", "--moe-grouped-gemm"]
    args = _check_entry_flags(workspace, monkeypatch, *free)
    assert recorded_moe(read_metadata(workspace["moe"]), args)["router_pre_softmax"] is False
    args = _check_entry_flags(workspace, monkeypatch, "--moe-router-pre-softmax")
    assert recorded_moe(read_metadata(workspace["moe"]), args)["router_pre_softmax"] is True


def test_entry_refuses_lpr_and_original_language_allocation_for_the_shared_variant(workspace, monkeypatch):
    from deltamoe.common.errors import DeltaMoEError
    from deltamoe.megatron_ext.moe.upcycle import build_plan

    shared = build_plan(variant="shared", num_experts=4, topk=2, ffn_hidden_size=96, granularity=2)
    with pytest.raises(DeltaMoEError, match="--lpr-loss-coeff: the shared variant has no routed original expert"):
        _check_entry_flags(workspace, monkeypatch, "--lpr-loss-coeff", "0.1", plan=shared, stage="2")
    allocation = ["--expert-allocation", "by-language", "--expert-allocation-map", json.dumps({"en": [0, 1], "es": [2, 3]})]
    with pytest.raises(DeltaMoEError, match="gives routed experts to original language 'en'"):
        _check_entry_flags(workspace, monkeypatch, *allocation, plan=shared)
    _check_entry_flags(workspace, monkeypatch, "--expert-allocation", "by-language", "--expert-allocation-map",
                       json.dumps({"es": [2, 3]}), plan=shared)  # new languages only: fine


@pytest.mark.slow
def test_recorded_routing_flag_reaches_the_export_and_matches_megatron(workspace):
    """Trained with --moe-router-pre-softmax (no top-k renormalisation): the trainer records it in deltamoe.json, and
    the export (Llama: Qwen2-MoE, as Mixtral always renormalises) gives the trained Megatron model's logits."""
    from deltamoe.converters.megatron_to_hf import export
    from deltamoe.megatron_ext.runtime.checkpoint import load_model, read_metadata
    from tests.megatron_helpers import hf_logits, megatron_logits

    out = workspace["root"] / "pre-softmax"
    train(workspace, out, iters=1, extra=["--moe-router-pre-softmax", "--save-interval", "1"])
    meta = read_metadata(out)
    assert meta.moe["router_pre_softmax"] is True
    assert meta.source["training"]["stage1"]["router_pre_softmax"] is True
    hf = export(out, workspace["root"] / "pre-softmax-hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["norm_topk_prob"] is False
    model, _ = load_model(out, spec="local")
    tokens = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hf_logits(hf, tokens), megatron_logits(model, tokens, VOCAB))
