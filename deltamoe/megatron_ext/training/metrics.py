"""Per-language training metrics: LM loss per language and the router probability of expert 0 per layer and language.

Sums accumulate on the device during the forward passes (loss function and router probe) and are reduced once per
`--routing-log-interval` from megatron's `finalize_model_grads` hook, which every rank runs once per iteration outside
the pipeline schedule (a collective inside the forward step could deadlock pipeline stages). The reduction is one
all-reduce over the whole world of (sum, count) pairs, and every token is counted once: the LM loss by tensor-parallel
rank 0 of the last pipeline stage of each data-parallel replica (the other tensor ranks hold the same per-token
losses), router statistics by the rank whose router saw the token (each pipeline stage its own layers, each
sequence-parallel rank its chunk). Sums, counts and ratios are then those of the global batch whatever the layout.
Rank 0 appends one JSON line per report, prints
one progress line (iteration, tokens/s, elapsed, ETA, LM loss and expert-0 probability per language) and writes
TensorBoard scalars when Megatron has a writer (`--tensorboard-dir` and tensorboard installed).

    deltamoe stage 1 | iteration 40/2000 | 41,230 tokens/s | elapsed 0:05:10 | ETA 4:13:05 | lm loss es 2.412 ru 2.917 | p(expert 0) es 0.38 ru 0.35

tokens/s counts global batch x sequence length per iteration (Megatron's accounting) over the wall time since the
previous line; the ETA extrapolates the mean time per iteration of this run (checkpoint saves and evaluations
included) to --train-iters. The clock starts at the first micro-batch and reads at the end of the backward pass (the
hook runs before the optimizer step), so the first line leaves out one optimizer step; later lines include them all.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from deltamoe.megatron_ext.moe.router_probe import SUMS_MIN_WIDTH, RouterProbe


class LanguageMetrics:
    def __init__(self, *, languages: list[str], num_layers: int, probe: RouterProbe, log_file: str | None,
                 interval: int, stage: int, train_iters: int | None = None, tokens_per_iteration: int | None = None):
        self.languages, self.num_layers, self.probe = list(languages), num_layers, probe
        self.log_file, self.interval, self.stage = log_file, max(1, interval), stage
        self.train_iters, self.tokens_per_iteration = train_iters, tokens_per_iteration
        self.lm_sums: torch.Tensor | None = None  # [2, languages]: loss sum, token count
        self.started: tuple[int, float] | None = None
        """(iteration completed before this run's first step, wall time of that step's start)."""
        self._last: tuple[int, float] | None = None

    def start_clock(self, iteration: int, now: float | None = None) -> None:
        """Mark the start of this run's first training step (`iteration` steps were done before it)."""
        self.started = self._last = (iteration, time.time() if now is None else now)

    def add_lm(self, per_token_loss: torch.Tensor, loss_mask: torch.Tensor, lang_ids: torch.Tensor) -> None:
        """per_token_loss, loss_mask [b, s]; lang_ids [b]. Call on one rank per data-parallel replica (TP rank 0)."""
        with torch.no_grad():
            if self.lm_sums is None:
                self.lm_sums = torch.zeros(2, len(self.languages), dtype=torch.float64, device=per_token_loss.device)
            mask = loss_mask.double()
            per_sample = (per_token_loss.double() * mask).sum(dim=1)
            ids = lang_ids.long().clamp(min=0)
            valid = (lang_ids >= 0).double()
            self.lm_sums[0].index_add_(0, ids, per_sample * valid)
            self.lm_sums[1].index_add_(0, ids, mask.sum(dim=1) * valid)

    def maybe_report(self, iteration: int) -> dict | None:
        """Called by every rank once per iteration; reduces and writes every `interval` iterations."""
        if iteration % self.interval:
            return None
        return self.report(iteration)

    def report(self, iteration: int) -> dict:
        num_lang = len(self.languages)
        device = _device()
        lm = self.lm_sums if self.lm_sums is not None else torch.zeros(2, num_lang, dtype=torch.float64, device=device)
        probe_sums = self.probe.sums
        if probe_sums is None:
            probe_sums = torch.zeros(3, self.num_layers, max(num_lang, SUMS_MIN_WIDTH), dtype=torch.float64, device=device)
        flat = torch.cat([lm.reshape(-1).to(device), probe_sums.reshape(-1).to(device)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat)
        lm = flat[: 2 * num_lang].reshape(2, num_lang).cpu()
        probe = flat[2 * num_lang:].reshape(3, self.num_layers, -1).cpu()
        self.lm_sums = None
        self.probe.reset()
        record = {"iteration": iteration, "stage": self.stage, "lm_loss": {}, "tokens": {}, "expert0_prob": {}}
        for i, lang in enumerate(self.languages):
            tokens = float(lm[1, i])
            record["tokens"][lang] = int(tokens)
            record["lm_loss"][lang] = float(lm[0, i] / tokens) if tokens > 0 else None
            counts = probe[1, :, i]
            record["expert0_prob"][lang] = [float(probe[0, layer, i] / counts[layer]) if counts[layer] > 0 else None
                                            for layer in range(self.num_layers)]
        if probe[2, :, 1].sum() > 0:
            # Mean over (MoE layer, micro-batch) terms, and per layer: each pipeline stage adds its own layers' terms.
            record["lpr_loss_per_layer"] = float(probe[2, :, 0].sum() / probe[2, :, 1].sum())
            record["lpr_loss_by_layer"] = [float(probe[2, layer, 0] / probe[2, layer, 1]) if probe[2, layer, 1] > 0
                                           else None for layer in range(self.num_layers)]
        if probe[2, 0, 2] > 0 and probe[2, 0, 3] > 0:
            # What the router losses add to the objective per micro-batch (γ · L_lpr + coeff · L_alloc, layer-averaged).
            record["router_loss"] = float(probe[2, 0, 2] / probe[2, 0, 3])
        if _rank() == 0:
            self._write(record)
            print(self.progress_line(record), flush=True)
        return record

    def progress_line(self, record: dict, now: float | None = None) -> str:
        """One line: iteration, tokens/s since the last line, elapsed, ETA, per-language LM loss and expert-0 share."""
        now = time.time() if now is None else now
        it = record["iteration"]
        total = f"/{self.train_iters}" if self.train_iters else ""
        parts = [f"deltamoe stage {self.stage}", f"iteration {it}{total}"]
        if self._last is not None and self.tokens_per_iteration and now > self._last[1] and it > self._last[0]:
            parts.append(f"{self.tokens_per_iteration * (it - self._last[0]) / (now - self._last[1]):,.0f} tokens/s")
        if self.started is not None:
            done, elapsed = it - self.started[0], now - self.started[1]
            parts.append(f"elapsed {_clock(elapsed)}")
            if self.train_iters and done > 0:
                parts.append(f"ETA {_clock(max(0, self.train_iters - it) * elapsed / done)}")
        self._last = (it, now)
        seen = [lang for lang in self.languages if record["tokens"].get(lang)]
        if seen:
            parts.append("lm loss " + " ".join(f"{lang} {record['lm_loss'][lang]:.3f}" for lang in seen))
            shares = {lang: [v for v in record["expert0_prob"][lang] if v is not None] for lang in seen}
            if all(shares.values()):
                parts.append("p(expert 0) " + " ".join(f"{lang} {sum(v) / len(v):.2f}" for lang, v in shares.items()))
        if "lpr_loss_per_layer" in record:
            parts.append(f"lpr loss {record['lpr_loss_per_layer']:.4f}")
        return " | ".join(parts)

    def _write(self, record: dict) -> None:
        if self.log_file:
            path = Path(self.log_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        writer = _tensorboard_writer()
        if writer is None:
            return
        it = record["iteration"]
        for lang, value in record["lm_loss"].items():
            if value is not None:
                writer.add_scalar(f"deltamoe/lm_loss/{lang}", value, it)
        for lang, layers in record["expert0_prob"].items():
            values = [v for v in layers if v is not None]
            for layer, value in enumerate(layers):
                if value is not None:
                    writer.add_scalar(f"deltamoe/expert0_prob/{lang}/layer{layer}", value, it)
            if values:
                writer.add_scalar(f"deltamoe/expert0_prob/{lang}/mean", sum(values) / len(values), it)
        for key in ("lpr_loss_per_layer", "router_loss"):
            if key in record:
                writer.add_scalar(f"deltamoe/{key}", record[key], it)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _tensorboard_writer():
    try:
        from megatron.training.global_vars import get_tensorboard_writer

        return get_tensorboard_writer()
    except Exception:  # no trainer globals (unit tests) or tensorboard absent
        return None
