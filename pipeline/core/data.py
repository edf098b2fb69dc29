"""Corpus manifests, labels and leakage-free splits.

A corpus folder holds either a MANIFEST.csv (at least `path,label`; optional generator, speaker,
language, n_speakers, source, sha256, split, twin_of) or `human/` and `ai/` subfolders. A clip's
source is the folder prefix before `__` (files of one source share a recording chain) unless the
manifest names it. A vocoded twin (pipeline.synthesis) names its human original in `twin_of`.

Splits keep whole groups on one side: a source (sources linked in params, e.g. one voice talent on
two pages, count as one), a speaker, or a file. Placeholder speaker values ("unknown", "see notes",
"speaker id in file name") are never one speaker: such clips are grouped by file.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.core.audio import AUDIO_SUFFIXES, AudioError, load_audio, voiced_region
from pipeline.core.model import AI_LABEL
from pipeline.progress import progress

log = logging.getLogger(__name__)

LABELS = {"human": 1 - AI_LABEL, "ai": AI_LABEL}
UNKNOWN = "unknown"


class CorpusError(ValueError):
    """A corpus folder or manifest that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class Clip:
    path: Path
    label: int          # 0 human, 1 ai
    generator: str
    speaker: str
    language: str
    source: str
    n_speakers: int = 1
    sha256: str = ""
    split: str = ""     # "train" or "test" when the manifest fixes it (see pipeline.io.store)
    twin_of: str = ""   # sha256 of the human original when this clip is its vocoded twin

    @property
    def id(self) -> str:
        return str(self.path)

    @property
    def label_name(self) -> str:
        return "ai" if self.label == AI_LABEL else "human"


@dataclass(frozen=True)
class LoadedClip:
    clip: Clip
    wave: np.ndarray              # mono float32 at the model's rate
    voiced: tuple[int, int]       # samples between the first and last voiced frame (training crops stay inside)


def load_clips(clips: list[Clip], params) -> list[LoadedClip]:
    """Decode every clip (params: pipeline.config.Params); a bad file is reported in one line and left out,
    the rest go on."""
    loaded = []
    for c in progress(clips, desc="decode", unit="clip"):
        try:
            wave = load_audio(c.path, params.audio)
        except AudioError as err:
            log.warning("skipped %s", err)
            continue
        loaded.append(LoadedClip(c, wave, voiced_region(wave, params.audio.sample_rate, params.train.trim_silence_db)))
    return loaded


def source_of(path: Path) -> str:
    """The folder prefix before `__` of the clip's parent folder (the folder name if it has none)."""
    return path.parent.name.split("__", 1)[0]


def read_corpus(root: str | Path, rejected: list[dict] | None = None) -> list[Clip]:
    """Clips of a corpus folder, from MANIFEST.csv if present, else from human/ and ai/ subfolders.

    A manifest row whose path is absolute or climbs out with `..` is refused: with `rejected` given it is
    appended there ({"file", "reason", "quarantined_as"}) and the rest is read; without, CorpusError."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: not a folder")
    manifest = root / "MANIFEST.csv"
    clips = _from_manifest(manifest, rejected) if manifest.exists() else _from_folders(root)
    if not clips:
        raise CorpusError(f"{root}: no clips (expected MANIFEST.csv or human/ and ai/ subfolders with audio)")
    return clips


def unsafe_manifest_path(rel: str) -> str | None:
    """Why a manifest's `path` may not be used (absolute, or `..` in it), or None."""
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        return "absolute path: manifest paths must be relative to the corpus folder"
    if ".." in p.parts or ".." in rel.replace("\\", "/").split("/"):
        return "'..' in the path: manifest paths must stay inside the corpus folder"
    return None


