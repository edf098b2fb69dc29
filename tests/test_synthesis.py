"""Vocoded twins (pipeline.synthesis): each vocoder resynthesises at the original's rate and length, the
twins step records what it could not do and goes on, never touches an original, and follows params.yaml."""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.config import TwinsConfig, load_params
from pipeline.core.data import LoadedClip, read_corpus
from pipeline.synthesis.neural import load_decoder
from pipeline.synthesis.twins import make_twins, with_twins
from pipeline.synthesis.vocoders import SIGNAL_VOCODERS, VocoderError, lpc, world
from pipeline.training.train import BalancedSampler, make_batch

from conftest import make_speech_like


@pytest.mark.parametrize("name", sorted(SIGNAL_VOCODERS))
@pytest.mark.parametrize("sr", [8000, 16000])
def test_signal_vocoder_keeps_rate_length_and_level(name, sr):
    x = make_speech_like(1.5, sr, seed=1)
    y = SIGNAL_VOCODERS[name](x, sr)
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all(), f"{name}@{sr}: {y.shape} {y.dtype}"
    rms = lambda v: float(np.sqrt(np.mean(v.astype(np.float64) ** 2)))
    assert rms(y) == pytest.approx(rms(x), rel=0.01), f"{name}: the twin is as loud as its original"
    assert not np.allclose(x, y, atol=1e-3), f"{name}: the waveform was remade, not copied"
    spec = lambda v: np.log(np.abs(np.fft.rfft(v)) + 1e-6)
    low = slice(0, len(spec(x)) // 4)   # where the speech-like signal has its harmonics
    assert np.corrcoef(spec(x)[low], spec(y)[low])[0, 1] > 0.3, f"{name}: the twin keeps the original's spectrum"


@pytest.mark.parametrize("vocoder", [world, lpc])
def test_pitch_vocoders_refuse_unvoiced_input(vocoder):
    noise = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    with pytest.raises(VocoderError, match="voiced"):
        vocoder(noise, 16000)


def _corpus(root: Path) -> Path:
    """Two human clips (16 kHz and 8 kHz), one unvoiced 'human' clip, one AI clip, and a manifest."""
    files = {"human/a__x/h1.wav": (make_speech_like(1.2, 16000, seed=2), 16000),
             "human/b__y/h2.wav": (make_speech_like(1.0, 8000, seed=3), 8000),
             "human/b__y/hiss.wav": (np.random.default_rng(4).standard_normal(8000).astype(np.float32) * 0.05, 8000),
             "ai/c__tts/t1.wav": (make_speech_like(1.0, 22050, seed=5), 22050)}
    for rel, (x, sr) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, x, sr)
    return root


def _fingerprint(root: Path) -> dict:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), os.stat(p).st_mtime_ns) for p in root.rglob("*.wav")}


