"""`aivoice detect`: score audio files with a detector, batching windows across files."""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from pipeline.config import Params
from pipeline.core.audio import AudioError, audio_info, stream_audio
from pipeline.apps.decode_pool import CpuFeatures, DecodePool, feature_chunks
from pipeline.core.features import stream_windows, window_starts
from pipeline.core.scoring import Scorer, score_streams, window_sizes
from pipeline.progress import enabled, progress

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


LONG_RUN_FILES, LONG_RUN_S = 20, 60.0   # a progress bar from this many files, or seconds of audio
HEADER_SCAN_MAX_FILES = 2000   # beyond, the bar counts files: reading every header first would delay the first result


def detect_files(paths: list[Path], scorer: Scorer, params: Params, threshold: float, model_name: str = "",
                 max_duration_s: float | None = None, pool: DecodePool | None = None) -> Iterator[Detection]:
    """Score each file (streamed, so hours-long files use bounded memory); errors are per file.
    `max_duration_s` refuses longer files (the service's cap; the CLI scores files of any length). A long
    run (many files, or a minute of audio or more) shows a progress bar in seconds of audio on stderr
    (pipeline.progress: only on a terminal), read from the headers first; past HEADER_SCAN_MAX_FILES
    files it counts files instead, so a folder of 100 000 files starts scoring at once.

    On CPU the files' windows reach the model as features computed on CPU in chunks of
    `detect.batch_windows` per file (pipeline.apps.decode_pool), in the `pool`'s worker processes when
    one is given, so the scores do not depend on the number of workers."""
    sr = params.audio.sample_rate
    seg, hop = window_sizes(params.audio, params.detect)
    decoded = [0] * len(paths)   # samples per file at the model's rate: where each window starts

    by_files = enabled() and len(paths) > HEADER_SCAN_MAX_FILES   # no header pass before the first result
    expected = [_header_seconds(p) for p in paths] if enabled() and not by_files else [0.0] * len(paths)
    if by_files:
        bar = progress(total=len(paths), desc="detect", unit="file")
    else:
        long_run = len(paths) > LONG_RUN_FILES or sum(expected) >= LONG_RUN_S
        bar = progress(total=round(sum(expected), 1), desc="detect", unit="s", when=long_run,
                       bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]")
    if scorer.device.type == "cpu":
        streams = _feature_streams(paths, scorer, params, max_duration_s, pool, decoded, bar, expected)
    else:   # the front end runs on the GPU beside the model; no workers
        streams = (stream_windows(_counted(_adding(stream_audio(p, params.audio, max_duration_s), decoded, i), bar, sr, s),
                                  seg, hop) for i, (p, s) in enumerate(zip(paths, expected)))
    results = score_streams(scorer, streams, params.detect, featurized=scorer.device.type == "cpu")
    for i, (path, res) in enumerate(zip(paths, results)):
        if by_files:
            bar.update(1)
        if isinstance(res, AudioError):
            yield Detection(path=str(path), error=res.reason, model=model_name)
        else:
            yield Detection(path=str(path), ai_score=round(res.ai_score, 6), threshold=threshold,
                            label=AI_GENERATED if res.ai_score >= threshold else HUMAN, windows=res.windows,
                            window_starts=[round(s / sr, 3) for s in window_starts(decoded[i], seg, hop)],
                            duration_s=round(decoded[i] / sr, 3),
                            language=res.language, speakers=res.speakers, model=model_name)
    bar.close()


def _adding(blocks: Iterator[np.ndarray], decoded: list[int], i: int) -> Iterator[np.ndarray]:
    for block in blocks:
        decoded[i] += len(block)
        yield block