def _from_manifest(manifest: Path, rejected: list[dict] | None = None) -> list[Clip]:
    root = manifest.parent
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise CorpusError(f"{manifest}: missing column(s) {', '.join(sorted(missing))}")
        clips = []
        for line, row in enumerate(reader, start=2):
            label = (row["label"] or "").strip().lower()
            if label not in LABELS:
                raise CorpusError(f"{manifest}:{line}: label {row['label']!r} is not 'human' or 'ai'")
            why = unsafe_manifest_path(row["path"] or "")
            if why:
                where = f"{manifest}:{line}: {row['path']}"
                if rejected is None:
                    raise CorpusError(f"{where}: {why}")
                rejected.append({"file": where, "reason": why, "quarantined_as": ""})
                continue
            path = root / row["path"]
            n_spk = (row.get("n_speakers") or "1").strip()
            if not n_spk.isdigit() or int(n_spk) < 1:
                raise CorpusError(f"{manifest}:{line}: n_speakers {n_spk!r} is not a positive integer")
            clips.append(Clip(
                path=path, label=LABELS[label],
                generator=_field(row, "generator", "human" if label == "human" else UNKNOWN),
                speaker=_field(row, "speaker", UNKNOWN), language=_field(row, "language", UNKNOWN),
                source=_field(row, "source", source_of(path)), n_speakers=int(n_spk),
                sha256=_field(row, "sha256", ""), split=_field(row, "split", ""), twin_of=_field(row, "twin_of", ""),
            ))
    return clips


def _field(row: dict, key: str, default: str) -> str:
    return (row.get(key) or "").strip() or default


def _from_folders(root: Path) -> list[Clip]:
    clips = []
    for name, label in LABELS.items():
        for path in sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES):
            generator = "human" if label != AI_LABEL else (path.parent.name if path.parent != root / name else UNKNOWN)
            clips.append(Clip(path=path, label=label, generator=generator, speaker=UNKNOWN,
                              language=UNKNOWN, source=source_of(path)))
    return clips


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_hash(clips: list[Clip]) -> str:
    """Content hash of a clip set: labels and audio bytes (order-independent)."""
    rows = sorted(f"{c.sha256 or file_sha256(c.path)}:{c.label}" for c in clips)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


_PLACEHOLDER = re.compile(r"^(unknown|n/?a|none|various|multiple|mixed)(?![a-z0-9])|^[-?]*$|^see |file ?name|"
                          r"id prefix|\bspeakers\b", re.IGNORECASE)


def is_placeholder_speaker(speaker: str) -> bool:
    """True for values that name no one speaker: unknown, "see notes", "speaker id in file name", "test speakers"."""
    return not speaker.strip() or bool(_PLACEHOLDER.search(speaker.strip()))


def source_groups(linked: Iterable[Iterable[str]]) -> dict[str, str]:
    """source -> the name of its linked group (the first source listed), for sources that must stay together."""
    return {src: group[0] for group in map(list, linked) if group for src in group}


SplitBy = Literal["source", "speaker", "file"]


def group_key(clip: Clip, by: SplitBy, linked: dict[str, str] | None = None) -> str:
    """What must stay on one side of a split: the (linked) source, the speaker, or the file.
    A speaker split falls back to the file for placeholder speakers."""
    if by == "source":
        return "source:" + (linked or {}).get(clip.source, clip.source)
    if by == "speaker" and not is_placeholder_speaker(clip.speaker):
        return f"speaker:{clip.speaker}"
    return f"file:{clip.path}"


