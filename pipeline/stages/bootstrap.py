"""Bootstrap: train a base model on a corpus folder, track it in MLflow and register it.

Not a DVC stage (it starts the model line rather than updating it), but built like one:
`run(params, corpus)` for the Prefect flow and the CLI, `main(argv)` for the command line.
It registers a base model (`registry.register(base=True)`, no gates): the first becomes `champion`.
With `lso=K` the same recipe is first judged leave-sources-out (pipeline.stages.evaluate) and the
version is tagged with those figures.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlflow

from pipeline.io import registry, tracking
from pipeline.io.disk import DiskSpaceError, require_free
from pipeline.stages import evaluate
from pipeline.config import Params, apply_threads, load_params
from pipeline.core.data import LABELS
from pipeline.training.plots import write_plots
from pipeline.training.distributed import init_from_env
from pipeline.training.report import describe_base
from pipeline.training.train import bootstrap


def run(params: Params, corpus: str | Path, out: str | Path | None = None, report: str | Path | None = None,
        twins: str | Path | None = None, lso: int = 0, seeds: int = 1) -> dict:
    """Train, log params/lineage/per-epoch and validation metrics/the report, register; return the report.
    Under torchrun with several processes, ranks other than 0 only train (pipeline.training.train) and
    return {}; rank 0 does everything else."""
    rank, world = init_from_env()
    if not rank:
        require_free(out or params.train.out, params.storage.min_free_gb, "bootstrap")
    if world > 1 and lso:
        raise ValueError("--lso with several processes: run `aivoice evaluate` first, then bootstrap")
    if rank:
        bootstrap(corpus, params, out, report, twins)
        return {}
    lso_tags, lso_result = {}, None
    if lso:
        lso_result = evaluate.run(params, corpus, lso, seeds, twins)
        summary, first = lso_result["summary"], lso_result["per_seed"][0]
        lso_tags = {"lso_pooled_eer": f"{summary['pooled_eer']['mean']:.4f}",
                    "lso_pooled_eer_ci": f"{first['pooled_eer_ci'][0]:.3f}-{first['pooled_eer_ci'][1]:.3f}",
                    "lso_matched_pair_eer": f"{summary['matched_pair_eer']['mean']:.4f}",
                    "lso_folds": f"{lso_result['k']}x{seeds}", "lso_run_id": lso_result["mlflow_run_id"]}
    with tracking.training_run(params, "bootstrap") as active:
        result = bootstrap(corpus, params, out, report, twins)
        mlflow.set_tags({"data_hash": result["data_hash"], "front_end": result["front_end"]["kind"]})
        tracking.log_history(result["history"])
        mlflow.log_metrics({"calibrated_threshold": result["calibration"]["threshold"],
                            "calibration_humans": result["calibration"]["n_humans"]})
        overall = result["validation"]["overall"]
        mlflow.log_metrics({f"val_{k}": float(v) for k, v in overall.items() if isinstance(v, (int, float)) and v == v})
        mlflow.log_dict(result, "bootstrap_report.json")
        with tempfile.TemporaryDirectory() as plots:
            val = result["val_scores"]
            write_plots({"base": {"scores": [r["ai_score"] for r in val], "threshold": result["validation"]["threshold"],
                                  "labels": [LABELS[r["label"]] for r in val]}}, Path(plots))
            mlflow.log_artifacts(plots, "plots")
        version = registry.register(result["checkpoint"], run_id=active.info.run_id, name=params.registry.model_name,
                                    base=True, tags={"eer": f"{overall['eer']:.4f}", "auc": f"{overall['auc']:.4f}",
                                                     "human_fpr": f"{overall['fpr']:.4f}", "source": "bootstrap",
                                                     "split_by": params.train.split_by,
                                                     "front_end": result["front_end"]["kind"]} | lso_tags,
                                    description=describe(result, corpus, lso_result))
    return result | {"model_version": version, "mlflow_run_id": active.info.run_id, "lso": lso_result}


def describe(result: dict, corpus: str | Path, lso_result: dict | None) -> str:
    """The version's one line in the registry: how it was trained, on what, and what it measured."""
    val, cal = result["validation"]["overall"], result["calibration"]
    figures = [f"EER {val['eer']:.3f} on {result['n_val']} clips of {len(result['val_sources'])} held-out "
               f"{result['split_by']}s",
               f"threshold {cal['threshold']:.3f} at {cal['target_fpr']:.0%} FPR on {cal['n_humans']} humans"]
    if lso_result:
        figures.append(f"leave-sources-out pooled EER {lso_result['summary']['pooled_eer']['mean']:.3f} "
                       f"({lso_result['k']} folds)")
    how = (f"trained by bootstrap on {corpus} ({result['n_train']} clips, {result['n_twins']} of them twins; "
           f"front end {result['front_end']['kind']})")
    return describe_base(how, data_hash=result["data_hash"], figures=figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.bootstrap")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--twins", help="twins folder (default: train.twins)")
    parser.add_argument("--lso", type=int, default=0, metavar="K", help="first evaluate the recipe leave-sources-out, K folds")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    apply_threads(params)
    try:
        result = run(params, args.corpus, twins=args.twins, lso=args.lso)
    except DiskSpaceError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    if not result:   # not rank 0
        return 0
    print(f"registered v{result['model_version']} (run {result['mlflow_run_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
