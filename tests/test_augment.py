"""Unit tests of pipeline.core.augment: reproducibility, shapes, and what each transform does to a signal."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.core.augment import (
    AugmentConfig, WaveParams, add_noise, augment_copies, augment_spec, augment_wave,
    band_limit, codec_roundtrip, draw_spec_params, draw_wave_params, lowpass, pitch_shift_mel, rawboost, time_stretch,
)

SR = 24000
SWITCHES = ("stretch", "codec", "band_limit", "gain", "noise", "lowpass", "mulaw", "rawboost")
WAVE_CASES = {  # name -> overrides enabling exactly that transform, always applied
    "stretch": {"stretch": True},
    "mp3": {"codec": True, "codec_formats": ("mp3",)},
    "opus": {"codec": True, "codec_formats": ("opus",)},
    "band_limit": {"band_limit": True},
    "gain": {"gain": True},
    "noise": {"noise": True},
    "lowpass": {"lowpass": True},
    "mulaw": {"mulaw": True},
    "rawboost": {"rawboost": True},
}
SEED_FREE = {"band_limit", "mulaw"}  # no random parameter: every seed gives the same output


def config(**on: object) -> AugmentConfig:
    """Every switch off and every probability 1, then the overrides."""
    base: dict[str, object] = {s: False for s in SWITCHES} | {"pitch_shift": False, "spec_augment": False}
    base |= {f"{s}_prob": 1.0 for s in (*SWITCHES, "pitch_shift", "spec_augment")}
    return AugmentConfig(**(base | on))


def speech_like(seconds: float = 1.0, sr: int = SR) -> np.ndarray:
    """Voiced, syllable-modulated harmonic signal with formant-shaped harmonic amplitudes."""
    t = np.arange(round(seconds * sr)) / sr
    f0 = 120 + 20 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = np.zeros_like(t)
    for k in range(1, 60):
        fk = k * f0
        env = sum(np.exp(-0.5 * ((fk - fc) / bw) ** 2) for fc, bw in ((500, 150), (1500, 200), (2500, 300)))
        x += (env + 0.02) / k ** 0.5 * np.sin(k * phase) * (fk < sr / 2)
    x *= 0.5 * (1 - np.cos(2 * np.pi * 4 * t))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speech_like()


@pytest.mark.parametrize("name", WAVE_CASES)
def test_wave_transform_reproducible_and_shape_preserving(name: str, speech: np.ndarray) -> None:
    cfg = config(**WAVE_CASES[name])
    a = augment_wave(speech, SR, cfg, np.random.default_rng(1))
    b = augment_wave(speech, SR, cfg, np.random.default_rng(1))
    c = augment_wave(speech, SR, cfg, np.random.default_rng(2))
    assert draw_wave_params(cfg, np.random.default_rng(1)) == draw_wave_params(cfg, np.random.default_rng(1)), \
        f"{name}: same seed drew different parameters"
    assert np.array_equal(a, b), f"{name}: same seed gave different output"
    assert a.shape == speech.shape and a.dtype == np.float32, f"{name}: got {a.shape} {a.dtype}, want {speech.shape} float32"
    assert np.isfinite(a).all(), f"{name}: non-finite output"
    assert not np.allclose(a, speech), f"{name}: transform left the input unchanged"
    if name not in SEED_FREE:
        assert not np.array_equal(a, c), f"{name}: different seeds gave the same output"


def test_all_switches_off_is_identity(speech: np.ndarray) -> None:
    out = augment_wave(speech, SR, config(), np.random.default_rng(0))
    assert np.array_equal(out, speech), "with every switch off the waveform must be returned unchanged"
    spec = torch.randn(1, 80, 100)
    assert torch.equal(augment_spec(spec, config(), np.random.default_rng(0)), spec), \
        "with pitch shift and SpecAugment off the spectrogram must be returned unchanged"


@pytest.mark.parametrize("switch", SWITCHES)
def test_disabled_switch_draws_identity(switch: str) -> None:
    cfg = config(**{s: s != switch for s in SWITCHES})
    p = draw_wave_params(cfg, np.random.default_rng(3))
    fields = {"stretch": "stretch", "codec": "codec", "band_limit": "band_limit", "gain": "gain_db",
              "noise": "noise_ratio", "lowpass": "lowpass_hz", "mulaw": "mulaw", "rawboost": "rawboost"}
    field = fields[switch]
    assert getattr(p, field) == getattr(WaveParams(), field), f"{switch} off but drew {field}={getattr(p, field)}"
    others_on = [f for f in fields.values() if f != field]
    assert all(getattr(p, f) != getattr(WaveParams(), f) for f in others_on), f"{switch} off disabled others: {p}"


def test_switch_does_not_shift_other_draws() -> None:
    with_codec = draw_wave_params(config(**{s: True for s in SWITCHES}), np.random.default_rng(5))
    without = draw_wave_params(config(**{s: s != "codec" for s in SWITCHES}), np.random.default_rng(5))
    assert (with_codec.stretch, with_codec.gain_db, with_codec.noise_ratio) == \
        (without.stretch, without.gain_db, without.noise_ratio), "turning codec off changed other parameters"


def test_noise_rms_ratio(speech: np.ndarray) -> None:
    out = add_noise(speech, 0.25, seed=7)
    ratio = rms(out - speech) / rms(speech)
    assert abs(ratio - 0.25) < 1e-3, f"noise/signal RMS {ratio:.4f}, want 0.25"
    cfg = config(noise=True)
    ratios = [draw_wave_params(cfg, np.random.default_rng(s)).noise_ratio for s in range(200)]
    assert 0.125 <= min(ratios) and max(ratios) <= 0.375, f"drawn ratios {min(ratios)}..{max(ratios)} outside 0.125..0.375"
    assert max(ratios) - min(ratios) > 0.2, "drawn noise ratios do not cover the documented range"


@pytest.mark.parametrize("rate", [0.9, 1.1])
def test_time_stretch_duration_and_pitch(rate: float) -> None:
    t = np.arange(int(1.5 * SR)) / SR
    burst = (np.sin(2 * np.pi * 440 * t) * ((t >= 0.5) & (t < 0.9))).astype(np.float32)
    out = time_stretch(burst, rate)
    assert len(out) == round(len(burst) / rate), f"length {len(out)}, want {round(len(burst) / rate)}"
    env = np.convolve(np.abs(out), np.ones(240) / 240, "same")
    on = np.flatnonzero(env > 0.5 * env.max())
    start, end = on[0] / SR, on[-1] / SR
    assert abs(start - 0.5 / rate) < 0.02, f"onset at {start:.3f} s, want {0.5 / rate:.3f} s"
    assert abs((end - start) - 0.4 / rate) < 0.03, f"burst lasts {end - start:.3f} s, want {0.4 / rate:.3f} s"
    seg = out[round(0.6 / rate * SR):round(0.8 / rate * SR)]
    peak_hz = np.argmax(np.abs(np.fft.rfft(seg, 8 * len(seg)))) * SR / (8 * len(seg))
    assert abs(peak_hz - 440) < 5, f"pitch moved to {peak_hz:.1f} Hz (want 440 Hz, pitch-preserving)"


@pytest.mark.parametrize("k", [-2, -1, 0, 1, 2])
def test_pitch_shift_moves_peak_row(k: int) -> None:
    spec = torch.zeros(1, 80, 50)
    spec[0, 40] = 5.0
    out = pitch_shift_mel(spec, k)
    assert out.shape == spec.shape, f"shape {tuple(out.shape)}, want {tuple(spec.shape)}"
    row = int(out[0, :, 0].argmax())
    assert row == 40 + k, f"peak row {row}, want {40 + k}"
    ramp = torch.arange(80.0)[None, :, None].expand(2, 1, 80, 7).clone()
    shifted = pitch_shift_mel(ramp, k)
    edge = shifted[..., :k, :] if k > 0 else shifted[..., 80 + k:, :]
    want = 0.0 if k > 0 else 79.0
    assert bool((edge == want).all()), f"vacated rows hold {edge.unique().tolist()}, want the edge row {want}"


def test_pitch_shift_draws_stay_in_range() -> None:
    cfg = config(pitch_shift=True)
    shifts = {draw_spec_params(cfg, 80, 100, np.random.default_rng(s)).shift for s in range(100)}
    assert shifts == {-2, -1, 0, 1, 2}, f"drawn shifts {sorted(shifts)}, want every integer in [-2, 2]"


def test_spec_augment_mask_counts_and_widths() -> None:
    cfg = config(spec_augment=True, time_masks=3, time_mask_max=10, freq_masks=2, freq_mask_max=6)
    spec = torch.randn(1, 80, 120)
    for seed in range(50):
        p = draw_spec_params(cfg, 80, 120, np.random.default_rng(seed))
        assert len(p.time_masks) == 3 and len(p.freq_masks) == 2, f"seed {seed}: mask counts {p}"
        assert all(0 <= w <= 10 and s + w <= 120 for s, w in p.time_masks), f"seed {seed}: time masks {p.time_masks}"
        assert all(0 <= w <= 6 and s + w <= 80 for s, w in p.freq_masks), f"seed {seed}: freq masks {p.freq_masks}"
        out = augment_spec(spec, cfg, np.random.default_rng(seed))
        fill = spec.mean()
        cols = {c for s, w in p.time_masks for c in range(s, s + w)}
        rows = {r for s, w in p.freq_masks for r in range(s, s + w)}
        filled_cols = {c for c in range(120) if bool((out[0, :, c] == fill).all())}
        filled_rows = {r for r in range(80) if bool((out[0, r, :] == fill).all())}
        assert filled_cols == cols and filled_rows == rows, f"seed {seed}: masked {filled_cols}/{filled_rows}, want {cols}/{rows}"
        untouched = [r for r in range(80) if r not in rows]
        keep = [c for c in range(120) if c not in cols]
        assert torch.equal(out[0][untouched][:, keep], spec[0][untouched][:, keep]), f"seed {seed}: unmasked cells changed"


def test_augment_spec_batch_reproducible_per_item() -> None:
    cfg = config(pitch_shift=True, spec_augment=True)
    spec = torch.randn(4, 1, 80, 100)
    a = augment_spec(spec, cfg, np.random.default_rng(0))
    b = augment_spec(spec, cfg, np.random.default_rng(0))
    c = augment_spec(spec, cfg, np.random.default_rng(1))
    assert a.shape == spec.shape and torch.isfinite(a).all(), f"batch output {tuple(a.shape)} or non-finite"
    assert torch.equal(a, b), "same seed gave different spectrogram augmentation"
    assert not torch.equal(a, c), "different seeds gave the same spectrogram augmentation"
    masked_cols = [tuple((a[i, 0] == a[i, 0, 0]).all(dim=0).nonzero().flatten().tolist()) for i in range(4)]
    assert len(set(masked_cols)) > 1, f"every batch item got the same time masks: {masked_cols}"


@pytest.mark.parametrize("codec,level", [("mp3", 0.5), ("mp3", 0.95), ("opus", 0.7), ("opus", 0.95)])
def test_codec_roundtrip_keeps_length_and_shape(codec: str, level: float, speech: np.ndarray) -> None:
    out = codec_roundtrip(speech, SR, codec, level)
    assert out.shape == speech.shape and out.dtype == np.float32, f"{codec}@{level}: {out.shape} {out.dtype}"
    corr = float(np.corrcoef(speech, out)[0, 1])
    assert corr > 0.8, f"{codec}@{level}: correlation {corr:.3f} with the input (delay not removed?)"
    assert not np.array_equal(out, speech), f"{codec}@{level}: codec left the signal bit-identical"


def test_codec_resamples_unsupported_rate() -> None:
    x = speech_like(0.5, sr=22050)
    out = codec_roundtrip(x, 22050, "opus", 0.8)
    assert len(out) == len(x), f"length {len(out)}, want {len(x)}"
    assert np.corrcoef(x, out)[0, 1] > 0.8, "opus at a resampled rate lost the signal"


@pytest.mark.parametrize("highpass", [False, True])
def test_band_limit_removes_energy_above_4khz(highpass: bool) -> None:
    noise = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    out = band_limit(noise, SR, highpass)
    power = np.abs(np.fft.rfft(out)) ** 2
    freqs = np.fft.rfftfreq(len(out), 1 / SR)
    share = power[freqs > 4200].sum() / power.sum()
    assert share < 0.01, f"{share:.2%} of energy above 4.2 kHz (want < 1 %)"
    low = power[freqs < 150].sum() / power[(freqs > 500) & (freqs < 3000)].sum() * (2500 / 150)
    assert (low < 0.3) == highpass, f"energy density below 150 Hz relative to the passband is {low:.2f}"


def test_augment_copies_independent_and_reproducible(speech: np.ndarray) -> None:
    cfg = config(noise=True, gain=True)
    copies = augment_copies(speech, SR, 5, cfg, seed=11)
    assert len(copies) == 5, f"{len(copies)} copies, want 5"
    again = augment_wave(speech, SR, cfg, np.random.default_rng([11, 3]))
    assert np.array_equal(copies[3], again), "copy 3 is not reproducible from (seed, index)"
    assert all(not np.array_equal(copies[0], c) for c in copies[1:]), "copies are not independent"
    assert len(augment_copies(speech, SR, cfg=cfg)) == cfg.copies == 20, "n_copies must default to cfg.copies (20)"
    crops = augment_copies(speech, SR, 3, cfg, seed=0, segment=SR // 2)
    assert all(c.shape == (SR // 2,) and c.dtype == np.float32 for c in crops), "segment crops have the wrong shape"


@pytest.mark.parametrize("bad", [
    {"codec_prob": 1.5}, {"noise_prob": -0.1}, {"gain_db": (6.0, -6.0)}, {"stretch_range": (0.0, 1.1)},
    {"mp3_levels": (0.5, 1.0)}, {"codec_formats": ()}, {"codec_formats": ("aac",)}, {"unknown": 1},
])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValidationError):
        AugmentConfig(**bad)


@pytest.mark.parametrize("cutoff", [3400.0, 7000.0])
def test_lowpass_removes_energy_above_cutoff(cutoff: float) -> None:
    noise = np.random.default_rng(0).standard_normal(SR).astype(np.float32)
    out = lowpass(noise, SR, cutoff)
    power = np.abs(np.fft.rfft(out)) ** 2
    freqs = np.fft.rfftfreq(len(out), 1 / SR)
    share = power[freqs > cutoff * 1.25].sum() / power.sum()
    assert out.shape == noise.shape and share < 0.01, f"{share:.2%} of energy above {cutoff * 1.25:.0f} Hz (want < 1 %)"


def test_original_draws_unchanged_by_new_switches() -> None:
    # the draws of stretch/codec/gain/noise for a seed do not depend on whether lowpass/mulaw/rawboost are on
    old = {s: True for s in ("stretch", "codec", "band_limit", "gain", "noise")}
    a = draw_wave_params(config(**old), np.random.default_rng(9))
    b = draw_wave_params(config(**old, lowpass=True, mulaw=True, rawboost=True), np.random.default_rng(9))
    assert (a.stretch, a.codec, a.codec_level, a.gain_db, a.noise_ratio, a.noise_seed) == \
        (b.stretch, b.codec, b.codec_level, b.gain_db, b.noise_ratio, b.noise_seed), "new switches shifted old draws"


@pytest.mark.parametrize("kind", ["convolutive", "impulsive", "stationary"])
def test_rawboost_kinds_keep_shape_and_level(kind: str, speech: np.ndarray) -> None:
    out = rawboost(speech, SR, kind, 20.0, seed=3)
    assert out.shape == speech.shape and out.dtype == np.float32 and np.isfinite(out).all(), f"{kind}: bad output"
    assert 0.5 < rms(out) / rms(speech) < 2.0, f"{kind}: level moved from {rms(speech):.3f} to {rms(out):.3f}"
    assert not np.allclose(out, speech), f"{kind}: no change"
