"""Which model should bootstrap keep? `train.select` best / last / swa, from one training per fold.

Runs `pipeline.training.lso.leave_sources_out` with `train.select: swa` (the full schedule). The weights of
every epoch are copied when the training loop validates them, so early stopping (`train.patience`
emulated on the same validation EERs) and the last epoch come from the same training draw as the weight
average: the three selections differ in nothing else. Each is scored on the held-out sources and
calibrated on the fold's validation humans, as leave_sources_out does; one JSON and a table per run.

    python bench/select_eer.py --twins-dir data/twins --vocoders griffinlim,world,lpc,codec2,istft \\
        --set model.base_width=32 train.epochs=8 train.steps_per_epoch=50
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch

from _common import DEFAULT_CORPUS, RESULTS, machine, md_table, write_json  # first: puts the project on sys.path
from base_eer import twin_view
from pipeline.config import load_params
from pipeline.core.metrics import compute_eer
from pipeline.training import lso, train
from pipeline.training.calibration import calibrate


class Snapshots:
    """Wraps train.validation_scores (every epoch's weights and validation EER, then the average's) and
    lso.validation_scores (scores the early-stopped and last-epoch models on the same clips as the kept one)."""

    def __init__(self, patience: int) -> None:
        self.patience, self.epochs, self.picked, self.folds = patience, [], {}, {"best": [], "last": []}
        self._train_scores, self._lso_scores = train.validation_scores, lso.validation_scores
        train.validation_scores, lso.validation_scores = self.in_training, self.in_lso

    def in_training(self, model, items, params, device):
        scores = self._train_scores(model, items, params, device)
        self.epochs.append((copy.deepcopy(model.state_dict()), compute_eer(scores, [it.clip.label for it in items])[0]))
        return scores

    def pick(self) -> None:
        """After a fold's training: the epoch early stopping would keep, and the last one."""
        epochs = self.epochs[:-1]   # the last entry is the weight average's validation
        best, stop, early = 0, len(epochs), train.EarlyStopping(self.patience)
        for i, (_, eer) in enumerate(epochs):
            if early.improved(eer):
                best = i
            elif early.stop:
                stop = i + 1
                break
        self.picked = {"best": epochs[best][0], "last": epochs[-1][0],
                       "info": {"best_epoch": best + 1, "stopped_after": stop, "val_eers": [e for _, e in self.epochs]}}
        self.epochs = []

    def in_lso(self, model, items, params, device):
        first = bool(self.epochs)   # leave_sources_out scores the validation clips first, then the held-out ones
        if first:
            self.pick()
        for name in ("best", "last"):
            other = copy.deepcopy(model)
            other.load_state_dict(self.picked[name])
            scores = self._lso_scores(other, items, params, device)
            if first:
                self.folds[name].append({"val": (items, scores)})
            else:
                self.folds[name][-1] |= {"test": (items, scores), "info": self.picked["info"]}
        return self._lso_scores(model, items, params, device)

    def summary(self, name: str, params) -> dict:
        clips, scores, folds, thresholds = [], [], [], []
        for f, fold in enumerate(self.folds[name]):
            (val, val_scores), (test, test_scores) = fold["val"], fold["test"]
            cal = calibrate([s for s, it in zip(val_scores, val) if it.clip.label == 0], params.calibration,
                            {it.clip.source for it in val if it.clip.label == 0})
            clips += [it.clip for it in test]
            scores += list(test_scores)
            folds += [f] * len(test)
            thresholds += [cal["threshold"]] * len(test)
        out = lso.summarise_seed(clips, np.array(scores), np.array(folds), np.array(thresholds), params.train.seed)
        return out | {"folds": [fold["info"] for fold in self.folds[name]]}


def row(name: str, s: dict) -> dict:
    return {"selection": name, "pooled EER": s["pooled_eer"], "pooled CI": f"{s['pooled_eer_ci'][0]:.3f}-{s['pooled_eer_ci'][1]:.3f}",
            "per-fold EER": ", ".join(f"{e:.3f}" for e in s["fold_eers"]), "matched-pair EER": s["matched_pair_eer"],
            "matched, clip-weighted": s["matched_pair_eer_weighted"], "human FPR@thr": s["human_fpr_at_threshold"],
            "AI recall@thr": s["ai_recall_at_threshold"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--twins-dir", type=Path, help="a twins folder made by `aivoice twins` for this corpus")
    ap.add_argument("--vocoders", default="", help="twin families to train with, comma-separated (empty: none)")
    ap.add_argument("--set", nargs="*", default=[], help="params overrides, key=json")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared 2-core host)")
    ap.add_argument("--name", default="select")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("pipeline.core.data").setLevel(logging.ERROR)
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)} | {"train.select": "swa"}
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", overrides)
    vocoders = [v for v in args.vocoders.split(",") if v]
    twins = twin_view(args.twins_dir, vocoders, RESULTS / "twin_views") if args.twins_dir else ""
    snaps = Snapshots(params.train.patience)
    result = lso.leave_sources_out(args.corpus, params, args.folds, 1, twins=twins)
    out = {"best": snaps.summary("best", params), "last": snaps.summary("last", params), "swa": result["per_seed"][0],
           "fold_runs": result["fold_runs"], "folds": result["folds"], "overrides": overrides, "vocoders": vocoders,
           "machine": machine(), "threads": args.threads, "wall_s": result["wall_s"]}
    write_json(RESULTS / f"select_eer_{args.name}.json", out)
    print(md_table([row(name, out[name]) for name in ("best", "last", "swa")], floatfmt="{:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
