"""Detection metrics on clip scores. Label 1 = AI (pipeline.core.model.AI_LABEL), 0 = human.

All functions take 1-D arrays of scores in [0, 1] and of labels in {0, 1}; a clip is called AI
when its score >= threshold.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import det_curve, roc_auc_score, roc_curve


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
    if y.min() == y.max():  # one class: the rates of the absent class stay 0
        thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
        hit = np.array([(s >= t).mean() for t in thresholds])
        zero = np.zeros(len(thresholds))
        return (zero, hit, thresholds) if y[0] == 1 else (hit, zero, thresholds)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr


def det_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, fnr, thresholds) of the DET curve, thresholds ascending (scikit-learn's `det_curve`): only
    the points between the last with no miss and the first with no false alarm, where the curve says
    something; both classes needed."""
    s, y = _check(scores, labels)
    if y.min() == y.max():
        raise ValueError("a DET curve needs both human and AI clips")
    fpr, fnr, thr = det_curve(y, s)
    return fpr, fnr, thr


def compute_eer(scores, labels) -> tuple[float, float]:
    """Equal error rate, interpolated where the false-positive and false-negative rates cross between
    two DET points, and the threshold of the point nearest the crossing (at most 1.0)."""
    s, y = _check(scores, labels)
    if y.min() == y.max():
        raise ValueError("EER needs both human and AI clips")
    fpr, fnr, thr = det_points(s, y)
    diff = fnr - fpr   # rises along the curve: <= 0 at its first point (no miss), >= 0 at its last
    i = int(np.argmax(diff >= 0))   # first point at or past the crossing
    if diff[i] == 0 or i == 0:
        eer = fpr[i]
    else:
        t = -diff[i - 1] / (diff[i] - diff[i - 1])
        eer = fpr[i - 1] + t * (fpr[i] - fpr[i - 1])
    j = i if i == 0 or abs(diff[i]) < abs(diff[i - 1]) else i - 1   # a tie: the lower threshold
    return float(eer), float(min(thr[j], 1.0))


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (probability that an AI clip outscores a human one; ties count half)."""
    s, y = _check(scores, labels)
    if y.min() == y.max():
        raise ValueError("AUC needs both human and AI clips")
    return float(roc_auc_score(y, s))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a rate k/n; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def best_end(n: int, upper: bool, z: float = 1.96) -> float:
    """The 95 % Wilson end a gate reads at the best count of n trials: the upper end of none (a rate gated
    on its upper end, as a human FPR) or the lower end of all (on its lower end, as a recall)."""
    return wilson(0, n, z)[1] if upper else wilson(n, n, z)[0]


def least_trials(limit: float, upper: bool, z: float = 1.96) -> int | None:
    """The fewest trials whose best count's 95 % Wilson end (best_end) is within the limit: with fewer, a
    gate on that end can never pass. None when no number of trials can (a limit of 0 or 1)."""
    if not 0 < limit < 1:
        return None
    n = max(1, math.ceil(z * z * ((1 - limit) / limit if upper else limit / (1 - limit))) - 1)
    while (best_end(n, upper, z) > limit) if upper else (best_end(n, upper, z) < limit):
        n += 1
    return n


def rate(k: int, n: int) -> dict:
    """A rate with its count and 95 % Wilson interval: {"value", "k", "n", "low", "high"}."""
    lo, hi = wilson(k, n)
    return {"value": k / n if n else float("nan"), "k": int(k), "n": int(n), "low": lo, "high": hi}


EARLIER_GATE = "earlier_ai_recall_vs_production"   # the validate gates on recall of earlier AI, one per human FPR


def at_fpr(fpr: float) -> str:
    """How a figure read at one human FPR is named, in the metrics and in the gates: 0.01 -> "at_1pct_fpr"."""
    return f"at_{fpr * 100:g}pct_fpr"


def recall_at_fpr(scores, labels, target_fpr: float) -> float:
    """Recall on the AI clips at the threshold that lets at most target_fpr of these humans through:
    the operating point that puts two models on the same footing."""
    s, y = _check(scores, labels)
    if y.min() == y.max():
        return float("nan")
    return float((s[y == 1] >= threshold_at_fpr(s[y == 0], target_fpr)).mean())


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
    """A threshold whose false-positive rate on these human scores is <= target_fpr, interpolated:
    halfway between the highest human score it must let through and the next one (just above the top
    human score when none may pass; then the estimate needs about 1/target_fpr humans to mean much)."""
    h = np.sort(np.asarray(human_scores, float))[::-1]
    if len(h) == 0:
        raise ValueError("threshold calibration needs human clips")
    allowed = int(np.floor(target_fpr * len(h)))  # humans that may score at or above the threshold
    if allowed >= len(h):
        return 0.0
    if allowed == 0 or h[allowed - 1] == h[allowed]:
        return float(np.nextafter(h[allowed], np.inf))  # may exceed 1.0: then nothing is called AI
    return float((h[allowed - 1] + h[allowed]) / 2)


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
