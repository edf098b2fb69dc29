"""How much of a base's leave-sources-out error is the training draw's? Averages the held-out scores (mean
logit) of several `bench/base_eer.py` result files run on the same source folds (different training seeds,
say) and judges every single file, every pair and the whole set with the same figures as base_eer.py.

    python bench/ensemble_lso.py bench/results/base_eer_auto10_s{0,1,2}.json --write bench/results/ens3.json

`--write` saves the full set's mean as a result file of base_eer.py's form (`bench/pretrained_lso.py --fuse`
reads it). An ensemble is not what the product serves (one model, docs/benchmarks.md 5h): this measures
the share of error that averaging training draws removes.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
from pathlib import Path

import numpy as np

from _common import DEFAULT_CORPUS, RESULTS, machine, md_table, mean_logit, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="base_eer.py result files on the same folds")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--write", type=Path, help="save the mean of all files as a base_eer.py result file")
    ap.add_argument("--out", type=Path, default=RESULTS / "ensemble_lso.json")
    args = ap.parse_args()
    from pipeline.core.data import read_corpus
    from pipeline.training.lso import summarise_seed

    runs = [json.loads(p.read_text()) for p in args.results]
    scores = [{r["path"]: r for r in run["per_seed"][0]["scores"]} for run in runs]
    folds = [{p: r["fold"] for p, r in s.items()} for s in scores]
    if any(f != folds[0] for f in folds[1:]):
        raise SystemExit("the result files hold different folds (or clips): run them with the same --fold-seed")
    clips = [c for c in read_corpus(args.corpus) if str(c.path) in folds[0]]
    fold = np.array([folds[0][str(c.path)] for c in clips])
    probs = [np.array([s[str(c.path)]["ai_score"] for c in clips]) for s in scores]
    rows = []

    def judge(name: str, members: tuple[int, ...]) -> np.ndarray:
        mean = mean_logit([probs[i] for i in members])
        s = summarise_seed(clips, mean, fold, np.full(len(clips), 0.5), 0)
        rows.append({"members": name, "pooled_eer": round(s["pooled_eer"], 3),
                     "ci": "%.3f-%.3f" % tuple(s["pooled_eer_ci"]),
                     "per_fold": ", ".join(f"{e:.3f}" for e in s["fold_eers"]),
                     "matched_pair": round(s["matched_pair_eer"], 3),
                     "matched_weighted": round(s["matched_pair_eer_weighted"], 3)})
        return mean

    names = [p.stem for p in args.results]
    for k in range(1, len(runs) + 1):
        for members in itertools.combinations(range(len(runs)), k):
            mean = judge(" + ".join(names[i] for i in members), members)
    table = md_table(rows)
    print(table)
    write_json(args.out, {"machine": machine(), "results": [str(p) for p in args.results], "rows": rows})
    if args.write:   # the last mean judged is the whole set's
        out = copy.deepcopy(runs[0])
        by_path = {str(c.path): float(m) for c, m in zip(clips, mean)}
        for r in out["per_seed"][0]["scores"]:
            r["ai_score"] = by_path[r["path"]]
        out["config"] = "mean of " + ", ".join(names)
        args.write.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
