"""Vocoded twins: every human training clip resynthesised by each enabled vocoder, labelled AI.

A twin differs from its original only in how the waveform was made: same words, speaker, source
and recording chain (it is written at the original's sample rate, and keeps its split). Batches that
pair a clip with its twin under one channel augmentation (pipeline.training.train) leave the model
nothing to learn but the synthesis.

Output: a folder in the store's format (`audio/<sha[:2]>/<sha>.flac` + MANIFEST.csv) whose rows carry
`twin_of` = the original's sha256 and generator `twin-<vocoder>`, plus `vocoders/<name>.pt` for the
neural decoders trained on the corpus's human training clips. Re-running adds only what is missing
(a twin exists per original and vocoder); twins of a vocoder no longer configured are removed, and a
neural decoder whose training settings changed is trained again and its twins remade, so the folder
always follows params.yaml. A clip a vocoder cannot handle (too short, no pitch, a missing tool) is
recorded with its reason and skipped; originals are only read.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline import atomic
from pipeline.config import TwinsConfig
from pipeline.core.audio import AudioError, load_native
from pipeline.core.data import Clip, file_sha256, read_corpus
from pipeline.io.store import read_manifest, write_manifest
from pipeline.progress import progress
from pipeline.synthesis.neural import (SR, DecoderTraining, NeuralVocoder, load_decoder, read_decoder_config,
                                       save_decoder, train_decoder)
from pipeline.synthesis.vocoders import SIGNAL_VOCODERS, VocoderError, codec2
from pipeline.training.forked import fork_map

log = logging.getLogger(__name__)

PREFIX = "twin-"
NEURAL = ("istft", "hifigan")
VOCODERS = tuple(SIGNAL_VOCODERS) + NEURAL


def twin_generator(vocoder: str) -> str:
    return PREFIX + vocoder


@dataclass
class TwinsReport:
    added: int = 0
    existing: int = 0
    failed: list[dict] = field(default_factory=list)   # {"file", "vocoder", "reason"}
    decoders: dict = field(default_factory=dict)        # neural decoder name -> training report
    seconds: dict = field(default_factory=dict)         # vocoder -> synthesis seconds

    def to_dict(self) -> dict:
        return {"added": self.added, "existing": self.existing, "n_failed": len(self.failed), "failed": self.failed,
                "decoders": self.decoders, "seconds": {k: round(v, 1) for k, v in self.seconds.items()}}


def originals(clips: list[Clip]) -> list[Clip]:
    """The clips that get twins: human, not in the test split, not twins themselves."""
    return [c for c in clips if c.label_name == "human" and c.split != "test" and not c.twin_of]


def decoder_training(name: str, cfg: TwinsConfig) -> DecoderTraining:
    return DecoderTraining(kind=name, steps=cfg.neural_steps, batch_size=cfg.neural_batch_size, lr=cfg.neural_lr,
                           seed=cfg.seed, max_minutes=cfg.neural_max_minutes)


def neural_vocoder(name: str, out: Path, humans: list[Clip], cfg: TwinsConfig, decoders: dict) -> NeuralVocoder:
    """The decoder `vocoders/<name>.pt` in the twins folder, trained first when it is not there."""
    path = out / "vocoders" / f"{name}.pt"
    if not path.exists():
        waves = []
        for c in humans:
            try:
                waves.append(load_native(c.path, SR))
            except AudioError as err:
                log.warning("decoder training: skipped %s", err)
        training = decoder_training(name, cfg)
        log.info("training the %s decoder on %d human clips (%d steps)", name, len(waves), cfg.neural_steps)
        model, training_report = train_decoder(waves, training)
        save_decoder(model, training, training_report, path)
        decoders[name] = training_report
    return NeuralVocoder(load_decoder(path))


def make_twins(corpus: str | Path, out: str | Path, cfg: TwinsConfig, workers: int = 0) -> TwinsReport:
    """Twins of `corpus`'s human training clips by every vocoder in cfg.vocoders, into `out`.

    Each vocoder is one job; with `workers` forked processes they run side by side (a neural decoder's
    training, the longest, here; the signal vocoders beside it), with the same twins as in sequence."""
    out = Path(out)
    clips = read_corpus(corpus)
    humans = originals(clips)
    rows = prune(out, read_manifest(out), cfg)
    sweep(out, rows)
    done = {(r["twin_of"], r["generator"]) for r in rows}
    report = TwinsReport()
    batch = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    jobs = []
    for name in sorted(cfg.vocoders, key=lambda v: v not in NEURAL):   # neural first: the longest job
        todo = [c for c in humans if (c.sha256 or file_sha256(c.path), twin_generator(name)) not in done]
        report.existing += len(humans) - len(todo)
        if todo:
            jobs.append((name, todo))
    results = fork_map(functools.partial(_vocoder_job, out=out, humans=humans, cfg=cfg, batch=batch), jobs, workers)
    for (name, _), result in sorted(zip(jobs, results), key=lambda j: cfg.vocoders.index(j[0][0])):
        rows += result["rows"]
        report.added += len(result["rows"])
        report.failed += result["failed"]
        report.seconds[name] = result["seconds"]
        report.decoders.update(result["decoders"])
    if jobs or not (out / "MANIFEST.csv").exists():
        write_manifest(out, rows)   # once, after every job: an interrupted run's files are swept by the next
    return report


def _vocoder_job(job: tuple[str, list[Clip]], out: Path, humans: list[Clip], cfg: TwinsConfig, batch: str) -> dict:
    """One vocoder's twins of `todo` (its decoder trained first when neural); rows and failures come back."""
    name, todo = job
    result = {"rows": [], "failed": [], "decoders": {}}
    if name in NEURAL:
        vocoder = neural_vocoder(name, out, humans, cfg, result["decoders"])
    elif name == "codec2":
        vocoder = lambda x, sr: codec2(x, sr, cfg.codec2_mode)
    else:
        vocoder = SIGNAL_VOCODERS[name]
    started = time.monotonic()
    for clip in progress(todo, desc=f"twins {name}", unit="clip"):
        try:
            result["rows"].append(_twin(clip, name, vocoder, out, batch))
        except (AudioError, VocoderError, ValueError) as err:
            reason = err.reason if isinstance(err, AudioError) else str(err)
            result["failed"].append({"file": str(clip.path), "vocoder": name, "reason": reason})
            log.warning("twin %s of %s: %s", name, clip.path, reason)
    result["seconds"] = time.monotonic() - started
    return result


