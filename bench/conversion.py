"""Benchmark the conversion commands against the disk: graft, merge, upcycle (HF), import and export.

Builds synthetic bf16 Llama-like inputs once in `--workdir` (kept for reruns): a dense base B (6 layers, hidden 2048,
FFN 5632, 16 / 8 heads, vocab 32000, 512 MiB shards; 0.83 GB), a post-trained I = B + noise, the 4-expert Mixtral
copy upcycle M of B (2.07 GB), B imported into Megatron (MB) and its Megatron upcycle (MM, the export's input).
Then, for each command, in its own process (peak RSS from `wait4`):
  1. drop the page cache (root only; otherwise every figure is warm and the table says so),
  2. `dd` the command's input files to /dev/null: the disk's rate for exactly those bytes,
  3. drop the page cache again and run the command: GB read (its input files), seconds, GB/s, % of the dd rate.
mergekit's task arithmetic on B and I runs the same way when `--mergekit-yaml` is given (install mergekit in its own
venv, never in the project's). The last lines project a Qwen2.5-72B graft (6 experts) from the measured rates, and
`--hashes FILE` writes the sha256 of every output's weight files (safetensors; torch_dist .distcp for import), to
show that outputs are bit-identical across versions of the code. `--repeat N` runs each row N times (median command
time, best dd time: what the disk gives); the machine's load is printed with the table. `--layers 6 18` runs every
row on inputs of both depths and prints the marginal rate between them (extra bytes over extra seconds, against the
extra dd seconds): the rate a larger model sees once start-up and the other fixed costs are paid.

  OMP_NUM_THREADS=2 .venv/bin/python bench/conversion.py --workdir /var/tmp/deltamoe-bench
  OMP_NUM_THREADS=2 .venv/bin/python bench/conversion.py --workdir /var/tmp/deltamoe-bench --layers 6 18
  OMP_NUM_THREADS=2 .venv/bin/python bench/conversion.py --workdir W --mergekit-yaml /tmp/mk-venv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltamoe.common.hashing import sha256_file  # noqa: E402
from deltamoe.converters.hf_upcycle import upcycle_hf  # noqa: E402
from deltamoe.converters.safetensors_io import SafetensorsReader, ShardWriter  # noqa: E402
from deltamoe.megatron_ext.moe.plan import copy_plan  # noqa: E402

SHARD_BYTES = 512 * 1024**2
DD_BLOCK = "16M"


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
    """Random bf16 weights; with `base`, base + noise (a post-trained model)."""
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
              "hidden_act": "silu", "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def input_files(folder: Path) -> list[Path]:
    """The files a command reads from an input folder (weights and JSON, recursively for Megatron checkpoints)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".distcp", ".pt"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in input_files(folder))


def drop_page_cache() -> bool:
    """Sync and drop the page cache (needs root); False where the machine does not allow it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def dd_seconds(files: list[Path]) -> float:
    start = time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", f"bs={DD_BLOCK}"], check=True, capture_output=True)
    return time.perf_counter() - start


def dd_write_seconds(folder: Path, nbytes: int) -> float:
    """`dd` writing `nbytes` of zeros into a new file of `folder` (through the page cache, as the commands write)."""
    target = folder / "dd-write.bin"
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", f"bs={DD_BLOCK}", f"count={max(1, -(-nbytes // 2**24))}"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run a command in its own process; (seconds, peak RSS in GiB of that process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024**2


def build_inputs(w: Path, a: argparse.Namespace, py: list[str]) -> None:
    marker = w / "inputs.json"
    if marker.exists() and json.loads(marker.read_text()) == vars_key(a):
        return
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    t0 = time.perf_counter()
    write_dense(w / "B", a, seed=0)
    write_dense(w / "I", a, seed=1, base=w / "B")
    upcycle_hf(w / "B", w / "M", copy_plan(num_experts=a.experts, topk=2, ffn_hidden_size=a.ffn),
               max_shard_bytes=SHARD_BYTES)
    timed([*py, "import", "--hf", str(w / "B"), "--out", str(w / "MB")])
    timed([*py, "upcycle", "--dense", str(w / "MB"), "--out", str(w / "MM"), "--num-experts", str(a.experts),
           "--topk", "2"])
    marker.write_text(json.dumps(vars_key(a)))
    print(f"built inputs in {time.perf_counter() - t0:.0f} s")


def startup_cmd(cmd: list[str]) -> list[str]:
    """The command's start-up alone: its subcommand with --help (the `-c` row: just the imports)."""
    if cmd[0].endswith("mergekit-yaml"):
        return [cmd[0], "--help"]
    if cmd[1] == "-c":
        return [cmd[0], "-c", cmd[2].split("; upcycle_hf(")[0]]
    return [*cmd[:4], "--help"]