def split_groups(clips: list[Clip], val_fraction: float, seed: int, by: SplitBy = "speaker",
                 linked: dict[str, str] | None = None) -> tuple[list[Clip], list[Clip]]:
    """Group-disjoint train/validation split (groups by `group_key`) holding about val_fraction of each class.

    Twins go wherever their original goes and do not count toward the targets. Whole groups go to
    validation in seeded random order while they keep every class they hold within 1.5x its target; a
    class still missing then gets its smallest group that is not the whole class. Raises CorpusError
    when validation cannot get both classes.
    """
    originals = {c.sha256: c for c in clips if c.sha256 and not c.twin_of}
    real = [c for c in clips if not c.twin_of]
    groups: dict[str, list[Clip]] = defaultdict(list)
    for c in real:
        groups[group_key(c, by, linked)].append(c)
    keys = sorted(groups)
    np.random.default_rng(seed).shuffle(keys)
    counts = {k: np.bincount([c.label for c in groups[k]], minlength=2) for k in keys}
    totals = np.bincount([c.label for c in real], minlength=2)
    target = np.maximum(np.round(totals * val_fraction), 1)
    taken = np.zeros(2)
    val_keys: set[str] = set()
    for k in keys:
        present = counts[k] > 0
        if np.all(taken[present] + counts[k][present] <= 1.5 * target[present]):
            val_keys.add(k)
            taken += counts[k]
    for label in (0, 1):
        candidates = [k for k in keys if k not in val_keys and 0 < counts[k][label] < totals[label]]
        if taken[label] == 0 and candidates:
            k = min(candidates, key=lambda k: counts[k].sum())
            val_keys.add(k)
            taken += counts[k]

    def in_val(c: Clip) -> bool:
        owner = originals.get(c.twin_of, c) if c.twin_of else c
        return group_key(owner, by, linked) in val_keys

    train = [c for c in clips if not in_val(c)]
    val = [c for c in clips if in_val(c)]
    check_two_classes([c for c in val if not c.twin_of], f"the validation split (whole {by}s are held out; add {by}s)")
    return train, val


def speaker_parts(clips: list[Clip], fractions: tuple[float, ...], seed: int) -> list[list[Clip]]:
    """Speaker-disjoint parts of one class (placeholder speakers count per file): part i+1 gets about
    fractions[i] of the clips, whole speakers at a time in seeded order (never more than 1.5x its share),
    part 0 the rest. With too few speakers, an empty part gets part 0's clips."""
    groups: dict[str, list[Clip]] = defaultdict(list)
    for c in clips:
        groups[group_key(c, "speaker")].append(c)
    keys = sorted(groups)
    np.random.default_rng(seed).shuffle(keys)
    targets = [f * len(clips) for f in fractions]
    parts: list[list[Clip]] = [[] for _ in range(len(fractions) + 1)]
    for key in keys:
        size = len(groups[key])
        room = [i for i, t in enumerate(targets, start=1) if len(parts[i]) < t and len(parts[i]) + size <= 1.5 * t]
        if len(keys) > len(fractions) and room:
            parts[min(room, key=lambda i: len(parts[i]) / targets[i - 1])].extend(groups[key])
        else:
            parts[0].extend(groups[key])
    if not parts[0]:   # every speaker went to the held-out parts: give training its share back
        parts[0] = parts[1]
    return [p if p else parts[0] for p in parts]


def split_by_speaker(clips: list[Clip], val_fraction: float, seed: int) -> tuple[list[Clip], list[Clip]]:
    """Speaker- and file-disjoint train/validation split (see split_groups)."""
    return split_groups(clips, val_fraction, seed, "speaker")


def split_by_source(clips: list[Clip], held_out: set[str]) -> tuple[list[Clip], list[Clip]]:
    """Leave-sources-out: train on every other source, evaluate on the held-out ones."""
    return [c for c in clips if c.source not in held_out], [c for c in clips if c.source in held_out]


def check_two_classes(clips: list[Clip], what: str) -> None:
    """Refuse to train or judge on one class only (the production incident)."""
    check_labels({c.label for c in clips}, what)


def check_labels(labels: set[int], what: str) -> None:
    """CorpusError unless both labels (0 human, 1 ai) are present."""
    if labels != set(LABELS.values()):
        only = ", ".join(name for name, label in LABELS.items() if label in labels) or "no clips"
        raise CorpusError(f"{what} has only {only}: training or validating on one class is refused; add "
                          f"{'AI' if AI_LABEL not in labels else 'human'} speech")
