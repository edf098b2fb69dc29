"""Leave-sources-out evaluation: how a base model made by the bootstrap recipe does on recording chains
and generators it has never heard.

Sources (linked ones together) are dealt into K folds; for each fold a model is trained with the
bootstrap recipe on the other folds (its checkpoint chosen and its threshold calibrated on a
source-disjoint part of those) and scores the fold's real clips (twins are training data only).
Reported, per training seed and with 95 % bootstrap intervals:
- pooled EER over all held-out clips (scores of K models), and the mean per-fold EER;
- the within-source EER of matched-pair sources (human and AI from the same page and chain,
  averaged over those sources): the number the recording chain cannot fake; and the same weighted by
  clips over the sources with at least 6 clips of each label (tiny sources swing the plain mean);
- per source: clips, within-source EER, human FPR / AI recall at the fold model's calibrated threshold;
- per generator: its AI clips against the humans of its fold.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.config import Params
from pipeline.core.data import Clip, CorpusError, LoadedClip, check_two_classes, load_clips, read_corpus, source_groups
from pipeline.core.metrics import compute_eer, rates_at
from pipeline.core.model import save_checkpoint
from pipeline.progress import progress
from pipeline.synthesis.twins import with_twins
from pipeline.training.calibration import calibrate
from pipeline.training.train import selected_val_eer, split_for_training, train_model, validation_scores

log = logging.getLogger(__name__)

N_BOOTSTRAP = 1000
MIN_PER_LABEL = 6   # a matched-pair source counts in the clip-weighted figure with this many clips of each label


def source_folds(clips: list[Clip], k: int, seed: int, linked: dict[str, str]) -> list[list[str]]:
    """Whole sources (linked ones merged) into k folds, balancing human and AI clip counts separately.

    Sources holding both labels are placed first (largest first, seeded order among equals), so every
    fold gets some where possible; each unit goes to the fold whose normalised loads stay most even."""
    units: dict[str, list[str]] = defaultdict(list)
    for src in sorted({c.source for c in clips}):
        units[linked.get(src, src)].append(src)
    if len(units) < 2:
        raise CorpusError(f"leave-sources-out needs at least 2 sources (linked sources count as one); found "
                          f"{len(units)}: {', '.join(units) or 'none'}")
    k = min(k, len(units))
    counts = {u: np.zeros(2) for u in units}
    for c in clips:
        counts[linked.get(c.source, c.source)][c.label] += 1
    totals = np.maximum(sum(counts.values()), 1)
    rng = np.random.default_rng(seed)
    order = list(units)
    rng.shuffle(order)
    order.sort(key=lambda u: (-int((counts[u] > 0).all()), -counts[u].sum()))  # stable: seeded among ties
    loads = [np.zeros(2) for _ in range(k)]
    folds: list[list[str]] = [[] for _ in range(k)]
    for u in order:
        cost = [float((((loads[i] + counts[u]) / totals) ** 2).sum() - ((loads[i] / totals) ** 2).sum()) for i in range(k)]
        best = int(np.argmin(cost))
        loads[best] += counts[u]
        folds[best].extend(units[u])
    return [sorted(f) for f in folds if f]


def _eer(scores: np.ndarray, labels: np.ndarray) -> float:
    return compute_eer(scores, labels)[0] if 0 < labels.sum() < len(labels) else float("nan")


def bootstrap_ci(stat, groups: list[np.ndarray], rng: np.random.Generator, n: int = N_BOOTSTRAP) -> tuple[float, float]:
    """95 % percentile interval of stat(indices) when each group of indices is resampled with replacement."""
    values = []
    for _ in range(n):
        idx = np.concatenate([g[rng.integers(len(g), size=len(g))] for g in groups if len(g)])
        v = stat(idx)
        if v == v:
            values.append(v)
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if values else (float("nan"),) * 2


def matched_pair_sources(clips: list[Clip]) -> list[str]:
    """Sources holding both human and AI clips (same page, same chain)."""
    labels = defaultdict(set)
    for c in clips:
        labels[c.source].add(c.label)
    return sorted(s for s, ls in labels.items() if ls == {0, 1})


def summarise_seed(clips: list[Clip], scores: np.ndarray, folds: np.ndarray, thresholds: np.ndarray, seed: int) -> dict:
    """Pooled, per-fold, matched-pair, per-source and per-generator figures of one seed's held-out scores."""
    y = np.array([c.label for c in clips])
    src = np.array([c.source for c in clips])
    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(y == 0), np.flatnonzero(y == 1)]
    pooled = _eer(scores, y)
    fold_eers = [_eer(scores[folds == f], y[folds == f]) for f in sorted(set(folds.tolist()))]
    matched = matched_pair_sources(clips)
    in_source = {s: np.flatnonzero(src == s) for s in matched}
    matched_eer = lambda idx: float(np.nanmean([_eer(scores[i], y[i]) for i in _split_by(idx, src, matched)])) \
        if matched else float("nan")
    per_source = []
    for s in sorted(set(src.tolist())):
        i = np.flatnonzero(src == s)
        at = rates_at(scores[i], y[i], float(thresholds[i[0]]))
        per_source.append({"source": s, "fold": int(folds[i[0]]), "n_human": int((y[i] == 0).sum()),
                           "n_ai": int((y[i] == 1).sum()), "eer_in_source": _eer(scores[i], y[i]),
                           "fpr": at["fpr"], "recall": at["recall"], "threshold": float(thresholds[i[0]]),
                           "mean_score": float(scores[i].mean())})
    per_generator = []
    for g in sorted({c.generator for c in clips if c.label == 1}):
        ai = np.array([c.generator == g and c.label == 1 for c in clips])
        fold = folds[ai][0]
        humans = (y == 0) & (folds == fold)
        idx = np.flatnonzero(ai | humans)
        per_generator.append({"generator": g, "fold": int(fold), "n_ai": int(ai.sum()), "eer_vs_fold_humans":
                              _eer(scores[idx], y[idx]), "recall": float((scores[ai] >= thresholds[ai]).mean())})
    sizable = [r for r in per_source if r["n_human"] >= MIN_PER_LABEL and r["n_ai"] >= MIN_PER_LABEL]
    weighted = float(np.average([r["eer_in_source"] for r in sizable], weights=[r["n_human"] + r["n_ai"] for r in sizable])) \
        if sizable else float("nan")
    return {
        "seed": seed, "pooled_eer": pooled, "matched_pair_eer_weighted": weighted,
        "matched_pair_sources_weighted": [r["source"] for r in sizable], "pooled_eer_ci": bootstrap_ci(lambda i: _eer(scores[i], y[i]), by_label, rng),
        "fold_eers": fold_eers, "mean_fold_eer": float(np.nanmean(fold_eers)),
        "matched_pair_eer": matched_eer(np.arange(len(y))),
        "matched_pair_eer_ci": bootstrap_ci(matched_eer, [in_source[s][y[in_source[s]] == lab] for s in matched
                                                          for lab in (0, 1)], rng) if matched else (float("nan"),) * 2,
        "matched_pair_sources": matched,
        "human_fpr_at_threshold": float(np.mean(scores[y == 0] >= thresholds[y == 0])),
        "ai_recall_at_threshold": float(np.mean(scores[y == 1] >= thresholds[y == 1])),
        "per_source": per_source, "per_generator": per_generator,
    }


