"""`aivoice detect`: score audio files with a detector, batching windows across files."""
from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from pipeline.core.audio import AudioError, stream_audio
from pipeline.config import Params
from pipeline.core.features import stream_windows, window_starts
from pipeline.core.scoring import Scorer, score_streams

AI_GENERATED, HUMAN = "AI_GENERATED", "HUMAN"


@dataclass
class Detection:
    """One file's verdict, or its error (then the scores are None)."""

    path: str
    ai_score: float | None = None
    label: str | None = None
    threshold: float | None = None
    windows: list[float] = field(default_factory=list)
    window_starts: list[float] = field(default_factory=list)   # seconds from the start, one per window
    duration_s: float | None = None                              # decoded duration
    language: str | None = None
    speakers: str | None = None
    error: str | None = None
    model: str | None = None


def detect_files(paths: list[Path], scorer: Scorer, params: Params, threshold: float, model_name: str = "",
                 max_duration_s: float | None = None) -> Iterator[Detection]:
    """Score each file (streamed, so hours-long files use bounded memory); errors are per file.
    `max_duration_s` refuses longer files (the service's cap; the CLI scores files of any length)."""
    sr = params.audio.sample_rate
    seg, hop = params.audio.segment_samples, round(params.detect.hop_s * sr)
    decoded = [0] * len(paths)   # samples per file at the model's rate: where each window starts

    def counted(i: int, blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for block in blocks:
            decoded[i] += len(block)
            yield block

    streams = (stream_windows(counted(i, stream_audio(p, params.audio, max_duration_s)), seg, hop)
               for i, p in enumerate(paths))
    progress = tqdm(total=len(paths), desc="detect", unit="file", disable=None if len(paths) > 20 else True, file=sys.stderr)
    for i, (path, res) in enumerate(zip(paths, score_streams(scorer, streams, params.detect))):
        progress.update()
        if isinstance(res, AudioError):
            yield Detection(path=str(path), error=res.reason, model=model_name)
        else:
            yield Detection(path=str(path), ai_score=round(res.ai_score, 6), threshold=threshold,
                            label=AI_GENERATED if res.ai_score >= threshold else HUMAN, windows=res.windows,
                            window_starts=[round(s / sr, 3) for s in window_starts(decoded[i], seg, hop)],
                            duration_s=round(decoded[i] / sr, 3),
                            language=res.language, speakers=res.speakers, model=model_name)
    progress.close()


def write_results(results: Iterable[Detection], fmt: str, out: TextIO) -> list[Detection]:
    """Print results as they come (table, json lines or csv); return them."""
    done = []
    writer = None
    if fmt == "table":
        out.write(f"{'ai_score':>8}  {'label':<12}  {'language':<8}  {'speakers':<8}  path\n")
    for r in results:
        done.append(r)
        if fmt == "json":
            out.write(json.dumps(asdict(r)) + "\n")
        elif fmt == "csv":
            row = asdict(r) | {"windows": " ".join(map(str, r.windows)), "window_starts": " ".join(map(str, r.window_starts))}
            if writer is None:
                writer = csv.DictWriter(out, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
        elif r.error:
            out.write(f"{'-':>8}  {'ERROR':<12}  {'':<8}  {'':<8}  {r.path}: {r.error}\n")
        else:
            out.write(f"{r.ai_score:>8.3f}  {r.label:<12}  {r.language:<8}  {r.speakers:<8}  {r.path}\n")
        out.flush()
    return done
