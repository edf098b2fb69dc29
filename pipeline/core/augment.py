"""Seeded, reproducible audio augmentation: parameters are drawn from a numpy Generator, then
pure functions apply them (the descript-audiotools habit), so the same seed gives the same output.

Waveforms are 1-D float32 arrays at `sr`; spectrograms are log-mel tensors (1, n_mels, T) or
(B, 1, n_mels, T) as made by `pipeline.core.features.FrontEnd`.

Waveform chain, in order (each switchable, each with its own probability):
- time stretch by `rate` in `stretch_range` (0.9-1.1x): phase vocoder, so pitch is kept; the
  result is cut, or tiled from its start, back to the input length (`features.fit_length`);
- codec round trip: MP3 (constant bitrate) or Opus through an in-memory file, at a
  libsndfile `compression_level` drawn from `mp3_levels` / `opus_levels` (at 24 kHz mono:
  MP3 0.5 -> ~82 kbit/s, 0.95 -> ~16 kbit/s; Opus 0.7 -> ~85 kbit/s, 0.95 -> ~22 kbit/s);
  codec delay is removed by cross-correlation and the length restored exactly;
- telephone band: resampled to 8 kHz and back (nothing above ~4 kHz), optionally a 300 Hz high-pass;
- a low-pass at a cut-off drawn from `lowpass_hz` (3.4-11 kHz): the band a clip reaches must not
  tell its label, so both labels get the same distribution of bandwidths;
- 8 kHz mu-law (G.711) round trip: the telephone codec;
- RawBoost-style channel noise (Tak et al., ICASSP 2022), one of: a random convolutive channel
  (an FIR filter with random band gains), signal-dependent impulsive noise, or stationary coloured
  noise at an SNR drawn from `rawboost_snr_db`;
- gain in dB drawn from `gain_db` (no clipping: samples may exceed 1);
- Gaussian noise, scale-free: its RMS is `noise_base_level * U(noise_scale)` times the signal's
  RMS, i.e. 0.5 * U(0.25, 0.75) = 0.125..0.375, an SNR of about 18..8.5 dB.
Codec2 is not among them: it rebuilds speech from parameters, so a codec2 copy is a vocoded twin
(pipeline.synthesis), labelled AI, and cannot also be a human augmentation.

Spectrogram chain: pitch shift by an integer k in [-pitch_shift_bins, pitch_shift_bins] mel bins
(edge rows repeated into the vacated bins), then SpecAugment frequency and time masks filled
with the spectrogram's mean. Random 3 s crops are `features.random_crop`; `augment_copies`
makes the production report's 20 independent copies per clip.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from pipeline.core.audio import resample
from pipeline.config import AugmentConfig, Codec
from pipeline.core.features import fit_length, random_crop

# ---------------------------------------------------------------- waveform transforms (pure)

STRETCH_N_FFT = 512
TELEPHONE_SR = 8000
HIGHPASS_HZ = 300.0
MAX_CODEC_LAG = 4096
_CODEC_RATES = {
    "mp3": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
    "opus": (8000, 12000, 16000, 24000, 48000),
}
_CODEC_FORMAT = {"mp3": ("MP3", "MPEG_LAYER_III", "CONSTANT"), "opus": ("OGG", "OPUS", None)}


def time_stretch(x: np.ndarray, rate: float) -> np.ndarray:
    """Play `rate` times faster at the same pitch (phase vocoder); length round(len(x) / rate)."""
    if rate == 1.0:
        return x
    window = torch.hann_window(STRETCH_N_FFT)
    hop = STRETCH_N_FFT // 4
    spec = torch.stft(torch.from_numpy(np.ascontiguousarray(x, np.float32)), STRETCH_N_FFT, hop,
                      window=window, return_complex=True)
    advance = torch.linspace(0, torch.pi * hop, spec.shape[0])[:, None]
    spec = AF.phase_vocoder(spec, rate, advance)
    n = max(1, round(len(x) / rate))
    return torch.istft(spec, STRETCH_N_FFT, hop, window=window, length=n).numpy()


def codec_roundtrip(x: np.ndarray, sr: int, codec: Codec, level: float) -> np.ndarray:
    """Encode to MP3 or Opus in memory at libsndfile `compression_level`, decode, same length as x."""
    rates = _CODEC_RATES[codec]
    rate = sr if sr in rates else next((r for r in rates if r >= sr), rates[-1])
    y = resample(x, sr, rate)
    scale = max(1.0, float(np.abs(y).max(initial=0.0)))   # keep encoders from clipping
    fmt, subtype, mode = _CODEC_FORMAT[codec]
    buf = io.BytesIO()
    sf.write(buf, y / scale, rate, format=fmt, subtype=subtype, compression_level=level, bitrate_mode=mode)
    buf.seek(0)
    z = sf.read(buf, dtype="float32")[0] * scale
    return resample(align_to(z, y), rate, sr)[:len(x)].astype(np.float32, copy=False)


def align_to(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """y shifted by its cross-correlation lag against ref (|lag| <= MAX_CODEC_LAG), cut/zero-padded to len(ref)."""
    n = 1 << int(max(len(y), len(ref)) + MAX_CODEC_LAG).bit_length()
    c = np.fft.irfft(np.fft.rfft(y, n) * np.conj(np.fft.rfft(ref, n)), n)
    lags = np.r_[0:MAX_CODEC_LAG + 1, -MAX_CODEC_LAG:0]
    lag = int(lags[np.argmax(c[lags])])
    y = y[lag:] if lag >= 0 else np.concatenate([np.zeros(-lag, y.dtype), y])
    return np.pad(y[:len(ref)], (0, max(0, len(ref) - len(y))))


def band_limit(x: np.ndarray, sr: int, highpass: bool = True) -> np.ndarray:
    """Telephone channel: through 8 kHz sampling (no energy above ~4 kHz), optionally a 300 Hz high-pass."""
    y = resample(resample(x, sr, TELEPHONE_SR), TELEPHONE_SR, sr)
    y = fit_length(y, len(x))
    if highpass:
        scale = max(1.0, float(np.abs(y).max(initial=0.0)))   # biquad clamps to [-1, 1]
        y = AF.highpass_biquad(torch.from_numpy(y / scale), sr, HIGHPASS_HZ).numpy() * scale
    return y.astype(np.float32, copy=False)


def lowpass(x: np.ndarray, sr: int, cutoff_hz: float) -> np.ndarray:
    """8th-order Butterworth low-pass (zero phase); a no-op when the cut-off is at or above Nyquist."""
    from scipy.signal import butter, sosfiltfilt

    if cutoff_hz >= sr / 2 * 0.98 or len(x) < 64:
        return x
    return sosfiltfilt(butter(8, cutoff_hz, fs=sr, output="sos"), x).astype(np.float32)


def mulaw_8k(x: np.ndarray, sr: int) -> np.ndarray:
    """Through G.711-style 8-bit mu-law at 8 kHz and back (level kept; values beyond +-1 are scaled in)."""
    y = resample(x, sr, TELEPHONE_SR)
    scale = max(1.0, float(np.abs(y).max(initial=0.0)))
    q = AF.mu_law_encoding(torch.from_numpy(y / scale), 256)
    z = AF.mu_law_decoding(q, 256).numpy() * scale
    return fit_length(resample(z, TELEPHONE_SR, sr), len(x)).astype(np.float32, copy=False)


RAWBOOST_KINDS = ("convolutive", "impulsive", "stationary")


def rawboost(x: np.ndarray, sr: int, kind: str, snr_db: float, seed: int) -> np.ndarray:
    """One RawBoost-style distortion drawn from `seed`: a random linear channel (FIR with 5 random band
    gains of -6..+6 dB), impulsive noise on 2 % of samples proportional to the signal, or stationary
    noise shaped by such a random filter, at `snr_db`."""
    from scipy.signal import fftconvolve, firwin2

    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float32)

    def random_filter() -> np.ndarray:
        freqs = np.r_[0.0, np.sort(rng.uniform(0.02, 0.98, 5)), 1.0]
        gains = 10 ** (rng.uniform(-6, 6, len(freqs)) / 20)
        return firwin2(129, freqs, gains)

    if kind == "convolutive":
        y = fftconvolve(x, random_filter(), mode="same")
        return (y * (np.sqrt(np.mean(x ** 2)) / max(np.sqrt(np.mean(y ** 2)), 1e-9))).astype(np.float32)
    if kind == "impulsive":
        hit = rng.random(len(x)) < 0.02
        return (x + hit * x * rng.uniform(-1, 1, len(x)) * 10 ** (-snr_db / 40)).astype(np.float32)
    noise = fftconvolve(rng.standard_normal(len(x)), random_filter(), mode="same")
    noise *= np.sqrt(np.mean(x ** 2) / max(np.mean(noise ** 2), 1e-12)) * 10 ** (-snr_db / 20)
    return (x + noise).astype(np.float32)


def apply_gain(x: np.ndarray, db: float) -> np.ndarray:
    """Scale by `db` decibels."""
    return (x * np.float32(10 ** (db / 20))).astype(np.float32, copy=False)


def add_noise(x: np.ndarray, rms_ratio: float, seed: int) -> np.ndarray:
    """Add white Gaussian noise drawn from `seed` whose RMS is exactly `rms_ratio` * RMS(x)."""
    if rms_ratio == 0 or len(x) == 0:
        return x
    noise = np.random.default_rng(seed).standard_normal(len(x))
    noise *= rms_ratio * np.sqrt(np.mean(np.square(x, dtype=np.float64)) / np.mean(noise ** 2))
    return (x + noise).astype(np.float32)


@dataclass(frozen=True)
class WaveParams:
    """Drawn waveform augmentation; identity values (1.0, None, False, 0.0) mean 'not applied'."""

    stretch: float = 1.0
    codec: Codec | None = None
    codec_level: float = 0.0
    band_limit: bool = False
    highpass: bool = False
    gain_db: float = 0.0
    noise_ratio: float = 0.0
    noise_seed: int = 0
    lowpass_hz: float = 0.0
    mulaw: bool = False
    rawboost: str | None = None
    rawboost_snr_db: float = 0.0


def draw_wave_params(cfg: AugmentConfig, rng: np.random.Generator) -> WaveParams:
    """Draw every parameter (always the same number of draws, so switches don't shift the others)."""
    on = rng.random(5) < [cfg.stretch_prob, cfg.codec_prob, cfg.band_limit_prob, cfg.gain_prob, cfg.noise_prob]
    on &= [cfg.stretch, cfg.codec, cfg.band_limit, cfg.gain, cfg.noise]
    rate = float(rng.uniform(*cfg.stretch_range))
    codec = cfg.codec_formats[int(rng.integers(len(cfg.codec_formats)))]
    level = float(rng.uniform(*(cfg.mp3_levels if codec == "mp3" else cfg.opus_levels)))
    db = float(rng.uniform(*cfg.gain_db))
    ratio = cfg.noise_base_level * float(rng.uniform(*cfg.noise_scale))
    seed = int(rng.integers(2 ** 63))
    # drawn after the original ones, so enabling these leaves the earlier draws of a seed unchanged
    more = rng.random(3) < [cfg.lowpass_prob, cfg.mulaw_prob, cfg.rawboost_prob]
    more &= [cfg.lowpass, cfg.mulaw, cfg.rawboost]
    cutoff = float(rng.uniform(*cfg.lowpass_hz))
    kind = RAWBOOST_KINDS[int(rng.integers(len(RAWBOOST_KINDS)))]
    snr = float(rng.uniform(*cfg.rawboost_snr_db))
    return WaveParams(
        stretch=rate if on[0] else 1.0,
        codec=codec if on[1] else None,
        codec_level=level if on[1] else 0.0,
        band_limit=bool(on[2]),
        highpass=bool(on[2]) and cfg.band_limit_highpass,
        gain_db=db if on[3] else 0.0,
        noise_ratio=ratio if on[4] else 0.0,
        noise_seed=seed,
        lowpass_hz=cutoff if more[0] else 0.0,
        mulaw=bool(more[1]),
        rawboost=kind if more[2] else None,
        rawboost_snr_db=snr if more[2] else 0.0,
    )


def apply_wave(x: np.ndarray, sr: int, p: WaveParams) -> np.ndarray:
    """Apply drawn parameters: stretch, codec, band-limit, low-pass, mu-law, RawBoost, gain, noise;
    float32 of len(x)."""
    y = np.asarray(x, np.float32)
    if p.stretch != 1.0:
        y = fit_length(time_stretch(y, p.stretch), len(x))
    if p.codec is not None:
        y = codec_roundtrip(y, sr, p.codec, p.codec_level)
    if p.band_limit:
        y = band_limit(y, sr, p.highpass)
    if p.lowpass_hz:
        y = lowpass(y, sr, p.lowpass_hz)
    if p.mulaw:
        y = mulaw_8k(y, sr)
    if p.rawboost is not None:
        y = rawboost(y, sr, p.rawboost, p.rawboost_snr_db, p.noise_seed ^ 0x5EED)
    if p.gain_db != 0.0:
        y = apply_gain(y, p.gain_db)
    return add_noise(y, p.noise_ratio, p.noise_seed)


def augment_wave(x: np.ndarray, sr: int, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Draw and apply the enabled waveform augmentations; float32 of the input's length."""
    return apply_wave(x, sr, draw_wave_params(cfg, rng))


def augment_copies(x: np.ndarray, sr: int, n_copies: int | None = None, cfg: AugmentConfig = AugmentConfig(),
                   seed: int = 0, *, segment: int | None = None) -> list[np.ndarray]:
    """`n_copies` (default cfg.copies) independent augmentations; copy i uses rng default_rng([seed, i])
    and is first randomly cropped to `segment` samples (features.random_crop) when one is given."""
    out = []
    for i in range(cfg.copies if n_copies is None else n_copies):
        rng = np.random.default_rng([seed, i])
        clip = random_crop(x, segment, rng) if segment else x
        out.append(augment_wave(clip, sr, cfg, rng))
    return out


# ---------------------------------------------------------- spectrogram transforms (pure)

Mask = tuple[int, int]  # (start, width)


def pitch_shift_mel(spec: torch.Tensor, bins: int) -> torch.Tensor:
    """Shift along the mel axis (dim -2) by `bins` (positive = up), repeating the edge row."""
    if bins == 0:
        return spec
    n = spec.shape[-2]
    index = (torch.arange(n, device=spec.device) - bins).clamp(0, n - 1)
    return spec.index_select(-2, index)


def mask_spec(spec: torch.Tensor, freq_masks: tuple[Mask, ...], time_masks: tuple[Mask, ...]) -> torch.Tensor:
    """Fill (start, width) bands of mel rows and of frames with the spectrogram's mean."""
    if not freq_masks and not time_masks:
        return spec
    out = spec.clone()
    fill = spec.mean()
    for start, width in freq_masks:
        out[..., start:start + width, :] = fill
    for start, width in time_masks:
        out[..., start:start + width] = fill
    return out


@dataclass(frozen=True)
class SpecParams:
    """Drawn spectrogram augmentation of one item."""

    shift: int = 0
    freq_masks: tuple[Mask, ...] = ()
    time_masks: tuple[Mask, ...] = ()


def _masks(count: int, max_width: int, size: int, rng: np.random.Generator) -> tuple[Mask, ...]:
    widths = rng.integers(0, min(max_width, size) + 1, size=count)
    return tuple((int(rng.integers(size - w + 1)), int(w)) for w in widths)


def draw_spec_params(cfg: AugmentConfig, n_mels: int, n_frames: int, rng: np.random.Generator) -> SpecParams:
    """Draw a pitch shift and SpecAugment masks for an (n_mels, n_frames) spectrogram."""
    on = rng.random(2) < [cfg.pitch_shift_prob, cfg.spec_augment_prob]
    shift = int(rng.integers(-cfg.pitch_shift_bins, cfg.pitch_shift_bins + 1))
    freq = _masks(cfg.freq_masks, cfg.freq_mask_max, n_mels, rng)
    time = _masks(cfg.time_masks, cfg.time_mask_max, n_frames, rng)
    masked = bool(on[1]) and cfg.spec_augment
    return SpecParams(
        shift=shift if on[0] and cfg.pitch_shift else 0,
        freq_masks=freq if masked else (),
        time_masks=time if masked else (),
    )


def apply_spec(spec: torch.Tensor, p: SpecParams) -> torch.Tensor:
    """Apply drawn parameters to one (1, n_mels, T) spectrogram: pitch shift, then masks."""
    return mask_spec(pitch_shift_mel(spec, p.shift), p.freq_masks, p.time_masks)


def augment_spec(spec: torch.Tensor, cfg: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """Pitch shift + SpecAugment of (1, n_mels, T), or of each item of (B, 1, n_mels, T) with its own draw."""
    n_mels, n_frames = spec.shape[-2:]
    if spec.dim() == 3:
        return apply_spec(spec, draw_spec_params(cfg, n_mels, n_frames, rng))
    if spec.dim() != 4:
        raise ValueError(f"expected (1, n_mels, T) or (B, 1, n_mels, T), got {tuple(spec.shape)}")
    return torch.stack([apply_spec(s, draw_spec_params(cfg, n_mels, n_frames, rng)) for s in spec])
