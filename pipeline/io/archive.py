"""Archive of refused candidates (`aivoice gc`, `aivoice restore`).

A candidate the gates refused stays a registry version for good (its tags, description, metrics and
verdict are the record of what was judged), but its artifacts - the model (checkpoint, pyfunc files) and
its run's reports - need not sit in the MLflow artifact store. `archive_version` packs both into one
`<archive_dir>/<model>-v<N>.tar.gz` with a manifest of sha256 sums, reads it back and checks it, tags the
version `archived=<file>` and only then deletes the artifacts from the store. `restore_version` uploads
them back to the same run and logged model and removes the tag. Each step is safe to repeat after a kill:
the tarball is written atomically, the tag is set before anything is deleted, and a version tagged
`archived` whose artifacts are still there only has them deleted on the next gc.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from pipeline.atomic import atomic_path
from pipeline.core.data import file_sha256
from pipeline.io import tracking

ARCHIVED_TAG = "archived"            # the tarball's path; set while the artifacts are out of the store
ARCHIVE_SHA_TAG = "archive_sha256"
ARCHIVABLE = ("failed", "insufficient-evidence")   # validation_status values of refused candidates


class ArchiveError(RuntimeError):
    """An archive that cannot be written, read back or restored; nothing was deleted."""


def archivable(version: dict) -> bool:
    """A refused candidate (as registry.list_versions describes it) that holds no alias and was never
    champion (a forced promotion keeps its files)."""
    return not version["aliases"] and version["validation_status"] in ARCHIVABLE and version["promotion"] is None


def archive_version(name: str, version: int, archive_dir: str | Path) -> dict:
    """Pack version `version`'s model and run artifacts into the archive, check it, tag the version, then
    delete the artifacts from the store. Returns {"version", "archive", "bytes", "files"}."""
    client = tracking.configure()
    mv = client.get_model_version(name, str(version))
    target = Path(archive_dir).resolve() / f"{name}-v{version}.tar.gz"
    if mv.tags.get(ARCHIVED_TAG):   # a gc killed after tagging: the tarball is checked, the deletion repeated
        _check_tarball(Path(mv.tags[ARCHIVED_TAG]), mv.tags.get(ARCHIVE_SHA_TAG), mv)
        _delete_artifacts(client, mv)
        return {"version": version, "archive": mv.tags[ARCHIVED_TAG], "bytes": 0, "files": 0, "repeated": True}
    with tempfile.TemporaryDirectory(prefix="aivoice-archive-") as tmp:
        staging = Path(tmp)
        _download(client, mv, staging)
        files = {p.relative_to(staging).as_posix(): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {"model": name, "version": int(version), "run_id": mv.run_id, "model_id": _model_id(mv),
                    "source": mv.source, "tags": dict(mv.tags), "description": mv.description or "", "files": files}
        (staging / "ARCHIVE.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as part:
            with tarfile.open(part, "w:gz") as tar:
                for item in sorted(staging.iterdir()):
                    tar.add(item, arcname=item.name)
    sha = file_sha256(target)
    _check_tarball(target, sha, mv)
    client.set_model_version_tag(name, str(version), ARCHIVE_SHA_TAG, sha)
    client.set_model_version_tag(name, str(version), ARCHIVED_TAG, str(target))
    _delete_artifacts(client, mv)
    return {"version": version, "archive": str(target), "bytes": target.stat().st_size, "files": len(files)}


def restore_version(name: str, version: int) -> dict:
    """Upload an archived version's artifacts back to its run and logged model; the tarball is kept."""
    client = tracking.configure()
    mv = client.get_model_version(name, str(version))
    path = mv.tags.get(ARCHIVED_TAG)
    if not path:
        raise ArchiveError(f"{name} v{version} is not archived (no '{ARCHIVED_TAG}' tag)")
    with tempfile.TemporaryDirectory(prefix="aivoice-restore-") as tmp:
        staging = Path(tmp)
        _check_tarball(Path(path), mv.tags.get(ARCHIVE_SHA_TAG), mv, extract_to=staging)
        if (staging / "model").is_dir():
            model_id = _model_id(mv)
            if model_id:
                client.log_model_artifacts(model_id, str(staging / "model"))
            else:   # a version registered from a run's artifact path (MLflow 2 style)
                client.log_artifacts(mv.run_id, str(staging / "model"), _run_relative_path(client, mv))
        if (staging / "run").is_dir() and mv.run_id:
            client.log_artifacts(mv.run_id, str(staging / "run"))
    client.delete_model_version_tag(name, str(version), ARCHIVED_TAG)
    client.delete_model_version_tag(name, str(version), ARCHIVE_SHA_TAG)
    return {"version": version, "archive": path}


