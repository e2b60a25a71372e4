"""The study's statistics: 95 % bootstrap intervals over seeds and items together, paired per-item McNemar tests of
a method against the baseline on the same seed, and the take-off of a learning curve.

Outcomes are 0/1 matrices [seeds x items], one per evaluation set, the items in the same order for every run (the
evaluation writes them per item, `sugarcrepe.details.json`). A bootstrap replicate draws the seeds with
replacement and, independently, the items of each set with replacement, and takes the mean accuracy; the interval
is the 2.5 / 97.5 percentiles of 2,000 replicates. Both sources of variation are in it: which seeds were run
(where a take-off falls) and which scenes were drawn for the test set. A difference between two methods is
bootstrapped with the same draws for both (paired by seed index and by item).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPLICATES = 2000
LEVEL = 0.95


def _draws(seeds: int, sizes: Sequence[int], replicates: int, seed: int):
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, seeds, size=(replicates, seeds))
    item_draws = [rng.integers(0, n, size=(replicates, n)) for n in sizes]
    return seed_draws, item_draws


def _replicates(matrices: Sequence[np.ndarray], seed_draws, item_draws) -> np.ndarray:
    """Mean over the sets of each set's mean accuracy, per replicate [R]."""
    out = np.zeros(seed_draws.shape[0])
    for matrix, items in zip(matrices, item_draws):
        per_seed = np.take(matrix.astype(np.uint8), items, axis=1).mean(-1, dtype=np.float64)  # [S, R]
        out += per_seed[seed_draws, np.arange(seed_draws.shape[0])[:, None]].mean(1)
    return out / len(matrices)


def bootstrap_ci(matrices: Sequence[np.ndarray], baseline: Optional[Sequence[np.ndarray]] = None,
                 replicates: int = REPLICATES, seed: int = 0) -> Tuple[float, float, float]:
    """(estimate, low, high) of the mean accuracy over `matrices` (one [seeds, items] 0/1 array per set), or of
    its difference from `baseline` (the same sets, the same seeds in the same order) with paired draws."""
    seeds = matrices[0].shape[0]
    seed_draws, item_draws = _draws(seeds, [m.shape[1] for m in matrices], replicates, seed)
    values = _replicates(matrices, seed_draws, item_draws)
    estimate = float(np.mean([m.mean() for m in matrices]))
    if baseline is not None:
        if [b.shape for b in baseline] != [m.shape for m in matrices]:
            raise ValueError("a paired bootstrap needs the same seeds and items for both methods")
        values = values - _replicates(baseline, seed_draws, item_draws)
        estimate -= float(np.mean([b.mean() for b in baseline]))
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return estimate, float(low), float(high)


def seed_ci(values: Sequence[float], replicates: int = REPLICATES, seed: int = 0) -> Tuple[float, float, float]:
    """(mean, low, high): the bootstrap over seeds alone, for a score without per-item outcomes (retrieval R@1 of
    runs evaluated before the evaluation kept every query's rank)."""
    values = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(replicates, len(values)))
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values[draws].mean(1), [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def mcnemar(method: np.ndarray, baseline: np.ndarray) -> Dict[str, float]:
    """Exact two-sided McNemar test on paired 0/1 outcomes of one seed: b = items only `method` gets right, c =
    items only `baseline` gets right; p = P(|X - n/2| >= |b - n/2|) for X ~ Binomial(b + c, 1/2)."""
    method, baseline = np.asarray(method, dtype=bool), np.asarray(baseline, dtype=bool)
    b, c = int((method & ~baseline).sum()), int((~method & baseline).sum())
    return {"b": b, "c": c, "p": binomial_two_sided(min(b, c), b + c)}


def binomial_two_sided(k: int, n: int) -> float:
    """2 P(X <= k) for X ~ Binomial(n, 1/2), k <= n/2, capped at 1 (summed in log space: n may be thousands)."""
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, 2 * math.exp(top) * sum(math.exp(value - top) for value in logs))


def steps_to(curve: Sequence[Tuple[int, float]], threshold: float = 0.70) -> Optional[int]:
    """The first step at which a curve [(step, accuracy)] reaches `threshold`; None if it never does."""
    for step, value in sorted(curve):
        if value >= threshold:
            return step
    return None


def takeoff_share(steps: Sequence[Optional[int]], at: Sequence[int]) -> List[float]:
    """For each step N of `at`, the share of seeds whose curve had reached the threshold by step N."""
    return [sum(1 for s in steps if s is not None and s <= n) / len(steps) for n in at]
