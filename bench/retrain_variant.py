"""What would the gates say with other fine-tuning settings? Re-runs finetune + validate on an existing
project (a demo trial kept by `demo_story.py --keep`, or your own checkout after a retrain) with params
overridden, in memory: nothing is written to the project, nothing is registered.

    python bench/retrain_variant.py /path/to/project --set finetune.distill_ai=3 --set finetune.recipe=last_block

The project needs what the retrain flow left there: models/production.pt (the champion it was judged
against), the store, its twins and data/augmented. Prints and writes one JSON row (verdict, reasons,
gate values, leave-one-file-out scores and thresholds, operating points, timings).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from _common import RESULTS, machine, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params override, e.g. finetune.distill_ai=3 (VALUE read as YAML)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable on shared cores)")
    ap.add_argument("--out", type=Path, help=f"JSON row (default {RESULTS}/retrain_variant_<project>.json)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    out = args.out.resolve() if args.out else RESULTS / f"retrain_variant_{args.project.name}.json"
    os.chdir(args.project)   # params paths are relative to the project
    from pipeline.config import load_params
    from pipeline.core.model import load_checkpoint
    from pipeline.training.finetune import finetune
    from pipeline.training.validate import validate

    params = load_params("params.yaml", overrides)
    production = load_checkpoint(params.finetune.base_model, params.audio)
    started = time.monotonic()
    candidate, report = finetune(production, params)
    finetune_s = time.monotonic() - started
    verdict = validate(candidate, production, json.loads(json.dumps(report, default=str)), params)["verdict"]
    row = {"machine": machine(), "project": str(args.project), "overrides": overrides,
           "finetune_s": round(finetune_s, 1), "total_s": round(time.monotonic() - started, 1),
           "status": verdict["status"], "reasons": verdict["reasons"], "threshold": report["calibration"]["threshold"],
           "lofo": report["lofo"]["files"], "best_epoch": report["best_epoch"],
           "gates": {n: g.get("value") for n, g in verdict["gates"].items()},
           "gate_counts": {n: g["count"] for n, g in verdict["gates"].items() if "count" in g},
           "operating_points": verdict.get("operating_points")}
    print(json.dumps({k: v for k, v in row.items() if k not in ("machine", "operating_points")}, default=str))
    write_json(out, row)


if __name__ == "__main__":
    main()
