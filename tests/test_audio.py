"""Audio front end (pipeline.core.audio) on real and broken input, as its docstrings promise.

Every file is written with soundfile into tmp_path (synthetic speech-like signals); the real clips
of the shared corpus are used where it is present and skipped with a reason where it is not.
"""
from __future__ import annotations

import csv
import re
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from pipeline.core.audio import _READ_FRAMES, AudioError, find_audio, load_audio, resample, resample_stream, stream_audio
from pipeline.config import AudioConfig
from pipeline.core.features import stream_windows, window_starts

CFG = AudioConfig()  # defaults: 24 kHz mono float32, min 0.25 s, silence peak 1e-4, 60 s blocks
SR = CFG.sample_rate

# (id, format, subtype, suffix, lossless)
FORMATS = [
    ("wav-pcm16", "WAV", "PCM_16", ".wav", True),
    ("wav-float", "WAV", "FLOAT", ".wav", True),
    ("flac", "FLAC", "PCM_16", ".flac", True),
    ("ogg-vorbis", "OGG", "VORBIS", ".ogg", False),
    ("ogg-opus", "OGG", "OPUS", ".opus", False),
    ("mp3", "MP3", "MPEG_LAYER_III", ".mp3", False),
]
FORMAT_BY_ID = {f[0]: f for f in FORMATS}


def _write(path: Path, x: np.ndarray, sr: int, fmt_id: str = "wav-float") -> Path:
    _, fmt, subtype, _, _ = FORMAT_BY_ID[fmt_id]
    sf.write(str(path), x, sr, format=fmt, subtype=subtype)
    return path


def _audio_error(path: Path, cfg: AudioConfig = CFG) -> AudioError:
    """Load `path`, expecting an AudioError whose str() names the file; return it."""
    with pytest.raises(AudioError) as info:
        load_audio(path, cfg)
    err = info.value
    assert str(path) in str(err), f"the error names the file: {err}"
    assert err.path == str(path), f"AudioError.path is the file: {err.path!r}"
    assert str(err) == f"{path}: {err.reason}", f"str() is 'path: reason': {err}"
    return err


def _check_clip(y: np.ndarray, seconds: float, tol_s: float, what: str) -> None:
    assert isinstance(y, np.ndarray) and y.ndim == 1, f"{what}: mono 1-D array, got shape {getattr(y, 'shape', None)}"
    assert y.dtype == np.float32, f"{what}: float32, got {y.dtype}"
    assert abs(len(y) / SR - seconds) <= tol_s, f"{what}: {len(y) / SR:.4f} s at {SR} Hz, expected {seconds} ± {tol_s} s"
    assert np.isfinite(y).all(), f"{what}: all samples finite"


# ---------------------------------------------------------------------------------------------
# Decoding every format soundfile writes


@pytest.mark.parametrize("rate", [24000, 16000])
@pytest.mark.parametrize("fmt_id", [f[0] for f in FORMATS])
def test_decodes_each_format_to_mono_float32_at_model_rate(fmt_id, rate, tmp_path, speech_like):
    # given: 2.5 s of speech-like audio written in this format at `rate`
    _, _, _, suffix, lossless = FORMAT_BY_ID[fmt_id]
    x = speech_like(2.5, rate, seed=1)
    path = _write(tmp_path / f"clip{suffix}", x, rate, fmt_id)
    assert sf.info(str(path)).samplerate == rate, "the file holds the rate we wrote"
    # when
    y = load_audio(path, CFG)
    # then: 24 kHz mono float32 of the same duration and content
    _check_clip(y, 2.5, 1e-3 if lossless else 0.05, f"{fmt_id} at {rate} Hz")
    if lossless:
        expected = resample(sf.read(str(path), dtype="float32")[0], rate, SR)
        np.testing.assert_allclose(y, expected, atol=1e-6, err_msg=f"{fmt_id}: decoded samples are the file's samples")
        np.testing.assert_allclose(y, resample(x, rate, SR), atol=2e-4,
                                   err_msg=f"{fmt_id}: lossless round trip keeps the signal (16-bit quantisation at most)")
    else:
        ratio = float(np.sqrt(np.mean(y**2)) / np.sqrt(np.mean(x**2)))
        assert 0.7 < ratio < 1.3, f"{fmt_id}: lossy round trip keeps the level (RMS ratio {ratio:.2f})"


