"""Signal-processing vocoders that resynthesise a human clip: the AI half of a vocoded twin.

Each vocoder takes a mono float32 clip at its own sample rate and returns a clip of the same length
and rate, so the twin keeps the original's recording chain (band, noise floor, codec history) and
differs only in how the waveform was made (Wang & Yamagishi, ICASSP 2023).

- `griffinlim`: the 80-bin log-mel of the model's front end, inverted (least squares) and phase
  reconstructed by Griffin-Lim: smeared, "phasey" harmonics.
- `world`: WORLD analysis and synthesis (pyworld: DIO + StoneMask F0, CheapTrick envelope, D4C
  aperiodicity), the vocoder of many statistical-parametric TTS systems.
- `lpc`: a classic source-filter vocoder: per-frame LPC envelope driven by a pulse train at the
  DIO F0 (noise when unvoiced): buzzy excitation, smooth envelope.
- `codec2`: Debian's codec2 (`c2enc`/`c2dec`) at a low bitrate: a parametric sinusoidal codec at
  8 kHz, i.e. speech rebuilt from a few hundred bits a second.

Neural decoders trained on the store's own human speech live in `pipeline.synthesis.neural`.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchaudio

from pipeline.config import FeatureConfig
from pipeline.core.audio import resample
from pipeline.core.augment import align_to

MODEL_SR = 24000          # Griffin-Lim works on the model's own 24 kHz log-mel
GL_ITERATIONS = 32
WORLD_FRAME_MS = 5.0
LPC_HOP_S, LPC_WIN_S = 0.005, 0.025
CODEC2_SR = 8000
CODEC2_MODE = "1300"      # bit/s; 700C and 450 exist too, 1300 keeps most voices intelligible


class VocoderError(RuntimeError):
    """A vocoder that cannot resynthesise this clip (too short, unvoiced, tool missing)."""


def fit(y: np.ndarray, n: int) -> np.ndarray:
    """Cut or zero-pad to n samples (vocoders may add or drop a frame at the end)."""
    y = np.asarray(y, np.float32)
    return y[:n] if len(y) >= n else np.pad(y, (0, n - len(y)))


def match_level(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Scale y to x's RMS: the twin is as loud as its original (level is not what we teach)."""
    ry, rx = float(np.sqrt(np.mean(y ** 2))), float(np.sqrt(np.mean(x ** 2)))
    return (y * (rx / ry)).astype(np.float32) if ry > 0 else y


