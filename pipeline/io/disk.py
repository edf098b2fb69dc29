"""Disk guard: a stage that writes big outputs (ingest, twins, augment, finetune, bootstrap) refuses to start
below `storage.min_free_gb` free on the output's filesystem, with one line naming the need and what is
free (the incident this project replaces ran a 4 GB project with 5.1 GB free)."""
from __future__ import annotations

import shutil
from pathlib import Path


class DiskSpaceError(ValueError):
    """Less free disk than storage.min_free_gb where a stage writes."""


def free_gb(path: str | Path) -> tuple[float, Path]:
    """Free GB on the filesystem holding `path` (its nearest existing parent), and that parent."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / 1e9, probe


def require_free(path: str | Path, min_gb: float, what: str) -> float:
    """Free GB at `path`; DiskSpaceError (one line) when below `min_gb`."""
    free, probe = free_gb(path)
    if free < min_gb:
        raise DiskSpaceError(f"{what}: {free:.3g} GB free on the disk of {probe}, storage.min_free_gb asks for "
                             f"{min_gb:g} GB; free space (`aivoice gc`) or lower the setting")
    return free


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) if folder.is_dir() else 0
