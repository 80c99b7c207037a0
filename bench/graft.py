"""Benchmark `deltamoe graft` on a synthetic ~2 GB bf16 Llama-like MoE, next to dense task-arithmetic merges.

Builds, in a temporary folder: a dense base B (random bf16, several shards), a post-trained I = B + noise, and the
4-expert Mixtral-format upcycle M of B (copy variant, via `upcycle_hf`). Then times, each in its own process (so the
peak RSS is that command's alone, read from `wait4`):
  deltamoe graft                      B, I, M  -> MoE (~2 GB written)
  deltamoe merge task_arithmetic      B, I     -> dense
  mergekit task_arithmetic            B, I     -> dense   (only with --mergekit-yaml; mergekit cannot graft into an MoE)
"Read" counts the bytes each tool must read (graft: B + I + M; merges: B + I), so GB/s compare like with like.

  python bench/graft.py                                  # deltamoe only
  python bench/graft.py --mergekit-yaml /tmp/mk-venv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltamoe.converters.hf_upcycle import upcycle_hf  # noqa: E402
from deltamoe.converters.safetensors_io import SafetensorsReader, ShardWriter  # noqa: E402
from deltamoe.megatron_ext.moe.plan import copy_plan  # noqa: E402

SHARD_BYTES = 512 * 1024**2


def dense_shapes(a: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    head_dim = a.hidden // a.heads
    shapes = {"model.embed_tokens.weight": (a.vocab, a.hidden)}
    for i in range(a.layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (a.hidden,), f"{p}.post_attention_layernorm.weight": (a.hidden,),
            f"{p}.self_attn.q_proj.weight": (a.hidden, a.hidden), f"{p}.self_attn.o_proj.weight": (a.hidden, a.hidden),
            f"{p}.self_attn.k_proj.weight": (a.kv_heads * head_dim, a.hidden),
            f"{p}.self_attn.v_proj.weight": (a.kv_heads * head_dim, a.hidden),
            f"{p}.mlp.gate_proj.weight": (a.ffn, a.hidden), f"{p}.mlp.up_proj.weight": (a.ffn, a.hidden),
            f"{p}.mlp.down_proj.weight": (a.hidden, a.ffn),
        })
    shapes.update({"model.norm.weight": (a.hidden,), "lm_head.weight": (a.vocab, a.hidden)})
    return shapes


def write_dense(folder: Path, a: argparse.Namespace, *, seed: int, base: Path | None = None) -> None:
    """Random bf16 weights; with `base`, base + 0.01 * noise (a post-trained model)."""
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder, max_shard_bytes=SHARD_BYTES)
    reader = SafetensorsReader(base) if base else None
    for name, shape in dense_shapes(a).items():
        t = torch.randn(shape, generator=gen) * 0.02
        if reader is not None:
            t = reader.get(name).float() + 0.5 * t
        writer.add(name, t.to(torch.bfloat16))
    writer.finish()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": a.vocab,
              "hidden_size": a.hidden, "intermediate_size": a.ffn, "num_hidden_layers": a.layers,
              "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run a command in its own process; (seconds, peak RSS in GiB of that process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024**2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=None, help="where to build the models (default: a temp folder)")
    p.add_argument("--mergekit-yaml", default=None, help="path of mergekit-yaml (install mergekit in its own venv)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_dense(tmp / "B", a, seed=0)
        write_dense(tmp / "I", a, seed=1, base=tmp / "B")
        upcycle_hf(tmp / "B", tmp / "M", copy_plan(num_experts=a.experts, topk=2, ffn_hidden_size=a.ffn),
                   max_shard_bytes=SHARD_BYTES)
        sizes = {k: folder_bytes(tmp / k) for k in ("B", "I", "M")}
        print(f"built inputs in {time.perf_counter() - t0:.0f} s: B {sizes['B'] / 1e9:.2f} GB, I {sizes['I'] / 1e9:.2f} GB, "
              f"M {sizes['M'] / 1e9:.2f} GB ({a.experts} experts, {a.layers} layers, bf16)")
        py = [sys.executable, "-m", "deltamoe"]
        rows = []
        s, rss = timed([*py, "graft", "--base", str(tmp / "B"), "--post", str(tmp / "I"), "--moe", str(tmp / "M"),
                        "--out", str(tmp / "G"), "--max-shard-size", "0.5"])
        rows.append(("deltamoe graft (B, I, M -> MoE)", s, sizes["B"] + sizes["I"] + sizes["M"], rss))
        s, rss = timed([*py, "merge", "--method", "task_arithmetic", "--base", str(tmp / "B"), "--models", str(tmp / "I"),
                        "--out", str(tmp / "TA")])
        rows.append(("deltamoe merge task_arithmetic (B, I -> dense)", s, sizes["B"] + sizes["I"], rss))
        if a.mergekit_yaml:
            cfg = tmp / "mergekit.yaml"
            cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp / 'B'}\nmodels:\n"
                           f"  - model: {tmp / 'I'}\n    parameters:\n      weight: 1.0\ndtype: bfloat16\n")
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            s, rss = timed([a.mergekit_yaml, str(cfg), str(tmp / "MK"), "--no-copy-tokenizer", "--lazy-unpickle"], env)
            rows.append(("mergekit task_arithmetic (B, I -> dense)", s, sizes["B"] + sizes["I"], rss))
        print("\n| command | seconds | GB read | GB/s read | peak RSS GiB |\n|---|---|---|---|---|")
        for name, s, nbytes, rss in rows:
            print(f"| {name} | {s:.1f} | {nbytes / 1e9:.2f} | {nbytes / 1e9 / s:.2f} | {rss:.2f} |")
        if a.mergekit_yaml:
            from safetensors import safe_open

            name = "model.layers.0.self_attn.q_proj.weight"
            ours = {}
            for folder in ("TA", "MK"):
                for f in (tmp / folder).glob("*.safetensors"):
                    with safe_open(f, "pt") as h:
                        if name in h.keys():
                            ours[folder] = h.get_tensor(name)
            print(f"\nmax |deltamoe - mergekit| on {name}: {(ours['TA'].float() - ours['MK'].float()).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