def test_twins_step_writes_chain_preserving_twins_and_goes_on_after_failures(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    before = _fingerprint(corpus)
    cfg = TwinsConfig(vocoders=("world", "codec2", "istft"), neural_steps=2, neural_batch_size=2)
    out = tmp_path / "twins"
    # when: twins are made
    report = make_twins(corpus, out, cfg)
    # then: every human clip got a twin per vocoder, except what a vocoder could not do, which is recorded
    failed = {(Path(f["file"]).name, f["vocoder"]) for f in report.failed}
    assert ("hiss.wav", "world") in failed and all(f["reason"] for f in report.failed), report.failed
    rows = list(csv.DictReader((out / "MANIFEST.csv").open()))
    assert report.added == len(rows) == 3 * 3 - len(failed), f"{report.added} twins, {len(rows)} rows, failed {failed}"
    originals = {c.sha256 or hashlib.sha256(c.path.read_bytes()).hexdigest(): c for c in read_corpus(corpus)}
    for row in rows:
        original = originals[row["twin_of"]]
        info, orig = sf.info(out / row["path"]), sf.info(original.path)
        assert row["label"] == "ai" and row["generator"].startswith("twin-"), row
        assert row["source"] == original.source and original.label_name == "human", "a twin keeps its original's source"
        assert info.samplerate == orig.samplerate and info.frames == orig.frames, "same rate and length as the original"
    assert load_decoder(out / "vocoders" / "istft.pt") is not None, "the trained decoder is kept, loadable weights-only"
    assert _fingerprint(corpus) == before, "originals are only read"
    # and: a second run adds nothing; dropping a vocoder from params removes its twins
    assert make_twins(corpus, out, cfg).added == 0, "re-running adds only what is missing"
    make_twins(corpus, out, TwinsConfig(vocoders=("world",), neural_steps=2, neural_batch_size=2))
    left = list(csv.DictReader((out / "MANIFEST.csv").open()))
    assert {r["generator"] for r in left} == {"twin-world"}, "twins of unconfigured vocoders are pruned"
    assert len(list((out / "audio").rglob("*.flac"))) == len(left), "and so are their files"


@pytest.fixture
def one_thread():
    """Workers are forked only where torch runs one thread (forked_workers); a worker runs one too."""
    from pipeline.training.train import one_thread as torch_on_one_thread

    with torch_on_one_thread():
        yield


def test_vocoders_side_by_side_make_the_same_twins_and_an_interrupted_run_is_swept(tmp_path, one_thread):
    corpus = _corpus(tmp_path / "corpus")
    # (world is left out: pyworld's aperiodic noise comes from a C generator that runs on across calls)
    cfg = TwinsConfig(vocoders=("griffinlim", "lpc", "istft"), neural_steps=2, neural_batch_size=2)
    pairs = lambda out: sorted((r["twin_of"], r["generator"], r["sha256"]) for r in csv.DictReader((out / "MANIFEST.csv").open()))
    # when: the same twins are made in one process, and with a forked worker beside it
    alone = make_twins(corpus, tmp_path / "alone", cfg)
    beside = make_twins(corpus, tmp_path / "beside", cfg, workers=1)
    # then: the same twins, bit for bit, the same failures, and every vocoder timed
    assert pairs(tmp_path / "alone") == pairs(tmp_path / "beside") and len(pairs(tmp_path / "alone")) == 3 * 3 - 1
    assert alone.failed == beside.failed and set(beside.seconds) == set(cfg.vocoders), beside.to_dict()
    assert set(beside.decoders) == {"istft"}, "the decoder's training report comes back from whichever process trained it"
    # and: files an interrupted run left without manifest rows are removed by the next run, twins kept
    stray = [tmp_path / "beside" / "audio" / "zz" / "unlisted.flac", tmp_path / "beside" / "audio" / ".x.flac.1-ab.tmp.flac"]
    for p in stray:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    assert make_twins(corpus, tmp_path / "beside", cfg, workers=1).added == 0
    assert not any(p.exists() for p in stray), "stray files swept"
    assert len(list((tmp_path / "beside" / "audio").rglob("*.flac"))) == 8, "every listed twin kept"


def test_twins_join_only_the_clips_they_were_made_from(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    make_twins(corpus, tmp_path / "twins", TwinsConfig(vocoders=("griffinlim",)))
    clips = read_corpus(corpus)
    assert len(with_twins(clips, tmp_path / "twins")) == len(clips) + 3, "every human's twin joins"
    only_a = [c for c in clips if c.source != "b"]
    assert len(with_twins(only_a, tmp_path / "twins")) == len(only_a) + 1, "a twin without its original stays out"
    # the corpus manifest has no sha256 column: the originals get it, so each twin finds its pair
    joined = with_twins(clips, tmp_path / "twins")
    originals = {c.sha256 for c in joined if not c.twin_of}
    assert all(t.twin_of in originals for t in joined if t.twin_of), "every twin's original is identifiable"
    sampler = BalancedSampler([LoadedClip(c, np.zeros(8000, np.float32), (0, 8000)) for c in joined],
                              np.random.default_rng(0))
    assert len(sampler.twins) == 3, "the sampler pairs all three humans with their twins"
    assert with_twins(clips, tmp_path / "none") == clips, "no twins folder: the clips alone"


def test_a_pair_is_one_crop_of_a_clip_and_its_twin_under_one_channel():
    params = load_params("/nonexistent", overrides={"train.twin_fraction": 1.0, "train.mixture_fraction": 0.0,
                                                     "train.batch_size": 8})
    from pipeline.core.data import Clip

    rng = np.random.default_rng(0)
    wave = make_speech_like(5.0, 24000, seed=7)
    human = LoadedClip(Clip(Path("h.wav"), 0, "human", "s", "en", "src", sha256="h"), wave, (24000, 96000))
    # an identity "vocoder": the twin is the same waveform, so the pair must come out identical
    twin = LoadedClip(Clip(Path("t.flac"), 1, "twin-x", "s", "en", "src", sha256="t", twin_of="h"), wave.copy(), (0, len(wave)))
    other = LoadedClip(Clip(Path("a.wav"), 1, "tts", "s2", "en", "tts"), make_speech_like(3.0, 24000, seed=8), (0, 72000))
    sampler = BalancedSampler([human, twin, other], rng)
    waves, ai, _, _, _ = make_batch(sampler, params, ["en"], rng)
    assert ai.tolist() == [0, 1] * 4, "each pair is a human clip then its twin"
    for i in range(0, 8, 2):
        assert torch.equal(waves[i], waves[i + 1]), "same crop, same channel augmentation for both halves of a pair"
    assert len({waves[i].sum().item() for i in range(0, 8, 2)}) > 1, "pairs differ from each other"


def _twin_sampler():
    """Params with half of each batch's pairs twins (batch 8), and a sampler of a human, its twin and a TTS clip."""
    from pipeline.core.data import Clip

    params = load_params("/nonexistent", overrides={"train.twin_fraction": 0.5, "train.batch_size": 8})
    wave = make_speech_like(5.0, 24000, seed=7)
    human = LoadedClip(Clip(Path("h.wav"), 0, "human", "s", "en", "src", sha256="h"), wave, (0, len(wave)))
    twin = LoadedClip(Clip(Path("t.flac"), 1, "twin-x", "s", "en", "src", sha256="t", twin_of="h"), wave * 0.5, (0, len(wave)))
    other = LoadedClip(Clip(Path("a.wav"), 1, "tts", "s2", "en", "tts"), make_speech_like(3.0, 24000, seed=8), (0, 72000))
    return params, BalancedSampler([human, twin, other], np.random.default_rng(0))


def test_ranks_draw_disjoint_shares_of_the_one_process_batch():
    from pipeline.training.train import make_shard

    params, sampler = _twin_sampler()
    whole, ai, _, _, _, _ = make_shard(sampler, params, ["en"], step=3)
    first, ai0, _, _, _, _ = make_shard(sampler, params, ["en"], step=3, rank=0, world=2)
    second, ai1, _, _, _, _ = make_shard(sampler, params, ["en"], step=3, rank=1, world=2)
    assert len(first) == len(second) == 4, "each of two ranks gets half of the global batch"
    # pairs 0, 2 on rank 0 and 1, 3 on rank 1: interleaved by pair they are the one-process batch
    merged = torch.cat([first[0:2], second[0:2], first[2:4], second[2:4]])
    assert torch.equal(merged, whole), "the ranks' shares are exactly the one-process batch"
    other_step, _, _, _, _, _ = make_shard(sampler, params, ["en"], step=4)
    assert not torch.equal(other_step, whole), "each step draws anew"


def test_batch_workers_make_the_same_batches_in_the_same_order():
    from pipeline.training.train import shard_stream

    params, sampler = _twin_sampler()
    # when: five steps are made in this process, and by two worker processes
    here = list(shard_stream(sampler, params, ["en"], total=5))
    torch_rng = torch.get_rng_state()
    ahead = list(shard_stream(sampler, params, ["en"], total=5, workers=2))
    assert torch.equal(torch.get_rng_state(), torch_rng), "torch's global generator (dropout) is left alone"
    # then: step for step the same waves, labels, and per-row generators in the same state (SpecAugment draws next)
    assert len(here) == len(ahead) == 5
    for a, b in zip(here, ahead):
        assert all(torch.equal(x, y) for x, y in zip(a[:5], b[:5]))
        assert [r.bit_generator.state for r in a[5]] == [r.bit_generator.state for r in b[5]]
    assert not torch.equal(here[0][0], here[1][0]), "each step draws anew"


def test_batch_workers_make_the_training_features_with_the_batch():
    from pipeline.core.features import FrontEnd
    from pipeline.training.train import shard_stream, training_features

    params, sampler = _twin_sampler()
    front_end = FrontEnd(params.audio, params.features.model_copy(update={"kind": "mel"}))
    before = torch.get_num_threads()
    torch.set_num_threads(2)   # this process on two threads, a worker on one: the features must not differ
    try:
        waves = list(shard_stream(sampler, params, ["en"], total=3))
        here = list(shard_stream(sampler, params, ["en"], total=3, front_end=front_end))
        assert torch.get_num_threads() == 2, "this process's threads are restored after making features"
        ahead = list(shard_stream(sampler, params, ["en"], total=3, workers=1, front_end=front_end))
    finally:
        torch.set_num_threads(before)
    for w, a, b in zip(waves, here, ahead):
        expected = training_features(front_end, w[0], w[5], params)   # what the training loop made from the waves
        assert a[5] is None and b[5] is None, "no generators left to draw from: SpecAugment is done"
        assert a[0].shape == expected.shape == (8, 1, params.features.n_mels, a[0].shape[-1])
        assert torch.allclose(a[0], expected, atol=1e-5), "the features the loop would have made from the waves"
        assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1:5], b[1:5])), \
            "bit for bit the same whether a worker or this process makes them"


