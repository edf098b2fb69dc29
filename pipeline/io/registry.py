"""The model registry: detector versions in MLflow, addressed by alias, never by number in code.

Aliases: `champion` (served), `challenger` (newest candidate that passed the gates, awaiting
promotion; cleared when promoted) and `previous-champion` (where `rollback` returns to).

Every promotion and rollback is recorded twice:
- as tags on the version that became champion (promoted_by/_at, promotion_reason/_action, forced);
- as one MLflow run per event in the experiment `<model>-registry-events`, its tags holding the
  event (at, action, version, previous, user, reason, forced). Runs are append-only and atomic, so
  concurrent promotions cannot lose an entry (a shared promotions.jsonl would need read-modify-write),
  and the log stays queryable (`history()`, `mlflow.search_runs`, the MLflow UI).
"""
from __future__ import annotations

import getpass
import hashlib
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.io import tracking
from pipeline.config import Params, RegistryConfig
from pipeline.core.model import Detector, load_checkpoint

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
METRIC_TAGS = ("eer", "human_fpr", "new_gen_recall", "auc")
_STATUS = {True: "passed", False: "failed", None: "none"}
_ALIAS = re.compile(r"^[A-Za-z][\w-]*$")
_EVENT_KEYS = ("at", "action", "version", "previous", "user", "reason", "forced")


DEFAULT_NAME = RegistryConfig().model_name


class RegistryError(ValueError):
    """A registry reference that cannot be resolved, or an operation the registry's state forbids."""


class PromotionError(RegistryError):
    """A promotion or rollback that was refused."""


@dataclass(frozen=True)
class Resolved:
    """Where a model reference led: registry version and alias (None for files and runs:/ URIs) and the local file."""

    version: int | None
    alias: str | None
    checkpoint_path: Path


def register(ckpt_path: str | Path, *, run_id: str | None = None, tags: dict | None = None,
             gates_passed: bool | None = None, status: str | None = None, name: str = DEFAULT_NAME,
             experiment: str | None = None) -> int:
    """Log the checkpoint as a pyfunc model in a run (`run_id`, the active run, or a new one in `experiment`),
    register it as a new version of `name` with lineage and validation tags, and return its number. The
    checkpoint file is stored once, as the model's artifact. Tag `failed_gates` to name them in refusals.

    `status` (e.g. "insufficient evidence") overrides the passed/failed of `gates_passed` in the
    `validation_status` tag; only "passed" can be promoted without force.

    The first version of a model becomes champion; later ones that passed the gates become challenger."""
    client = tracking.configure()
    meta = load_checkpoint(ckpt_path).meta  # refuses anything that is not a checkpoint
    lineage = tracking.lineage_tags(params_hash=meta.params_hash, data_hash=meta.data_hash)
    given = {k: str(v) for k, v in (tags or {}).items()}  # may override lineage, never the validation status
    validation = (status or _STATUS[gates_passed]).replace(" ", "-")
    version_tags = lineage | given | {"validation_status": validation, "threshold": str(meta.threshold),
                                      "checkpoint": Path(ckpt_path).name}
    with _run(client, run_id, experiment or name):
        mlflow.set_tags(lineage)
        model_uri = tracking.log_checkpoint_model(ckpt_path)
    version = int(mlflow.register_model(model_uri, name, tags=version_tags).version)
    if CHAMPION not in aliases(name):
        _make_champion(client, name, version, action="promote", reason="first model", user=None, forced=False)
    elif gates_passed:
        client.set_registered_model_alias(name, CHALLENGER, str(version))
    return version