def _split_by(idx: np.ndarray, src: np.ndarray, sources: list[str]) -> list[np.ndarray]:
    return [idx[src[idx] == s] for s in sources]


def leave_sources_out(corpus: str | Path, params: Params, k: int, seeds: int = 1, twins: str | Path | None = None,
                      on_fold=None, keep_models: str | Path | None = None, fold_seed: int | None = None) -> dict:
    """Train K fold models per seed with the bootstrap recipe and score each fold's held-out sources.
    `on_fold(result)` is called after each training (MLflow child runs); with `keep_models` each fold
    model is saved there as seed<s>_fold<f>.pt (its held-out sources in its notes), e.g. as the bases of
    a leave-one-generator-out few-shot benchmark. The folds are drawn with `fold_seed` (default
    train.seed), so training seeds run as separate jobs can share one set of folds."""
    started = time.time()
    cfg = params.train
    linked = source_groups(cfg.linked_sources)
    everything = with_twins(read_corpus(corpus), cfg.twins if twins is None else twins)
    real = [c for c in everything if not c.twin_of]
    check_two_classes(real, f"corpus {corpus}")
    folds = source_folds(real, k, cfg.seed if fold_seed is None else fold_seed, linked)
    cache: dict[Path, LoadedClip] = {it.clip.path: it for it in load_clips(everything, params)}
    per_seed, fold_runs = [], []
    bar = progress(total=seeds * len(folds), desc="evaluate", unit="fold", leave=True)
    for s in range(seeds):
        p = params.model_copy(update={"train": cfg.model_copy(update={"seed": cfg.seed + s})})
        held_clips, held_scores, held_folds, held_thr = [], [], [], []
        for f, sources in enumerate(folds):
            held = set(sources)
            train_clips = [c for c in everything if c.source not in held and c.split != "test"]
            test = [cache[c.path] for c in real if c.source in held and c.path in cache]
            tr, va, split_by = split_for_training(train_clips, p)
            train_items = [cache[c.path] for c in tr if c.path in cache]
            val_items = [cache[c.path] for c in va if c.path in cache]
            t0 = time.time()
            model, history = train_model(train_items, val_items, p)
            val_scores = validation_scores(model, val_items, p, "cpu")
            cal = calibrate([v for v, it in zip(val_scores, val_items) if it.clip.label == 0], params.calibration,
                            {it.clip.source for it in val_items if it.clip.label == 0})
            scores = np.array(validation_scores(model, test, p, "cpu"))
            labels = np.array([it.clip.label for it in test])
            result = {"seed": s, "fold": f, "held_out": sources, "split_by": split_by, "n_train": len(train_items),
                      "n_twins": sum(1 for it in train_items if it.clip.twin_of), "n_val": len(val_items),
                      "n_test": len(test), "front_end": model.meta.features["kind"], "eer": _eer(scores, labels),
                      "val_eer": selected_val_eer(history, p.train.select),
                      "epochs": len(history), "threshold": cal["threshold"], "calibration": cal,
                      "train_s": round(time.time() - t0, 1), "history": history}
            if keep_models:
                save_checkpoint(model, Path(keep_models) / f"seed{s}_fold{f}.pt", threshold=cal["threshold"],
                                notes={"held_out_sources": sources, "corpus": str(corpus), "calibration": cal})
            fold_runs.append(result)
            log.info("seed %d fold %d (%s): EER %.3f on %d held-out clips (%.0f s)", s, f, ", ".join(sources),
                     result["eer"], len(test), result["train_s"])
            bar.update()
            bar.set_postfix(eer=f"{result['eer']:.3f}")
            if on_fold:
                on_fold(result)
            held_clips += [it.clip for it in test]
            held_scores += scores.tolist()
            held_folds += [f] * len(test)
            held_thr += [cal["threshold"]] * len(test)
        summary = summarise_seed(held_clips, np.array(held_scores), np.array(held_folds), np.array(held_thr), cfg.seed + s)
        summary["scores"] = [{"path": str(c.path), "source": c.source, "generator": c.generator, "label": c.label_name,
                              "fold": fo, "ai_score": round(v, 6)} for c, v, fo in zip(held_clips, held_scores, held_folds)]
        per_seed.append(summary)
    bar.close()
    return {"corpus": str(corpus), "k": len(folds), "folds": folds, "seeds": seeds, "n_clips": len(real),
            "n_twins": len(everything) - len(real), "summary": _across_seeds(per_seed), "per_seed": per_seed,
            "fold_runs": fold_runs, "wall_s": round(time.time() - started, 1)}


def _across_seeds(per_seed: list[dict]) -> dict:
    out = {}
    for key in ("pooled_eer", "mean_fold_eer", "matched_pair_eer", "matched_pair_eer_weighted", "human_fpr_at_threshold",
                "ai_recall_at_threshold"):
        values = [r[key] for r in per_seed]
        out[key] = {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
                    "per_seed": values}
    return out
