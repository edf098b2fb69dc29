"""Spectrogram front end and segmentation, shared by training, validation and scoring.

A segment is `audio.segment_s` seconds. Clips shorter than a segment are tiled (repeated) to
full length rather than zero-padded, so that padding silence cannot become a class cue.
Each log spectrogram has its mean removed, which makes scores independent of input gain; with
`normalize: rms` each window is also scaled to one RMS first, so the log floor sits at the same
level below the speech whatever the recording's level; with `normalize: cmn` each bin's mean over the
window is removed instead, so a fixed channel response (a constant per bin in the log domain) is no
cue. A trained model scores with the front end recorded in its checkpoint
(`pipeline.core.model.ModelMeta.feature_config`).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torchaudio

from pipeline.config import AudioConfig, FeatureConfig


RMS_LEVEL = 0.1   # the level every window is scaled to with normalize: rms


class FrontEnd(torch.nn.Module):
    """(B, samples) waveform -> (B, 1, bins, frames) mean-normalised log power spectrogram:
    `n_mels` mel bins (kind mel), n_fft/2+1 linear bins (kind linear) or `n_mels` bands spaced evenly
    in Hz (kind linear_bands)."""

    def __init__(self, audio: AudioConfig, feats: FeatureConfig) -> None:
        super().__init__()
        self.floor = feats.log_floor
        self.rms = feats.normalize == "rms"
        self.mean_dims = (2,) if feats.normalize == "cmn" else (1, 2)  # per bin over time, or the whole window
        if feats.kind == "auto":
            raise ValueError("features.kind auto is resolved from the training audio first (resolve_kind)")
        common = dict(n_fft=feats.n_fft, win_length=feats.win_length, hop_length=feats.hop_length, power=2.0, center=True)
        if feats.kind == "mel":
            self.spec = torchaudio.transforms.MelSpectrogram(
                sample_rate=audio.sample_rate, f_min=feats.f_min, f_max=feats.f_max, n_mels=feats.n_mels, **common)
        else:
            self.spec = torchaudio.transforms.Spectrogram(**common)
        bands = torchaudio.functional.linear_fbanks(feats.n_fft // 2 + 1, feats.f_min, feats.f_max, feats.n_mels,
                                                    audio.sample_rate) if feats.kind == "linear_bands" else None
        self.register_buffer("bands", bands, persistent=False)   # (n_fft/2+1, n_mels) or None

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        wave = wave.float()
        if self.rms:
            wave = wave * (RMS_LEVEL / wave.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-8))
        spec = self.spec(wave)  # (B, bins, T)
        if self.bands is not None:
            spec = (spec.transpose(1, 2) @ self.bands).transpose(1, 2)
        spec = spec.clamp_min(self.floor).log()
        spec = spec - spec.mean(dim=self.mean_dims, keepdim=True)
        return spec.unsqueeze(1)  # (B, 1, bins, T)


WIDEBAND_EDGE_HZ = 6000.0   # telephone audio ends at 3.4-4 kHz, 16 kHz recordings near 8 kHz: well apart
EDGE_BELOW_PEAK_DB = 50.0   # a band this far below the loudest one is the recording's floor, not its signal


def spectral_edge_hz(wave: np.ndarray, sample_rate: int) -> float:
    """Where a recording's band ends: the top of the highest 100 Hz band whose mean power is within
    `EDGE_BELOW_PEAK_DB` of the loudest band's. Resampling does not move it (8 kHz telephone audio at
    24 kHz still ends near 4 kHz), unlike the file's sample rate."""
    x = np.asarray(wave, dtype=np.float64)[:sample_rate * 30]
    if not len(x):
        raise ValueError("cannot measure the band of an empty clip")
    power = np.abs(np.fft.rfft(x)) ** 2
    n_bands = max(1, int(sample_rate / 2 // 100))
    band = np.minimum((np.fft.rfftfreq(len(x), 1 / sample_rate) / 100).astype(int), n_bands - 1)
    mean = np.bincount(band, power, n_bands) / np.maximum(np.bincount(band, minlength=n_bands), 1)
    db = 10 * np.log10(mean + 1e-30)
    return float(np.flatnonzero(db > db.max() - EDGE_BELOW_PEAK_DB).max() + 1) * 100.0


def resolve_kind(feats: FeatureConfig, human_waves: list[np.ndarray], sample_rate: int) -> tuple[FeatureConfig, dict]:
    """The concrete front end for `kind: auto`: linear_bands when the median human training clip reaches
    `WIDEBAND_EDGE_HZ` (their even spacing resolves the high band where vocoders leave their traces:
    benchmarks 5e), mel otherwise (on telephone audio two thirds of the linear bands would lie above the
    band's end, empty, while mel spends its bins below 4 kHz). Any other kind is returned unchanged.
    Returns the config and what was measured."""
    if feats.kind != "auto":
        return feats, {"kind": feats.kind, "chosen_by": "features.kind"}
    if not human_waves:
        raise ValueError("features.kind auto: no human training clips to measure the band on")
    edge = float(np.median([spectral_edge_hz(w, sample_rate) for w in human_waves]))
    kind = "linear_bands" if edge >= WIDEBAND_EDGE_HZ else "mel"
    return feats.model_copy(update={"kind": kind}), {
        "kind": kind, "chosen_by": "features.kind auto", "human_edge_khz": round(edge / 1000, 2),
        "n_humans": len(human_waves), "wideband_from_khz": WIDEBAND_EDGE_HZ / 1000}


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Tile a short clip to exactly n samples (longer clips are cut)."""
    if len(x) == 0:
        raise ValueError("cannot tile an empty clip")
    reps = -(-n // len(x))
    return np.tile(x, reps)[:n] if reps > 1 else x[:n]


def draw_start(length: int, n: int, rng: np.random.Generator) -> int:
    """Where a random n-sample crop of a `length`-sample clip starts (its tiling phase when shorter)."""
    return int(rng.integers(length)) if length <= n else int(rng.integers(length - n + 1))


def crop_at(x: np.ndarray, start: int, n: int) -> np.ndarray:
    """The n-sample crop starting at `start`; a short clip is tiled from phase `start`."""
    if len(x) <= n:
        return fit_length(np.roll(x, -start), n)
    return x[start:start + n]


def random_crop(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random n-sample crop (training); short clips are tiled from a random phase."""
    return crop_at(x, draw_start(len(x), n, rng), n)


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