def test_block_size_does_not_change_the_output(tmp_path, speech_like):
    # given: a 44.1 kHz clip, decoded with 60 s blocks and with odd tiny blocks (many reads, many resampler calls)
    path = _write(tmp_path / "c.wav", speech_like(3.3, 44100, seed=2), 44100)
    whole = load_audio(path, CFG)
    tiny = AudioConfig(block_s=0.0123)
    # when
    blocks = list(stream_audio(path, tiny))
    # then
    # 268 input blocks; soxr emits its output in bursts, so fewer (but still many) come out
    assert len(blocks) > 50, f"tiny blocks stream in many pieces, got {len(blocks)}"
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks), "every block is mono float32"
    np.testing.assert_allclose(np.concatenate(blocks), whole, atol=1e-6, err_msg="block size changes nothing")


# ---------------------------------------------------------------------------------------------
# Bad input: a typed AudioError naming the file and the reason


def test_missing_file(tmp_path):
    err = _audio_error(tmp_path / "nope.wav")
    assert err.reason == "no such file", f"reason: {err.reason}"


def test_stream_audio_is_lazy_and_raises_when_iterated(tmp_path):
    # stream_audio is a generator: opening happens at the first next(), not at the call
    gen = stream_audio(tmp_path / "nope.wav", CFG)
    with pytest.raises(AudioError, match="no such file"):
        next(gen)


def test_max_duration_is_checked_from_the_header_before_decoding(tmp_path, speech_like):
    # given an 8 s clip, when streamed with a 5 s cap (the service's serve.max_duration_s)
    path = _write(tmp_path / "long.flac", speech_like(8.0, SR), SR, "flac")
    gen = stream_audio(path, CFG, max_duration_s=5.0)
    # then the first next() refuses it: no block is decoded first
    with pytest.raises(AudioError) as info:
        next(gen)
    assert info.value.reason == "too long: 8.0 s (maximum 5 s)", f"reason: {info.value.reason}"
    # and without a cap, or under it, the clip decodes whole
    assert len(load_audio(path, CFG)) == 8 * SR
    assert sum(len(b) for b in stream_audio(path, CFG, max_duration_s=8.5)) == 8 * SR


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    err = _audio_error(path)
    assert "empty file (0 bytes)" in err.reason, f"reason: {err.reason}"


@pytest.mark.parametrize("content", [
    pytest.param(b"This is a text file, not a recording.\n" * 40, id="text"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, id="png"),
    pytest.param(np.random.default_rng(0).bytes(5000), id="random-bytes"),
    pytest.param(b"RIFF", id="riff-magic-only"),
])
def test_non_audio_renamed_wav(content, tmp_path):
    path = tmp_path / "fake.wav"
    path.write_bytes(content)
    err = _audio_error(path)
    assert "not a readable audio file" in err.reason, f"reason: {err.reason}"


def test_silence_is_refused_after_the_last_block(tmp_path):
    # given: 2 s of digital silence
    path = _write(tmp_path / "silence.wav", np.zeros(2 * SR, np.float32), SR, "wav-pcm16")
    err = _audio_error(path)
    assert "silent" in err.reason, f"reason: {err.reason}"
    # when streaming: all blocks come first, the error after them (documented in stream_audio)
    got = 0
    with pytest.raises(AudioError, match="silent"):
        for block in stream_audio(path, CFG):
            got += len(block)
    assert got == 2 * SR, f"the 2 s of blocks were yielded before the error, got {got} samples"


def test_quiet_but_not_silent_is_kept(tmp_path, speech_like):
    # a clip at -60 dBFS peak stays above the 1e-4 silence threshold
    path = _write(tmp_path / "quiet.wav", speech_like(1.0, SR, level=1e-3, noise=0.0), SR)
    y = load_audio(path, CFG)
    assert len(y) == SR, f"quiet clip decoded whole, got {len(y)} samples"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_samples(bad, tmp_path, speech_like):
    # given: a FLOAT wav with one non-finite sample at 1.5 s
    x = speech_like(2.0, SR, seed=3)
    x[int(1.5 * SR)] = bad
    path = _write(tmp_path / "nonfinite.wav", x, SR, "wav-float")
    err = _audio_error(path)
    match = re.fullmatch(r"NaN or infinite samples near ([0-9.]+) s", err.reason)
    assert match, f"reason names NaN/inf and a time: {err.reason}"
    near = float(match.group(1))
    assert 1.5 - _READ_FRAMES / SR - 0.01 <= near <= 1.5, f"position {near} s is at or just before 1.5 s"