def promote(version: int | str | None = None, *, reason: str, force: bool = False, user: str | None = None,
            name: str = DEFAULT_NAME) -> dict:
    """Make `version` (default: the challenger) champion; the old champion becomes previous-champion.

    Refused unless the version passed validation, or `force` is given with a non-empty reason."""
    client = tracking.configure()
    current = aliases(name)
    if version is None and CHALLENGER not in current:
        raise PromotionError(f"{name}: there is no {CHALLENGER} to promote; name a version")
    version = int(version) if version is not None else current[CHALLENGER]
    tags = _version(client, name, version).tags
    if current.get(CHAMPION) == version:
        raise PromotionError(f"{name} v{version} is already {CHAMPION}")
    status = tags.get("validation_status", "none")
    if status != "passed" and not force:
        raise PromotionError(f"refusing to promote {name} v{version}: validation_status={status}, failed gates: "
                             f"{tags.get('failed_gates') or 'not recorded'} (force with a reason to override)")
    if status != "passed" and not reason.strip():
        raise PromotionError(f"refusing to force {name} v{version} (validation_status={status}) without a reason")
    event = _make_champion(client, name, version, action="promote", reason=reason, user=user, forced=status != "passed")
    if current.get(CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    return event


def rollback(to: int | str | None = None, *, reason: str, user: str | None = None, name: str = DEFAULT_NAME) -> dict:
    """Make previous-champion (or version `to`, which must have been champion before) champion again;
    the replaced champion becomes previous-champion."""
    client = tracking.configure()
    current = aliases(name)
    target = int(to) if to is not None else current.get(PREVIOUS)
    if CHAMPION not in current or target is None:
        raise PromotionError(f"{name}: nothing to roll back to (champion: {current.get(CHAMPION, 'none')}, "
                             f"{PREVIOUS}: {current.get(PREVIOUS, 'none')})")
    if target == current[CHAMPION]:
        raise PromotionError(f"{name} v{target} is already {CHAMPION}")
    if "promoted_at" not in _version(client, name, target).tags:
        raise PromotionError(f"{name} v{target} was never {CHAMPION}; use promote")
    return _make_champion(client, name, target, action="rollback", reason=reason, user=user, forced=False)


def aliases(name: str = DEFAULT_NAME) -> dict[str, int]:
    """{alias: version} of a registered model ({} when it does not exist yet); one registry call."""
    try:
        found = tracking.configure().get_registered_model(name).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {alias: int(v) for alias, v in found.items()}


def history(name: str = DEFAULT_NAME) -> list[dict]:
    """Promotions and rollbacks, oldest first: at, action, version, previous, user, reason, forced."""
    client = tracking.configure()
    exp = client.get_experiment_by_name(_events_experiment(name))
    if exp is None:
        return []
    events = [_event_from_tags(run.data.tags) for run in _all_runs(client, exp.experiment_id)]
    return sorted(events, key=lambda e: e["at"])


def count_versions(tag: str, value: str, name: str = DEFAULT_NAME) -> int:
    """How many versions of `name` carry tag=value (e.g. candidates judged on the same gate data)."""
    client = tracking.configure()
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return 0
        raise
    return sum(1 for mv in found if mv.tags.get(tag) == value)


def list_versions(name: str = DEFAULT_NAME) -> list[dict]:
    """Every version, oldest first: aliases, creation time, validation status, threshold, metrics,
    lineage and its latest promotion (None if never champion)."""
    client = tracking.configure()
    by_version: dict[int, list[str]] = defaultdict(list)
    for alias, v in aliases(name).items():
        by_version[v].append(alias)
    found = client.search_model_versions(f"name = '{name}'")
    return [_describe(mv, sorted(by_version[int(mv.version)])) for mv in sorted(found, key=lambda m: int(m.version))]


def resolve(ref: str | int | None = None, name: str = DEFAULT_NAME) -> Resolved:
    """A local checkpoint for `ref`: None/"champion" or any alias, a version number, models:/<name>@<alias>,
    models:/<name>/<version>, runs:/<run_id>/<path> or a checkpoint file. Registry downloads are cached
    per version beside the store, so resolving again is cheap."""
    ref = str(ref) if ref not in (None, "") else CHAMPION
    if ref.startswith("models:/"):
        name, selector = _parse_models_uri(ref)
    elif ref.startswith("runs:/"):
        return Resolved(None, None, _cached_run_checkpoint(tracking.configure(), ref))
    elif ref.isdigit():
        selector = int(ref)
    elif Path(ref).is_file():
        return Resolved(None, None, Path(ref))
    elif _ALIAS.match(ref):
        selector = ref
    else:
        raise RegistryError(f"{ref}: no such checkpoint file, and not an alias, version, models:/ or runs:/ URI")
    client = tracking.configure()
    mv = _version(client, name, selector)
    alias = selector if isinstance(selector, str) else None
    return Resolved(int(mv.version), alias, _cached_version_checkpoint(client, name, mv))


def load_model(ref: str | int | None, params: Params, *, name: str = DEFAULT_NAME) -> tuple[Detector, Resolved]:
    """Resolve `ref` and load its checkpoint, checked against the configured audio and feature settings."""
    resolved = resolve(ref, name)
    return load_checkpoint(resolved.checkpoint_path, params.audio), resolved


def _make_champion(client: MlflowClient, name: str, version: int, *, action: str, reason: str, user: str | None,
                   forced: bool) -> dict:
    """Move champion to `version` (the old one to previous-champion), tag the version and log the event."""
    previous = aliases(name).get(CHAMPION)
    if previous is not None:
        client.set_registered_model_alias(name, PREVIOUS, str(previous))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    event = {"at": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "action": action, "version": version,
             "previous": previous, "user": user or _whoami(), "reason": reason, "forced": forced}
    version_tags = {"promoted_at": event["at"], "promoted_by": event["user"], "promotion_reason": reason,
                    "promotion_action": action} | ({"forced": "true"} if forced else {})
    for key, value in version_tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    _log_event(client, name, event)
    return event


def _log_event(client: MlflowClient, name: str, event: dict) -> None:
    """One finished run per event in `<name>-registry-events`, the event in its tags."""
    exp = tracking.experiment_id(client, _events_experiment(name))
    tags = {key: "" if event[key] is None else str(event[key]) for key in _EVENT_KEYS} | {"model": name}
    run = client.create_run(exp, run_name=f"{event['action']} v{event['version']}", tags=tags)
    client.set_terminated(run.info.run_id)


def _event_from_tags(tags: dict[str, str]) -> dict:
    return {"at": tags["at"], "action": tags["action"], "version": int(tags["version"]),
            "previous": int(tags["previous"]) if tags.get("previous") else None, "user": tags.get("user", ""),
            "reason": tags.get("reason", ""), "forced": tags.get("forced") == "True"}


def _events_experiment(name: str) -> str:
    return f"{name}-registry-events"


def _all_runs(client: MlflowClient, experiment_id: str) -> Iterator:
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _describe(mv: ModelVersion, version_aliases: list[str]) -> dict:
    tags = mv.tags
    promotion = None
    if "promoted_at" in tags:
        promotion = {"at": tags["promoted_at"], "by": tags.get("promoted_by"), "reason": tags.get("promotion_reason"),
                     "action": tags.get("promotion_action"), "forced": tags.get("forced") == "true"}
    return {
        "version": int(mv.version), "aliases": version_aliases,
        "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
        "validation_status": tags.get("validation_status", "none"),
        "threshold": float(tags["threshold"]) if "threshold" in tags else None,
        "metrics": {k: float(tags[k]) for k in METRIC_TAGS if k in tags},
        "lineage": {k: tags.get(k, "") for k in ("git_commit", "git_dirty", "data_hash", "params_hash")},
        "promotion": promotion,
    }


def _version(client: MlflowClient, name: str, selector: int | str) -> ModelVersion:
    """The version with this number, or the one this alias points at; RegistryError when there is none."""
    try:
        if isinstance(selector, str):
            return client.get_model_version_by_alias(name, selector)
        return client.get_model_version(name, str(selector))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # a missing alias is the latter
            what = f"alias {selector!r}" if isinstance(selector, str) else f"version {selector}"
            raise RegistryError(f"{name}: no {what} in the registry at {client.tracking_uri}") from None
        raise


def _parse_models_uri(uri: str) -> tuple[str, int | str]:
    """models:/<name>@<alias> or models:/<name>/<version> -> (name, alias or version)."""
    body = uri.removeprefix("models:/").strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        return name, alias
    name, _, version = body.rpartition("/")
    if not name or not version.isdigit():
        raise RegistryError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, int(version)


def _cached_version_checkpoint(client: MlflowClient, name: str, mv: ModelVersion) -> Path:
    """The version's checkpoint, downloaded once into <cache>/<name>/v<version>-<key>/ (versions are immutable)."""
    key = hashlib.sha256(f"{client.tracking_uri}|{mv.source}".encode()).hexdigest()[:12]
    ckpt = mv.tags.get("checkpoint")
    uri = f"models:/{name}/{mv.version}" + (f"/artifacts/{ckpt}" if ckpt else "")
    return _cached_download(client, uri, Path(name) / f"v{mv.version}-{key}")


def _cached_run_checkpoint(client: MlflowClient, uri: str) -> Path:
    key = hashlib.sha256(f"{client.tracking_uri}|{uri}".encode()).hexdigest()[:12]
    return _cached_download(client, uri, Path("runs") / key)


def _cached_download(client: MlflowClient, uri: str, key: Path) -> Path:
    """Download `uri` (a checkpoint, or a folder holding exactly one) into its own cache folder, atomically."""
    folder = tracking.cache_dir(client.tracking_uri) / key
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=folder.parent))
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch / "raw"),
                                                            tracking_uri=client.tracking_uri))
            ckpt = _find_checkpoint(got, uri)
            (scratch / "ready").mkdir()
            ckpt.replace(scratch / "ready" / ckpt.name)
            try:
                (scratch / "ready").rename(folder)
            except OSError:  # another process cached it first
                pass
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return next(folder.iterdir())


