"""The versioned audio store: content-addressed copies of every accepted clip plus MANIFEST.csv.

Layout (the whole folder is a DVC-tracked output; see dvc.yaml):
    <store>/audio/<sha256[:2]>/<sha256><ext>    the bytes the user gave, never modified
    <store>/MANIFEST.csv                        one row per clip (columns below)
Rejected files are copied to <quarantine>/<sha256><ext> (while the quarantine folder stays under
`ingest.quarantine_max_mb`) and listed with their reason in the ingest report. The user's own files are
only read.

Crash and race safety (docs/architecture.md, "Crash safety"): each file is copied to a temporary file in
the store, fsynced and hashed *as copied*, so the name is the hash of the stored bytes; the source's size
and mtime are compared before and after the copy, and a file that changed meanwhile (still being written)
is rejected, not stored. Validation reads the copy. The copies are renamed into place and MANIFEST.csv is
rewritten (temp + fsync + rename) under an exclusive lock (`<store>.lock` beside the store), after
re-reading the manifest, so two concurrent ingests both keep their rows. Under the same lock, audio files
no manifest row names (a process killed between rename and manifest) and temporary files of dead
processes are removed: the manifest and the audio folder always agree after an ingest.

`split` is fixed at ingest, given by the user or drawn from a hash of the clip's bytes (or of its
speaker with `ingest.split_by: speaker`, so that a speaker's clips all land on one side); `test`
clips are never trained on, by bootstrap or fine-tuning.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import atomic
from pipeline.core.audio import AudioError, audio_info, load_audio
from pipeline.config import AudioConfig, IngestConfig
from pipeline.core.data import LABELS, UNKNOWN, is_placeholder_speaker, read_corpus, source_of
from pipeline.faults import fault_point
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
    """Rewrite the manifest atomically (temp + fsync + rename); callers that read-modify-write it hold
    `store_lock(store)`."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\r\n")
    w.writeheader()
    w.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)
    store.mkdir(parents=True, exist_ok=True)
    atomic.write_text(store / MANIFEST, buf.getvalue())


def store_lock(store: Path):
    """The exclusive lock on a store's manifest: `<store>.lock` beside the store (outside the DVC output)."""
    return atomic.locked(store.parent / f"{store.name}.lock")


def reconcile(store: Path, rows: list[dict]) -> list[Path]:
    """Remove audio no row names and dead processes' temporary files (call with store_lock held)."""
    removed = atomic.sweep_temps(store)
    named = {r["path"] for r in rows}
    audio = store / "audio"
    for p in sorted(audio.glob("*/*")) if audio.is_dir() else []:
        if p.is_file() and not p.name.startswith(".") and p.relative_to(store).as_posix() not in named:
            p.unlink()
            removed.append(p)
    return removed


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


def from_corpus(root: Path, split: str = "", rejected: list[dict] | None = None) -> list[tuple[Path, ClipInfo]]:
    """Files and their descriptions from a labelled corpus folder (MANIFEST.csv or human/ and ai/); unsafe
    manifest rows (absolute paths, `..`) go to `rejected` when given (else CorpusError)."""
    return [(c.path, ClipInfo(label=c.label_name, generator=c.generator, speaker=c.speaker, language=c.language,
                              source=c.source, n_speakers=c.n_speakers, split=split))
            for c in read_corpus(root, rejected)]


