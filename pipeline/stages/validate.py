"""Stage validate: candidate vs production on held-out data; metrics, plots and the verdict."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.config import Params
from pipeline.model import load_checkpoint
from pipeline.plots import write_plots
from pipeline.stages.common import stage_main, write_json
from pipeline.validate import validate

SUMMARY_KEYS = ("threshold", "eer", "auc", "fpr", "recall", "new_recall", "n_test", "n_new")


def run(params: Params) -> dict:
    cfg = params.validation
    candidate = load_checkpoint(params.finetune.out, params.audio, params.features)
    production = load_checkpoint(params.finetune.base_model, params.audio, params.features)
    finetune_report = json.loads(Path(params.finetune.report).read_text())
    result = validate(candidate, production, finetune_report, params)
    models = result["models"]
    metrics = {name: {k: m[k] for k in SUMMARY_KEYS} for name, m in models.items()}
    metrics["candidate"]["per_generator"] = models["candidate"]["tables"]["per_generator"]
    metrics["candidate"]["per_source"] = models["candidate"]["tables"]["per_source"]
    metrics["production"]["per_generator"] = models["production"]["tables"]["per_generator"]
    write_json(cfg.metrics, metrics)
    write_plots({name: {"scores": m["scores"], "labels": m["labels"], "threshold": m["threshold"]}
                 for name, m in models.items()}, Path(cfg.plots))
    write_json(cfg.verdict, result["verdict"])
    return {"passed": result["verdict"]["passed"], "reasons": result["verdict"]["reasons"], "verdict": cfg.verdict}


def main(argv: list[str] | None = None) -> int:
    return stage_main("validate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
