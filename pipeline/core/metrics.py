"""Detection metrics on clip scores. Label 1 = AI (pipeline.core.model.AI_LABEL), 0 = human.

All functions take 1-D arrays of scores in [0, 1] and of labels in {0, 1}; a clip is called AI
when its score >= threshold.
"""
from __future__ import annotations

import numpy as np


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, float), np.asarray(labels, int)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-D and line up")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0 (human) or 1 (ai)")
    return s, y


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for every distinct threshold, thresholds descending; first point is (0, 0)."""
    s, y = _check(scores, labels)
    thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
    pos, neg = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    tpr = np.array([((s >= t) & (y == 1)).sum() / pos for t in thresholds])
    fpr = np.array([((s >= t) & (y == 0)).sum() / neg for t in thresholds])
    return fpr, tpr, thresholds


def compute_eer(scores, labels) -> tuple[float, float]:
    """Equal error rate and the threshold where false-positive and false-negative rates cross."""
    s, y = _check(scores, labels)
    if y.min() == y.max():
        raise ValueError("EER needs both human and AI clips")
    fpr, tpr, thr = roc_points(s, y)
    fnr = 1 - tpr
    i = int(np.argmin(np.abs(fnr - fpr)))
    # between two ROC points the rates cross: take the mean of the two errors at the closest point
    return float((fpr[i] + fnr[i]) / 2), float(min(thr[i], 1.0))


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (probability that an AI clip outscores a human one; ties count half)."""
    s, y = _check(scores, labels)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs both human and AI clips")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def rates_at(scores, labels, threshold: float) -> dict[str, float]:
    """Accuracy, false-positive rate on humans and false-negative rate on AI at a threshold.

    A rate is NaN when its class is absent.
    """
    s, y = _check(scores, labels)
    pred = s >= threshold
    n_h, n_ai = int((y == 0).sum()), int((y == 1).sum())
    return {
        "accuracy": float((pred == (y == 1)).mean()) if len(y) else float("nan"),
        "fpr": float(pred[y == 0].sum() / n_h) if n_h else float("nan"),
        "fnr": float((~pred[y == 1]).sum() / n_ai) if n_ai else float("nan"),
        "recall": float(pred[y == 1].sum() / n_ai) if n_ai else float("nan"),
    }


def threshold_at_fpr(human_scores, target_fpr: float) -> float:
    """Lowest threshold whose false-positive rate on these human scores is <= target_fpr."""
    h = np.sort(np.asarray(human_scores, float))[::-1]
    if len(h) == 0:
        raise ValueError("threshold calibration needs human clips")
    allowed = int(np.floor(target_fpr * len(h)))  # humans that may score at or above the threshold
    if allowed >= len(h):
        return 0.0
    # just above the (allowed+1)-th highest human score
    return float(np.nextafter(h[allowed], np.inf))  # may exceed 1.0: then nothing is called AI


def summarize(scores, labels, threshold: float) -> dict[str, float]:
    """EER, AUC and rates at the threshold; EER/AUC are NaN when one class is missing."""
    s, y = _check(scores, labels)
    out = {"n": int(len(y)), "n_human": int((y == 0).sum()), "n_ai": int((y == 1).sum())}
    if 0 < y.sum() < len(y):
        eer, eer_thr = compute_eer(s, y)
        out |= {"eer": eer, "eer_threshold": eer_thr, "auc": roc_auc(s, y)}
    else:
        out |= {"eer": float("nan"), "eer_threshold": float("nan"), "auc": float("nan")}
    return out | rates_at(s, y, threshold)