def test_absurdly_large_float_samples_are_refused_not_resampled_into_nan(tmp_path, speech_like):
    # given: a FLOAT wav with finite samples near float32's maximum (found by the fuzz: at another rate the
    # resampler's sums overflowed, and NaN/inf windows reached the model)
    x = speech_like(2.0, SR, seed=3)
    x[int(0.5 * SR):int(0.5 * SR) + 50] = 3e38
    path = _write(tmp_path / "huge.wav", x, SR, "wav-float")
    err = _audio_error(path)
    assert re.fullmatch(r"sample magnitude 3e\+38 near [0-9.]+ s \(float audio is within \+-1; over 10000 it is not audio\)",
                        err.reason), err.reason
    # while a float clip that peaks a little over 1.0 (headroom) still decodes
    x[int(0.5 * SR):int(0.5 * SR) + 50] = 1.5
    assert np.isfinite(load_audio(_write(tmp_path / "hot.wav", x, SR, "wav-float"), CFG)).all()


def test_one_sample_clip(tmp_path):
    path = _write(tmp_path / "one.wav", np.array([0.5], np.float32), SR)
    err = _audio_error(path)
    assert err.reason.startswith("too short:") and "minimum 0.25 s" in err.reason, f"reason: {err.reason}"
    # with no minimum, the single sample comes through (resampled 8 kHz -> 24 kHz: 3 samples)
    no_min = AudioConfig(min_duration_s=0)
    assert load_audio(path, no_min).shape == (1,), "one sample at 24 kHz stays one sample"
    path8 = _write(tmp_path / "one8k.wav", np.array([0.5], np.float32), 8000)
    assert load_audio(path8, no_min).shape == (3,), "one sample at 8 kHz becomes 3 at 24 kHz"


def test_header_without_samples(tmp_path):
    # a valid WAV header with 0 frames: nothing to use
    path = _write(tmp_path / "noframes.wav", np.zeros(0, np.float32), SR)
    err = _audio_error(path)
    assert "no samples decoded" in err.reason, f"reason: {err.reason}"


def test_eight_channels_are_averaged_then_resampled(tmp_path, speech_like):
    # given: 8 different channels at 48 kHz
    x = np.stack([speech_like(1.2, 48000, seed=10 + c, level=0.1) for c in range(8)], axis=1)
    path = _write(tmp_path / "eight.wav", x, 48000, "wav-float")
    assert sf.info(str(path)).channels == 8, "file has 8 channels"
    # when
    y = load_audio(path, CFG)
    # then: the channel mean, resampled whole
    expected = soxr.resample(x.mean(axis=1, dtype=np.float32), 48000, SR)
    assert y.shape == expected.shape, f"mono at 24 kHz: {y.shape} vs {expected.shape}"
    np.testing.assert_allclose(y, expected, atol=1e-6, err_msg="8 channels -> their mean, resampled")


@pytest.mark.parametrize("rate", [8000, 192000])
def test_low_and_high_input_rates_are_resampled(rate, tmp_path, speech_like):
    x = speech_like(1.0, rate, seed=4)
    path = _write(tmp_path / f"r{rate}.wav", x, rate, "wav-float")
    y = load_audio(path, CFG)
    assert len(y) == round(len(x) * SR / rate), f"{rate} Hz: length round(n * 24000 / {rate}), got {len(y)}"
    if rate == 8000:
        assert len(y) == 3 * len(x), "8 kHz -> 24 kHz is exactly 3x as long"
    expected = soxr.resample(x, rate, SR)
    np.testing.assert_allclose(y, expected, atol=1e-6, err_msg=f"{rate} Hz: same as resampling the whole file")


# ---------------------------------------------------------------------------------------------
# Truncated files: decoded as far as libsndfile gives samples; an error only when nothing is usable


@pytest.mark.parametrize("fmt_id", ["wav-pcm16", "wav-float", "flac", "ogg-vorbis", "ogg-opus", "mp3"])
def test_file_cut_in_half_decodes_its_first_part(fmt_id, tmp_path, speech_like):
    # given: an 8 s file and a copy holding only the first half of its bytes
    # (ogg decodes up to its last complete page; opus pages are ~1 s apart: hence 8 s, not less)
    suffix = FORMAT_BY_ID[fmt_id][3]
    full = _write(tmp_path / f"full{suffix}", speech_like(8.0, SR, seed=5), SR, fmt_id)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    # when
    whole, part = load_audio(full, CFG), load_audio(cut, CFG)
    # then: a shorter clip that is the start of the whole one (not padded to the header's length)
    frac = len(part) / len(whole)
    assert 0.3 < frac < 0.6, f"{fmt_id}: half the bytes give about half the audio, got {frac:.2f} of it"
    np.testing.assert_allclose(part[: len(part) - 2048], whole[: len(part) - 2048], atol=1e-5,
                               err_msg=f"{fmt_id}: the decoded part is the start of the full clip")