def _feature_streams(paths: list[Path], scorer: Scorer, params: Params, max_duration_s: float | None,
                     pool: DecodePool | None, decoded: list[int], bar, expected: list[float]) -> Iterator[Iterator]:
    """Per file, a stream of (features, rms) windows for `score_streams(featurized=True)`; it raises the
    file's AudioError after the windows decoded before it, with or without workers."""
    sr, (seg, hop) = params.audio.sample_rate, window_sizes(params.audio, params.detect)
    chunk, feats = params.detect.batch_windows, scorer.model.meta.feature_config()
    local = CpuFeatures(params.audio, feats)

    def streamed(i: int, path: Path) -> Iterator:
        moved = [0.0]

        def on_block(block: np.ndarray) -> None:   # the bar moves while a long file decodes
            decoded[i] += len(block)
            step = min(len(block) / sr, max(0.0, expected[i] - moved[0]))
            moved[0] += step
            bar.update(step)
        try:
            yield from _windows_of(feature_chunks(path, params.audio, local, seg, hop, chunk, max_duration_s, on_block))
        finally:
            bar.update(max(0.0, expected[i] - moved[0]))

    if pool is None:
        for i, path in enumerate(paths):
            yield streamed(i, path)
        return
    for i, (kind, chunks, n, reason) in enumerate(pool.decode(paths, params.audio, feats, seg, hop, chunk, max_duration_s)):
        if kind == "stream":
            yield streamed(i, paths[i])
            continue
        decoded[i] = n
        yield _with_bar(_replayed(chunks, paths[i], reason), bar, expected[i])


def _windows_of(chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[torch.Tensor, float]]:
    for feats, rms in chunks:
        feats = torch.from_numpy(feats)
        for j in range(len(rms)):
            yield feats[j], rms[j]


def _replayed(chunks: list, path: Path, reason: str | None) -> Iterator[tuple[torch.Tensor, float]]:
    yield from _windows_of(chunks)
    if reason is not None:
        raise AudioError(path, reason)


def _with_bar(windows: Iterator, bar, expected_s: float) -> Iterator:
    """Moves the bar by the file's header duration once its windows are used up (or it failed)."""
    try:
        yield from windows
    finally:
        bar.update(expected_s)


def _header_seconds(path: Path) -> float:
    """The file's duration by its header (0 when it cannot be read: decoding will say why)."""
    try:
        return float(audio_info(path).duration)
    except AudioError:
        return 0.0


def _counted(blocks: Iterator[np.ndarray], bar, rate: int, expected_s: float) -> Iterator[np.ndarray]:
    """Pass blocks through, moving the bar by their seconds; a file that ends early (an error, a header
    that overstated its length) still moves the bar by exactly its header duration."""
    done = 0.0
    try:
        for block in blocks:
            step = min(len(block) / rate, max(0.0, expected_s - done))
            done += step
            bar.update(step)
            yield block
    finally:
        bar.update(max(0.0, expected_s - done))


def hf_output(d: Detection) -> list[dict]:
    """Hugging Face's audio-classification pipeline output for one file: both labels with their
    probabilities (AI score and 1 - AI score), highest first; [] for a file that could not be scored.
    The top label is the likelier class, not the call at the served threshold (`label` elsewhere)."""
    if d.error:
        return []
    scores = [{"label": AI_GENERATED, "score": d.ai_score}, {"label": HUMAN, "score": round(1.0 - d.ai_score, 6)}]
    return sorted(scores, key=lambda s: -s["score"])


def write_results(results: Iterable[Detection], fmt: str, out: TextIO, header: bool = True) -> list[Detection]:
    """Print results as they come (table, json lines, csv, or hf: one Hugging Face list per line, in
    file order), flushed per file; `header`: the table's or csv's header line first (not when appending
    to an earlier run's csv). Returns only the files that failed, so memory stays bounded however many
    files are scored."""
    failed = []
    writer = None
    if fmt == "table" and header:
        out.write(f"{'ai_score':>8}  {'label':<12}  {'language':<8}  {'speakers':<8}  path\n")
    for r in results:
        if r.error:
            failed.append(Detection(path=r.path, error=r.error, model=r.model))
        if fmt == "json":
            out.write(json.dumps(asdict(r)) + "\n")
        elif fmt == "hf":
            out.write(json.dumps(hf_output(r)) + "\n")
        elif fmt == "csv":
            row = asdict(r) | {"windows": " ".join(map(str, r.windows)), "window_starts": " ".join(map(str, r.window_starts))}
            if writer is None:
                writer = csv.DictWriter(out, fieldnames=list(row))
                if header:
                    writer.writeheader()
            writer.writerow(row)
        elif r.error:
            out.write(f"{'-':>8}  {'ERROR':<12}  {'':<8}  {'':<8}  {r.path}: {r.error}\n")
        else:
            out.write(f"{r.ai_score:>8.3f}  {r.label:<12}  {r.language:<8}  {r.speakers:<8}  {r.path}\n")
        out.flush()
    return failed
