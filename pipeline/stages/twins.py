"""Stage twins: vocoded twins of the store's human training clips (pipeline.synthesis.twins).

Runs after ingest; its output folder (`twins.out`) is read with the store by bootstrap and by the
leave-sources-out evaluation. The neural decoders it trains are saved inside that folder, so DVC
versions them with the twins they made.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import Params
from pipeline.io.disk import require_free
from pipeline.stages.common import stage_main, write_json
from pipeline.synthesis.twins import make_twins
from pipeline.training.forked import forked_workers


def run(params: Params, corpus: str | Path | None = None, out: str | Path | None = None) -> dict:
    cfg = params.twins
    require_free(out or cfg.out, params.storage.min_free_gb, "twins")
    workers = forked_workers(params, "cpu")   # one vocoder per process where a core is free (compute.batch_workers)
    report = make_twins(corpus or params.ingest.store, out or cfg.out, cfg, workers).to_dict()
    write_json(cfg.report, report)
    return {"added": report["added"], "existing": report["existing"], "failed": report["n_failed"],
            "out": str(out or cfg.out), "report": cfg.report}


def ensure(params: Params, corpus: str | Path) -> dict | None:
    """Make the twins of `corpus` that `train.twins` lacks, before a training that reads that folder: so
    `aivoice bootstrap` and `aivoice evaluate` train the shipped recipe (with twins) even where `aivoice
    twins` was not run first. Only what is missing is made; None when the recipe has no twins to make
    (`train.twins` empty or `twins.vocoders` empty: the folder is then read as it is)."""
    if not params.train.twins or not params.twins.vocoders:
        return None
    return run(params, corpus, params.train.twins)


def main(argv: list[str] | None = None) -> int:
    return stage_main("twins", run, argv)


if __name__ == "__main__":
    sys.exit(main())
