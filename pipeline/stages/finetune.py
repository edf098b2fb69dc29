"""Stage finetune: a candidate from the production model, the new samples and a replay set."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import Params, params_hash
from pipeline.data import data_hash, read_corpus
from pipeline.finetune import finetune
from pipeline.model import load_checkpoint, save_checkpoint
from pipeline.stages.common import stage_main, write_json


def run(params: Params) -> dict:
    cfg = params.finetune
    production = load_checkpoint(cfg.base_model, params.audio, params.features)
    candidate, report = finetune(production, params)
    out = Path(cfg.out)
    out.unlink(missing_ok=True)   # a stage output: DVC keeps every earlier version in its cache
    dhash = data_hash(read_corpus(Path(params.ingest.store)))
    save_checkpoint(candidate, out, threshold=report["calibration"]["threshold"], data_hash=dhash,
                    params_hash=params_hash(params),
                    notes={"base_model": cfg.base_model, "new_generators": report["new_generators"], "trained": report["trained"]})
    write_json(cfg.report, report | {"checkpoint": str(out), "data_hash": dhash})
    return {"checkpoint": str(out), "threshold": report["calibration"]["threshold"], "lofo": report["lofo"]["scores"]}


def main(argv: list[str] | None = None) -> int:
    return stage_main("finetune", run, argv)


if __name__ == "__main__":
    sys.exit(main())