def sweep(out: Path, rows: list[dict]) -> None:
    """Remove files under `out/audio` that no manifest row names: twins (or temporary files) of a run that
    was interrupted before it wrote the manifest. The folder is this step's output, never user data."""
    named = {r["path"] for r in rows}
    stray = [p for p in (out / "audio").rglob("*") if p.is_file() and p.relative_to(out).as_posix() not in named]
    for p in stray:
        p.unlink()
    if stray:
        log.info("removed %d files of an interrupted twins run", len(stray))


def prune(out: Path, rows: list[dict], cfg: TwinsConfig) -> list[dict]:
    """Drop the twins (rows and files) of vocoders no longer configured, and of neural decoders whose
    checkpoint was trained with other settings (the checkpoint goes too, so it is trained again)."""
    stale = {twin_generator(v) for v in VOCODERS if v not in cfg.vocoders}
    for name in NEURAL:
        path = out / "vocoders" / f"{name}.pt"
        if path.exists() and read_decoder_config(path) != dataclasses.asdict(decoder_training(name, cfg)):
            path.unlink()
            stale.add(twin_generator(name))
    keep = [r for r in rows if r["generator"] not in stale]
    for r in rows:
        if r["generator"] in stale:
            (out / r["path"]).unlink(missing_ok=True)
    if len(keep) != len(rows):
        log.info("removed %d twins of vocoders no longer configured or retrained", len(rows) - len(keep))
        write_manifest(out, keep)
    return keep


def _twin(clip: Clip, name: str, vocoder, out: Path, batch: str) -> dict:
    info = sf.info(str(clip.path))
    x = load_native(clip.path, info.samplerate)
    y = vocoder(x, info.samplerate)
    if not np.isfinite(y).all() or not np.abs(y).max() > 0:
        raise VocoderError("the vocoder produced silence or non-finite samples")
    peak = float(np.abs(y).max())
    y = y * min(1.0, 0.99 / peak)   # FLAC is integer PCM: keep the twin inside full scale
    tmp = atomic.temp_path(f"{clip.sha256 or file_sha256(clip.path)}-{name}.flac", out / "audio")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    sf.write(tmp, y, info.samplerate, subtype="PCM_16", format="FLAC")
    sha = file_sha256(tmp)
    rel = Path("audio") / sha[:2] / f"{sha}.flac"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    atomic.commit(tmp, out / rel)
    return {"path": rel.as_posix(), "sha256": sha, "label": "ai", "generator": twin_generator(name),
            "speaker": clip.speaker, "language": clip.language, "n_speakers": clip.n_speakers,
            "duration_s": round(len(y) / info.samplerate, 3), "sample_rate": info.samplerate, "source": clip.source,
            "split": clip.split, "added_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "batch": batch, "original_name": clip.path.name, "twin_of": clip.sha256 or file_sha256(clip.path)}


def with_twins(clips: list[Clip], twins_dir: str | Path | None) -> list[Clip]:
    """`clips` plus the twins in `twins_dir` whose original is among them (others are ignored). The
    originals get their sha256 filled in (a corpus manifest may lack it): it is how a twin finds its pair."""
    if not twins_dir or not (Path(twins_dir) / "MANIFEST.csv").exists():
        return clips
    clips = [c if c.sha256 or c.twin_of else dataclasses.replace(c, sha256=file_sha256(c.path)) for c in clips]
    have = {c.sha256 for c in clips if not c.twin_of}
    return clips + [t for t in read_corpus(twins_dir) if t.twin_of in have]