def _model_id(mv) -> str | None:
    """The LoggedModel behind the version (MLflow 3 registers `models:/<model_id>`; the field itself may be empty)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    body = mv.source.removeprefix("models:/") if mv.source.startswith("models:/") else ""
    return body if body.startswith("m-") and "/" not in body else None


def _run_relative_path(client: MlflowClient, mv) -> str | None:
    """The version's path inside its run's artifacts when it was registered from runs:/ (else None)."""
    if mv.source.startswith("runs:/"):
        return mv.source.removeprefix("runs:/").split("/", 1)[1] if "/" in mv.source[6:] else None
    root = client.get_run(mv.run_id).info.artifact_uri.rstrip("/") if mv.run_id else ""
    return mv.source[len(root) + 1:] if root and mv.source.startswith(root + "/") else None


def _model_location(client: MlflowClient, mv) -> str:
    model_id = _model_id(mv)
    return client.get_logged_model(model_id).artifact_location if model_id else mv.source


def _download(client: MlflowClient, mv, staging: Path) -> None:
    """The version's model files into staging/model, its run's other artifacts into staging/run."""
    (staging / "model").mkdir()
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(staging / "model"),
                                        tracking_uri=client.tracking_uri)
    if not any((staging / "model").rglob("*")):
        raise ArchiveError(f"{mv.name} v{mv.version}: no model artifacts to archive at {mv.source}")
    if mv.run_id:
        inside = _run_relative_path(client, mv) if not _model_id(mv) else None
        (staging / "run").mkdir()
        for item in client.list_artifacts(mv.run_id):
            if inside and (item.path == inside or inside.startswith(item.path + "/")):
                continue   # the model itself, already under model/
            client.download_artifacts(mv.run_id, item.path, str(staging / "run"))


def _check_tarball(path: Path, sha: str | None, mv, extract_to: Path | None = None) -> None:
    """The tarball exists, has the recorded sha256, and every file in it has the sum its manifest gives,
    the checkpoint's matching the version's checkpoint_sha256 tag."""
    if not path.is_file():
        raise ArchiveError(f"{path}: the archive of {mv.name} v{mv.version} is missing")
    if sha and file_sha256(path) != sha:
        raise ArchiveError(f"{path}: sha256 differs from the one recorded when {mv.name} v{mv.version} was archived")
    own = extract_to is None
    folder = Path(tempfile.mkdtemp(prefix="aivoice-check-")) if own else extract_to
    try:
        with tarfile.open(path, "r:gz") as tar:
            tar.extractall(folder, filter="data")   # refuses absolute paths, `..` and links out of the folder
        manifest = json.loads((folder / "ARCHIVE.json").read_text())
        for rel, digest in manifest["files"].items():
            if file_sha256(folder / rel) != digest:
                raise ArchiveError(f"{path}: {rel} does not match its sha256 in the archive's manifest")
        want = mv.tags.get("checkpoint_sha256")
        if want and want not in manifest["files"].values():
            raise ArchiveError(f"{path}: holds no file with the checkpoint sha256 of {mv.name} v{mv.version}")
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)


def leftovers(client: MlflowClient, mv) -> bool:
    """Artifacts of an archived version still in the store (a gc killed between tagging and deleting)."""
    return any(repo.list_artifacts() for repo in _repos(client, mv))


def _repos(client: MlflowClient, mv) -> list:
    """The artifact repositories archiving empties: the model's files, and its run's unless shared."""
    repos = [get_artifact_repository(_model_location(client, mv), tracking_uri=client.tracking_uri)]
    if mv.run_id and not _run_shared(client, mv):
        repos.append(get_artifact_repository(client.get_run(mv.run_id).info.artifact_uri,
                                             tracking_uri=client.tracking_uri))
    return repos


def _delete_artifacts(client: MlflowClient, mv) -> None:
    """Delete the model's files and the run's artifacts from the artifact store (metadata stays)."""
    for repo in _repos(client, mv):
        if repo.list_artifacts():
            repo.delete_artifacts()


def _run_shared(client: MlflowClient, mv) -> bool:
    """Another version, not archived, was registered from the same run: its run artifacts stay."""
    others = client.search_model_versions(f"run_id = '{mv.run_id}'")
    return any(o.version != mv.version and not o.tags.get(ARCHIVED_TAG) for o in others)