def test_ogg_cut_inside_its_first_audio_page_is_refused(tmp_path, speech_like):
    # ogg decodes up to its last complete page; cut inside the first audio page, nothing is usable
    full = _write(tmp_path / "full.ogg", speech_like(4.0, SR, seed=5), SR, "ogg-vorbis")
    data = full.read_bytes()
    pages = [m.start() for m in re.finditer(b"OggS", data)]
    assert len(pages) > 3, f"premise: headers on pages 1-2, audio from page 3 on ({len(pages)} pages)"
    cut = tmp_path / "cut.ogg"
    cut.write_bytes(data[: pages[2] + 100])
    err = _audio_error(cut)
    assert "no samples decoded" in err.reason, f"reason: {err.reason}"


def test_flac_cut_before_the_first_read_completes_is_refused(tmp_path, speech_like):
    # given: a FLAC cut after ~8% of 4 s (< one read of _READ_FRAMES): the first read fails
    full = _write(tmp_path / "full.flac", speech_like(4.0, SR, seed=5), SR, "flac")
    cut = tmp_path / "cut.flac"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 8 // 100])
    assert 0.08 * 4.0 * SR < _READ_FRAMES, "premise: the cut lies inside the first read"
    err = _audio_error(cut)
    assert err.reason.startswith("decoding failed at the start ("), f"reason: {err.reason}"


@pytest.mark.parametrize("keep", [20, 100, 400])
def test_mp3_cut_inside_its_header_is_refused(keep, tmp_path, speech_like):
    full = _write(tmp_path / "full.mp3", speech_like(4.0, SR, seed=5), SR, "mp3")
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(full.read_bytes()[:keep])
    err = _audio_error(cut)
    assert "not a readable audio file" in err.reason, f"reason: {err.reason}"


