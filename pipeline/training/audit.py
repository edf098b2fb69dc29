"""Shortcut audit: how well do recording-chain features alone tell the labels apart?

Per clip, only what the chain leaves (no voice): native sample rate, the band holding 95 % / 99 % of
the energy, leading and trailing silence, level (RMS, peak), noise floor, duration, and the file's
codec. A logistic regression on those is trained and scored under the same leave-sources-out folds
as the model. If it reaches a low EER, a model can too without learning anything about synthesis:
the corpus needs matched twins, channel augmentation or more sources, and the features that carry
the label are named.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.core.audio import AudioError, load_native, voiced_region
from pipeline.core.data import Clip, check_two_classes, read_corpus, source_groups
from pipeline.core.metrics import compute_eer
from pipeline.progress import progress
from pipeline.training.lso import source_folds

log = logging.getLogger(__name__)

WARN_BELOW_EER = 0.35
NUMERIC = ("sample_rate_khz", "band95_khz", "band99_khz", "lead_silence_s", "trail_silence_s", "rms_db", "peak_db",
           "noise_floor_db", "duration_s")


def chain_features(path: Path) -> dict[str, float | str]:
    """The recording-chain description of one file (AudioError when it cannot be decoded)."""
    info = sf.info(str(path))
    x = load_native(path, info.samplerate)
    sr = info.samplerate
    spec = np.abs(np.fft.rfft(x[:sr * 30])) ** 2
    cum = np.cumsum(spec) / max(spec.sum(), 1e-20)
    freqs = np.fft.rfftfreq(min(len(x), sr * 30), 1 / sr)
    start, end = voiced_region(x, sr, 40.0)
    frame = max(1, sr // 50)
    n = max(len(x) // frame, 1)
    frames = np.sqrt(np.mean(np.square(x[:n * frame].reshape(n, -1), dtype=np.float64), axis=1)) + 1e-10
    db = lambda v: float(20 * np.log10(max(v, 1e-10)))
    return {
        "sample_rate_khz": sr / 1000, "band95_khz": float(freqs[np.searchsorted(cum, 0.95)]) / 1000,
        "band99_khz": float(freqs[min(np.searchsorted(cum, 0.99), len(freqs) - 1)]) / 1000,
        "lead_silence_s": start / sr, "trail_silence_s": (len(x) - end) / sr,
        "rms_db": db(np.sqrt(np.mean(x ** 2))), "peak_db": db(np.abs(x).max()),
        "noise_floor_db": db(np.percentile(frames, 10)) - db(frames.max()), "duration_s": len(x) / sr,
        "codec": f"{info.format}/{info.subtype}",
    }


def _matrix(rows: list[dict], codecs: list[str]) -> np.ndarray:
    return np.array([[r[k] for k in NUMERIC] + [float(r["codec"] == c) for c in codecs] for r in rows])


def audit_corpus(corpus: str | Path, k: int = 4, seed: int = 0, linked: list[list[str]] | tuple = ()) -> dict:
    """Leave-sources-out EER of a chain-features-only classifier, with the features that carry the label."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clips: list[Clip] = [c for c in read_corpus(corpus) if not c.twin_of]
    check_two_classes(clips, f"corpus {corpus}")
    rows, kept = [], []
    for c in progress(clips, desc="chain features", unit="clip"):
        try:
            rows.append(chain_features(c.path))
            kept.append(c)
        except (AudioError, sf.LibsndfileError, RuntimeError) as err:
            log.warning("audit: skipped %s", err)
    codecs = sorted({r["codec"] for r in rows})
    x, y = _matrix(rows, codecs), np.array([c.label for c in kept])
    names = list(NUMERIC) + [f"codec={c}" for c in codecs]
    folds = source_folds(kept, k, seed, source_groups(linked))
    scores, weights = np.zeros(len(kept)), defaultdict(list)
    for sources in folds:
        test = np.array([c.source in set(sources) for c in kept])
        if len(set(y[~test].tolist())) < 2:
            scores[test] = 0.5
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0)).fit(x[~test], y[~test])
        scores[test] = model.predict_proba(x[test])[:, 1]
        for name, w in zip(names, model[-1].coef_[0]):
            weights[name].append(float(w))
    eer = compute_eer(scores, y)[0]
    ranked = sorted(((float(np.mean(w)), n) for n, w in weights.items()), key=lambda t: -abs(t[0]))
    by_label = {f: {lab: float(np.median([r[f] for r, c in zip(rows, kept) if c.label == i]))
                    for i, lab in ((0, "human"), (1, "ai"))} for f in NUMERIC}
    top = [{"feature": n, "weight": w, "sign": "AI" if w > 0 else "human"} for w, n in ranked[:6]]
    warning = None
    if eer < WARN_BELOW_EER:
        warning = (f"chain features alone separate the labels (leave-sources-out EER {eer:.3f} < {WARN_BELOW_EER}); "
                   "strongest: " + ", ".join(f"{t['feature']} ({'+' if t['weight'] > 0 else '-'}AI)" for t in top[:4]))
        log.warning("shortcut audit: %s", warning)
    return {"corpus": str(corpus), "k": len(folds), "n_clips": len(kept), "eer": eer, "warning": warning,
            "top_features": top, "medians": by_label, "codecs": codecs}
