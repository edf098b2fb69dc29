"""Hostile input for the decoder front end: byte-level fuzz of stream_audio/load_audio over truncated,
mutated, spliced and concatenated files of every format libsndfile decodes here (wav, flac, ogg vorbis,
ogg opus, mp3, aiff, au). Every case must end in a float32 array or the one-line AudioError, never another
exception, a crash or a hang.

Two fuzzers share the mutations: a seeded one (numpy's generator, files in RAM) runs $AIVOICE_FUZZ_CASES
cases, 10 000 by default (about 15-40 s on 2 shared cores: most of the time is decoding); hypothesis runs
500 more, for its boundary values and because it shrinks a failing file to a minimal one. Both are marked
`fuzz` so a CI job can select or size them."""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings, strategies as st  # noqa: E402

from pipeline.config import AudioConfig  # noqa: E402
from pipeline.core.audio import AudioError, load_audio, stream_audio  # noqa: E402

CASES = int(os.environ.get("AIVOICE_FUZZ_CASES", "10000"))   # seeded fuzzer
HYPOTHESIS_CASES = 500
CFG = AudioConfig(sample_rate=16000, min_duration_s=0.05, decode_timeout_s=5.0)
# format, subtype, suffix, rate: every container/codec the decoder accepts
FORMATS = [("WAV", "PCM_16", ".wav", 8000), ("WAV", "FLOAT", ".wav", 8000), ("FLAC", "PCM_16", ".flac", 8000),
           ("OGG", "VORBIS", ".ogg", 8000), ("OGG", "OPUS", ".opus", 8000), ("MP3", "MPEG_LAYER_III", ".mp3", 8000),
           ("AIFF", "PCM_16", ".aiff", 8000), ("AU", "PCM_16", ".au", 8000)]


def _seed_file(fmt: str, subtype: str, rate: int, seconds: float = 0.4, channels: int = 1) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    x = np.stack([x] * channels, axis=1) if channels > 1 else x
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


SEEDS = {f"{fmt}-{subtype}": (_seed_file(fmt, subtype, rate, channels=1 + i % 2), suffix)
         for i, (fmt, subtype, suffix, rate) in enumerate(FORMATS)}
NAMES = sorted(SEEDS)


