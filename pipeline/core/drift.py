"""Score-distribution statistics for monitoring production traffic: histogram, PSI, KS, and which
clips are least certain (closest to the threshold). Scores live in [0, 1]."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-4   # floor of a bin's share, so an empty bin does not make PSI infinite


def histogram(scores: Sequence[float], bins: int = 10) -> tuple[list[int], list[float]]:
    """(counts, edges) of scores on `bins` equal-width bins over [0, 1] (1.0 falls in the last bin)."""
    counts, edges = np.histogram(np.clip(np.asarray(scores, float), 0, 1), bins=bins, range=(0.0, 1.0))
    return counts.tolist(), edges.round(6).tolist()


def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> float:
    """Population stability index of `current` against `reference` on fixed [0, 1] bins:
    sum((c - r) * ln(c / r)) over bin shares. ~0: same; 0.1-0.2: moderate shift; > 0.2: large shift."""
    if len(reference) == 0 or len(current) == 0:
        raise ValueError("psi needs at least one reference and one current score")
    r = np.maximum(np.asarray(histogram(reference, bins)[0], float) / len(reference), EPS)
    c = np.maximum(np.asarray(histogram(current, bins)[0], float) / len(current), EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def ks_statistic(reference: Sequence[float], current: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs (0..1)."""
    a, b = np.sort(np.asarray(reference, float)), np.sort(np.asarray(current, float))
    if len(a) == 0 or len(b) == 0:
        raise ValueError("ks_statistic needs at least one reference and one current score")
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def least_certain(scores: Sequence[float], threshold: float, k: int) -> list[int]:
    """Indices of the k scores closest to the decision threshold, closest first (ties: input order)."""
    distance = np.abs(np.asarray(scores, float) - threshold)
    return [int(i) for i in np.argsort(distance, kind="stable")[:max(k, 0)]]


def judge(scores: Sequence[float], reference: Sequence[float] | None, metric: str, limit: float,
          min_clips: int, bins: int = 10) -> dict:
    """Drift verdict of `scores` against `reference`: PSI and KS, flagged when `metric` exceeds `limit`.
    Without reference scores, or with fewer than `min_clips` scores, nothing is flagged and the status says why."""
    out = {"metric": metric, "threshold": limit, "n": len(scores), "n_reference": len(reference or []),
           "psi": None, "ks": None, "value": None, "flagged": None}
    if not reference:
        return out | {"status": "no reference"}
    if len(scores) < min_clips:
        return out | {"status": f"too few clips ({len(scores)} < min_clips {min_clips})"}
    out["psi"] = round(psi(reference, scores, bins), 4)
    out["ks"] = round(ks_statistic(reference, scores), 4)
    out["value"] = out[metric]
    out["flagged"] = out["value"] > limit
    return out | {"status": "drift" if out["flagged"] else "no drift"}
