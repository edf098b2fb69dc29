"""Stage ingest: every file under `ingest.incoming` into the versioned store.

The incoming folder's layout says what each file is: `<incoming>/<human|ai>/<generator>/...`
(human files may sit directly under `human/`). Files already in the store are skipped, so the
stage can run on the same folder again; nothing under `incoming` is moved or modified. A symlink that
resolves outside `incoming` is rejected without being read.

Incoming AI clips are the retrain's training samples: stored in the train split, and judged
leave-one-file-out (a hash split would hide one of two clips from training in 4 draws of 10). Human
clips keep the hash split, whose test part calibrates and judges. Held-out clips of a new generator
are ingested with `aivoice ingest DIR --split test`: never trained on, scored by the candidate.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.audio import find_audio
from pipeline.config import Params
from pipeline.core.data import LABELS
from pipeline.stages.common import stage_main, write_json
from pipeline.io.disk import require_free
from pipeline.io.store import ClipInfo, ingest


def incoming_items(incoming: Path) -> list[tuple[Path, ClipInfo]]:
    """(file, description) for every audio file in the incoming layout."""
    items = []
    for label in LABELS:
        for path in find_audio([incoming / label]) if (incoming / label).is_dir() else []:
            rel = path.relative_to(incoming / label).parts
            generator = "human" if label == "human" else (rel[0] if len(rel) > 1 else "unknown")
            items.append((path, ClipInfo(label=label, generator=generator, split="train" if label == "ai" else "")))
    return items


def run(params: Params) -> dict:
    cfg = params.ingest
    require_free(cfg.store, params.storage.min_free_gb, "ingest")
    incoming = Path(cfg.incoming)
    report = ingest(incoming_items(incoming), Path(cfg.store), Path(cfg.quarantine), params.audio, cfg, within=incoming)
    write_json(cfg.report, report.to_dict())
    return {"added": len(report.added), "duplicates": len(report.duplicates), "rejected": len(report.rejected),
            "store": cfg.store, "report": cfg.report}


def main(argv: list[str] | None = None) -> int:
    return stage_main("ingest", run, argv)


if __name__ == "__main__":
    sys.exit(main())
