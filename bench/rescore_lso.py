"""Scoring settings judged leave-sources-out, without training: re-scores the fold models a
`base_eer.py --keep-models DIR` run saved (each on the held-out sources in its notes) under several
`detect` settings, and summarises each as base_eer.py does (pooled, per-fold and matched-pair EER).

    python bench/rescore_lso.py DIR [DIR ...] --config "default:" "quiet30:silent_window_db=30" "max:aggregate=max"

Each DIR holds one training seed's seed<s>_fold<f>.pt; the seeds are summarised apart and averaged.
A config is NAME:KEY=VALUE[;KEY=VALUE] over the `detect` section, plus two keys of this script:
- `trim=1`: each clip cut to its voiced region (train.trim_silence_db) before scoring. Why: training crops
  stay inside that region, while scoring averages every window of a clip, pauses and leading/trailing
  silence included; those windows carry the recording chain and nothing of the voice.
- `channels=A+B+...`: each clip scored through each of these channels (CHANNELS below, the training
  augmentation's low-passes, telephone band, mu-law, codec round trips; `id` = as is) and the scores'
  logits averaged (test-time augmentation). Why: if the chain is the cue, putting every clip through the
  same channel, or averaging over several, could take it away at scoring time.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import yaml

from _common import DEFAULT_CORPUS, REPO, RESULTS, machine, md_table, mean_logit, write_json


CHANNELS = ("id", "lp4k", "lp6k", "lp8k", "tel", "mulaw", "mp3", "opus")


def through(channel: str, x: np.ndarray, sr: int = 24000) -> np.ndarray:
    """x (at the model's rate) through one of CHANNELS: the training augmentation's own functions."""
    from pipeline.core import augment as A

    if channel.startswith("lp"):
        return A.lowpass(x, sr, float(channel[2:-1]) * 1000)
    return {"id": lambda: x, "tel": lambda: A.band_limit(x, sr, True), "mulaw": lambda: A.mulaw_8k(x, sr),
            "mp3": lambda: A.codec_roundtrip(x, sr, "mp3", 0.9),
            "opus": lambda: A.codec_roundtrip(x, sr, "opus", 0.9)}[channel]()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dirs", type=Path, nargs="+")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--config", nargs="+", default=["default:"])
    ap.add_argument("--out", type=Path, default=RESULTS / "rescore_lso.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from pipeline.config import load_params
    from pipeline.core.data import load_clips, read_corpus
    from pipeline.core.model import load_checkpoint
    from pipeline.training.lso import summarise_seed
    from pipeline.training.train import validation_scores

    base = load_params(REPO / "params.yaml")
    real = [c for c in read_corpus(args.corpus) if not c.twin_of]
    cache = {it.clip.path: it for it in load_clips(real, base)}
    rows, results = [], []
    for spec in args.config:
        name, _, sets = spec.partition(":")
        detect = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets.split(";") if s)}
        trim = bool(detect.pop("trim", False))
        channels = str(detect.pop("channels", "id")).split("+")
        if unknown := set(channels) - set(CHANNELS):
            raise SystemExit(f"{name}: unknown channels {sorted(unknown)} (known: {', '.join(CHANNELS)})")
        params = base.model_copy(update={"detect": base.detect.model_copy(update=detect)})
        per_seed = []
        for seed, folder in enumerate(args.model_dirs):
            clips, scores, folds, thresholds = [], [], [], []
            started = time.time()
            for path in sorted(folder.glob("seed*_fold*.pt")):
                model = load_checkpoint(path, params.audio)
                held = set(model.meta.notes["held_out_sources"])
                items = [cache[c.path] for c in real if c.source in held and c.path in cache]
                clips += [it.clip for it in items]
                if trim:
                    items = [dataclasses.replace(it, wave=it.wave[it.voiced[0]:it.voiced[1]]) for it in items]
                each = [validation_scores(model, [dataclasses.replace(it, wave=through(ch, it.wave)) for it in items],
                                          params, "cpu") for ch in channels]
                scores += each[0] if len(each) == 1 else list(mean_logit(each))
                folds += [int(path.stem.split("fold")[1])] * len(items)
                thresholds += [model.meta.threshold] * len(items)
            s = summarise_seed(clips, np.array(scores), np.array(folds), np.array(thresholds), seed)
            per_seed.append({k: s[k] for k in ("pooled_eer", "pooled_eer_ci", "fold_eers", "mean_fold_eer", "matched_pair_eer",
                                              "matched_pair_eer_weighted", "human_fpr_at_threshold",
                                              "ai_recall_at_threshold")} | {"models": str(folder),
                                                                             "score_s": round(time.time() - started, 1)})
        results.append({"config": name, "detect": detect, "trim": trim, "channels": channels, "per_seed": per_seed})
        rows.append({"config": name, **{f"pooled s{i}": r["pooled_eer"] for i, r in enumerate(per_seed)},
                     "pooled mean": float(np.mean([r["pooled_eer"] for r in per_seed])),
                     **{f"matched s{i}": r["matched_pair_eer"] for i, r in enumerate(per_seed)},
                     "matched mean": float(np.mean([r["matched_pair_eer"] for r in per_seed]))})
        print(md_table(rows[-1:]), flush=True)
    print(md_table(rows))
    write_json(args.out, {"machine": machine(), "corpus": str(args.corpus), "results": results, "table": rows})


if __name__ == "__main__":
    main()