def vars_key(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab", "experts")}


def qwen72b_graft_bytes(experts: int = 6) -> float:
    """Bytes a graft of Qwen2.5-72B (bf16) upcycled to `experts` copies reads: B + I + M."""
    hidden, ffn, layers, heads, kv, vocab = 8192, 29568, 80, 64, 8, 152064
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + 2 * kv * head_dim * hidden + (hidden + 2 * kv * head_dim) + 2 * hidden
    ffn_params = 3 * hidden * ffn
    other = layers * attn + 2 * vocab * hidden + hidden
    dense = other + layers * ffn_params
    moe = other + layers * (experts * ffn_params + experts * hidden)
    return 2 * (2 * dense + moe)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[6],
                   help="decoder layers of the inputs; two values (e.g. 6 18): both tables and the marginal rate "
                        "between them (start-up and other fixed costs cancel)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--workdir", type=Path, required=True, help="inputs are built here once and kept for reruns")
    p.add_argument("--only", nargs="+", default=None, help="run only the rows whose label starts with one of these")
    p.add_argument("--mergekit-yaml", default=None, help="path of mergekit-yaml (install mergekit in its own venv)")
    p.add_argument("--repeat", type=int, default=1, help="runs per row: median command time, best dd time")
    p.add_argument("--hashes", type=Path, default=None, help="write the sha256 of every output's safetensors here")
    a = p.parse_args()
    if len(a.layers) > 2 or len(set(a.layers)) != len(a.layers):
        p.error("--layers: one size, or two different sizes")
    sizes = sorted(a.layers)
    tables, hashes, cold = {}, {}, True
    for layers in sizes:
        w = a.workdir.resolve() if len(sizes) == 1 else a.workdir.resolve() / f"layers-{layers}"
        table, row_hashes, row_cold = run_rows(w, argparse.Namespace(**{**vars(a), "layers": layers}))
        tables[layers] = table
        hashes.update({(label if len(sizes) == 1 else f"{label} (layers {layers})"): h for label, h in row_hashes.items()})
        cold &= row_cold
    state = "cold page cache (dropped before dd and before each command)" if cold else "WARM page cache (could not drop it)"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{state}; {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average at the end {load}; {a.repeat} run(s) per row")
    for layers, table in tables.items():
        print(f"\n{layers} layers:\n")
        print_table(table)
    print("\nstart-up: the same command with --help (interpreter, torch and the command's imports); dd write: zeros of "
          "the output's size through the page cache, as the command writes; % = dd seconds / command seconds.")
    graft_rate = None
    if len(sizes) == 2:
        print(f"\nMarginal: {sizes[1]} layers minus {sizes[0]} layers, row by row (what each further layer costs; "
              "start-up, imports and other fixed costs cancel, as they do on a 70B model):\n")
        graft_rate = print_marginal(tables[sizes[0]], tables[sizes[1]])
    graft = next((r for r in tables[sizes[-1]] if r[0] == "graft"), None)
    if graft:
        total = qwen72b_graft_bytes()
        rate = graft_rate or graft[1] / (graft[3] - graft[7])
        fraction = min(1.0, rate / (graft[1] / graft[2]))
        how = "marginal graft rate" if graft_rate else "graft rate without start-up"
        print(f"\nQwen2.5-72B upcycled to 6 experts, bf16: a graft reads {total / 1e12:.2f} TB (B + I + M). At this run's "
              f"{how} ({rate / 1e9:.2f} GB/s): {total / rate / 60:.0f} min; at the same "
              f"{100 * fraction:.0f} % of a 3 GB/s NVMe's read rate: {total / (3e9 * fraction) / 60:.0f} min.")
    if a.hashes:
        a.hashes.write_text(json.dumps(hashes, indent=2) + "\n")


def run_rows(w: Path, a: argparse.Namespace) -> tuple[list[tuple], dict, bool]:
    """Build the inputs in `w` (once) and time every row: (table rows, output hashes, whether the cache was cold)."""
    py = [sys.executable, "-m", "deltamoe"]
    build_inputs(w, a, py)
    sizes = {k: folder_bytes(w / k) for k in ("B", "I", "M", "MB", "MM")}
    print(f"{a.layers} layers, inputs: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items()))
    out = w / "out"
    rows = [
        ("graft", [*py, "graft", "--base", str(w / "B"), "--post", str(w / "I"), "--moe", str(w / "M"),
                   "--out", str(out / "graft"), "--max-shard-size", "0.5"], ["B", "I", "M"], out / "graft"),
        *[(f"merge {m}", [*py, "merge", "--method", m, "--base", str(w / "B"), "--models", str(w / "I"),
                          *(["--density", "0.5"] if m != "task_arithmetic" else []), "--out", str(out / f"merge-{m}")],
           ["B", "I"], out / f"merge-{m}") for m in ("task_arithmetic", "ties", "dare_linear")],
        ("upcycle (HF)", [sys.executable, "-c", "import sys; from deltamoe.converters.hf_upcycle import upcycle_hf; "
                          "from deltamoe.megatron_ext.moe.plan import copy_plan; "
                          f"upcycle_hf(sys.argv[1], sys.argv[2], copy_plan(num_experts={a.experts}, topk=2, "
                          f"ffn_hidden_size={a.ffn}), max_shard_bytes={SHARD_BYTES})", str(w / "B"), str(out / "upcycle-hf")],
         ["B"], out / "upcycle-hf"),
        ("import", [*py, "import", "--hf", str(w / "B"), "--out", str(out / "import")], ["B"], out / "import"),
        ("export", [*py, "export", "--megatron", str(w / "MM"), "--out", str(out / "export"), "--max-shard-size-gb", "0.5"],
         ["MM"], out / "export"),
    ]
    if a.mergekit_yaml:
        cfg = w / "mergekit.yaml"
        cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {w / 'B'}\nmodels:\n"
                       f"  - model: {w / 'I'}\n    parameters:\n      weight: 1.0\ndtype: bfloat16\n")
        rows.append(("mergekit task_arithmetic", [a.mergekit_yaml, str(cfg), str(out / "mergekit"), "--no-copy-tokenizer",
                                                  "--lazy-unpickle"], ["B", "I"], out / "mergekit"))
    if a.only:
        rows = [r for r in rows if any(r[0].startswith(o) for o in a.only)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    table, hashes, cold = [], {}, True
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for label, cmd, inputs, target in rows:
        files = [f for k in inputs for f in input_files(w / k)]
        nbytes = sum(f.stat().st_size for f in files)
        runs, dds, dd_ws, startups = [], [], [], []
        for _ in range(a.repeat):  # pairs: the disk, then the command, each from a cold cache
            cold &= drop_page_cache()
            dds.append(dd_seconds(files))
            cold &= drop_page_cache()
            runs.append(timed(cmd, env))
            written = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
            hashes[label] = {p.name: sha256_file(p) for p in sorted(target.rglob("*"))
                             if p.is_file() and p.suffix in (".safetensors", ".distcp")}
            shutil.rmtree(target)  # keeps the disk (and the page cache) for the next row
            cold &= drop_page_cache()
            dd_ws.append(dd_write_seconds(out, written))
            startups.append(timed(startup_cmd(cmd), env)[0])
        # The disk's best (what it gives), the command's median, peak RSS of the median run.
        dd, dd_w, startup = min(dds), min(dd_ws), statistics.median(startups)
        seconds, rss = sorted(runs)[(len(runs) - 1) // 2]
        table.append((label, nbytes, dd, seconds, rss, written, dd_w, startup))
        print(f"  {label}: {seconds:.1f} s (start-up {startup:.1f} s; dd read {dd:.1f} s, dd write {dd_w:.1f} s)", flush=True)
    return table, hashes, cold


def print_table(table: list[tuple]) -> None:
    print("| command | GB read | GB written | dd read s (GB/s) | dd write s | seconds | start-up s | GB/s read "
          "(w/o start-up) | % of dd read (w/o start-up) | % of dd read + write (w/o start-up) | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, nbytes, dd, seconds, rss, written, dd_w, startup in table:
        work = seconds - startup
        print(f"| {label} | {nbytes / 1e9:.2f} | {written / 1e9:.2f} | {dd:.1f} ({nbytes / 1e9 / dd:.2f}) | {dd_w:.1f} | "
              f"{seconds:.1f} | {startup:.1f} | {nbytes / 1e9 / seconds:.2f} ({nbytes / 1e9 / work:.2f}) | "
              f"{100 * dd / seconds:.0f} % ({100 * dd / work:.0f} %) | {100 * (dd + dd_w) / seconds:.0f} % "
              f"({100 * (dd + dd_w) / work:.0f} %) | {rss:.2f} |")


def marginal_rows(small: list[tuple], large: list[tuple]) -> list[tuple]:
    """(label, extra GB read, extra dd s, extra dd write s, extra command s) for the rows both tables have."""
    by_label = {r[0]: r for r in small}
    rows = []
    for label, nbytes, dd, seconds, _, _, dd_w, _ in large:
        if label in by_label:
            _, nbytes0, dd0, seconds0, _, _, dd_w0, _ = by_label[label]
            rows.append((label, (nbytes - nbytes0) / 1e9, dd - dd0, dd_w - dd_w0, seconds - seconds0))
    return rows


def print_marginal(small: list[tuple], large: list[tuple]) -> float | None:
    """Print the marginal table; return graft's marginal read rate in bytes/s (None without a graft row)."""
    print("| command | extra GB read | extra dd read s (GB/s) | extra dd write s | extra seconds | marginal GB/s read "
          "| % of dd read | % of dd read + write |")
    print("|---|---|---|---|---|---|---|---|")
    graft_rate = None
    for label, gb, dd, dd_w, seconds in marginal_rows(small, large):
        if seconds <= 0 or dd <= 0:  # a disk or a machine that got faster between the two sizes: no rate
            print(f"| {label} | {gb:.2f} | {dd:.1f} | {dd_w:.1f} | {seconds:.1f} | n/a | n/a | n/a |")
            continue
        print(f"| {label} | {gb:.2f} | {dd:.1f} ({gb / dd:.2f}) | {dd_w:.1f} | {seconds:.1f} | {gb / seconds:.2f} | "
              f"{100 * dd / seconds:.0f} % | {100 * (dd + max(dd_w, 0.0)) / seconds:.0f} % |")
        if label == "graft":
            graft_rate = gb * 1e9 / seconds
    return graft_rate


if __name__ == "__main__":
    main()
