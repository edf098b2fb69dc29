"""Stage validate: candidate vs production on held-out data; metrics, plots and the verdict."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import mlflow
import pandas as pd

from pipeline.io import registry, tracking, version_report
from pipeline.config import Params
from pipeline.core.metrics import at_fpr
from pipeline.core.model import load_checkpoint
from pipeline.core.scoring import threshold_mismatch
from pipeline.faults import fault_point
from pipeline.training.plots import write_plots
from pipeline.training.report import describe_candidate
from pipeline.stages.common import stage_main, write_json
from pipeline.training.validate import gate_clips, gate_data_key, validate

log = logging.getLogger(__name__)


def summary(m: dict) -> dict:
    """One model's numbers for `dvc metrics`: flat, every rate with its interval."""
    out = {"threshold": m["threshold"], "eer": m["eer"], "auc": m["auc"], "n_test": m["n_test"], "n_new": m["n_new"]}
    for key in ("fpr", "recall", "new_recall"):
        r = m[key]
        out |= {key: r["value"], f"{key}_low": r["low"], f"{key}_high": r["high"]}
    for point in m["operating_points"]:
        at = at_fpr(point["human_fpr"])
        out |= {f"new_recall_{at}": point["new_recall"], f"earlier_ai_recall_{at}": point["earlier_ai_recall"]}
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
    test, new = gate_clips(Path(params.ingest.store), finetune_report)
    key = gate_data_key(test, new)
    earlier = registry.count_versions("gate_data", key, params.registry.model_name, exclude_checkpoint=params.finetune.out)
    result = validate(candidate, production, finetune_report, params, earlier_tries=earlier)
    models = result["models"]
    metrics = {name: summary(m) for name, m in models.items()}
    write_json(cfg.metrics, metrics)
    tables = {name: {k: m["tables"][k] for k in ("per_generator", "per_source")} for name, m in models.items()}
    write_json(cfg.tables, tables)
    write_plots({name: {"scores": m["scores"], "labels": m["labels"], "threshold": m["threshold"]}
                 for name, m in models.items()}, Path(cfg.plots))
    candidate_scores = {"scores": models["candidate"]["scores"], "labels": models["candidate"]["labels"]}
    held_out = {name: {k: m[k] for k in ("threshold", "scores", "labels", "sources", "generators", "new_scores",
                                        "new_generators")} for name, m in models.items()}
    description = describe_candidate(result["verdict"], metrics, base_version=base_version,
                                     data_hash=finetune_report.get("data_hash", ""), trigger=_trigger())
    verdict = result["verdict"] | register_candidate(params, finetune_report["mlflow_run_id"], metrics, result["verdict"],
                                                     candidate_scores, base_version=base_version, tables=tables,
                                                     held_out=held_out, description=description)
    fault_point("validate.registered")
    # the report of the registered version, from what its run now holds (as `aivoice report` rebuilds it)
    verdict["report"] = version_report.publish(verdict["model_version"], Path(cfg.report), Path(cfg.plots),
                                               params.registry.model_name)
    write_json(cfg.verdict, verdict)
    return {"passed": verdict["passed"], "status": verdict["status"], "reasons": verdict["reasons"],
            "verdict": cfg.verdict, "model_version": verdict["model_version"], "report": cfg.report}


def _trigger() -> str:
    """What started this validation: a Prefect flow run (the retrain flow) or a `dvc repro` by hand."""
    flow_run = os.environ.get(tracking.FLOW_RUN_ENV)
    return f"retrain flow run {flow_run[:8]}" if flow_run else "validate stage"


def register_candidate(params: Params, run_id: str, metrics: dict, verdict: dict, scores: dict,
                       base_version: int | None, *, tables: dict, held_out: dict, description: str) -> dict:
    """Log the validation to the candidate's fine-tuning run and register it (challenger if it passed; never
    champion unless it passed), tagged with `base_version`, the champion it was judged against.
    `scores` (held-out test-split scores and labels) become the monitor's drift reference; `held_out`
    (both models' scores with labels, sources and generators) and the tables are what the version's
    report is rebuilt from. Version tags stay short (the gates in full are in verdict.json);
    `description` is the line a person reads in the registry."""
    cfg = params.validation
    cand = metrics["candidate"]
    with tracking.training_run(params, "validate", run_id=run_id):
        for name in ("candidate", "production"):
            mlflow.log_metrics({f"{name}_{k}": float(v) for k, v in metrics[name].items()
                                if isinstance(v, (int, float)) and v == v})
        mlflow.log_metrics({f"gate_{n}": float(g["passed"]) for n, g in verdict["gates"].items()})
        mlflow.set_tag("validation_status", verdict["status"].replace(" ", "-"))
        mlflow.log_dict(metrics, version_report.INPUTS["metrics"])
        mlflow.log_dict(tables, version_report.INPUTS["tables"])
        mlflow.log_artifacts(cfg.plots, "plots")
        mlflow.log_dict(verdict, version_report.INPUTS["verdict"])
        mlflow.log_dict(scores, "validation_scores.json")
        mlflow.log_dict(held_out, version_report.INPUTS["scores"])
        mlflow.log_table(pd.DataFrame(verdict["before_after"]), "before_after.json")
        failed = [n for n, g in verdict["gates"].items() if not g["passed"]]
        version = registry.register(
            params.finetune.out, run_id=run_id, name=params.registry.model_name, gates_passed=verdict["passed"],
            status=verdict["status"], base_version=base_version, description=description,
            tags={"eer": f"{cand['eer']:.4f}", "auc": f"{cand['auc']:.4f}", "human_fpr": f"{cand['fpr']:.4f}",
                  "new_gen_recall": f"{cand['new_recall']:.4f}", "failed_gates": ",".join(failed) or "none",
                  "source": "finetune", "gate_data": verdict["gate_data"], "recipe": str(verdict.get("recipe"))}
            | ({"missing_evidence": ",".join(missing)} if (missing := _missing(verdict["evidence"], cfg.gates)) else {}))
    return {"model_version": version, "mlflow_run_id": run_id, "base_version": base_version}


def _missing(evidence: dict, gates) -> list[str]:
    """Short names of the evidence below what the gates need (the sentences are in verdict.json)."""
    need = {"new_files": gates.min_new_files, "calibration_humans": gates.min_calibration_humans}
    return [k for k, n in need.items() if evidence.get(k, 0) < n]


def main(argv: list[str] | None = None) -> int:
    return stage_main("validate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