def griffinlim(x: np.ndarray, sr: int, feats: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """80-mel -> linear power (least squares) -> Griffin-Lim, at the model's 24 kHz, back to sr."""
    y = torch.from_numpy(resample(x, sr, MODEL_SR))
    mel = torchaudio.transforms.MelSpectrogram(MODEL_SR, n_fft=feats.n_fft, win_length=feats.win_length,
                                               hop_length=feats.hop_length, f_min=feats.f_min,
                                               f_max=min(feats.f_max, MODEL_SR / 2), n_mels=feats.n_mels)(y)
    n_stft = feats.n_fft // 2 + 1
    fb = torchaudio.functional.melscale_fbanks(n_stft, feats.f_min, min(feats.f_max, MODEL_SR / 2), feats.n_mels,
                                               MODEL_SR)  # (n_stft, n_mels)
    power = torch.linalg.lstsq(fb.T, mel).solution.clamp_min(0)  # (n_stft, T)
    gl = torchaudio.transforms.GriffinLim(n_fft=feats.n_fft, win_length=feats.win_length,
                                          hop_length=feats.hop_length, power=2.0, n_iter=GL_ITERATIONS,
                                          rand_init=False)
    z = gl(power).numpy()
    return match_level(fit(resample(z, MODEL_SR, sr), len(x)), x)


MIN_VOICED = 0.05   # share of voiced frames below which a clip is not speech a pitch vocoder can remake


def _pyworld():
    """pyworld, imported without its pkg_resources deprecation warning (it asks setuptools for its version)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import pyworld
    return pyworld


def _f0(x64: np.ndarray, sr: int, frame_ms: float) -> tuple[np.ndarray, np.ndarray]:
    """DIO + StoneMask F0 per frame; VocoderError when (almost) no frame is voiced."""
    pyworld = _pyworld()

    f0, t = pyworld.dio(x64, sr, frame_period=frame_ms)
    f0 = pyworld.stonemask(x64, f0, t, sr)
    if (f0 > 0).mean() < MIN_VOICED:
        raise VocoderError(f"too few voiced frames ({(f0 > 0).mean():.0%}; a pitch vocoder needs >= {MIN_VOICED:.0%})")
    return f0, t


def world(x: np.ndarray, sr: int) -> np.ndarray:
    """WORLD analysis/synthesis at the clip's own rate."""
    pyworld = _pyworld()

    x64 = x.astype(np.float64)
    f0, t = _f0(x64, sr, WORLD_FRAME_MS)
    sp = pyworld.cheaptrick(x64, f0, t, sr)
    ap = pyworld.d4c(x64, f0, t, sr)
    y = pyworld.synthesize(f0, sp, ap, sr, WORLD_FRAME_MS)
    return match_level(fit(y, len(x)), x)


def lpc_coefficients(frame: np.ndarray, order: int) -> tuple[np.ndarray, float]:
    """(a, gain): A(z) = 1 + a1 z^-1 + ... by the autocorrelation method (Levinson via Toeplitz solve)."""
    from scipy.linalg import solve_toeplitz

    r = np.correlate(frame, frame, "full")[len(frame) - 1:len(frame) + order]
    if r[0] <= 1e-10:
        return np.r_[1.0, np.zeros(order)], 0.0
    r = r.copy()
    r[0] *= 1 + 1e-6  # white-noise correction keeps the solve stable
    a = solve_toeplitz(r[:order], -r[1:order + 1])
    err = max(float(r[0] + np.dot(a, r[1:order + 1])), 0.0)
    return np.r_[1.0, a], float(np.sqrt(err))


def lpc(x: np.ndarray, sr: int, seed: int = 0) -> np.ndarray:
    """Source-filter resynthesis: per 5 ms hop, an LPC all-pole filter (order 2 + sr/1000) driven by a
    pulse train at the DIO F0 when voiced, white noise when not."""
    from scipy.signal import lfilter

    hop, win = round(LPC_HOP_S * sr), round(LPC_WIN_S * sr)
    if len(x) < win * 2:
        raise VocoderError(f"too short for LPC analysis ({len(x) / sr:.3f} s)")
    order = 2 + sr // 1000
    x64 = x.astype(np.float64)
    f0, _ = _f0(x64, sr, LPC_HOP_S * 1000)
    rng = np.random.default_rng(seed)
    window = np.hanning(win)
    padded = np.pad(x64, (win // 2, win))
    out = np.zeros(len(x) + hop)
    zi = np.zeros(order)
    phase = 0.0
    for i, start in enumerate(range(0, len(x), hop)):
        a, gain = lpc_coefficients(padded[start:start + win] * window, order)
        f = f0[min(i, len(f0) - 1)]
        if f > 0:  # unit-power pulse train, phase carried across hops
            t = phase + np.arange(hop) * f / sr
            excitation = (np.diff(np.floor(np.r_[phase - 1e-9, t])) > 0).astype(float) * np.sqrt(sr / f)
            phase = float(t[-1] + f / sr) % 1.0
        else:
            excitation = rng.standard_normal(hop)
        y, zi = lfilter([gain / np.sqrt(win)], a, excitation, zi=zi)
        out[start:start + hop] = y
    return match_level(fit(out, len(x)), x)


def codec2(x: np.ndarray, sr: int, mode: str = CODEC2_MODE) -> np.ndarray:
    """Through Debian's codec2 command-line encoder and decoder at `mode` bit/s (8 kHz inside)."""
    enc, dec = shutil.which("c2enc"), shutil.which("c2dec")
    if not enc or not dec:
        raise VocoderError("codec2 is not installed (Debian package `codec2`: c2enc/c2dec)")
    y = resample(x, sr, CODEC2_SR)
    scale = max(float(np.abs(y).max()), 1e-9) / 0.9
    pcm = np.clip(y / scale * 32767, -32768, 32767).astype("<i2")
    with tempfile.TemporaryDirectory(prefix="codec2-") as tmp:
        raw, bits, back = Path(tmp) / "in.raw", Path(tmp) / "in.bit", Path(tmp) / "out.raw"
        raw.write_bytes(pcm.tobytes())
        for cmd in ([enc, mode, str(raw), str(bits)], [dec, mode, str(bits), str(back)]):
            done = subprocess.run(cmd, capture_output=True, timeout=120)
            if done.returncode != 0:
                raise VocoderError(f"{Path(cmd[0]).name} exited {done.returncode}: {done.stderr.decode()[:120].strip()}")
        z = np.frombuffer(back.read_bytes(), "<i2").astype(np.float32) / 32767 * scale
    z = align_to(z, y)   # codec delay removed by cross-correlation
    return match_level(fit(resample(z, CODEC2_SR, sr), len(x)), x)


SIGNAL_VOCODERS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "griffinlim": griffinlim, "world": world, "lpc": lpc, "codec2": codec2,
}
