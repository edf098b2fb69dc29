"""Resuming `aivoice detect --output FILE`: which files an earlier run already wrote to FILE.

The results file is appended to and flushed once per file, so a killed run leaves every finished
file's line intact and at most one line cut short; that line is dropped here (the file is scored
again), and every complete line's path is skipped on the re-run."""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import fields
from pathlib import Path

log = logging.getLogger("aivoice")

RESUMABLE_FORMATS = ("json", "csv")


class OutputFileError(Exception):
    """The output file is not results of `aivoice detect` in the format asked for (left untouched)."""


def done_paths(path: Path, fmt: str) -> set[str]:
    """The paths already in the results file `path` (none when it does not exist or is empty). A last
    line without its newline, written by a run killed mid-line, is cut off the file."""
    from pipeline.apps.detect import Detection

    if fmt not in RESUMABLE_FORMATS:
        raise OutputFileError(f"--output needs --format json or csv (the path is on every line), not {fmt}")
    if not path.is_file() or path.stat().st_size == 0:
        return set()
    done: set[str] = set()
    header = [f.name for f in fields(Detection)]
    complete = 0   # bytes up to the end of the last complete line
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if fmt == "json":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                    raise OutputFileError(f"{path}:{number}: not a json line of `aivoice detect` (a path per line)")
                done.add(row["path"])
            elif number == 1:
                if next(csv.reader([line]), []) != header:
                    raise OutputFileError(f"{path}: not a csv file of `aivoice detect` (its header differs)")
            else:
                done.add(next(csv.reader([line]))[0])
            complete += len(raw)
    size = path.stat().st_size
    if complete < size:
        log.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run", path, size - complete)
        with path.open("r+b") as f:
            f.truncate(complete)
    return done
