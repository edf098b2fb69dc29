"""Decoding, resampling and the spectrogram front end of `aivoice detect` in worker processes.

On CPU about a third of detection is not the model: decoding, resampling and the log-mel front end
(docs/benchmarks.md, section 8). Worker processes do that part for the files ahead while the main process
runs the model, so the two overlap. Both paths cut a file's windows into the same chunks of
`detect.batch_windows` and compute their features with the same front end on CPU, one thread, so scores
are bit-identical with and without workers. A worker keeps a whole file's features in memory, so files
longer than WORKER_MAX_S (by their header) are streamed in the main process instead, in bounded memory.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from pipeline.config import AudioConfig, FeatureConfig
from pipeline.core.audio import AudioError, audio_info, stream_audio

WORKER_MAX_S = 600.0    # longer files: streamed in the main process (a worker holds a file's features whole)
LOOKAHEAD_PER_WORKER = 4   # files decoded ahead of the model per worker: bounds memory on huge folders

Chunk = tuple[np.ndarray, np.ndarray]   # (log-spectrograms (n, 1, bins, T), rms (n,)) of up to batch_windows windows


def resolve_workers(setting: str | int, n_files: int) -> int:
    """`detect.workers`: auto = one worker per CPU core beyond the model's own, at most 4; none for a
    single file (process start would cost more than it saves), and none where `compute.threads: auto`
    would use one thread (<= 2 cores, or a 1-minute load at least the core count): there the workers
    only take CPU from the model (docs/benchmarks.md, section 8)."""
    from pipeline.config import auto_threads

    if setting != "auto":
        return int(setting)
    if n_files < 2 or auto_threads() == 1:
        return 0
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def feature_chunks(path: Path, audio: AudioConfig, features: Callable[[np.ndarray], Chunk], seg: int, hop: int,
                   chunk: int, max_duration_s: float | None, on_block: Callable[[np.ndarray], None]) -> Iterator[Chunk]:
    """A file's windows, `chunk` at a time, as features; raises the file's AudioError after the chunks
    decoded before it (as the streamed path always has)."""
    from pipeline.core.features import stream_windows

    def counted(blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for block in blocks:
            on_block(block)
            yield block

    pending: list[np.ndarray] = []
    for w in stream_windows(counted(stream_audio(path, audio, max_duration_s)), seg, hop):
        pending.append(w)
        if len(pending) == chunk:
            yield features(np.stack(pending))
            pending = []
    if pending:
        yield features(np.stack(pending))


class CpuFeatures:
    """The front end of one feature configuration on CPU, as numpy (what a worker sends back)."""

    def __init__(self, audio: AudioConfig, feats: FeatureConfig) -> None:
        from pipeline.core.features import FrontEnd

        self.front_end = FrontEnd(audio, feats)

    def __call__(self, batch: np.ndarray) -> Chunk:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32))
            return self.front_end(x).numpy(), x.square().mean(-1).sqrt().numpy()


_front_ends: dict[str, CpuFeatures] = {}


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)   # the workers share the cores with the model: one thread each
    import pipeline.core.features  # noqa: F401  (imports torchaudio now, while the main process loads the model)


def _decode(path: str, audio: AudioConfig, feats: FeatureConfig, seg: int, hop: int, chunk: int,
            max_duration_s: float | None) -> tuple[str, list[Chunk], int, str | None]:
    """In a worker: ("done", chunks, decoded samples, error reason or None), or ("stream", ...) for a
    file too long to hold whole, which the main process then streams itself."""
    try:
        info = audio_info(path)
        if info.frames / max(info.samplerate, 1) > WORKER_MAX_S:
            return "stream", [], 0, None
    except AudioError:
        pass   # stream_audio below says why, in the same words as in the main process
    key = audio.model_dump_json() + feats.model_dump_json()
    if key not in _front_ends:
        _front_ends[key] = CpuFeatures(audio, feats)
    decoded = [0]
    chunks: list[Chunk] = []

    def on_block(block: np.ndarray) -> None:
        decoded[0] += len(block)

    try:
        for c in feature_chunks(Path(path), audio, _front_ends[key], seg, hop, chunk, max_duration_s, on_block):
            chunks.append(c)
    except AudioError as err:
        return "done", chunks, decoded[0], err.reason
    return "done", chunks, decoded[0], None


class DecodePool:
    """N worker processes (spawned, so no torch state is forked) that decode files ahead of the model.
    Start it early: the workers import torch while the main process loads the model."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def decode(self, paths: Iterable[Path], audio: AudioConfig, feats: FeatureConfig, seg: int, hop: int, chunk: int,
               max_duration_s: float | None) -> Iterator[tuple[str, list[Chunk], int, str | None]]:
        """Results of `_decode`, in file order, at most LOOKAHEAD_PER_WORKER files per worker ahead."""
        pending: deque = deque()
        it = iter(paths)
        for path in it:
            pending.append(self.pool.apply_async(_decode, (str(path), audio, feats, seg, hop, chunk, max_duration_s)))
            if len(pending) >= self.workers * LOOKAHEAD_PER_WORKER:
                break
        while pending:
            result = pending.popleft().get()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(self.pool.apply_async(_decode, (str(nxt), audio, feats, seg, hop, chunk, max_duration_s)))
            yield result
