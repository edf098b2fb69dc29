"""Stage finetune: a candidate from the production model, the new samples and a replay set."""
from __future__ import annotations

import sys
from pathlib import Path

import mlflow

from pipeline.io import tracking
from pipeline.config import Params, params_hash
from pipeline.core.data import data_hash, read_corpus
from pipeline.training.finetune import finetune
from pipeline.core.model import load_checkpoint, save_checkpoint
from pipeline.faults import fault_point
from pipeline.io.disk import require_free
from pipeline.stages.common import stage_main, write_json


def run(params: Params) -> dict:
    """Fine-tune in an MLflow run that the validate stage resumes (one run per candidate)."""
    cfg = params.finetune
    require_free(cfg.out, params.storage.min_free_gb, "finetune")
    production = load_checkpoint(cfg.base_model, params.audio)
    dhash = data_hash(read_corpus(Path(params.ingest.store)))
    with tracking.training_run(params, "finetune", data_hash=dhash) as active:
        mlflow.set_tags({"base_model_data_hash": production.meta.data_hash, "base_model": cfg.base_model})
        candidate, report = finetune(production, params)
        fault_point("finetune.trained")
        tracking.log_history(report["history"])
        mlflow.log_metrics({"calibrated_threshold": report["calibration"]["threshold"],
                            "calibration_humans": report["calibration"]["n_humans"]}
                           | {f"segments_{k}": v for k, v in report["segments"].items() if isinstance(v, (int, float))})
        mlflow.set_tags({"recipe": report["recipe"], "calibration_from": report["segments"].get("calibration_from", "")})
        out = Path(cfg.out)
        out.unlink(missing_ok=True)   # a stage output: DVC keeps every earlier version in its cache
        save_checkpoint(candidate, out, threshold=report["calibration"]["threshold"], data_hash=dhash,
                        params_hash=params_hash(params),
                        notes={"base_model": cfg.base_model, "new_generators": report["new_generators"],
                               "trained": report["trained"], "recipe": report["recipe"]})
        report |= {"checkpoint": str(out), "data_hash": dhash, "mlflow_run_id": active.info.run_id}
        write_json(cfg.report, report)
        mlflow.log_artifact(cfg.report)
    return {"checkpoint": str(out), "threshold": report["calibration"]["threshold"], "lofo": report["lofo"]["files"],
            "mlflow_run_id": active.info.run_id}


def main(argv: list[str] | None = None) -> int:
    return stage_main("finetune", run, argv)


if __name__ == "__main__":
    sys.exit(main())
