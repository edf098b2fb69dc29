"""Log-mel front end and segmentation (pipeline.core.features), as their docstrings promise."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio

from pipeline.config import AudioConfig, FeatureConfig, load_params
from pipeline.core.features import (WIDEBAND_EDGE_HZ, FrontEnd, fit_length, random_crop, resolve_kind, spectral_edge_hz,
                                    stream_windows, window_starts, windows)


@pytest.fixture(scope="module")
def default_params(tmp_path_factory):
    # a params.yaml that does not exist means the defaults (independent of the working directory)
    return load_params(tmp_path_factory.mktemp("p") / "params.yaml")


# ---------------------------------------------------------------------------------------------
# FrontEnd


def test_logmel_shape_for_three_seconds(default_params, speech_like):
    audio, feats = default_params.audio, default_params.features
    assert (audio.sample_rate, audio.segment_s, feats.n_mels, feats.hop_length) == (24000, 3.0, 80, 240), \
        "premise: the documented defaults"
    # given: a batch of two 3 s clips at 24 kHz
    wave = torch.from_numpy(np.stack([speech_like(3.0, 24000, seed=s) for s in (0, 1)]))
    assert wave.shape == (2, audio.segment_samples), f"3 s = {audio.segment_samples} samples"
    # when
    spec = FrontEnd(audio, feats)(wave)
    # then: (B, 1, n_mels, 1 + samples // hop) with center=True
    assert spec.shape == (2, 1, 80, 301), f"(B, 1, 80, 301), got {tuple(spec.shape)}"
    assert spec.dtype == torch.float32 and torch.isfinite(spec).all(), "finite float32"
    means = spec.mean(dim=(1, 2, 3))
    assert torch.allclose(means, torch.zeros(2), atol=1e-4), f"each item has its mean removed: {means}"


def test_logmel_items_are_independent(default_params, speech_like):
    lm = FrontEnd(default_params.audio, default_params.features)
    a, b = speech_like(3.0, 24000, seed=2), speech_like(3.0, 24000, seed=3, level=0.05)
    both = lm(torch.from_numpy(np.stack([a, b])))
    alone = lm(torch.from_numpy(a)[None])
    assert torch.allclose(both[0], alone[0], atol=1e-4), "an item's features do not depend on its batch mates"


@pytest.mark.parametrize("gain", [0.1, 3.0])
def test_logmel_is_gain_invariant(gain, default_params, speech_like):
    # given: a speech-like clip well above the log floor (peak 0.3 plus broadband noise), and a scaled copy
    lm = FrontEnd(default_params.audio, default_params.features)
    x = speech_like(3.0, 24000, seed=4)
    # when
    ref, scaled = lm(torch.from_numpy(x)[None]), lm(torch.from_numpy(gain * x)[None])
    # then: mean removal cancels log(gain^2)
    diff = float((ref - scaled).abs().max())
    assert diff < 1e-3, f"gain {gain}: log-mel differs by at most 1e-3 after mean removal, got {diff:.2e}"


def test_logmel_floor_keeps_silence_finite(default_params):
    lm = FrontEnd(default_params.audio, default_params.features)
    spec = lm(torch.zeros(1, 24000))
    assert torch.isfinite(spec).all(), "silence: no -inf from log(0)"
    assert float(spec.abs().max()) < 1e-5, "silence -> the floor everywhere -> zeros after mean removal"


def test_rms_normalised_front_end_is_gain_invariant_even_at_the_floor(default_params, speech_like):
    # given: a quiet, band-limited clip (nothing above 4 kHz): its high bins sit on the log floor
    from pipeline.core.augment import lowpass

    x = lowpass(speech_like(3.0, 24000, seed=5, noise=0.0), 24000, 4000.0)
    plain = FrontEnd(default_params.audio, default_params.features)
    rms = FrontEnd(default_params.audio, default_params.features.model_copy(update={"normalize": "rms"}))
    spec = lambda fe, g: fe(torch.from_numpy(g * x)[None])
    # then: without normalisation the level moves the floor relative to the speech; with it, it does not
    assert float((spec(plain, 0.01) - spec(plain, 1.0)).abs().max()) > 1.0, "premise: the floor leaks the level"
    assert float((spec(rms, 0.01) - spec(rms, 1.0)).abs().max()) < 1e-3, "rms normalisation removes the level"


def test_cmn_front_end_ignores_a_fixed_channel_filter(default_params, speech_like):
    # given: one clip and the same clip through a fixed filter (a channel: constant gain per frequency)
    import torchaudio.functional as AF

    x = torch.from_numpy(speech_like(3.0, 24000, seed=7))[None]
    coloured = AF.equalizer_biquad(AF.equalizer_biquad(x, 24000, 1500.0, 12.0, 0.7), 24000, 5000.0, -9.0, 1.0)
    plain = FrontEnd(default_params.audio, default_params.features)
    cmn = FrontEnd(default_params.audio, default_params.features.model_copy(update={"normalize": "cmn"}))
    # then: the channel shifts the plain log-mel by about one neper per bin; per-bin mean removal takes it out
    # (what is left is the filter's smearing between neighbouring frames and bins)
    diff = lambda fe: float((fe(x) - fe(coloured))[..., 5:-5].abs().mean())
    assert diff(plain) > 0.8, f"premise: the filter moves the plain spectrogram ({diff(plain):.3f})"
    assert diff(cmn) < 0.25 * diff(plain), f"cmn {diff(cmn):.3f} vs plain {diff(plain):.3f}"
    assert torch.allclose(cmn(x).mean(dim=-1), torch.zeros(1), atol=1e-4), "every bin is zero-mean over time"


def test_linear_front_end_keeps_every_stft_bin(default_params, speech_like):
    feats = default_params.features.model_copy(update={"kind": "linear"})
    spec = FrontEnd(default_params.audio, feats)(torch.from_numpy(speech_like(3.0, 24000))[None])
    assert spec.shape == (1, 1, feats.n_fft // 2 + 1, 301), f"n_fft/2+1 bins, got {tuple(spec.shape)}"
    assert torch.isfinite(spec).all() and abs(float(spec.mean())) < 1e-4, "finite and mean-removed"


def test_linear_bands_are_evenly_spaced_in_hz_where_mel_bins_widen(default_params):
    # given: pure tones every 2 kHz from 2 to 10 kHz
    sr = default_params.audio.sample_rate
    t = torch.arange(3 * sr) / sr
    tones = torch.stack([0.1 * torch.sin(2 * torch.pi * f * t) for f in (2000, 4000, 6000, 8000, 10000)])
    peak = lambda kind: FrontEnd(default_params.audio, default_params.features.model_copy(update={"kind": kind}))(
        tones).mean(-1)[:, 0].argmax(-1)
    bands, mel = peak("linear_bands"), peak("mel")
    # then: each tone peaks in a band as many bands on as the tones are apart in Hz; mel bins widen with frequency
    steps = bands.diff()
    assert steps.max() - steps.min() <= 1 and steps.min() >= 12, f"even steps of ~13 bands: {bands.tolist()}"
    assert mel.diff()[-1] < mel.diff()[0] - 3, f"premise: mel's steps shrink: {mel.tolist()}"
    assert FrontEnd(default_params.audio, default_params.features.model_copy(update={"kind": "linear_bands"}))(
        tones[:1]).shape == (1, 1, default_params.features.n_mels, 301), "n_mels bands, the mel front end's shape"


def _wide_and_telephone(speech_like, sr):
    wide = speech_like(3.0, sr, noise=0.03)   # harmonics plus a floor up to Nyquist
    down = torchaudio.functional.resample(torch.from_numpy(wide), sr, 8000)
    return wide, torchaudio.functional.resample(down, 8000, sr).numpy()   # 8 kHz telephone audio, back at sr


def test_spectral_edge_finds_where_the_band_ends_whatever_the_sample_rate(default_params, speech_like):
    # given: one signal at 24 kHz, and the same after a trip through 8 kHz (a telephone recording resampled)
    sr = default_params.audio.sample_rate
    wide, telephone = _wide_and_telephone(speech_like, sr)
    # then: the first reaches Nyquist, the second ends near 4 kHz (plus the resampler's transition band),
    # well below the wideband mark, although both are 24 kHz
    assert spectral_edge_hz(wide, sr) >= 11000, spectral_edge_hz(wide, sr)
    assert 3000 <= spectral_edge_hz(telephone, sr) <= WIDEBAND_EDGE_HZ - 1000, spectral_edge_hz(telephone, sr)
    with pytest.raises(ValueError, match="empty"):
        spectral_edge_hz(np.zeros(0, np.float32), sr)


def test_auto_front_end_is_linear_bands_for_wideband_humans_and_mel_for_telephone(default_params, speech_like):
    sr = default_params.audio.sample_rate
    wide, telephone = _wide_and_telephone(speech_like, sr)
    auto = default_params.features.model_copy(update={"kind": "auto"})
    # when auto is resolved on mostly wideband humans, then on mostly telephone ones
    feats, choice = resolve_kind(auto, [wide, wide, telephone], sr)
    assert feats.kind == "linear_bands" and choice["human_edge_khz"] >= 11, choice
    feats, choice = resolve_kind(auto, [telephone, telephone, wide], sr)
    assert feats.kind == "mel" and choice["human_edge_khz"] <= 5, choice
    assert feats.model_copy(update={"kind": "auto"}) == auto, "only the kind is chosen"
    # and a concrete kind is kept as given; auto with no humans, or unresolved in a front end, is an error
    assert resolve_kind(default_params.features, [telephone], sr)[0] == default_params.features
    with pytest.raises(ValueError, match="no human"):
        resolve_kind(auto, [], sr)
    with pytest.raises(ValueError, match="resolved"):
        FrontEnd(default_params.audio, auto)


# ---------------------------------------------------------------------------------------------
# fit_length and random_crop


def test_fit_length_tiles_short_clips_and_cuts_long_ones():
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(fit_length(x, 12), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1],
                                  err_msg="short clips are repeated, not zero-padded")
    np.testing.assert_array_equal(fit_length(x, 5), x, err_msg="exact length is unchanged")
    np.testing.assert_array_equal(fit_length(x, 3), [0, 1, 2], err_msg="longer clips are cut")
    np.testing.assert_array_equal(fit_length(x[:1], 4), [0, 0, 0, 0], err_msg="one sample tiles")
    for n in (1, 4, 5, 6, 9, 10, 11, 1000):
        assert len(fit_length(x, n)) == n, f"fit_length(x, {n}) has {n} samples"


def test_fit_length_refuses_an_empty_clip():
    with pytest.raises(ValueError, match="empty"):
        fit_length(np.zeros(0, np.float32), 10)


def test_random_crop_is_seeded_and_in_range():
    x = np.arange(100, dtype=np.float32)
    n = 30
    # same seed, same crops
    a = [random_crop(x, n, np.random.default_rng(7)) for _ in range(3)]
    assert all(np.array_equal(a[0], c) for c in a), "the same seed gives the same crop"
    # every crop is a contiguous slice of x, with starts covering [0, len - n]
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(2000):
        c = random_crop(x, n, rng)
        start = int(c[0])
        assert len(c) == n, f"crop length {len(c)}"
        np.testing.assert_array_equal(c, x[start:start + n], err_msg="a crop is a contiguous slice")
        starts.add(start)
    assert starts == set(range(len(x) - n + 1)), \
        f"starts cover 0..{len(x) - n} exactly, missing {sorted(set(range(len(x) - n + 1)) - starts)[:5]}"


def test_random_crop_tiles_short_clips_from_a_random_phase():
    x = np.arange(7, dtype=np.float32)
    rng = np.random.default_rng(1)
    phases = set()
    for _ in range(300):
        c = random_crop(x, 20, rng)
        phase = int(c[0])
        np.testing.assert_array_equal(c, x[(phase + np.arange(20)) % 7], err_msg="a rotated, tiled copy")
        phases.add(phase)
    assert phases == set(range(7)), f"every phase occurs, got {sorted(phases)}"
    c1 = random_crop(x, 20, np.random.default_rng(5))
    c2 = random_crop(x, 20, np.random.default_rng(5))
    np.testing.assert_array_equal(c1, c2, err_msg="seeded: the same phase")
    assert len(random_crop(x, 7, rng)) == 7, "a clip of exactly n samples stays n samples"


# ---------------------------------------------------------------------------------------------
# window_starts, windows, stream_windows

SEG, HOP = 72000, 36000  # 3 s segments, 1.5 s hop at 24 kHz (the defaults)


@pytest.mark.parametrize("seg,hop", [(SEG, HOP), (10, 3), (10, 10), (10, 4), (10, 15)])
def test_window_starts_cover_the_clip_and_end_flush(seg, hop):
    for n in list(range(1, 4 * seg + 2)) if seg < 100 else [1, seg - 1, seg, seg + 1, 2 * seg, 10 * seg + 123]:
        starts = window_starts(n, seg, hop)
        if n <= seg:
            assert starts == [0], f"n={n} <= seg: one window at 0, got {starts}"
            continue
        assert starts[0] == 0, f"n={n}: first window at 0"
        assert starts[-1] == n - seg, f"n={n}: last window flush with the end, got {starts[-1]}"
        assert all(0 <= s <= n - seg for s in starts), f"n={n}: every window inside the clip"
        assert starts == sorted(set(starts)), f"n={n}: increasing, no duplicates"
        regular = starts[:-1] if starts[-1] % hop else starts
        assert regular == list(range(0, len(regular) * hop, hop)), f"n={n}: every hop before the flush window"
        if hop <= seg:
            covered = np.zeros(n, bool)
            for s in starts:
                covered[s:s + seg] = True
            assert covered.all(), f"n={n}: windows cover every sample"


def test_windows_are_slices_at_the_starts():
    x = np.arange(10 * 7 + 3, dtype=np.float32)
    w = windows(x, 10, 7)
    starts = window_starts(len(x), 10, 7)
    assert w.shape == (len(starts), 10), f"one row per start, got {w.shape}"
    for row, s in zip(w, starts):
        np.testing.assert_array_equal(row, x[s:s + 10], err_msg=f"row at {s}")
    short = windows(x[:4], 10, 7)
    np.testing.assert_array_equal(short, fit_length(x[:4], 10)[None], err_msg="a short clip: one tiled window")


def _blocks(x: np.ndarray, sizes: list[int]):
    i, k = 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        yield x[i:i + n]
        i, k = i + n, k + 1


def _assert_stream_equals_windows(x, seg, hop, sizes):
    ref = windows(x, seg, hop)
    got = list(stream_windows(_blocks(x, sizes), seg, hop))
    assert len(got) == len(ref), f"n={len(x)} seg={seg} hop={hop} blocks={sizes}: {len(got)} windows vs {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref)):
        np.testing.assert_array_equal(g, r, err_msg=f"n={len(x)} seg={seg} hop={hop} blocks={sizes}: window {i}")


@pytest.mark.parametrize("seg,hop", [(10, 3), (10, 5), (10, 10), (10, 15), (7, 1)])
def test_stream_windows_equals_windows_small(seg, hop):
    rng = np.random.default_rng(seg * 100 + hop)
    lengths = sorted({1, 2, seg - 1, seg, seg + 1, 2 * seg - 1, 2 * seg, 2 * seg + 1, 3 * seg + hop - 1, 5 * seg + 3, 97})
    block_sizings = [[1], [2], [3], [seg - 1], [seg], [seg + 1], [4 * seg], [1000], [1, 17, 2, 5]]
    for n in lengths:
        x = rng.standard_normal(n).astype(np.float32)
        for sizes in block_sizings:
            _assert_stream_equals_windows(x, seg, hop, sizes)


@pytest.mark.parametrize("n", [1, 100, SEG - 1, SEG, SEG + 1, SEG + HOP - 1, SEG + HOP, SEG + HOP + 1, 10 * SEG + 12345])
def test_stream_windows_equals_windows_at_default_sizes(n, speech_like):
    x = speech_like(n / 24000, 24000, seed=n % 97)[:n]
    assert len(x) == n, "premise: exact length"
    for sizes in ([SEG], [SEG - 1], [SEG + 1], [24000 * 60], [4097], [HOP // 3 + 1, 50001]):
        _assert_stream_equals_windows(x, SEG, HOP, sizes)


def test_stream_windows_of_nothing_is_nothing():
    assert list(stream_windows(iter([]), 10, 5)) == [], "no blocks, no windows"
    assert list(stream_windows(iter([np.zeros(0, np.float32)] * 3), 10, 5)) == [], "empty blocks, no windows"


def test_stream_windows_ignores_empty_blocks_between():
    x = np.arange(37, dtype=np.float32)
    empty = np.zeros(0, np.float32)
    blocks = [x[:5], empty, x[5:20], empty, empty, x[20:]]
    got = list(stream_windows(iter(blocks), 10, 4))
    ref = windows(x, 10, 4)
    assert len(got) == len(ref) and all(np.array_equal(g, r) for g, r in zip(got, ref)), "empty blocks change nothing"


def test_feature_config_defaults_match_audio_segment(default_params):
    # the defaults used above: 3 s at 24 kHz and a 240-sample hop give 301 frames
    a, f = default_params.audio, default_params.features
    assert isinstance(a, AudioConfig) and isinstance(f, FeatureConfig), "typed sections"
    assert 1 + a.segment_samples // f.hop_length == 301, "301 frames per segment"
