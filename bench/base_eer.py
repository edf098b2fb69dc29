"""Base-model EER on a labelled corpus (default: the shared third-party corpus), two ways.

1. speaker-disjoint split (pipeline.core.data.split_by_speaker, train.val_fraction), trained exactly like
   `aivoice bootstrap` (pipeline.training.train.train_model; the best epoch is chosen on that same validation
   split, so this number is optimistic) -> overall EER/AUC, per-source and per-generator tables;
2. leave-sources-out: whole sources are grouped into K seeded folds (linked sources kept together);
   for each fold a model is trained on the other sources (checkpoint chosen on a speaker-disjoint
   split of the training sources only) and scores the held-out sources -> per-held-out-source
   EER/FPR/recall and the pooled EER over all folds.

Training uses params.yaml's `train` schedule and full width unless overridden (--epochs/--steps/
--batch/--width); each full-width training takes several minutes on 2 CPU cores. JSON (rewritten
after every training, so a partial run leaves its results) -> bench/results/base_eer.json;
the markdown tables are printed and written beside it.

    python bench/base_eer.py                               # full run, ~35-45 min on 2 busy cores
    python bench/base_eer.py --epochs 1 --steps 2 --width 8 --folds 2   # sanity check, ~2 min
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CORPUS, REPO, RESULTS, machine, md_table, peak_rss_mb, write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_params  # noqa: E402
from pipeline.core.data import Clip, read_corpus, split_by_source, split_by_speaker  # noqa: E402
from pipeline.training.evaluate import evaluate  # noqa: E402
from pipeline.core.metrics import summarize  # noqa: E402
from pipeline.training.train import load_clips, train_model, validation_scores  # noqa: E402

log = logging.getLogger("bench.base_eer")

# Sources that hold the same recording or the same talker and must sit in the same fold
# (corpus README "confounds"): JFK in whisper and whisper.cpp; Asterisk es-MX is the English
# Asterisk voice talent.
LINKED = {"whispercpp": "whisper", "asterisk_es": "debian_asterisk-core-sounds-en-wav"}


def make_folds(clips: list[Clip], k: int, seed: int) -> list[list[str]]:
    """Whole sources (linked ones merged) into k folds, balancing human and AI clip counts separately.

    Sources holding both labels are placed first (largest first, seeded order among equals), so every
    fold gets some where possible; each unit goes to the fold whose normalized loads stay most even."""
    units: dict[str, list[str]] = defaultdict(list)
    for src in sorted({c.source for c in clips}):
        units[LINKED.get(src, src)].append(src)
    counts = {u: np.zeros(2) for u in units}
    for c in clips:
        counts[LINKED.get(c.source, c.source)][c.label] += 1
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
    return [sorted(f) for f in folds]


def per_source_rows(clips: list[Clip], scores: np.ndarray, threshold: float) -> list[dict]:
    """One row per source: clips, EER within the source (both labels only), EER of the source's clips
    against the other class's clips scored by the same model (`eer_vs_rest`), FPR (humans), recall (AI)."""
    y = np.array([c.label for c in clips])
    rows = []
    for src in sorted({c.source for c in clips}):
        idx = np.array([c.source == src for c in clips])
        own = summarize(scores[idx], y[idx], threshold)
        labels = set(y[idx].tolist())
        vs_rest = own["eer"]
        if len(labels) == 1:
            other = (y != labels.pop()) & ~idx
            if other.any():
                vs_rest = summarize(np.r_[scores[idx], scores[other]], np.r_[y[idx], y[other]], threshold)["eer"]
        rows.append({"source": src, "n_human": own["n_human"], "n_ai": own["n_ai"], "eer_in_source": own["eer"],
                     "eer_vs_rest": vs_rest,
                     "fpr": own["fpr"], "recall": own["recall"], "mean_score": float(scores[idx].mean())})
    return rows


def train_and_score(train: list, val: list, test: list, params) -> tuple[np.ndarray, list[dict], float, float]:
    """Train on `train` (best epoch by EER on `val`), score `test`: (scores, history, threshold, seconds)."""
    started = time.time()
    model, history = train_model(train, val, params)
    scores = np.array(validation_scores(model, test, params, "cpu"), float)
    return scores, history, model.meta.threshold, time.time() - started