@st.composite
def hostile_files(draw) -> tuple[bytes, str, str]:
    """(bytes, suffix, what was done): a seed file truncated, mutated, spliced and/or concatenated."""
    name = draw(st.sampled_from(NAMES))
    data, suffix = SEEDS[name]
    data = bytearray(data)
    ops = draw(st.lists(st.sampled_from(["truncate", "flip", "overwrite", "splice", "concat", "zero-run"]),
                        min_size=1, max_size=3))
    for op in ops:
        n = len(data)
        if n == 0:
            break
        if op == "truncate":
            del data[draw(st.integers(0, n - 1)):]
        elif op == "flip":
            for _ in range(draw(st.integers(1, 8))):
                data[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":   # header fields are where decoders trust numbers: favour the first 64 bytes
            at = draw(st.integers(0, min(n - 1, 63)) | st.integers(0, n - 1))
            chunk = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\xff" * 4, b"\x00" * 4, b"\x7f\xff\xff\xff"]))
            data[at:at + len(chunk)] = chunk
        elif op == "splice":
            a, b = sorted(draw(st.tuples(st.integers(0, n), st.integers(0, n))))
            data[a:b] = draw(st.binary(max_size=64))
        elif op == "concat":
            other = SEEDS[draw(st.sampled_from(NAMES))][0]
            data += other[: draw(st.integers(0, len(other)))]
        elif op == "zero-run":
            at = draw(st.integers(0, n - 1))
            data[at:at + draw(st.integers(1, 512))] = b"\0" * min(512, n - at)
    return bytes(data), suffix, f"{name}: {'+'.join(ops)}"


def test_every_format_decodes_unharmed():
    # the seeds themselves are valid files of every format (else the fuzz would only test the error path)
    for name, (data, suffix) in SEEDS.items():
        path = Path(f"/tmp/aivoice-fuzz-seed-{os.getpid()}{suffix}")
        path.write_bytes(data)
        try:
            x = load_audio(path, CFG)
        finally:
            path.unlink()
        assert x.dtype == np.float32 and len(x) > 0.3 * CFG.sample_rate, f"{name}: {len(x)} samples"


OPS = ("truncate", "flip", "overwrite", "splice", "concat", "zero-run")
SPECIAL = (b"\xff" * 4, b"\x00" * 4, b"\x7f\xff\xff\xff")


def mutate(rng: np.random.Generator) -> tuple[bytes, str, str]:
    """hostile_files' mutations drawn from a seeded numpy generator: (bytes, suffix, what was done)."""
    name = NAMES[rng.integers(len(NAMES))]
    data, suffix = SEEDS[name]
    data = bytearray(data)
    ops = [OPS[i] for i in rng.integers(len(OPS), size=rng.integers(1, 4))]
    for op in ops:
        n = len(data)
        if n == 0:
            break
        if op == "truncate":
            del data[rng.integers(n):]
        elif op == "flip":
            for _ in range(rng.integers(1, 9)):
                data[rng.integers(n)] ^= 1 << int(rng.integers(8))
        elif op == "overwrite":   # header fields first: half of the writes land in the first 64 bytes
            at = int(rng.integers(min(n, 64)) if rng.random() < 0.5 else rng.integers(n))
            chunk = SPECIAL[rng.integers(3)] if rng.random() < 0.3 else rng.bytes(int(rng.integers(1, 9)))
            data[at:at + len(chunk)] = chunk
        elif op == "splice":
            a, b = sorted(rng.integers(n + 1, size=2))
            data[a:b] = rng.bytes(int(rng.integers(65)))
        elif op == "concat":
            other = SEEDS[NAMES[rng.integers(len(NAMES))]][0]
            data += other[: rng.integers(len(other) + 1)]
        elif op == "zero-run":
            at = int(rng.integers(n))
            data[at:at + int(rng.integers(1, 513))] = b"\0" * min(512, n - at)
    return bytes(data), suffix, f"{name}: {'+'.join(ops)}"


def _decode_case(path: Path, data: bytes, capped: bool, what: str, stats: dict) -> None:
    """Decode one hostile file: a float32 array or the one-line AudioError naming the file, within the timeout."""
    path.write_bytes(data)
    t0 = time.monotonic()
    try:
        blocks = list(stream_audio(path, CFG, max_duration_s=30.0 if capped else None))
        x = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
        assert x.dtype == np.float32 and np.isfinite(x).all(), what
        stats["decoded"] += 1
    except AudioError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message, f"{what}: {message!r}"
        stats["refused"] += 1
    elapsed = time.monotonic() - t0
    stats["slowest_s"] = max(stats["slowest_s"], elapsed)
    stats["cases"] += 1
    assert elapsed < CFG.decode_timeout_s + 2.0, f"{what}: {elapsed:.1f} s (a hang)"


@pytest.mark.fuzz
def test_decoder_survives_seeded_byte_level_fuzz(tmp_path):
    ram = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="aivoice-fuzz-", dir=ram if ram.is_dir() else tmp_path))
    rng = np.random.default_rng(20261127)
    stats = {"cases": 0, "decoded": 0, "refused": 0, "slowest_s": 0.0}
    started = time.monotonic()
    try:
        for i in range(CASES):
            data, suffix, what = mutate(rng)
            _decode_case(folder / f"upload{suffix}", data, bool(i % 2), f"case {i}, {what}", stats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    took = time.monotonic() - started
    print(f"\nseeded fuzz: {stats['cases']} cases in {took:.1f} s ({stats['decoded']} decoded, {stats['refused']} "
          f"refused with AudioError, slowest {stats['slowest_s'] * 1000:.0f} ms)")
    assert stats["cases"] == CASES and stats["decoded"] > 0.05 * CASES and stats["refused"] > 0.05 * CASES, stats


@pytest.mark.fuzz
def test_decoder_survives_byte_level_fuzz(tmp_path):
    stats = {"cases": 0, "decoded": 0, "refused": 0, "slowest_s": 0.0}
    started = time.monotonic()

    @seed(20261127)
    @settings(max_examples=HYPOTHESIS_CASES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(case=hostile_files(), capped=st.booleans())
    def fuzz(case, capped):
        data, suffix, what = case
        _decode_case(tmp_path / f"upload{suffix}", data, capped, what, stats)

    fuzz()
    took = time.monotonic() - started
    print(f"\nhypothesis fuzz: {stats['cases']} cases in {took:.1f} s ({stats['decoded']} decoded, {stats['refused']} refused "
          f"with AudioError, slowest {stats['slowest_s'] * 1000:.0f} ms)")
    assert stats["cases"] >= HYPOTHESIS_CASES * 0.9, stats   # hypothesis may stop early only on duplicates


def test_decode_timeout_refuses_a_slow_file_and_the_next_file_decodes(tmp_path):
    # given a 5-minute file and a 1 s file, and a decode timeout far below the long file's decoding time
    # (about 1/50 of it on a fast machine: the long file decodes in ~0.06 s there, in ~290 reads)
    rng = np.random.default_rng(0)
    long_path, short_path = tmp_path / "long.flac", tmp_path / "short.flac"
    sf.write(long_path, (0.1 * rng.standard_normal(300 * 16000)).astype(np.float32), 16000, subtype="PCM_16")
    sf.write(short_path, (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000, subtype="PCM_16")
    cfg = AudioConfig(sample_rate=16000, decode_timeout_s=0.001)
    # when both are decoded in turn
    with pytest.raises(AudioError) as refused:
        load_audio(long_path, cfg)
    short = load_audio(short_path, cfg)
    # then the long one is refused in one line naming the file and the setting, and the short one decodes
    assert str(refused.value).startswith(f"{long_path}: decoding took over 0.001 s (audio.decode_timeout_s)"), refused.value
    assert len(short) == 16000


def test_decode_timeout_is_not_part_of_the_params_hash():
    from pipeline.config import Params, params_hash

    assert params_hash(Params()) == params_hash(Params(audio=AudioConfig(decode_timeout_s=1.0)))
