"""The versioned audio store: content-addressed copies of every accepted clip plus MANIFEST.csv.

Layout (the whole folder is a DVC-tracked output; see dvc.yaml):
    <store>/audio/<sha256[:2]>/<sha256><ext>    the bytes the user gave, never modified
    <store>/MANIFEST.csv                        one row per clip (columns below)
Rejected files are copied to <quarantine>/<sha256><ext> and listed with their reason in the
ingest report. The user's own files are only read.

`split` is fixed at ingest, given by the user or drawn from a hash of the clip's bytes (or of its
speaker with `ingest.split_by: speaker`, so that a speaker's clips all land on one side); `test`
clips are never trained on, by bootstrap or fine-tuning.
"""
from __future__ import annotations

import csv
import hashlib
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.core.audio import AudioError, audio_info, load_audio
from pipeline.config import AudioConfig, IngestConfig
from pipeline.core.data import LABELS, UNKNOWN, file_sha256, is_placeholder_speaker, read_corpus, source_of
from pipeline.progress import progress

MANIFEST = "MANIFEST.csv"
COLUMNS = ("path", "sha256", "label", "generator", "speaker", "language", "n_speakers", "duration_s",
           "sample_rate", "source", "split", "added_at", "batch", "original_name", "twin_of")


@dataclass(frozen=True)
class ClipInfo:
    """What the user says about the files of one ingest call."""

    label: str
    generator: str
    speaker: str = UNKNOWN
    language: str = UNKNOWN
    source: str = ""          # default: the file's folder prefix before `__`, else the generator
    n_speakers: int = 1
    split: str = ""           # "train" or "test" to fix it; default: drawn by hash (see split_for)

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"label {self.label!r} must be 'human' or 'ai'")
        if self.split not in ("", "train", "test"):
            raise ValueError(f"split {self.split!r} must be 'train' or 'test'")
        if not self.generator:
            raise ValueError("a generator name is required ('human' for human speech)")


@dataclass
class IngestReport:
    added: list[dict] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)   # "path: same bytes as <stored path>"
    rejected: list[dict] = field(default_factory=list)    # {"file", "reason", "quarantined_as"}

    def to_dict(self) -> dict:
        return asdict(self) | {"n_added": len(self.added), "n_duplicates": len(self.duplicates), "n_rejected": len(self.rejected)}


def read_manifest(store: Path) -> list[dict]:
    path = store / MANIFEST
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_manifest(store: Path, rows: list[dict]) -> None:
    """Rewrite the manifest atomically (rows are only ever appended by ingest)."""
    store.mkdir(parents=True, exist_ok=True)
    tmp = store / (MANIFEST + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)
    tmp.replace(store / MANIFEST)


def split_for(speaker: str, sha256: str, test_fraction: float, by: str) -> str:
    """'test' or 'train' from a hash: stable per speaker (by="speaker", known speakers) or per file."""
    key = f"speaker:{speaker}" if by == "speaker" and not is_placeholder_speaker(speaker) else f"file:{sha256}"
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < test_fraction else "train"


def check_clip(path: Path, audio: AudioConfig, cfg: IngestConfig) -> tuple[float, int]:
    """(duration_s, sample_rate) of a usable clip, or AudioError with the reason."""
    info = audio_info(path)
    if info.samplerate < cfg.min_sample_rate:
        raise AudioError(path, f"sample rate {info.samplerate} Hz below the {cfg.min_sample_rate} Hz minimum")
    if info.duration > cfg.max_duration_s:
        raise AudioError(path, f"{info.duration:.0f} s is longer than the {cfg.max_duration_s:.0f} s maximum")
    wave = load_audio(path, audio)   # raises for undecodable, too short, NaN/inf or silent audio
    return len(wave) / audio.sample_rate, info.samplerate


def from_corpus(root: Path, split: str = "") -> list[tuple[Path, ClipInfo]]:
    """Files and their descriptions from a labelled corpus folder (MANIFEST.csv or human/ and ai/)."""
    return [(c.path, ClipInfo(label=c.label_name, generator=c.generator, speaker=c.speaker, language=c.language,
                              source=c.source, n_speakers=c.n_speakers, split=split)) for c in read_corpus(root)]


def ingest(items: list[tuple[Path, ClipInfo]], store: Path, quarantine: Path, audio: AudioConfig,
           cfg: IngestConfig, batch: str | None = None) -> IngestReport:
    """Validate and copy files into the store, appending the manifest; the same bytes twice is a no-op."""
    rows = read_manifest(store)
    known = {r["sha256"]: r["path"] for r in rows}
    batch = batch or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")  # sorts in ingest order
    report = IngestReport()
    for src, info in progress(items, desc="ingest", unit="file"):
        try:
            sha = file_sha256(src)
        except OSError as exc:
            report.rejected.append({"file": str(src), "reason": f"unreadable ({exc.strerror})", "quarantined_as": ""})
            continue
        if sha in known:
            report.duplicates.append(f"{src}: same bytes as {known[sha]} (already ingested)")
            continue
        ext = src.suffix.lower()
        try:
            duration, rate = check_clip(src, audio, cfg)
        except AudioError as err:
            quarantine.mkdir(parents=True, exist_ok=True)
            dest = quarantine / f"{sha}{ext}"
            shutil.copyfile(src, dest)
            report.rejected.append({"file": str(src), "reason": err.reason, "quarantined_as": str(dest)})
            continue
        rel = Path("audio") / sha[:2] / f"{sha}{ext}"
        (store / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, store / rel)
        row = {
            "path": rel.as_posix(), "sha256": sha, "label": info.label, "generator": info.generator,
            "speaker": info.speaker, "language": info.language, "n_speakers": info.n_speakers,
            "duration_s": round(duration, 3), "sample_rate": rate,
            "source": info.source or (source_of(src) if "__" in src.parent.name else info.generator),
            "split": info.split or split_for(info.speaker, sha, cfg.test_fraction, cfg.split_by),
            "added_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "batch": batch,
            "original_name": src.name,
        }
        rows.append(row)
        known[sha] = row["path"]
        report.added.append(row)
    write_manifest(store, rows)
    return report