def test_matched_pairs_take_a_human_and_an_ai_clip_of_one_source_through_one_channel():
    from pipeline.core.data import Clip

    def sampler_and_params(fraction):
        params = load_params("/nonexistent", overrides={"train.twin_fraction": 0.0, "train.mixture_fraction": 0.0,
                                                         "train.matched_fraction": fraction, "train.batch_size": 16})
        wave = np.full(72000, 0.1, np.float32)   # wherever a crop starts, the page's two clips give the same one
        page = [LoadedClip(Clip(Path(f"{n}.wav"), label, n, "s", "en", "page"), wave.copy(), (0, len(wave)))
                for n, label in (("h", 0), ("a", 1))]
        human_only = LoadedClip(Clip(Path("o.wav"), 0, "human", "s2", "en", "other"), make_speech_like(3.0, 24000, seed=8), (0, 72000))
        ai_only = LoadedClip(Clip(Path("t.wav"), 1, "tts", "s3", "en", "tts"), make_speech_like(3.0, 24000, seed=9), (0, 72000))
        return params, BalancedSampler([*page, human_only, ai_only], np.random.default_rng(0))

    params, sampler = sampler_and_params(1.0)
    assert sampler.matched == ["page"], "only a source holding both labels gives matched pairs"
    rng = np.random.default_rng(1)
    waves, ai, _, _, _ = make_batch(sampler, params, ["en"], rng)
    assert ai.tolist() == [0, 1] * 8
    for i in range(0, 16, 2):
        assert torch.equal(waves[i], waves[i + 1]), "the page's human and AI clip (here one constant) share one channel"
    assert len({waves[i].sum().item() for i in range(0, 16, 2)}) > 1, "each pair draws its own channel"
    # off (the default): pairs draw their classes independently, from every source, each through its own channel
    params, sampler = sampler_and_params(0.0)
    waves, ai, _, _, _ = make_batch(sampler, params, ["en"], np.random.default_rng(1))
    assert not all(torch.equal(waves[i], waves[i + 1]) for i in range(0, 16, 2))