def ingest(items: list[tuple[Path, ClipInfo]], store: Path, quarantine: Path, audio: AudioConfig,
           cfg: IngestConfig, batch: str | None = None, within: Path | None = None,
           rejected: list[dict] | None = None) -> IngestReport:
    """Validate and copy files into the store, appending the manifest; the same bytes twice is a no-op.

    `within`: the folder the items came from (a corpus or the incoming folder); a file whose real path
    (symlinks resolved) lies outside it is rejected, never read. `rejected`: rejections found before
    (unsafe manifest rows), carried into the report."""
    batch = batch or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")  # sorts in ingest order
    report = IngestReport(rejected=list(rejected or []))
    staging = store / "audio"
    staging.mkdir(parents=True, exist_ok=True)
    known = {r["sha256"]: r["path"] for r in read_manifest(store)}   # early duplicates; re-checked under the lock
    ready: list[tuple[Path, str, dict]] = []     # (temporary copy, sha256, row) to rename into place
    root = within.resolve() if within is not None else None
    try:
        for src, info in progress(items, desc="ingest", unit="file"):
            if root is not None and not _inside(src, root):
                report.rejected.append({"file": str(src), "reason": f"resolves outside {within} (symlink): not read",
                                        "quarantined_as": ""})
                continue
            tmp = atomic.temp_path(f"ingest{src.suffix.lower()}", staging)
            try:
                sha = _copy_unchanged(src, tmp)
                fault_point("ingest.copied")
                if sha in known:
                    report.duplicates.append(f"{src}: same bytes as {known[sha]} (already ingested)")
                    tmp.unlink()
                    continue
                duration, rate = check_clip(tmp, audio, cfg)
            except OSError as exc:   # unreadable source, or the store's disk is full (nothing half-written stays)
                tmp.unlink(missing_ok=True)
                report.rejected.append({"file": str(src), "reason": f"not copied ({exc.strerror or exc})",
                                        "quarantined_as": ""})
                continue
            except _Changing as exc:
                tmp.unlink(missing_ok=True)
                report.rejected.append({"file": str(src), "reason": str(exc), "quarantined_as": ""})
                continue
            except AudioError as err:
                kept = _quarantine(tmp, sha, src, quarantine, cfg)
                report.rejected.append({"file": str(src), "quarantined_as": kept, "reason": err.reason + (
                    "" if kept else f"; not quarantined: {quarantine} is at ingest.quarantine_max_mb "
                    f"({cfg.quarantine_max_mb:g} MB)")})
                tmp.unlink(missing_ok=True)
                continue
            rel = Path("audio") / sha[:2] / f"{sha}{src.suffix.lower()}"
            row = {
                "path": rel.as_posix(), "sha256": sha, "label": info.label, "generator": info.generator,
                "speaker": info.speaker, "language": info.language, "n_speakers": info.n_speakers,
                "duration_s": round(duration, 3), "sample_rate": rate,
                "source": info.source or (source_of(src) if "__" in src.parent.name else info.generator),
                "split": info.split or split_for(info.speaker, sha, cfg.test_fraction, cfg.split_by),
                "added_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "batch": batch,
                "original_name": src.name,
            }
            known[sha] = row["path"]
            ready.append((tmp, sha, row))
        with store_lock(store):
            rows = read_manifest(store)
            reconcile(store, rows)
            present = {r["sha256"]: r["path"] for r in rows}
            for tmp, sha, row in ready:
                if sha in present:      # another ingest stored the same bytes meanwhile
                    report.duplicates.append(f"{row['original_name']}: same bytes as {present[sha]} (already ingested)")
                    continue
                dest = store / row["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
                atomic.fsync_dir(dest.parent)
                fault_point("ingest.renamed")
                rows.append(row)
                present[sha] = row["path"]
                report.added.append(row)
            write_manifest(store, rows)
            fault_point("ingest.manifest")
    finally:
        for tmp, _, _ in ready:
            tmp.unlink(missing_ok=True)
    return report


class _Changing(Exception):
    """The source changed while it was copied (still being written)."""


def _copy_unchanged(src: Path, tmp: Path) -> str:
    """Copy src to tmp and return the copy's sha256; _Changing when src's size or mtime moved meanwhile."""
    before = os.stat(src)
    sha, n = atomic.copy_hashing(src, tmp)
    after = os.stat(src)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or n != after.st_size:
        raise _Changing(f"changed while it was copied ({before.st_size} -> {after.st_size} bytes): still being "
                        "written? not stored; ingest it again when it is complete")
    return sha


def _quarantine(tmp: Path, sha: str, src: Path, quarantine: Path, cfg: IngestConfig) -> str:
    """Keep a rejected file's copy in quarantine while the folder stays under ingest.quarantine_max_mb."""
    dest = quarantine / f"{sha}{src.suffix.lower()}"
    if dest.exists():
        return str(dest)
    used = sum(p.stat().st_size for p in quarantine.glob("*") if p.is_file()) if quarantine.is_dir() else 0
    if used + tmp.stat().st_size > cfg.quarantine_max_mb * 1e6:
        return ""
    quarantine.mkdir(parents=True, exist_ok=True)
    atomic.copy_file(tmp, dest)
    return str(dest)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):
        return False
