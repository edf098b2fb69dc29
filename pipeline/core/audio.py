"""Decoding: any file libsndfile reads (wav, flac, ogg/opus, mp3) -> mono float32 at the model's rate.

Policies (see docs/audio.md):
- several channels are averaged to mono; any input rate is resampled to `audio.sample_rate`;
- long files are streamed in blocks of `audio.block_s`, so memory stays bounded;
- a file that cannot be decoded, is shorter than `audio.min_duration_s`, holds NaN/inf samples
  or is silent throughout raises `AudioError` naming the file and the reason;
- a truncated file (an interrupted download or copy) is decoded as far as libsndfile gives
  samples: a short read ends the stream (wav, mp3; ogg vorbis/opus up to its last complete page),
  and so does a decoding error once some samples have come (flac: up to one read of `_READ_FRAMES`
  before the cut is lost); the length and silence checks then apply to what was decoded. It is an
  `AudioError` only when nothing is usable: the header cannot be read, the first read fails, or no
  samples decode (an ogg file cut inside its first audio page).
- decoding one file takes at most `audio.decode_timeout_s` of wall time, checked after every read
  of `_READ_FRAMES` frames: a file that makes the decoder crawl (a hostile or corrupt stream) is an
  `AudioError` and the batch goes on. One libsndfile call is not interrupted; the byte-level fuzz
  (tests/test_audio_fuzz.py) finds none that hangs.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from pipeline.config import AudioConfig

_READ_FRAMES = 1 << 14  # frames per libsndfile read; blocks are assembled from several reads

RESAMPLE_QUALITY = "HQ"  # soxr's default: 20-bit precision, passband to 91 % of the lower Nyquist rate

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".opus", ".mp3", ".oga", ".aiff", ".aif", ".au"})


class AudioError(ValueError):
    """A file that cannot be used as speech; str() is 'path: reason'."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def resample_stream(blocks: Iterator[np.ndarray], orig: int, new: int) -> Iterator[np.ndarray]:
    """Resample a stream of float32 blocks with soxr's streaming resampler: the output equals
    `resample` of the whole signal (soxr keeps the filter state between blocks), so block edges
    leave no seams. Blocks pass through unchanged at the same rate."""
    if orig == new:
        yield from blocks
        return
    stream = soxr.ResampleStream(orig, new, 1, dtype="float32", quality=RESAMPLE_QUALITY)
    for block in blocks:
        y = stream.resample_chunk(np.ascontiguousarray(block, np.float32))
        if len(y):
            yield y
    tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)  # flush the filter's delay line
    if len(tail):
        yield tail