def test_wav_cut_to_a_few_samples_is_too_short(tmp_path, speech_like):
    # 44-byte header + 16 bytes = 8 PCM_16 samples
    full = _write(tmp_path / "full.wav", speech_like(1.0, SR), SR, "wav-pcm16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[:60])
    err = _audio_error(cut)
    assert err.reason.startswith("too short: 0.0003 s"), f"reason: {err.reason}"


# ---------------------------------------------------------------------------------------------
# find_audio


def test_find_audio_expands_nested_folders(tmp_path, speech_like):
    # given: audio at several depths, with an upper-case suffix, next to non-audio files
    x = speech_like(0.3, SR)
    root = tmp_path / "root"
    for rel in ["z.flac", "a/one.MP3", "a/b/c.wav", "a/b/deep/e.opus"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")  # find_audio looks at names only
    (root / "notes.txt").write_text("not audio")
    (root / "a" / "cover.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty_dir").mkdir()
    loose = _write(tmp_path / "loose.wav", x, SR)
    # when
    found = find_audio([root, str(loose), tmp_path / "empty_dir"])
    # then: the folder recursively and sorted, then the loose file as given; empty folder adds nothing
    expected = sorted(root / rel for rel in ["z.flac", "a/one.MP3", "a/b/c.wav", "a/b/deep/e.opus"]) + [loose]
    assert found == expected, f"nested audio found, sorted, non-audio skipped: {found}"


def test_find_audio_keeps_a_missing_path_and_load_names_it(tmp_path):
    missing = tmp_path / "gone" / "x.wav"
    assert find_audio([missing]) == [missing], "files (even missing ones) are kept as given"
    err = _audio_error(missing)
    assert err.reason == "no such file", f"the missing path fails at decode: {err.reason}"


# ---------------------------------------------------------------------------------------------
# Streaming (soxr.ResampleStream) equals one-shot soxr resampling, whatever the blocks


def _blockwise(x: np.ndarray, orig: int, sizes: list[int]) -> np.ndarray:
    blocks, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        blocks.append(x[i:i + n])
        i, k = i + n, k + 1
    out = list(resample_stream(iter(blocks), orig, SR))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


RATES = [8000, 11025, 16000, 22050, 44100, 48000, 192000]
BLOCKINGS = {"7": [7], "331": [331], "4097": [4097], "mixed": [1, 5000, 13, 997, 2, 30011], "whole": [10**9]}


# 7-sample blocks above 48 kHz only cost time; 331 and "mixed" cover odd sizes there
@pytest.mark.parametrize("rate,blocking", [(r, b) for r in RATES for b in BLOCKINGS if not (b == "7" and r > 48000)])
def test_stream_resampling_equals_whole_file_resampling(rate, blocking, speech_like):
    x = speech_like(0.4, rate, seed=6) + np.float32(0.0)
    x[len(x) // 3] = 0.9  # a click: any seam would show
    ref = soxr.resample(x, rate, SR)
    got = _blockwise(x, rate, BLOCKINGS[blocking])
    assert got.shape == ref.shape, f"{rate} Hz, blocks {blocking}: length {got.shape} vs {ref.shape}"
    np.testing.assert_allclose(got, ref, atol=1e-6, err_msg=f"{rate} Hz, blocks {blocking}: block-wise == whole")


def test_stream_resampling_of_very_high_rates(speech_like):
    # 2.8224 MHz (DSD-like) -> 24 kHz: a long filter, many input samples per output sample
    rate = 2822400
    x = speech_like(0.1, rate, seed=7)
    np.testing.assert_allclose(_blockwise(x, rate, [40961]), soxr.resample(x, rate, SR), atol=1e-6,
                               err_msg="high input rate: block-wise == whole")


def test_stream_resampling_passes_blocks_through_at_the_model_rate():
    blocks = [np.arange(5, dtype=np.float32), np.arange(3, dtype=np.float32)]
    out = list(resample_stream(iter(blocks), SR, SR))
    assert len(out) == 2 and all(a is b for a, b in zip(out, blocks)), "same rate: blocks pass unchanged"


@pytest.mark.parametrize("n", [1, 2, 3, 100])
def test_stream_resampling_tiny_inputs(n):
    x = np.linspace(-0.5, 0.5, n, dtype=np.float32)
    for rate in (8000, 44100):
        ref = soxr.resample(x, rate, SR)
        got = _blockwise(x, rate, [1])
        np.testing.assert_allclose(got, ref, atol=1e-6, err_msg=f"{n} samples at {rate} Hz, 1-sample blocks")


def test_long_file_decoded_in_blocks_has_no_seams(tmp_path):
    # given: 3 minutes of a 44.1 kHz tone (a signal whose correct resampling is known exactly), decoded
    # in 0.37 s blocks: ~490 block edges, none on a multiple of the 147/80 rate ratio's period
    rate, seconds, freq = 44100, 180, 441.0
    t = np.arange(seconds * rate) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    path = _write(tmp_path / "tone.wav", x, rate)
    cfg = AudioConfig(block_s=0.37)
    # when
    blocks = list(stream_audio(path, cfg))
    y = np.concatenate(blocks)
    # then: the same samples as soxr resampling the whole file at once
    assert len(blocks) > 200, f"decoded in many blocks, got {len(blocks)}"
    one_shot = soxr.resample(x, rate, SR)
    assert y.shape == one_shot.shape, f"length {y.shape} vs one-shot {one_shot.shape}"
    np.testing.assert_allclose(y, one_shot, atol=1e-6, err_msg="block-wise decoding == one-shot soxr resampling")
    # and: at every block edge the output is the tone at 24 kHz, as everywhere else (a restarted filter,
    # a dropped or repeated sample would leave an error of the tone's order, 0.1-0.5)
    ideal = 0.5 * np.sin(2 * np.pi * freq * np.arange(len(y)) / SR)
    err = np.abs(y - ideal)
    edges = np.cumsum([len(b) for b in blocks])[:-1]
    near = np.concatenate([np.arange(e - 16, e + 16) for e in edges if 2400 < e < len(y) - 2400])
    interior = err[2400:-2400]
    assert err[near].max() < 1e-3, f"largest error next to a block edge: {err[near].max():.2e}"
    assert err[near].max() <= 1.5 * interior.max(), (
        f"block edges ({err[near].max():.2e}) no worse than the rest of the file ({interior.max():.2e})")


# ---------------------------------------------------------------------------------------------
# A 2-hour file streams in bounded memory


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def test_two_hour_file_streams_in_bounded_memory(tmp_path):
    # given: a 2-hour 8 kHz 16-bit WAV (115 MB), written block-wise; 24 kHz float32 in full would be 691 MB
    rate, hours = 8000, 2
    path = tmp_path / "two_hours.wav"
    rng = np.random.default_rng(8)
    minute = (rng.standard_normal(60 * rate) * 300).astype(np.int16)  # low-level noise, peak ~0.04
    with sf.SoundFile(str(path), "w", rate, 1, format="WAV", subtype="PCM_16") as f:
        for _ in range(hours * 60):
            f.write(minute)
    assert sf.info(str(path)).duration == hours * 3600, "premise: the file is 2 h long"
    seg, hop = CFG.segment_samples, round(1.5 * SR)

    decoded = 0

    def counted(blocks):
        nonlocal decoded
        for b in blocks:
            decoded += len(b)
            yield b

    # when: decode, resample and cut into scoring windows, touching every window
    rss_tracked = _peak_rss_reset()
    rss_before = _vm_hwm_bytes()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        n_windows, checksum = 0, 0.0
        for w in stream_windows(counted(stream_audio(path, CFG)), seg, hop):
            assert len(w) == seg, f"every window is one segment, got {len(w)}"
            n_windows += 1
            checksum += float(w[::997].sum())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    # then
    assert abs(decoded / SR - hours * 3600) <= 1, f"decoded {decoded / SR:.2f} s, expected 2 h ± 1 s"
    assert n_windows == len(window_starts(decoded, seg, hop)), f"{n_windows} windows cover the file"
    assert np.isfinite(checksum), "windows hold finite samples"
    assert peak < 64 * 2**20, f"peak traced (numpy) memory {peak / 2**20:.1f} MiB stays under 64 MiB"
    if rss_tracked:  # the resampler's buffers are not traced by tracemalloc; the RSS peak shows them
        grew = _vm_hwm_bytes() - rss_before
        assert grew < 384 * 2**20, f"peak RSS grew {grew / 2**20:.0f} MiB while streaming 2 h (whole file: 691 MB)"
    assert elapsed < 60, f"streaming 2 h took {elapsed:.1f} s"


# ---------------------------------------------------------------------------------------------
# Real clips from the shared corpus (skipped where the corpus is absent)


def _corpus_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "MANIFEST.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_corpus_one_clip_per_format_rate_and_layout(shared_corpus):
    # given: the first clip of every (format, rate, channels) combination in the manifest
    picked: dict[tuple[str, str, str], dict[str, str]] = {}
    for row in _corpus_rows(shared_corpus):
        picked.setdefault((row["format"], row["sample_rate"], row["channels"]), row)
    assert len(picked) >= 5, f"the corpus has several formats, got {sorted(picked)}"
    failures = []
    for key, row in sorted(picked.items()):
        path = shared_corpus / row["path"]
        try:
            y = load_audio(path, CFG)
            _check_clip(y, float(row["duration_s"]), 0.01, f"{row['path']} {key}")
            assert np.abs(y).max() > CFG.silence_peak, f"{row['path']}: not silent"
        except (AudioError, AssertionError) as exc:
            failures.append(f"{key}: {exc}")
    assert not failures, "real clips decode as the manifest says:\n" + "\n".join(failures)


@pytest.mark.parametrize("fmt", ["MP3/MPEG_LAYER_III", "OGG/VORBIS", "FLAC/PCM_24"])
def test_corpus_clip_streams_like_it_loads(fmt, shared_corpus):
    rows = [r for r in _corpus_rows(shared_corpus) if r["format"] == fmt]
    if not rows:
        pytest.skip(f"no {fmt} clip in the corpus")
    row = max(rows, key=lambda r: int(r["channels"]))  # stereo where there is one
    path = shared_corpus / row["path"]
    whole = load_audio(path, CFG)
    streamed = np.concatenate(list(stream_audio(path, AudioConfig(block_s=0.37))))
    np.testing.assert_allclose(streamed, whole, atol=1e-6, err_msg=f"{row['path']}: 0.37 s blocks == whole")


def test_corpus_mp3_cut_in_half_decodes_its_first_part(shared_corpus, tmp_path):
    rows = [r for r in _corpus_rows(shared_corpus) if r["format"].startswith("MP3") and float(r["duration_s"]) > 4]
    if not rows:
        pytest.skip("no mp3 longer than 4 s in the corpus")
    src = shared_corpus / rows[0]["path"]
    data = src.read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2])
    whole, part = load_audio(src, CFG), load_audio(cut, CFG)
    frac = len(part) / len(whole)
    assert 0.3 < frac < 0.6, f"{src.name}: half the bytes give about half the audio, got {frac:.2f}"
    np.testing.assert_allclose(part[:-4096], whole[: len(part) - 4096], atol=1e-5,
                               err_msg=f"{src.name}: the decoded half is the start of the clip")
