"""Retention (`aivoice gc`).

Every candidate is stored up to four times (MLflow artifact, the local checkpoint cache, the DVC cache,
models/production.pt). Registry versions are never deleted (a version is the record of what was judged and
served). What goes: the cached checkpoint downloads of versions that hold no alias and are not among the
`keep` newest of those; the MLflow artifacts of the refused candidates among them, moved into a checked
tarball under `archive_dir` (pipeline/io/archive.py; `aivoice restore` puts them back); and, with a DVC
repository, DVC cache objects the workspace no longer uses (`dvc gc -w -f`: an older data or model version
then needs `dvc pull` from a remote, or is gone if it was never pushed).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.io import registry, tracking
from pipeline.io.archive import archivable, archive_version, leftovers
from pipeline.io.disk import folder_bytes


def collect_garbage(name: str, keep: int, repo: str | Path | None = ".", dry_run: bool = False,
                    archive_dir: str | Path | None = None) -> dict:
    """Remove the local copies retention allows and, with `archive_dir`, archive the refused candidates
    beyond the `keep` newest (see the module docstring); returns what was kept, archived and freed."""
    client = tracking.configure()
    versions = registry.list_versions(name)
    aliased = {v["version"] for v in versions if v["aliases"]}
    others = sorted((v["version"] for v in versions if v["version"] not in aliased), reverse=True)
    kept = aliased | set(others[:keep])
    removed, freed = [], 0
    cache = tracking.cache_dir(client.tracking_uri) / name
    for folder in sorted(cache.glob("v*-*")) if cache.is_dir() else []:
        number = folder.name[1:].split("-", 1)[0]
        if number.isdigit() and int(number) not in kept:
            size = folder_bytes(folder)
            if not dry_run:
                shutil.rmtree(folder)
            removed.append(str(folder))
            freed += size
    archived = []
    if archive_dir:
        for v in versions:   # oldest first, described by list_versions (one registry search)
            if v["version"] in kept:
                continue
            if v["archived"]:   # finished before, unless a gc killed midway left artifacts in MLflow
                if not leftovers(client, registry.model_version(v["version"], name)):
                    continue
            elif not archivable(v):
                continue
            archived.append({"version": v["version"], "archive": None} if dry_run
                            else archive_version(name, v["version"], archive_dir))
    result = {"versions": len(versions), "kept": sorted(kept), "removed": removed, "cache_freed_bytes": freed,
              "archived": archived, "dvc": None}
    if repo is not None and (Path(repo) / ".dvc").is_dir():
        result["dvc"] = _dvc_gc(Path(repo), dry_run)
    return result


def _dvc_gc(repo: Path, dry_run: bool) -> dict:
    """`dvc gc -w -f` (objects the workspace does not use), measured as the cache's size before and after."""
    cache = repo / ".dvc" / "cache"
    before = folder_bytes(cache)
    if dry_run:
        return {"ran": False, "cache_bytes": before}
    out = subprocess.run([sys.executable, "-m", "dvc", "gc", "--workspace", "--force"], cwd=repo,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"dvc gc failed in {repo}: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return {"ran": True, "cache_bytes": folder_bytes(cache), "freed_bytes": before - folder_bytes(cache)}