def _find_checkpoint(path: Path, uri: str) -> Path:
    if path.is_file():
        return path
    found = sorted(path.rglob("*.pt"))
    if len(found) != 1:
        raise RegistryError(f"{uri}: expected one .pt checkpoint, found {len(found)}")
    return found[0]


@contextmanager
def _run(client: MlflowClient, run_id: str | None, experiment: str) -> Iterator:
    """The run to log in: `run_id` (resumed), else the active run, else a new run in `experiment`."""
    active = mlflow.active_run()
    if active is not None and run_id in (None, active.info.run_id):
        yield active
        return
    if run_id is not None:
        with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
            yield run
        return
    with mlflow.start_run(experiment_id=tracking.experiment_id(client, experiment), run_name="register",
                          nested=active is not None) as run:
        yield run


def _whoami() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except OSError:
        return "unknown"


def export_champion(path: str | Path, name: str = DEFAULT_NAME) -> Resolved:
    """Write the champion's checkpoint to `path` (the DVC pipeline's production model), rewriting it only
    when the champion changed, so that an unchanged champion leaves `dvc repro` a no-op."""
    resolved = resolve(CHAMPION, name)
    path = Path(path)
    if not path.exists() or not _same_bytes(path, resolved.checkpoint_path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        shutil.copyfile(resolved.checkpoint_path, tmp)
        tmp.replace(path)
    return resolved


def _same_bytes(a: Path, b: Path) -> bool:
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    return a.stat().st_size == b.stat().st_size and digest(a) == digest(b)
