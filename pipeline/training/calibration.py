"""The served threshold: calibrated on held-out humans to a target false-positive rate, with the
evidence it rests on (how many humans, from how many sources, the interval of the rate it achieves),
and an out-of-sample estimate of the human FPR that calibration gives (`crossfit_fpr`)."""
from __future__ import annotations

import logging

import numpy as np

from pipeline.config import CalibrationConfig
from pipeline.core.data import Clip, group_key, speaker_parts
from pipeline.core.metrics import rate, threshold_at_fpr

log = logging.getLogger(__name__)


def calibrate(human_scores: list[float], cfg: CalibrationConfig, sources: set[str] | None = None) -> dict:
    """Threshold with at most cfg.target_fpr of these humans at or above it (interpolated between two
    human scores), the FPR it gives on them with its 95 % interval, and warnings when the humans are too
    few for the target (fewer than cfg.min_humans, or fewer than 1/target_fpr so no human may pass)."""
    h = np.asarray(human_scores, float)
    threshold = threshold_at_fpr(h, cfg.target_fpr)
    warnings = []
    if len(h) < cfg.min_humans:
        warnings.append(f"calibrated on {len(h)} humans, fewer than calibration.min_humans {cfg.min_humans}")
    if cfg.target_fpr > 0 and len(h) * cfg.target_fpr < 1:
        warnings.append(f"{len(h)} humans cannot resolve a {cfg.target_fpr:.1%} FPR (need >= {int(np.ceil(1 / cfg.target_fpr))}):"
                        " the threshold sits just above the highest human score")
    for w in warnings:
        log.warning("threshold calibration: %s", w)
    return {"threshold": float(threshold), "target_fpr": cfg.target_fpr, "n_humans": int(len(h)),
            "n_sources": len(sources) if sources is not None else None,
            "fpr": rate(int((h >= threshold).sum()), len(h)), "warnings": warnings}


def crossfit_fpr(clips: list[Clip], scores: list[float], target_fpr: float, folds: int, seed: int) -> dict:
    """The human FPR of this calibration, measured on humans it did not see: the humans are split by
    speaker into `folds` parts (fewer, down to 2, when the speakers cannot fill that many), and each
    part is judged at the threshold calibrated (to target_fpr) on the other parts. Every human is judged
    once, by a threshold it took no part in. The served threshold, calibrated on all of them, rests on
    more humans than each fold's, so this errs on the pessimistic side, less so with more folds: with 2,
    each threshold sits on half the humans and the estimate swings with the split (docs/benchmarks.md 6k)."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs >= 2 folds, got {folds}")
    by_clip = {id(c): s for c, s in zip(clips, scores)}
    for k in range(folds, 1, -1):
        parts = speaker_parts(clips, (1 / k,) * (k - 1), seed)
        if len({tuple(map(id, p)) for p in parts}) == k:
            break
    else:
        raise ValueError(f"{len(clips)} test humans of {len({group_key(c, 'speaker') for c in clips})} speaker(s) "
                         "cannot be split by speaker into 2 parts")
    rows, flagged_all = [], 0
    for i, part in enumerate(parts):
        rest = [by_clip[id(c)] for j, other in enumerate(parts) if j != i for c in other]
        thr = threshold_at_fpr(rest, target_fpr)
        flagged = int(sum(by_clip[id(c)] >= thr for c in part))
        flagged_all += flagged
        rows.append({"n": len(part), "flagged": flagged, "threshold": float(thr), "calibrated_on": len(rest)})
    return rate(flagged_all, len(clips)) | {"folds": len(parts), "folds_asked": folds, "per_fold": rows}
