"""Judging a model on labelled clips: overall metrics, and per-generator and per-source tables."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from pipeline.core.data import Clip
from pipeline.core.metrics import summarize
from pipeline.core.model import AI_LABEL


def check_aligned(clips: list[Clip], scores: list[float]) -> None:
    """Scores must line up one-to-one with clips (joined by position, checked by length)."""
    if len(clips) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(clips)} clips: they do not line up")


def evaluate(clips: list[Clip], scores: list[float], threshold: float) -> dict:
    """Overall summary, per-generator table (each generator's AI clips against all human clips) and
    per-source table (each source's own clips: FPR for human sources, recall for AI ones)."""
    check_aligned(clips, scores)
    s = np.asarray(scores, float)
    y = np.array([c.label for c in clips])
    human = y != AI_LABEL
    by_gen, by_src = defaultdict(list), defaultdict(list)
    for i, c in enumerate(clips):
        by_src[c.source].append(i)
        if c.label == AI_LABEL:
            by_gen[c.generator].append(i)
    per_generator = {g: summarize(np.r_[s[idx], s[human]], np.r_[y[idx], y[human]], threshold)
                     for g, idx in sorted(by_gen.items())}
    per_source = {src: summarize(s[idx], y[idx], threshold) for src, idx in sorted(by_src.items())}
    return {"threshold": threshold, "overall": summarize(s, y, threshold),
            "per_generator": per_generator, "per_source": per_source}


SOURCE_COLUMNS = ("n", "eer", "auc", "fpr", "recall")
GENERATOR_COLUMNS = ("n_ai", "eer", "auc", "recall")


def format_table(rows: dict[str, dict], columns: tuple[str, ...] = SOURCE_COLUMNS) -> str:
    """Plain-text table of metric rows (NaN shown as '-')."""
    width = max([len(k) for k in rows] + [8])
    lines = [f"{'':<{width}}  " + "  ".join(f"{c:>7}" for c in columns)]
    for name, row in rows.items():
        cells = []
        for c in columns:
            v = row.get(c, float("nan"))
            cells.append(f"{v:>7d}" if isinstance(v, int) else ("      -" if v != v else f"{v:>7.3f}"))
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
