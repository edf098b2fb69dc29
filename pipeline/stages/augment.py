"""Stage augment: the production report's recipe applied to the new samples.

New samples are the stored train-split AI clips of `augment_stage.new_generators` (default: the AI
generators of the latest ingest batch). The new generator's test-split clips are never augmented, so
never trained on: the validate stage scores them with the candidate as held-out files. Each gets `augment.copies` random 3 s crops, augmented (stretch,
codec, band limit, gain, noise), written as 16-bit WAV beside an index.csv; the spectrogram part
of the recipe (mel pitch shift, SpecAugment) is applied when the copies are embedded in finetune.
Copy i of a clip is reproducible from (its sha256, i).
"""
from __future__ import annotations

import csv
import io
import shutil
import sys
from pathlib import Path

import soundfile as sf

from pipeline import atomic
from pipeline.core.audio import load_audio
from pipeline.core.augment import augment_copies
from pipeline.config import Params
from pipeline.core.data import CorpusError
from pipeline.progress import progress
from pipeline.io.disk import require_free
from pipeline.stages.common import stage_main
from pipeline.io.store import read_manifest

INDEX = "index.csv"


def new_samples(rows: list[dict], generators: tuple[str, ...]) -> list[dict]:
    """Train-split manifest rows of the new generator(s): named ones, else those of the latest batch's AI
    clips. Their test-split clips are never trained on: validate scores them with the candidate."""
    ai = [r for r in rows if r["label"] == "ai"]
    if not generators:
        if not ai:
            raise CorpusError("the store holds no AI clips to augment; ingest new samples first")
        latest = max(r["batch"] for r in ai)
        generators = tuple(sorted({r["generator"] for r in ai if r["batch"] == latest}))
    chosen = [r for r in ai if r["generator"] in generators]
    if not chosen:
        raise CorpusError(f"no stored AI clips of generator(s) {', '.join(generators)}")
    train = [r for r in chosen if r["split"] != "test"]
    if not train:
        raise CorpusError(f"every stored clip of generator(s) {', '.join(generators)} is in the test split: nothing to "
                          "learn from (clips dropped into the incoming folder are stored as train)")
    return train


def run(params: Params) -> dict:
    store, out = Path(params.ingest.store), Path(params.augment_stage.out)
    require_free(out, params.storage.min_free_gb, "augment")
    rows = new_samples(read_manifest(store), params.augment_stage.new_generators)
    if out.exists():
        shutil.rmtree(out)   # this stage owns its output folder (DVC removes it too before a run)
    out.mkdir(parents=True)
    sr, seg = params.audio.sample_rate, params.audio.segment_samples
    index = []
    for row in progress(rows, desc="augment", unit="clip"):
        wave = load_audio(store / row["path"], params.audio)
        seed = int(row["sha256"][:8], 16)
        for i, copy in enumerate(augment_copies(wave, sr, cfg=params.augment, seed=seed, segment=seg)):
            name = f"{row['sha256'][:16]}_{i:02d}.wav"
            peak = float(abs(copy).max())
            # 16-bit PCM keeps the bytes reproducible (float WAV carries a timestamped PEAK chunk);
            # scaling down a loud copy changes nothing downstream: log-mel features are gain-invariant
            sf.write(out / name, copy * min(1.0, 0.99 / peak) if peak else copy, sr, subtype="PCM_16")
            index.append({"file": name, "sha256": row["sha256"], "generator": row["generator"], "copy": i})
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["file", "sha256", "generator", "copy"], lineterminator="\r\n")
    w.writeheader()
    w.writerows(index)
    atomic.write_text(out / INDEX, buf.getvalue())   # last: a folder without its index is an unfinished run
    return {"new_clips": len(rows), "copies": len(index), "generators": sorted({r["generator"] for r in rows}), "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    return stage_main("augment", run, argv)


if __name__ == "__main__":
    sys.exit(main())