def audio_info(path: str | Path) -> sf._SoundFileInfo:
    """Header information, or AudioError when libsndfile cannot open the file."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "no such file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        return sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(path, f"not a readable audio file ({_short(exc)})") from None


MAX_SAMPLE = 1e4   # largest |sample| accepted: float WAV/AIFF may exceed 1.0 a little, never by orders of magnitude


def stream_audio(path: str | Path, cfg: AudioConfig, max_duration_s: float | None = None) -> Iterator[np.ndarray]:
    """Yield mono float32 blocks at cfg.sample_rate; raise AudioError for unusable input.

    The minimum-duration and silence checks need the whole file, so they raise after the last
    block: callers that act on blocks as they come must be ready to discard their work.
    `max_duration_s` (the service's cap) is checked from the header before any decoding, and
    again while decoding, for headers that understate the length.
    """
    info = audio_info(path)
    if max_duration_s is not None and info.frames / info.samplerate > max_duration_s:
        raise AudioError(path, _too_long(info.frames / info.samplerate, max_duration_s))
    block = max(1, round(cfg.block_s * info.samplerate))
    max_frames = None if max_duration_s is None else max_duration_s * info.samplerate
    n_in, peak = 0, 0.0
    deadline = time.monotonic() + cfg.decode_timeout_s

    def mono_blocks() -> Iterator[np.ndarray]:
        # Not SoundFile.blocks(): it ignores short reads (a truncated mp3 would be padded to its
        # header's length with stale buffer contents) and one failing read loses the whole block.
        nonlocal n_in, peak
        try:
            f = sf.SoundFile(str(path))
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(path, f"not a readable audio file ({_short(exc)})") from None
        with f:
            parts: list[np.ndarray] = []
            n_parts = 0
            while True:
                try:
                    data = f.read(min(_READ_FRAMES, block), dtype="float32", always_2d=True)
                except (sf.LibsndfileError, RuntimeError) as exc:
                    if n_in + n_parts == 0:
                        raise AudioError(path, f"decoding failed at the start ({_short(exc)})") from None
                    break  # truncated or corrupt from here on: keep what decoded (module docstring)
                if not len(data):
                    break
                if time.monotonic() > deadline:
                    raise AudioError(path, f"decoding took over {cfg.decode_timeout_s:g} s (audio.decode_timeout_s) "
                                           f"at {(n_in + n_parts) / info.samplerate:.1f} s of audio")
                mono = data.mean(axis=1, dtype=np.float32)
                if not np.isfinite(mono).all():
                    raise AudioError(path, f"NaN or infinite samples near {(n_in + n_parts) / info.samplerate:.2f} s")
                block_peak = float(np.abs(mono).max())
                if block_peak > MAX_SAMPLE:   # float files: the resampler's sums overflow to inf/NaN up there
                    raise AudioError(path, f"sample magnitude {block_peak:.3g} near {(n_in + n_parts) / info.samplerate:.2f} s "
                                           f"(float audio is within +-1; over {MAX_SAMPLE:g} it is not audio)")
                peak = max(peak, block_peak)
                parts.append(mono)
                n_parts += len(mono)
                if max_frames is not None and n_in + n_parts > max_frames:
                    raise AudioError(path, _too_long((n_in + n_parts) / info.samplerate, max_duration_s, "over "))
                if n_parts >= block:
                    n_in += n_parts
                    yield np.concatenate(parts)
                    parts, n_parts = [], 0
            if parts:
                n_in += n_parts
                yield np.concatenate(parts)

    for out in resample_stream(mono_blocks(), info.samplerate, cfg.sample_rate):
        if not np.isfinite(out).all():   # defensive: nothing finite and under MAX_SAMPLE should get here
            raise AudioError(path, "resampling produced NaN or infinite samples")
        yield out
    duration = n_in / info.samplerate
    if n_in == 0:
        raise AudioError(path, "no samples decoded (empty or truncated stream)")
    if duration < cfg.min_duration_s:
        raise AudioError(path, f"too short: {duration:.4f} s (minimum {cfg.min_duration_s} s)")
    if peak < cfg.silence_peak:
        raise AudioError(path, f"silent: peak amplitude {peak:.2e} below {cfg.silence_peak:.0e}")


def load_audio(path: str | Path, cfg: AudioConfig) -> np.ndarray:
    """The whole file as one mono float32 array at cfg.sample_rate (for clips, not hours)."""
    blocks = list(stream_audio(path, cfg))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def load_native(path: str | Path, sample_rate: int) -> np.ndarray:
    """The whole file, mono, at `sample_rate` (its own rate for resynthesis), with the usual checks."""
    return load_audio(path, AudioConfig(sample_rate=sample_rate))


VAD_FRAME_S = 0.02


def voiced_region(x: np.ndarray, sr: int, floor_db: float) -> tuple[int, int]:
    """(start, end) samples between the first and last 20 ms frame within floor_db of the loudest frame:
    leading and trailing silence or noise cut (an energy VAD, relative so that level does not matter).
    The whole clip when floor_db is 0 or the region would be shorter than one frame."""
    frame = max(1, round(VAD_FRAME_S * sr))
    n = len(x) // frame
    if floor_db <= 0 or n < 2:
        return 0, len(x)
    rms = np.sqrt(np.mean(np.square(x[:n * frame].reshape(n, frame), dtype=np.float64), axis=1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (-floor_db / 20))
    start, end = int(loud[0]) * frame, (int(loud[-1]) + 1) * frame
    return (start, end if loud[-1] < n - 1 else len(x)) if end - start >= frame else (0, len(x))


def resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Resample a whole array (float32) with soxr, the same resampler as `resample_stream`; the
    output has round(len(x) * new / orig) samples."""
    if orig == new:
        return x.astype(np.float32, copy=False)
    return soxr.resample(np.ascontiguousarray(x, np.float32), orig, new, quality=RESAMPLE_QUALITY)


def find_audio(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of audio files; files are kept as given."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in AUDIO_SUFFIXES))
        else:
            found.append(p)
    return found


def _too_long(seconds: float, limit: float, prefix: str = "") -> str:
    return f"too long: {prefix}{seconds:.1f} s (maximum {limit:g} s)"


def _short(exc: Exception) -> str:
    """First line of a library error, bounded, for one-line messages."""
    return (str(exc).splitlines() or [type(exc).__name__])[0].strip()[:160]
