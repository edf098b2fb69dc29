"""Stage validate: candidate vs production on held-out data; metrics, plots and the verdict."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import mlflow
import pandas as pd

from pipeline.io import registry, tracking
from pipeline.config import Params
from pipeline.core.model import load_checkpoint
from pipeline.core.scoring import threshold_mismatch
from pipeline.faults import fault_point
from pipeline.training.plots import write_plots
from pipeline.stages.common import stage_main, write_json
from pipeline.training.validate import gate_data_key, held_out_clips, validate

log = logging.getLogger(__name__)


def summary(m: dict) -> dict:
    """One model's numbers for `dvc metrics`: flat, every rate with its interval."""
    out = {"threshold": m["threshold"], "eer": m["eer"], "auc": m["auc"], "n_test": m["n_test"], "n_new": m["n_new"]}
    for key in ("fpr", "recall", "new_recall"):
        r = m[key]
        out |= {key: r["value"], f"{key}_low": r["low"], f"{key}_high": r["high"]}
    for point in m["operating_points"]:
        pct = f"{point['human_fpr'] * 100:g}pct"
        out |= {f"new_recall_at_{pct}_fpr": point["new_recall"], f"earlier_ai_recall_at_{pct}_fpr": point["earlier_ai_recall"]}
    return out | {f"{h}_accuracy": a for h, a in m["head_accuracy"].items()}


def run(params: Params) -> dict:
    cfg = params.validation
    # the champion this candidate is judged against (the retrain flow exported it to finetune.base_model just
    # before): tagged base_version on the registered candidate, so promote refuses it once champion has moved
    base_version = registry.aliases(params.registry.model_name).get(registry.CHAMPION)
    candidate = load_checkpoint(params.finetune.out, params.audio)
    production = load_checkpoint(params.finetune.base_model, params.audio)
    mismatch = threshold_mismatch(production.meta, params)
    if mismatch:   # the gates compare both models at one human FPR; production's own threshold is only reported
        log.warning("production's threshold was calibrated with other scoring settings: %s", mismatch)
    finetune_report = json.loads(Path(params.finetune.report).read_text())
    test, new = held_out_clips(Path(params.ingest.store), set(finetune_report["new_generators"]),
                               set(finetune_report["calibration"].get("clips", [])))
    key = gate_data_key(test, new)
    earlier = registry.count_versions("gate_data", key, params.registry.model_name, exclude_checkpoint=params.finetune.out)
    result = validate(candidate, production, finetune_report, params, earlier_tries=earlier)
    models = result["models"]
    metrics = {name: summary(m) for name, m in models.items()}
    write_json(cfg.metrics, metrics)
    write_json(cfg.tables, {name: {k: m["tables"][k] for k in ("per_generator", "per_source")} for name, m in models.items()})
    write_plots({name: {"scores": m["scores"], "labels": m["labels"], "threshold": m["threshold"]}
                 for name, m in models.items()}, Path(cfg.plots))
    candidate_scores = {"scores": models["candidate"]["scores"], "labels": models["candidate"]["labels"]}
    verdict = result["verdict"] | register_candidate(params, finetune_report["mlflow_run_id"], metrics, result["verdict"],
                                                     candidate_scores, base_version=base_version)
    fault_point("validate.registered")
    write_json(cfg.verdict, verdict)
    return {"passed": verdict["passed"], "status": verdict["status"], "reasons": verdict["reasons"],
            "verdict": cfg.verdict, "model_version": verdict["model_version"]}


def register_candidate(params: Params, run_id: str, metrics: dict, verdict: dict, scores: dict,
                       base_version: int | None = None) -> dict:
    """Log the validation to the candidate's fine-tuning run and register it (challenger if it passed; never
    champion unless it passed), tagged with `base_version`, the champion it was judged against.
    `scores` (held-out test-split scores and labels) become the monitor's drift reference."""
    cfg = params.validation
    cand = metrics["candidate"]
    with tracking.training_run(params, "validate", run_id=run_id):
        for name in ("candidate", "production"):
            mlflow.log_metrics({f"{name}_{k}": float(v) for k, v in metrics[name].items()
                                if isinstance(v, (int, float)) and v == v})
        mlflow.log_metrics({f"gate_{n}": float(g["passed"]) for n, g in verdict["gates"].items()})
        mlflow.set_tag("validation_status", verdict["status"].replace(" ", "-"))
        mlflow.log_artifact(cfg.metrics)
        mlflow.log_artifact(cfg.tables)
        mlflow.log_artifacts(cfg.plots, "plots")
        mlflow.log_dict(verdict, "verdict.json")
        mlflow.log_dict(scores, "validation_scores.json")
        mlflow.log_table(pd.DataFrame(verdict["before_after"]), "before_after.json")
        failed = [n for n, g in verdict["gates"].items() if not g["passed"]]
        version = registry.register(
            params.finetune.out, run_id=run_id, name=params.registry.model_name, gates_passed=verdict["passed"],
            status=verdict["status"], base_version=base_version,
            tags={"eer": f"{cand['eer']:.4f}", "auc": f"{cand['auc']:.4f}", "human_fpr": f"{cand['fpr']:.4f}",
                  "new_gen_recall": f"{cand['new_recall']:.4f}", "gates": json.dumps({n: g["passed"] for n, g in verdict["gates"].items()}),
                  "failed_gates": ", ".join(failed) or "none", "source": "finetune", "gate_data": verdict["gate_data"],
                  "tries_on_gate_data": str(verdict["tries_on_gate_data"]), "recipe": str(verdict.get("recipe")),
                  "missing_evidence": "; ".join(verdict["missing_evidence"]) or "none"})
    return {"model_version": version, "mlflow_run_id": run_id, "base_version": base_version}


def main(argv: list[str] | None = None) -> int:
    return stage_main("validate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
