"""How much a bits-per-byte number can move with the examples: percentile bootstrap intervals over examples.

Bits per byte is a corpus-level ratio, -Σ log₂ p / Σ bytes, so each resample draws n examples with replacement and
recomputes the ratio (not a mean of per-example ratios). A difference between two models on the same examples is
bootstrapped *paired*: both models' sums use the same drawn examples, which removes the (large) spread between easy
and hard examples from the difference (Efron & Tibshirani 1993, ch. 13; Koehn 2004 for the paired form in MT).
The generator is numpy's PCG64 with a fixed seed, so a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from deltamoe.common.errors import DeltaMoEError

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if n < 1:
        raise DeltaMoEError("bootstrap: no examples")
    if resamples < 1:
        raise DeltaMoEError(f"bootstrap: resamples must be positive, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise DeltaMoEError(f"bootstrap: level must be in (0, 1), got {level}")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float], *, resamples: int = RESAMPLES,
                   seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of Σ numerators / Σ denominators over examples drawn with replacement."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape:
        raise DeltaMoEError(f"bootstrap: {num.size} numerators for {den.size} denominators")
    idx = _indices(num.size, resamples, seed)
    return _percentiles(num[idx].sum(axis=1) / den[idx].sum(axis=1), level)


def paired_difference_interval(numerators_a: Sequence[float], denominators_a: Sequence[float],
                               numerators_b: Sequence[float], denominators_b: Sequence[float], *,
                               resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of ratio(b) − ratio(a), both computed on the same drawn examples (paired by position)."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (numerators_a, denominators_a, numerators_b, denominators_b)]
    if len({a.size for a in arrays}) != 1:
        raise DeltaMoEError(f"bootstrap: paired samples differ in size ({', '.join(str(a.size) for a in arrays)})")
    na, da, nb, db = arrays
    idx = _indices(na.size, resamples, seed)
    return _percentiles(nb[idx].sum(axis=1) / db[idx].sum(axis=1) - na[idx].sum(axis=1) / da[idx].sum(axis=1), level)


def bits_per_byte_samples(samples: list[dict]) -> tuple[list[float], list[float]]:
    """(bits, bytes) per example from a task's samples: perplexity records `logprob`, qa_loglik `loglik` (nats)."""
    bits, sizes = [], []
    for s in samples:
        logprob = s.get("logprob", s.get("loglik"))
        if logprob is None or "bytes" not in s:
            raise DeltaMoEError(f"bootstrap: sample {s.get('line')} has no log-likelihood and bytes")
        bits.append(-logprob / math.log(2))
        sizes.append(s["bytes"])
    return bits, sizes


def interval_record(samples: list[dict]) -> dict:
    """The bits-per-byte interval stored in a task result's details."""
    bits, sizes = bits_per_byte_samples(samples)
    lo, hi = ratio_interval(bits, sizes)
    return {"metric": "bits_per_byte", "n": len(bits), "resamples": RESAMPLES, "seed": SEED, "level": LEVEL,
            "interval": [lo, hi]}
