"""How much does the gate's human-FPR estimate depend on how the test humans are split? Scores the test
humans of projects a retrain ran in (demo trials kept by `demo_story.py --keep`) with their candidate and
production models, then cross-fits the threshold calibration (`pipeline.training.calibration.crossfit_fpr`,
what `validate` gates on) with several fold counts and several speaker splits.

    python bench/crossfit_folds.py /path/to/project ... --folds 2 3 5 10 --split-seeds 5

The served threshold is calibrated on all test humans; each cross-fitted part is judged at a threshold
calibrated on the others, so fewer folds mean thresholds on fewer humans. Prints one line per project and
model: humans flagged (of n) per fold count, one number per split seed (seed 0 is the one the gate uses
with finetune.seed 0), and the gate's pessimistic end for each; writes them all to one JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from _common import RESULTS, machine, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("projects", type=Path, nargs="+")
    ap.add_argument("--folds", type=int, nargs="+", default=[2, 3, 5, 10])
    ap.add_argument("--split-seeds", type=int, default=5)
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=RESULTS / "crossfit_folds.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from pipeline.config import load_params
    from pipeline.core.model import load_checkpoint
    from pipeline.training.calibration import crossfit_fpr
    from pipeline.training.validate import gate_clips, score_clips

    out, rows = args.out.resolve(), []
    for project in args.projects:
        os.chdir(project.resolve())   # params paths are relative to the project
        params = load_params("params.yaml")
        test, _ = gate_clips(Path(params.ingest.store), json.loads(Path(params.finetune.report).read_text()))
        humans = [c for c in test if c.label == 0]
        for name, path in (("candidate", params.finetune.out), ("production", params.finetune.base_model)):
            kept, scores, _ = score_clips(load_checkpoint(path, params.audio), humans, params)
            row = {"project": str(project), "model": name, "n": len(kept), "flagged": {}, "folds_used": {}, "high": {}}
            for k in args.folds:
                fits = [crossfit_fpr(kept, scores, args.target_fpr, k, seed) for seed in range(args.split_seeds)]
                row["flagged"][k] = [f["k"] for f in fits]
                row["folds_used"][k] = [f["folds"] for f in fits]
                row["high"][k] = [round(f["high"], 4) for f in fits]
            print(json.dumps({x: row[x] for x in ("project", "model", "n", "flagged", "folds_used")}), flush=True)
            rows.append(row)
    write_json(out, {"machine": machine(), "target_fpr": args.target_fpr, "rows": rows})


if __name__ == "__main__":
    main()
