"""Tensor parallel 2 + sequence parallel + MoE trains with the fast spec, and matches tensor parallel 1.

megatron requires sequence parallel for MoE with TP > 1 in training, and its local spec's torch norm refuses sequence
parallel, so this combination could not train without Transformer Engine. Two gloo processes (torchrun) run the
same few steps with megatron's own DDP, `finalize_model_grads` and optimizer (AdamW, weight decay), first at TP=1
(each rank a full replica) and then at TP=2 with sequence parallel and the chunked vocab-parallel loss; the losses
must agree within float32 rounding, and the TP=2 norm weights, whose gradients only `finalize_model_grads` makes
whole, must match TP=1 after training.

Run by pytest (which starts torchrun) or directly as the worker:
`OMP_NUM_THREADS=1 PYTHONPATH=. python -m torch.distributed.run --nproc-per-node 2 tests/test_fast_spec_tp.py OUT.json`
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def _backward(loss) -> None:
    """`loss.backward()`, with cpu_compat's CUDA->CPU mode active inside the autograd engine.

    The mode pops itself while it handles `Tensor.backward` / `torch.autograd.backward`, so the engine would run
    megatron's sequence-parallel backward (`torch.empty(device=torch.cuda.current_device())`) without it and ask
    for CUDA. Calling the engine entry directly, under the mode, avoids that dispatch. (Reported to the lead: a fix
    belongs in cpu_compat; on a GPU this is plain `torch.autograd.backward`.)
    """
    from deltamoe.megatron_ext.runtime import cpu_compat

    if not cpu_compat.is_active():
        torch.autograd.backward(loss)
        return
    from torch.autograd.graph import _engine_run_backward

    with cpu_compat._CudaToCpuMode():
        _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                             accumulate_grad=True)


def _train(tp: int, sp: bool, chunked: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from deltamoe.megatron_ext.internals import use_chunked_loss
    from deltamoe.megatron_ext.runtime.distributed import (
        ParallelLayout,
        init_distributed,
    )
    from deltamoe.megatron_ext.runtime.model_builder import MoESettings
    from tests.test_fast_spec import build_model
    from tests.tiny_models import tiny_config

    init_distributed(ParallelLayout(tensor_model_parallel_size=tp), seed=7)
    torch.manual_seed(7)  # CPU initialisation draws whole weights, then each rank keeps its shard: TP-independent
    model = build_model(tiny_config("qwen3").to_dict(), spec="fast", moe=MoESettings(num_experts=4, topk=2,
                        grouped_gemm=True), tensor_model_parallel_size=tp, sequence_parallel=sp)
    if chunked:
        use_chunked_loss(model, chunk_bytes=4 * 128 * 5)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=0.0, params_dtype=torch.float32),
        [ddp],
    )
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(3))
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    losses = []
    for _ in range(STEPS):  # the same batch each step, so the loss must fall
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(ids, positions, None, labels=labels).mean()
        _backward(loss)
        finalize_model_grads([ddp])
        optimizer.step()
        losses.append(loss.item())
    norms = {name: p.detach().clone() for name, p in model.named_parameters() if "layernorm" in name}
    return losses, norms


def _worker(out_path: str) -> None:
    from deltamoe.megatron_ext.runtime.distributed import destroy_distributed

    tp1_losses, tp1_norms = _train(tp=1, sp=False, chunked=False)
    tp2_losses, tp2_norms = _train(tp=2, sp=True, chunked=True)
    norm_max_diff = max((tp1_norms[k] - tp2_norms[k]).abs().max().item() for k in tp1_norms)
    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps({
            "tp1": tp1_losses, "tp2": tp2_losses, "norm_keys": sorted(tp2_norms), "norm_max_diff": norm_max_diff,
        }))
    destroy_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_tp2_sequence_parallel_moe_matches_tp1(tmp_path):
    out = tmp_path / "losses.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         str(Path(__file__)), str(out)],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert len(result["tp1"]) == STEPS
    # Training moved: a bug that freezes everything would also "match".
    assert result["tp1"][-1] < result["tp1"][0]
    torch.testing.assert_close(torch.tensor(result["tp2"]), torch.tensor(result["tp1"]))
    # Norm weights are replicated over TP; partial (not all-reduced) SP gradients make them drift from TP=1.
    # Measured: 2e-5 (Adam amplifies rounding where gradients are tiny); 6e-2 with the sequence_parallel flag removed.
    assert any("pre_mlp_layernorm" in k for k in result["norm_keys"])
    assert result["norm_max_diff"] < 1e-3


if __name__ == "__main__":
    _worker(sys.argv[1])
