"""Base-model generalisation, measured leave-sources-out, as ablations of the bootstrap recipe.

Each named configuration is params.yaml plus overrides, and a choice of vocoded-twin families (a
filtered view of one twins folder made by `aivoice twins`). For each, `pipeline.training.lso` trains
K fold models per seed with the bootstrap recipe and scores the held-out sources; the JSON of every
run and a markdown table (pooled EER, matched-pair within-source EER, mean per-fold EER, human FPR
and AI recall at the calibrated thresholds, wall time) go to bench/results/.

    python bench/base_eer.py --twins-dir data/twins --config none:: gl:griffinlim: \\
        all:griffinlim,world,lpc,codec2,istft,hifigan: --set model.base_width=16 train.epochs=6
    python bench/base_eer.py --render bench/results/base_eer_*.json        # tables again

A configuration is NAME:VOCODERS:OVERRIDES, VOCODERS comma-separated (empty: no twins), OVERRIDES
`key=json;key=json` applied after --set (e.g. `wide:griffinlim:model.base_width=64`).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

import torch

from _common import DEFAULT_CORPUS, RESULTS, machine, md_table, write_json  # first: puts the project on sys.path
from pipeline.atomic import atomic_path
from pipeline.config import load_params
from pipeline.training.lso import leave_sources_out

log = logging.getLogger("bench.base_eer")


def twin_view(twins_dir: Path, vocoders: list[str], work: Path) -> str:
    """A twins folder holding only these vocoders' twins (a filtered manifest; the audio is linked)."""
    if not vocoders:
        return ""
    view = work / ("twins_" + "_".join(sorted(vocoders)))
    view.mkdir(parents=True, exist_ok=True)
    try:   # seeds run as separate jobs make the same view at the same time
        (view / "audio").symlink_to((twins_dir / "audio").resolve())
    except FileExistsError:
        pass
    with (twins_dir / "MANIFEST.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["generator"].removeprefix("twin-") in vocoders]
        fields = reader.fieldnames
    with atomic_path(view / "MANIFEST.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return str(view)


def row(result: dict) -> dict:
    s = result["summary"]
    fold_s = sum(r["train_s"] for r in result["fold_runs"]) / max(len(result["fold_runs"]), 1)
    span = lambda key: s[key]["mean"] if result["seeds"] == 1 else f"{s[key]['mean']:.3f} ({s[key]['min']:.3f}-{s[key]['max']:.3f})"
    first = result["per_seed"][0]
    return {"config": result["config"], "twins": result["vocoders"] or "none", "seeds": result["seeds"],
            "pooled EER": span("pooled_eer"), "pooled CI (seed 0)": f"{first['pooled_eer_ci'][0]:.3f}-{first['pooled_eer_ci'][1]:.3f}",
            "matched-pair EER": span("matched_pair_eer"), "matched, clip-weighted": span("matched_pair_eer_weighted"),
            "mean fold EER": span("mean_fold_eer"),
            "human FPR@thr": span("human_fpr_at_threshold"), "AI recall@thr": span("ai_recall_at_threshold"),
            "train min": fold_s / 60}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--twins-dir", type=Path, help="a twins folder made by `aivoice twins` for this corpus")
    ap.add_argument("--config", nargs="+", default=["none::"], help="NAME:VOCODERS:OVERRIDES (see above)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every config, key=json")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--fold-seed", type=int, help="draw the source folds with this seed (default train.seed), "
                    "e.g. to run training seeds as separate jobs on one set of folds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared 2-core host)")
    ap.add_argument("--keep-models", type=Path, help="save the fold models of the LAST config here")
    ap.add_argument("--render", nargs="+", type=Path, help="print the table of these result files and exit")
    args = ap.parse_args(argv)
    if args.render:
        print(md_table([row(json.loads(p.read_text())) for p in args.render], floatfmt="{:.3f}"))
        return 0
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("pipeline.core.data").setLevel(logging.ERROR)
    common = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    rows = []
    for i, spec in enumerate(args.config):
        name, vocoders, extra = (spec.split(":", 2) + ["", ""])[:3]
        overrides = common | {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in extra.split(";") if kv)}
        params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", overrides)
        twins = twin_view(args.twins_dir, [v for v in vocoders.split(",") if v], RESULTS / "twin_views") \
            if args.twins_dir else ""
        started = time.time()
        keep = args.keep_models if args.keep_models and i == len(args.config) - 1 else None
        result = leave_sources_out(args.corpus, params, args.folds, args.seeds, twins=twins, keep_models=keep,
                                   fold_seed=args.fold_seed)
        result |= {"config": name, "vocoders": vocoders, "overrides": overrides, "machine": machine(),
                   "threads": args.threads, "fold_seed": args.fold_seed, "bench_wall_s": round(time.time() - started, 1)}
        write_json(RESULTS / f"base_eer_{name}.json", result)
        rows.append(row(result))
        print(md_table(rows[-1:], floatfmt="{:.3f}"), flush=True)
    print(md_table(rows, floatfmt="{:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
