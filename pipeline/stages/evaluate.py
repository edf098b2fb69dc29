"""Leave-sources-out evaluation of the bootstrap recipe (pipeline.training.lso), tracked in MLflow.

One parent run (`leave-sources-out`) holds the summary metrics, reports/lso.json and the plots; each
fold model of each seed is a child run with its held-out sources, EER and calibration. Called by
`aivoice evaluate --leave-sources-out K` and by `aivoice bootstrap --lso K` (which then tags the
registered version with the figures).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlflow

from pipeline.config import Params, apply_threads, load_params
from pipeline.io import tracking
from pipeline.stages.common import write_json
from pipeline.training.lso import leave_sources_out
from pipeline.training.plots import write_lso_plots

REPORT, PLOTS = "reports/lso.json", "reports/lso"


def run(params: Params, corpus: str | Path, k: int, seeds: int = 1, twins: str | Path | None = None,
        report: str | Path = REPORT, plots: str | Path = PLOTS) -> dict:
    """Run the K-fold evaluation inside an MLflow parent run; write the report and plots; return the report."""
    with tracking.training_run(params, "leave-sources-out") as parent:
        mlflow.set_tags({"evaluation": "leave-sources-out", "corpus": str(corpus), "folds": str(k), "seeds": str(seeds)})

        def child(result: dict) -> None:
            with mlflow.start_run(run_name=f"seed {result['seed']} fold {result['fold']}", nested=True,
                                  experiment_id=parent.info.experiment_id):
                mlflow.set_tags({"held_out_sources": ", ".join(result["held_out"])[:5000], "stage": "lso-fold",
                                 "front_end": result["front_end"]})
                mlflow.log_metrics({m: float(result[m]) for m in ("eer", "val_eer", "threshold", "n_train", "n_twins",
                                                                   "n_val", "n_test", "epochs", "train_s")
                                    if result[m] == result[m]})
                tracking.log_history(result["history"])

        result = leave_sources_out(corpus, params, k, seeds, twins, on_fold=child)
        summary = result["summary"]
        mlflow.log_metrics({f"lso_{key}": v["mean"] for key, v in summary.items() if v["mean"] == v["mean"]})
        first = result["per_seed"][0]
        mlflow.log_metrics({"lso_pooled_eer_ci_low": first["pooled_eer_ci"][0], "lso_pooled_eer_ci_high": first["pooled_eer_ci"][1]})
        write_json(report, result)
        mlflow.log_artifact(str(report))
        write_lso_plots(result, Path(plots))
        mlflow.log_artifacts(str(plots), "lso")
    return result | {"mlflow_run_id": parent.info.run_id, "report": str(report)}


def describe(result: dict) -> str:
    """The headline figures, one line each."""
    s, first = result["summary"], result["per_seed"][0]
    fmt = lambda key: f"{s[key]['mean']:.3f}" + (f" (seeds {s[key]['min']:.3f}-{s[key]['max']:.3f})" if result["seeds"] > 1 else "")
    lines = [
        f"leave-sources-out, {result['k']} folds x {result['seeds']} seed(s), {result['n_clips']} clips "
        f"({result['n_twins']} twins used in training only):",
        f"  pooled EER            {fmt('pooled_eer')}   95% CI (seed {first['seed']}) "
        f"{first['pooled_eer_ci'][0]:.3f}-{first['pooled_eer_ci'][1]:.3f}",
        f"  mean per-fold EER     {fmt('mean_fold_eer')}",
        f"  matched-pair EER      {fmt('matched_pair_eer')}   95% CI {first['matched_pair_eer_ci'][0]:.3f}-"
        f"{first['matched_pair_eer_ci'][1]:.3f}  (within {len(first['matched_pair_sources'])} sources holding both labels)",
        f"  matched-pair, clip-weighted over the {len(first['matched_pair_sources_weighted'])} sources with >= 6 "
        f"clips of each label: {fmt('matched_pair_eer_weighted')}",
        f"  at the calibrated thresholds: human FPR {fmt('human_fpr_at_threshold')}, AI recall {fmt('ai_recall_at_threshold')}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.evaluate")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--leave-sources-out", type=int, default=4, dest="k")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    apply_threads(params)
    result = run(params, args.corpus, args.k, args.seeds)
    print(describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