def _setup(r: dict) -> str:
    t = r["train"]
    return (f"width {r['base_width']}, {t['epochs']} epochs x {t['steps_per_epoch']} steps x batch {t['batch_size']}, "
            f"torch threads {r.get('threads', '?')}")


def render(results: list[dict]) -> str:
    """Markdown tables of one or more result files (e.g. a speaker-split run and a leave-sources-out run)."""
    md: list[str] = []
    for r in results:
        if "speaker_split" in r:
            sp = r["speaker_split"]
            m = sp["metrics"]
            o = m["overall"]
            n_val_src = len(sp["per_source"])
            md += [f"## Speaker-disjoint split ({_setup(r)}; {sp['n_train']} train / {sp['n_val']} validation clips; "
                   f"{len(sp['sources_on_both_sides'])} of {n_val_src} validation sources also in training)",
                   md_table([{"eer": o["eer"], "auc": o["auc"], "accuracy": o["accuracy"], "fpr@thr": o["fpr"],
                              "recall@thr": o["recall"], "threshold": m["threshold"], "epochs_run": len(sp["history"]),
                              "train_s": round(sp["train_s"])}]),
                   "", "Per source (validation clips; `eer_vs_rest`: a one-label source against all validation clips of the other label):",
                   md_table(sp["per_source"], ["source", "n_human", "n_ai", "eer_in_source", "eer_vs_rest", "fpr", "recall", "mean_score"]),
                   "", "Per generator (its AI clips vs all validation humans):",
                   md_table([{"generator": g} | v for g, v in m["per_generator"].items()], ["generator", "n_ai", "eer", "auc", "recall"]), ""]
        if "leave_sources_out" in r:
            lso = r["leave_sources_out"]
            p, rows = lso["pooled"], lso["folds"]
            md += [f"## Leave-sources-out ({_setup(r)}; {len(rows)} of {len(r['folds'])} folds run)",
                   md_table(rows, ["fold", "sources", "n_human", "n_ai", "eer", "auc", "fpr", "recall", "best_val_eer", "train_s"]),
                   "", f"Pooled over held-out folds (scores of {len(rows)} different models): EER {p['eer']:.3f}, "
                   f"AUC {p['auc']:.3f}, FPR {p['fpr']:.3f}, recall {p['recall']:.3f}; mean per-fold EER {lso['mean_fold_eer']:.3f}",
                   "", "Per held-out source (`eer_vs_rest`: a one-label source against the other label held out in its fold):",
                   md_table(sorted(lso["per_source"], key=lambda x: (x["fold"], x["source"])),
                            ["fold", "source", "n_human", "n_ai", "eer_in_source", "eer_vs_rest", "fpr", "recall", "mean_score"]),
                   "", "Pooled per generator (held out; its AI clips vs all held-out humans):",
                   md_table([{"generator": g} | v for g, v in lso["pooled_per_generator"].items()], ["generator", "n_ai", "eer", "auc", "recall"]), ""]
        if "wall_s" in r:
            md.append(f"wall {r['wall_s']:.0f} s, peak RSS {r.get('peak_rss_mb')} MB, decode {r.get('decode_s')} s; "
                      f"load average at start {r['machine']['loadavg'][0]:.1f}\n")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="corpus folder (MANIFEST.csv or human/ ai/)")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--epochs", type=int, help="override train.epochs")
    ap.add_argument("--steps", type=int, help="override train.steps_per_epoch")
    ap.add_argument("--batch", type=int, help="override train.batch_size")
    ap.add_argument("--width", type=int, help="override model.base_width (64 = production)")
    ap.add_argument("--seed", type=int, default=0, help="split, fold and training seed")
    ap.add_argument("--folds", type=int, default=4, help="leave-sources-out folds (0 = skip)")
    ap.add_argument("--max-folds", type=int, help="run only the first N folds (time budget)")
    ap.add_argument("--skip-speaker-split", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", help="train.device (cpu, cuda, auto)")
    ap.add_argument("--out", type=Path, default=RESULTS / "base_eer.json")
    ap.add_argument("--render", type=Path, nargs="+", metavar="JSON", help="only print the markdown of earlier result files")
    args = ap.parse_args(argv)
    if args.render:
        print(render([json.loads(p.read_text()) for p in args.render]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    overrides = {"train.seed": args.seed, "train.device": args.device}
    for key, val in (("train.epochs", args.epochs), ("train.steps_per_epoch", args.steps),
                     ("train.batch_size", args.batch), ("model.base_width", args.width)):
        if val is not None:
            overrides[key] = val
    params = load_params(args.params, overrides=overrides)
    t0 = time.time()
    result: dict = {"machine": machine(), "corpus": str(args.corpus), "overrides": overrides, "threads": args.threads,
                    "train": params.train.model_dump(include={"epochs", "steps_per_epoch", "batch_size", "lr", "patience", "val_fraction"}),
                    "base_width": params.model.base_width}

    clips = read_corpus(args.corpus)
    t = time.time()
    loaded = load_clips(clips, params)
    by_path = {it.clip.path: it for it in loaded}
    result["decode_s"] = round(time.time() - t, 1)
    result["n_clips"], result["n_decoded"] = len(clips), len(loaded)
    log.info("decoded %d/%d clips in %.0f s", len(loaded), len(clips), result["decode_s"])
    clips = [c for c in clips if c.path in by_path]
    items = lambda cs: [by_path[c.path] for c in cs]  # noqa: E731

    if not args.skip_speaker_split:
        tr, va = split_by_speaker(clips, params.train.val_fraction, params.train.seed)
        shared = sorted({c.source for c in tr} & {c.source for c in va})
        log.info("speaker split: %d train, %d val clips; %d sources on both sides", len(tr), len(va), len(shared))
        scores, history, thr, secs = train_and_score(items(tr), items(va), items(va), params)
        metrics = evaluate(va, list(scores), thr)
        result["speaker_split"] = {"n_train": len(tr), "n_val": len(va), "sources_on_both_sides": shared,
                                   "history": history, "train_s": round(secs, 1), "metrics": metrics,
                                   "per_source": per_source_rows(va, scores, thr)}
        write_json(args.out, result)

    if args.folds:
        folds = make_folds(clips, args.folds, args.seed)
        result["folds"] = folds
        pooled_clips: list[Clip] = []
        pooled_scores: list[float] = []
        fold_rows, src_rows = [], []
        for i, held in enumerate(folds[: args.max_folds or len(folds)]):
            rest, test = split_by_source(clips, set(held))
            tr, va = split_by_speaker(rest, params.train.val_fraction, params.train.seed)
            log.info("fold %d/%d: holding out %s (%d clips); training %d, model selection on %d",
                     i + 1, len(folds), ", ".join(held), len(test), len(tr), len(va))
            scores, history, thr, secs = train_and_score(items(tr), items(va), items(test), params)
            m = evaluate(test, list(scores), thr)
            rows = per_source_rows(test, scores, thr)
            for r in rows:
                r["fold"] = i + 1
            src_rows += rows
            pooled_clips += test
            pooled_scores += list(scores)
            o = m["overall"]
            fold_rows.append({"fold": i + 1, "n_human": o["n_human"], "n_ai": o["n_ai"], "eer": o["eer"], "auc": o["auc"],
                              "fpr": o["fpr"], "recall": o["recall"], "train_s": round(secs),
                              "best_val_eer": min(h["val_eer"] for h in history), "sources": len(held)})
            pooled = evaluate(pooled_clips, pooled_scores, thr)
            result["leave_sources_out"] = {"folds": fold_rows, "per_source": src_rows, "pooled": pooled["overall"],
                                           "pooled_per_generator": pooled["per_generator"],
                                           "mean_fold_eer": float(np.nanmean([f["eer"] for f in fold_rows]))}
            write_json(args.out, result)

    result["wall_s"] = round(time.time() - t0, 1)
    result["peak_rss_mb"] = round(peak_rss_mb())
    write_json(args.out, result)
    text = render([result])
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
