"""Crash-safe writes of user-visible state, in one place.

Every file a user or a later stage reads (the store's audio and MANIFEST.csv, reports/*.json, models/*.pt,
models/production.pt) is written to a temporary file in its destination folder, flushed to disk (fsync),
renamed over the destination (atomic on POSIX) and the folder fsynced: a kill -9 or a power cut leaves
either the old file or the new one, never half of one. A temporary file left by a killed process is named
`.<name>.<pid>-<random>.tmp<suffix>`; `sweep_temps` removes those of processes no longer alive.

`locked(path)` is an exclusive fcntl.flock for read-modify-write of shared files (the store's manifest).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TEMP = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp")


def temp_path(path: str | Path, folder: str | Path | None = None) -> Path:
    """A fresh temporary name for `path` in `folder` (default: its own), keeping its suffix for decoders."""
    path = Path(path)
    return Path(folder or path.parent) / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}"


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> Path:
    """fsync `tmp`, rename it over `path`, fsync the destination folder."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path` (fsync + rename),
    on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def copy_file(src: str | Path, dest: str | Path) -> Path:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dest)


def copy_hashing(src: Path, tmp: Path, limit: int | None = None) -> tuple[str, int]:
    """Copy src to tmp (a new file) and return (sha256 of the bytes written, their count); the hash is of
    the copy, so what is stored is what is named. Stops with ValueError past `limit` bytes."""
    h, n = hashlib.sha256(), 0
    with src.open("rb") as fin, tmp.open("xb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            n += len(chunk)
            if limit is not None and n > limit:
                raise ValueError(f"larger than {limit / 1e6:.0f} MB")
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest(), n


def sweep_temps(folder: str | Path) -> list[Path]:
    """Remove temporary files (this module's naming) under `folder` whose writing process is gone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.rglob(".*.tmp*"):
        m = _TEMP.match(p.name)
        if m and p.is_file() and not pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Exclusive fcntl.flock on the file `path` (created if missing), released on exit or process death."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
