"""`deltamoe env`: what this machine runs DeltaMoE with, for bug reports and before a long job.

Versions (Python, torch with its CUDA / cuDNN / NCCL, Transformer Engine, apex, megatron-core, transformers, ...),
devices, the layer spec `--deltamoe-layer-spec auto` resolves to and why (`runtime/specs.py` decides; this module
only asks it), the fused Adam the optimizer would use, and whether the kernels the fast spec relies on are usable
here: grouped GEMM (`torch._grouped_mm`, as `layers/grouped_experts.grouped_mm_usable` decides) and SDPA's flash
kernel (tried on a tiny input). Nothing here fails: what cannot be determined is reported as such.

Examples:
    deltamoe env                 # readable report; paste it into a bug report
    deltamoe env --json          # the same as JSON (e.g. to attach to a run's manifest)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys

PACKAGES = {
    "torch": ("torch",),
    "transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-torch", "transformer_engine_torch"),
    "apex": ("apex",),
    "megatron-core": ("megatron-core", "megatron_core"),
    "transformers": ("transformers",),
    "safetensors": ("safetensors",),
    "huggingface-hub": ("huggingface-hub", "huggingface_hub"),
    "numpy": ("numpy",),
}


def _distribution_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _import_status(module: str) -> tuple[bool, str | None]:
    """(importable, the error when it is installed but fails to import)."""
    if importlib.util.find_spec(module) is None:
        return False, None
    try:
        importlib.import_module(module)
        return True, None
    except Exception as e:  # noqa: BLE001 - a broken build (e.g. CUDA libraries missing) is what we report
        return False, f"{type(e).__name__}: {e}"


def spec_choice(requested: str = "auto") -> tuple[str, str]:
    """(the concrete layer spec, why) for `--deltamoe-layer-spec requested` on this machine."""
    import torch

    from deltamoe.megatron_ext.runtime.specs import HAVE_TE, resolve_spec_name

    try:
        name = resolve_spec_name(requested)
    except (RuntimeError, ValueError) as e:
        return "unusable", str(e)
    if requested != "auto":
        return name, f"--deltamoe-layer-spec {requested}"
    if name == "te":
        return name, "Transformer Engine and CUDA are present"
    if not HAVE_TE:
        return name, "Transformer Engine is not importable, so DeltaMoE's torch-native spec"
    if not torch.cuda.is_available():
        return name, "Transformer Engine needs CUDA and there is no CUDA device"
    return name, "what resolve_spec_name chose"


def fused_adam_source() -> str | None:
    """Where megatron-core's fused Adam would come from ("Transformer Engine" or "apex"); None: torch's AdamW."""
    for module, label in (("transformer_engine.pytorch.optimizers", "Transformer Engine"), ("apex.optimizers", "apex")):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            continue
        try:
            importlib.import_module(module)
            return label
        except Exception:  # noqa: BLE001 - a broken build means no fused Adam
            continue
    return None


def _grouped_gemm() -> dict:
    import torch

    from deltamoe.megatron_ext.layers.grouped_experts import grouped_mm_usable

    info = {"available_in_torch": hasattr(torch, "_grouped_mm")}
    if not info["available_in_torch"]:
        return {**info, "usable": False, "why": "this torch has no torch._grouped_mm: experts run as a loop of GEMMs"}
    if not torch.cuda.is_available():
        return {**info, "usable": False, "why": "no CUDA device: torch's CPU grouped GEMM is a reference implementation, "
                                                 "so the fast spec loops over experts (faster on CPU)"}

    class _Config:  # the one field grouped_mm_usable reads
        moe_grouped_gemm = True

    weights = [torch.zeros(64, 64, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    usable = grouped_mm_usable(_Config(), weights)
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    if not usable:
        return {**info, "usable": False, "why": f"compute capability {capability}: torch's grouped-GEMM kernels need "
                                                 f"9.0 (Hopper) or newer with bfloat16; experts loop over GEMMs"}
    try:  # the kernel really runs: one grouped GEMM over two experts
        x = torch.ones(8, 64, dtype=torch.bfloat16, device="cuda")
        w = torch.stack(weights).transpose(-2, -1)
        torch._grouped_mm(x, w, offs=torch.tensor([4, 8], dtype=torch.int32, device="cuda"))
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        return {**info, "usable": False, "why": f"torch._grouped_mm fails here: {type(e).__name__}: {e}"}
    return {**info, "usable": True, "why": f"bfloat16 on compute capability {capability} (the fast spec uses it with "
                                           f"--moe-grouped-gemm)"}


def _sdpa_flash() -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
    results = {"device": device, "dtype": str(dtype).removeprefix("torch.")}
    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("memory_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            results[label] = True
        except Exception as e:  # noqa: BLE001 - "no kernel for these inputs" is the answer
            results[label] = False
            results[f"{label}_why"] = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return results


def _devices() -> dict:
    import torch

    info = {"cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS",
                                               "NCCL_DEBUG", "DELTAMOE_VERBOSE") if k in os.environ}}
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1)})
    info["gpus"] = gpus
    return info


def collect() -> dict:
    """Everything the report shows, as JSON-ready data."""
    import torch

    import deltamoe

    versions = {"deltamoe": deltamoe.__version__}  # the imported one (a checkout may differ from what pip installed)
    versions.update({name: _distribution_version(dists) for name, dists in PACKAGES.items()})
    versions["python"] = sys.version.split()[0]
    te_ok, te_error = _import_status("transformer_engine")
    apex_ok, apex_error = _import_status("apex")

    def safe(fn):
        try:
            return fn()
        except Exception:  # noqa: BLE001 - absent in this build
            return None

    nccl = safe(lambda: ".".join(map(str, torch.cuda.nccl.version())))
    cudnn = safe(torch.backends.cudnn.version)
    if cudnn:  # an int: major * 10000 + minor * 100 + patch since cuDNN 9, major * 1000 + minor * 100 + patch before
        cudnn = (f"{cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}" if cudnn >= 90000
                 else f"{cudnn // 1000}.{cudnn // 100 % 10}.{cudnn % 100}")
    spec, why = spec_choice("auto")
    return {
        "versions": versions,
        "platform": platform.platform(),
        "torch_build": {"cuda": torch.version.cuda, "cudnn": cudnn, "nccl": nccl,
                        "debug": torch.version.debug},
        "transformer_engine": {"importable": te_ok, "error": te_error},
        "apex": {"importable": apex_ok, "error": apex_error},
        "devices": _devices(),
        "layer_spec": {"auto": spec, "why": why},
        "fused_adam": fused_adam_source(),
        "grouped_gemm": _grouped_gemm(),
        "sdpa": _sdpa_flash(),
    }


def format_report(info: dict) -> str:
    v, build = info["versions"], info["torch_build"]

    def ver(name: str) -> str:
        return v.get(name) or "not installed"

    def importable(name: str, key: str) -> str:
        status = info[key]
        if status["error"]:
            return f"{ver(name)}, import fails: {status['error']}"
        return ver(name) if status["importable"] else "not installed"

    torch_extra = ", ".join(f"{k} {build[k]}" for k in ("cuda", "cudnn", "nccl") if build[k]) or "CPU-only build"
    lines = ["DeltaMoE environment (paste into bug reports)",
             f"  deltamoe            {ver('deltamoe')}",
             f"  python              {v['python']} ({info['platform']})",
             f"  torch               {ver('torch')} ({torch_extra})",
             f"  transformer engine  {importable('transformer-engine', 'transformer_engine')}",
             f"  apex                {importable('apex', 'apex')}",
             f"  megatron-core       {ver('megatron-core')}",
             f"  transformers        {ver('transformers')}",
             f"  safetensors         {ver('safetensors')}",
             f"  huggingface-hub     {ver('huggingface-hub')}",
             f"  numpy               {ver('numpy')}"]
    d = info["devices"]
    lines.append("devices")
    if d["gpus"]:
        for g in d["gpus"]:
            lines.append(f"  cuda:{g['index']:<14} {g['name']} (compute {g['capability']}, {g['memory_gib']} GiB)")
    else:
        lines.append(f"  cuda                not available{' (torch built with CUDA ' + build['cuda'] + ')' if build['cuda'] else ''}")
    lines.append(f"  cpu                 {d['cpu_count']} cores, torch threads {d['torch_threads']}")
    for k, value in d["env"].items():
        lines.append(f"  {k:<19} {value}")
    spec = info["layer_spec"]
    lines.append(f"layer spec auto -> {spec['auto']}: {spec['why']}")
    lines.append(f"optimizer: {'fused Adam from ' + info['fused_adam'] if info['fused_adam'] else 'torch AdamW (no fused Adam from Transformer Engine or apex)'}")
    g = info["grouped_gemm"]
    lines.append(f"grouped GEMM (torch._grouped_mm): {'usable' if g['usable'] else 'not used'}: {g['why']}")
    s = info["sdpa"]
    for label in ("flash", "memory_efficient"):
        state = "usable" if s[label] else f"not usable ({s.get(label + '_why', '')})"
        lines.append(f"SDPA {label.replace('_', '-')} kernel on {s['device']} {s['dtype']}: {state}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of the readable report")


def main(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0
