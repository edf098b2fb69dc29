"""Log-mel front end and segmentation, shared by training, validation and scoring.

A segment is `audio.segment_s` seconds. Clips shorter than a segment are tiled (repeated) to
full length rather than zero-padded, so that padding silence cannot become a class cue.
Each log-mel segment has its mean removed, which makes scores independent of input gain.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torchaudio

from pipeline.config import AudioConfig, FeatureConfig


class LogMel(torch.nn.Module):
    """(B, samples) waveform -> (B, 1, n_mels, frames) mean-normalised log-mel."""

    def __init__(self, audio: AudioConfig, feats: FeatureConfig) -> None:
        super().__init__()
        self.floor = feats.log_floor
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=audio.sample_rate, n_fft=feats.n_fft, win_length=feats.win_length,
            hop_length=feats.hop_length, f_min=feats.f_min, f_max=feats.f_max, n_mels=feats.n_mels,
            power=2.0, center=True,
        )

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = self.mel(wave.float()).clamp_min(self.floor).log()  # (B, n_mels, T)
        spec = spec - spec.mean(dim=(1, 2), keepdim=True)
        return spec.unsqueeze(1)  # (B, 1, n_mels, T)


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Tile a short clip to exactly n samples (longer clips are cut)."""
    if len(x) == 0:
        raise ValueError("cannot tile an empty clip")
    reps = -(-n // len(x))
    return np.tile(x, reps)[:n] if reps > 1 else x[:n]


def random_crop(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random n-sample crop (training); short clips are tiled from a random phase."""
    if len(x) <= n:
        return fit_length(np.roll(x, -int(rng.integers(len(x)))), n)
    start = int(rng.integers(len(x) - n + 1))
    return x[start:start + n]


def window_starts(n_samples: int, seg: int, hop: int) -> list[int]:
    """Fixed window starts covering a clip: every hop, plus one flush with the end."""
    if n_samples <= seg:
        return [0]
    starts = list(range(0, n_samples - seg + 1, hop))
    if starts[-1] != n_samples - seg:
        starts.append(n_samples - seg)
    return starts


def windows(x: np.ndarray, seg: int, hop: int) -> np.ndarray:
    """(n_windows, seg) fixed scoring windows of a whole clip."""
    if len(x) <= seg:
        return fit_length(x, seg)[None]
    return np.stack([x[s:s + seg] for s in window_starts(len(x), seg, hop)])


def stream_windows(blocks: Iterator[np.ndarray], seg: int, hop: int) -> Iterator[np.ndarray]:
    """Same windows as `windows(concatenate(blocks))`, holding at most about one block in memory."""
    buf = np.zeros(0, np.float32)
    offset = 0        # absolute index of buf[0]
    next_start = 0
    total = 0
    for block in blocks:
        buf = np.concatenate([buf, block])
        total += len(block)
        while next_start + seg <= total:
            yield buf[next_start - offset:next_start - offset + seg]
            next_start += hop
        keep_from = min(next_start, max(total - seg, 0))
        buf, offset = buf[keep_from - offset:], keep_from
    if total == 0:
        return
    if next_start == 0:  # shorter than one segment
        yield fit_length(buf, seg)
    elif next_start - hop != total - seg:  # the last hop-aligned window did not reach the end
        yield buf[total - seg - offset:]
