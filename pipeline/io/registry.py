"""The model registry: detector versions in MLflow, addressed by alias, never by number in code.

Aliases: `champion` (served), `challenger` (newest candidate that passed the gates, awaiting
promotion; cleared when promoted) and `previous-champion` (where `rollback` returns to).

Every promotion and rollback is recorded twice:
- as tags on the version that became champion (promoted_by/_at, promotion_reason/_action, forced);
- as one MLflow run per event in the experiment `<model>-registry-events`, its tags holding the
  event (at, action, version, previous, reason, forced; the user in MLflow's own `mlflow.user`, which
  the UI shows as the run's user). Runs are append-only and atomic, so
  concurrent promotions cannot lose an entry (a shared promotions.jsonl would need read-modify-write),
  and the log stays queryable (`history()`, `mlflow.search_runs`, the MLflow UI).

Guards:
- only a base model (`register(..., base=True)`: bootstrap, import-checkpoint) or a version whose gates
  passed becomes champion when the registry has none; a failed or insufficient-evidence candidate never does;
- a candidate is tagged `base_version`, the champion it was judged against; `promote` refuses it (unless
  forced with a reason) once champion has moved to another version;
- a champion move runs in a crash-safe order: the move is first journalled in the registered model's tag
  `pending_move`, then the version's tags, the event, previous-champion, champion and challenger are written,
  and the journal is cleared. A crash anywhere leaves the journal; the next promote, rollback or register
  (or `complete_pending`) completes the move, each step idempotent (the event is logged once, by its id);
- alias moves are serialised per store: by a file lock (fcntl.flock on `<store>.registry.lock`) beside a
  local sqlite database or file store; for a remote registry (an MLflow server, a PostgreSQL or other SQL
  database) by a lease lock made of the registry itself: the registered model `aivoice.registry-lock`,
  created to take the lock (creation is atomic: the database's unique name constraint lets one creator
  win) and deleted to release it; its tags name the owner and when the lease expires (LOCK_LEASE_S), after
  which a crashed holder's lock is broken. Under either lock, a move first re-reads the aliases and refuses
  if champion is no longer what the decision was based on (compare-and-set), which also covers a lease
  broken while its holder was still alive.
"""
from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_USER

from pipeline import atomic
from pipeline.io import tracking
from pipeline.io.archive import ARCHIVED_TAG, restore_version
from pipeline.io.local_registry import version_cache_folder
from pipeline.config import Params, RegistryConfig
from pipeline.core.data import file_sha256
from pipeline.core.model import Detector, load_checkpoint
from pipeline.faults import fault_point

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
METRIC_TAGS = ("eer", "human_fpr", "new_gen_recall", "auc")
_STATUS = {True: "passed", False: "failed", None: "none"}
_ALIAS = re.compile(r"^[A-Za-z][\w-]*$")
_EVENT_KEYS = ("at", "action", "version", "previous", "user", "reason", "forced")
PENDING_TAG = "pending_move"   # registered-model tag: the champion move in progress (JSON event)
BASE_VERSION_TAG = "base_version"
CHECKPOINT_SHA_TAG = "checkpoint_sha256"   # one version per checkpoint's bytes: a re-run after a kill reuses it
LOCK_TIMEOUT_S = 120.0
LOCK_LEASE_S = 120.0       # a remote lock older than this is a crashed holder's: broken
REMOTE_LOCK_MODEL = "aivoice.registry-lock"
log = logging.getLogger(__name__)


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
             experiment: str | None = None, base: bool = False, base_version: int | None = None,
             description: str | None = None) -> int:
    """Log the checkpoint as a pyfunc model in a run (`run_id`, the active run, or a new one in `experiment`),
    register it as a new version of `name` with lineage and validation tags, and return its number. The
    checkpoint file is stored once, as the model's artifact. Tag `failed_gates` to name them in refusals.
    Tags stay short and machine-readable; `description` is the one line a person reads in the MLflow UI
    (what made the version, on which data, its verdict and the figures that decided it).

    `status` (e.g. "insufficient evidence") overrides the passed/failed of `gates_passed` in the
    `validation_status` tag; only "passed" can be promoted without force.

    `base`: a base model (bootstrap, an imported checkpoint) that no gates judge. When the registry has
    no champion, the version becomes champion only if it is a base or its gates passed; a failed or
    insufficient-evidence candidate is registered without an alias. With a champion, a version that
    passed becomes challenger.

    `base_version`: the champion version the candidate was judged against (tag `base_version`; promote
    refuses the candidate once champion has moved). Default for a judged version (gates_passed or status
    given): the champion now."""
    client = tracking.configure()
    meta = load_checkpoint(ckpt_path).meta  # refuses anything that is not a checkpoint
    lineage = tracking.lineage_tags(params_hash=meta.params_hash, data_hash=meta.data_hash)
    given = {k: str(v) for k, v in (tags or {}).items()}  # may override lineage, never the validation status
    validation = (status or _STATUS[gates_passed]).replace(" ", "-")
    sha = file_sha256(Path(ckpt_path))
    version_tags = lineage | given | {"validation_status": validation, "threshold": str(meta.threshold),
                                      "checkpoint": Path(ckpt_path).name, CHECKPOINT_SHA_TAG: sha}
    if meta.threshold_scoring:   # the scoring settings the threshold holds under (core.scoring.scoring_settings)
        version_tags["threshold_scoring"] = ",".join(f"{k}={v}" for k, v in sorted(meta.threshold_scoring.items()))
    if base_version is None and not base and (gates_passed is not None or status):
        base_version = aliases(name).get(CHAMPION)
    if base_version is not None and not base:
        version_tags[BASE_VERSION_TAG] = str(base_version)
    existing = _version_with_checkpoint(client, name, sha)
    if existing is not None:   # these bytes were registered before (a re-run after a kill): one version, tags renewed
        version = existing
        if client.get_model_version(name, str(version)).tags.get(ARCHIVED_TAG):   # gc archived it meanwhile
            restore_version(name, version)
            log.info("%s v%d was archived: its artifacts are restored from the archive", name, version)
        for key, value in version_tags.items():
            client.set_model_version_tag(name, str(version), key, value)
        log.info("%s v%d already holds this checkpoint (sha256 %s): tags updated, no new version", name, version, sha[:12])
    else:
        with _run(client, run_id, experiment or name):
            mlflow.set_tags(lineage)
            model_uri = tracking.log_checkpoint_model(ckpt_path)
        version = int(mlflow.register_model(model_uri, name, tags=version_tags).version)
    fault_point("registry.registered")
    if description:
        client.update_model_version(name, str(version), description=description)
    with _registry_lock(client):
        current = _complete_pending(client, name)
        if CHAMPION not in current:
            if base or validation == "passed":
                first = client.get_experiment_by_name(_events_experiment(name)) is None   # no champion ever
                what = "base model" if base else "passed its gates"
                reason = "first model" if first else f"{what}; there was no {CHAMPION}"
                _move(client, name, _new_event("promote", version, None, reason=reason, user=None, forced=False))
            else:
                log.warning("%s v%d registered without an alias: the registry has no %s, and a version becomes "
                            "%s only when its gates passed (validation_status=%s) or it is a base model",
                            name, version, CHAMPION, CHAMPION, validation)
        elif validation == "passed" and current.get(CHAMPION) != version:
            client.set_registered_model_alias(name, CHALLENGER, str(version))
    return version


def promote(version: int | str | None = None, *, reason: str, force: bool = False, user: str | None = None,
            name: str = DEFAULT_NAME, ui_promotion: str = "revert") -> dict:
    """Make `version` (default: the challenger) champion; the old champion becomes previous-champion.

    Refused unless the version passed validation and champion is still the version it was judged against
    (its `base_version` tag, when it has one), or `force` is given with a non-empty reason. A promotion or
    rollback that was interrupted is completed first; re-running the interrupted promotion completes it."""
    client = tracking.configure()
    with _registry_lock(client):
        before = _state(client, name)
        current = _guard_unrecorded(client, name, _complete_pending(client, name, before), ui_promotion)
        pending = before[1]
        if version is None:
            if pending is not None and pending["action"] == "promote" and CHALLENGER not in current:
                return _public(pending)   # the interrupted promotion of the challenger, now complete
            if CHALLENGER not in current:
                raise PromotionError(f"{name}: there is no {CHALLENGER} to promote; name a version")
        version = int(version) if version is not None else current[CHALLENGER]
        if pending is not None and pending["version"] == version:
            return _public(pending)       # this very move was interrupted: completed above
        mv = _version(client, name, version)
        _refuse_archived(name, mv)
        tags = mv.tags
        champion = current.get(CHAMPION)
        if champion == version:
            raise PromotionError(f"{name} v{version} is already {CHAMPION}")
        status = tags.get("validation_status", "none")
        if status != "passed" and not force:
            raise PromotionError(f"refusing to promote {name} v{version}: validation_status={status}, failed gates: "
                                 f"{tags.get('failed_gates') or 'not recorded'} (force with a reason to override)")
        base = tags.get(BASE_VERSION_TAG, "")
        stale = base.isdigit() and int(base) != champion
        if stale and not force:
            raise PromotionError(f"refusing to promote {name} v{version}: it was validated against {CHAMPION} v{base}, "
                                 f"but {CHAMPION} is now {'v' + str(champion) if champion else 'unset'}; validate it "
                                 f"again against the current {CHAMPION} (or force with a reason)")
        if (status != "passed" or stale) and not reason.strip():
            why = f"validation_status={status}" if status != "passed" else f"validated against v{base}"
            raise PromotionError(f"refusing to force {name} v{version} ({why}) without a reason")
        event = _new_event("promote", version, champion, reason=reason, user=user, forced=status != "passed" or stale)
        return _move(client, name, event)


def rollback(to: int | str | None = None, *, reason: str, user: str | None = None, name: str = DEFAULT_NAME,
             ui_promotion: str = "revert") -> dict:
    """Make previous-champion (or version `to`, which must have been champion before) champion again;
    the replaced champion becomes previous-champion. An interrupted move is completed first; re-running
    an interrupted rollback completes it (and does not roll back again)."""
    client = tracking.configure()
    with _registry_lock(client):
        before = _state(client, name)
        current = _guard_unrecorded(client, name, _complete_pending(client, name, before), ui_promotion)
        pending = before[1]
        if pending is not None and pending["action"] == "rollback" and (to is None or int(to) == pending["version"]):
            return _public(pending)       # this very rollback was interrupted: completed above
        target = int(to) if to is not None else current.get(PREVIOUS)
        if CHAMPION not in current or target is None:
            raise PromotionError(f"{name}: nothing to roll back to (champion: {current.get(CHAMPION, 'none')}, "
                                 f"{PREVIOUS}: {current.get(PREVIOUS, 'none')})")
        if target == current[CHAMPION]:
            raise PromotionError(f"{name} v{target} is already {CHAMPION}")
        if "promoted_at" not in _version(client, name, target).tags:
            raise PromotionError(f"{name} v{target} was never {CHAMPION}; use promote")
        return _move(client, name, _new_event("rollback", target, current[CHAMPION], reason=reason, user=user,
                                              forced=False))


def complete_pending(name: str = DEFAULT_NAME) -> dict | None:
    """Complete a promotion or rollback that was interrupted (a crash, a lost connection) and return its
    event; None when none was pending. promote, rollback and register do this first on their own."""
    client = tracking.configure()
    with _registry_lock(client):
        _, pending = _state(client, name)
        if pending is None:
            return None
        _complete_pending(client, name, (None, pending))
        return _public(pending)


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


def _version_with_checkpoint(client: MlflowClient, name: str, sha: str) -> int | None:
    """The version of `name` registered from a checkpoint with these bytes, or None."""
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    same = [int(mv.version) for mv in found if mv.tags.get(CHECKPOINT_SHA_TAG) == sha]
    return min(same) if same else None


def count_versions(tag: str, value: str, name: str = DEFAULT_NAME, exclude_checkpoint: str | Path | None = None) -> int:
    """How many versions of `name` carry tag=value (e.g. candidates judged on the same gate data), not
    counting one registered from `exclude_checkpoint`'s bytes (the candidate itself, after a kill)."""
    client = tracking.configure()
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return 0
        raise
    skip = file_sha256(Path(exclude_checkpoint)) if exclude_checkpoint else None
    return sum(1 for mv in found if mv.tags.get(tag) == value and (skip is None or mv.tags.get(CHECKPOINT_SHA_TAG) != skip))


def list_versions(name: str = DEFAULT_NAME) -> list[dict]:
    """Every version, oldest first: aliases, creation time, validation status, threshold, metrics,
    lineage, its latest promotion (None if never champion) and its description."""
    client = tracking.configure()
    by_version: dict[int, list[str]] = defaultdict(list)
    for alias, v in aliases(name).items():
        by_version[v].append(alias)
    found = client.search_model_versions(f"name = '{name}'")
    return [_describe(mv, sorted(by_version[int(mv.version)])) for mv in sorted(found, key=lambda m: int(m.version))]


def model_version(version: int, name: str = DEFAULT_NAME) -> ModelVersion:
    """One registered version (tags, description, run id); RegistryError when there is none."""
    return _version(tracking.configure(), name, int(version))


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


def _new_event(action: str, version: int, previous: int | None, *, reason: str, user: str | None,
               forced: bool) -> dict:
    return {"id": uuid.uuid4().hex, "at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "action": action, "version": int(version), "previous": previous, "user": user or _whoami(),
            "reason": reason, "forced": forced}


def _public(event: dict) -> dict:
    return {key: event[key] for key in _EVENT_KEYS}


def _move(client: MlflowClient, name: str, event: dict, *, fresh: bool = True) -> dict:
    """Make event["version"] champion and event["previous"] previous-champion, in an order a crash at any
    point leaves completable: journal (PENDING_TAG), version tags, event log, previous-champion, champion,
    challenger cleared (when it was the version), journal cleared. Every step is idempotent, so running
    the same event again (`_complete_pending`) finishes it. Call with the registry lock held.

    `fresh`: a new decision (not the completion of a journalled one): compare-and-set, refused when
    champion is no longer event["previous"] or another move is journalled.

    event["previous_alias"], when given, is where previous-champion goes instead of event["previous"] (a
    revert of an unguarded move records the version it replaced, but keeps the earlier rollback target)."""
    version, previous = event["version"], event["previous"]
    if fresh:
        now, pending = _state(client, name)
        if now.get(CHAMPION) != previous or (pending is not None and pending.get("id") != event["id"]):
            raise PromotionError(f"{name}: {CHAMPION} moved while v{version}'s {event['action']} was decided (was "
                                 f"{previous}, now {now.get(CHAMPION)}"
                                 f"{', a move is pending' if pending else ''}); nothing changed, try again")
    client.set_registered_model_tag(name, PENDING_TAG, json.dumps(event))
    fault_point("registry.journal")
    version_tags = {"promoted_at": event["at"], "promoted_by": event["user"], "promotion_reason": event["reason"],
                    "promotion_action": event["action"]} | ({"forced": "true"} if event["forced"] else {})
    for key, value in version_tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    if not _event_logged(client, name, event["id"]):
        _log_event(client, name, event)
    previous_alias = event.get("previous_alias", previous)   # a revert keeps previous-champion where it was
    if previous_alias is not None and previous_alias != version:
        client.set_registered_model_alias(name, PREVIOUS, str(previous_alias))
    fault_point("registry.previous")
    client.set_registered_model_alias(name, CHAMPION, str(version))
    fault_point("registry.champion")
    if _state(client, name)[0].get(CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    client.delete_registered_model_tag(name, PENDING_TAG)
    return _public(event)


def _state(client: MlflowClient, name: str) -> tuple[dict[str, int], dict | None]:
    """({alias: version}, the pending move or None) in one registry call; ({}, None) for no such model."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}, None
        raise
    raw = model.tags.get(PENDING_TAG) if model.tags else None
    return {alias: int(v) for alias, v in model.aliases.items()}, json.loads(raw) if raw else None


def _complete_pending(client: MlflowClient, name: str,
                      state: tuple[dict[str, int] | None, dict | None] | None = None) -> dict[str, int]:
    """Finish an interrupted move, if one is journalled; returns the aliases afterwards. Lock held."""
    current, pending = state or _state(client, name)
    if pending is None:
        return current
    events = client.get_experiment_by_name(_events_experiment(name))
    if events is not None:   # an event run a kill left RUNNING
        tracking.end_dead_runs(client, [events.experiment_id])
    log.warning("%s: completing the interrupted %s of v%s (started %s by %s)", name, pending["action"],
                pending["version"], pending["at"], pending["user"])
    _move(client, name, pending, fresh=False)
    return _state(client, name)[0]


def _guard_unrecorded(client: MlflowClient, name: str, current: dict[str, int], ui_promotion: str) -> dict[str, int]:
    """A champion moved outside aivoice (the MLflow UI) and not yet reconciled by the webhook is brought into
    the history first (alias_guard), so a decision never takes an unguarded champion as its baseline."""
    from pipeline.io import alias_guard   # alias_guard builds on this module

    if alias_guard.reconcile_locked(client, name, current, ui_promotion)["action"] == "none":
        return current
    return _state(client, name)[0]


def _event_logged(client: MlflowClient, name: str, event_id: str) -> bool:
    exp = client.get_experiment_by_name(_events_experiment(name))
    return exp is not None and bool(client.search_runs([exp.experiment_id], f"tags.event_id = '{event_id}'",
                                                       max_results=1))


def _log_event(client: MlflowClient, name: str, event: dict) -> None:
    """One finished run per event in `<name>-registry-events`, the event in its tags."""
    exp = tracking.experiment_id(client, _events_experiment(name))
    tags = {key: "" if event[key] is None else str(event[key]) for key in _EVENT_KEYS if key != "user"}
    tags |= {MLFLOW_USER: event["user"], "model": name}
    run = client.create_run(exp, run_name=f"{event['action']} v{event['version']}",
                            tags=tags | {"event_id": event["id"]} | tracking.owner_tags())
    client.set_terminated(run.info.run_id)


_held = threading.local()   # lock files this thread holds (flock is per open file: re-locking would deadlock)


@contextmanager
def _registry_lock(client: MlflowClient, timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive fcntl.flock on `<store>.registry.lock` beside a local registry store, held while aliases
    move; re-entrant within a thread. A registry behind a server or a SQL database takes `_remote_lock`."""
    uri = os.environ.get("MLFLOW_REGISTRY_URI") or client.tracking_uri
    path = _lock_path(uri)
    held = getattr(_held, "paths", None)
    if held is None:
        held = _held.paths = set()
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    key = path if path is not None else f"remote:{uri}"
    if key in held:
        yield
        return
    if path is None:
        held.add(key)
        try:
            with _remote_lock(client, timeout_s):
                yield
        finally:
            held.discard(key)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(f"registry lock {path} still held by another promotion or rollback after "
                                        f"{timeout_s:.0f} s") from None
                time.sleep(0.05)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _remote_lock(client: MlflowClient, timeout_s: float) -> Iterator[None]:
    """Lease lock in a remote registry: create registered model REMOTE_LOCK_MODEL (one creator wins: the
    name is unique in the database), delete it when done. Its tags `owner` and `expires` let a waiter break
    the lock of a holder that crashed (lease past); the compare-and-set in `_move` guards what a broken
    lease of a live holder could let through."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(REMOTE_LOCK_MODEL, tags={"owner": owner, "expires": f"{time.time() + LOCK_LEASE_S:.3f}"},
                                           description="held while a promotion or rollback moves aliases (aivoice)")
            break
        except MlflowException as exc:
            # ALREADY_EXISTS: held. DOES_NOT_EXIST: it was held while the server checked and released before it
            # answered (the server re-reads the model to report the clash): retry either way
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        _break_expired_lock(client)
        if time.monotonic() > deadline:
            raise RegistryError(f"registry lock {REMOTE_LOCK_MODEL} at {client.tracking_uri} still held by another "
                                f"promotion or rollback after {timeout_s:.0f} s") from None
        time.sleep(0.1)
    try:
        yield
    finally:
        try:
            if _lock_owner(client)[0] == owner:   # a broken lease may have gone to someone else
                client.delete_registered_model(REMOTE_LOCK_MODEL)
        except MlflowException as exc:
            log.warning("could not release registry lock %s: %s", REMOTE_LOCK_MODEL, exc)


def _lock_owner(client: MlflowClient) -> tuple[str | None, float]:
    """(owner, lease expiry as epoch seconds) of the remote lock; (None, 0) when nobody holds it."""
    try:
        tags = client.get_registered_model(REMOTE_LOCK_MODEL).tags or {}
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None, 0.0
        raise
    return tags.get("owner"), float(tags.get("expires") or 0)


def _break_expired_lock(client: MlflowClient) -> None:
    owner, expires = _lock_owner(client)
    if owner is not None and expires < time.time() and _lock_owner(client)[0] == owner:
        log.warning("breaking registry lock %s held by %s: its lease expired", REMOTE_LOCK_MODEL, owner)
        try:
            client.delete_registered_model(REMOTE_LOCK_MODEL)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise


def _lock_path(uri: str) -> Path | None:
    """`<db>.registry.lock` beside a sqlite database or `<folder>.registry.lock` beside a file store; None when remote."""
    if uri.startswith("sqlite:///"):
        db = uri.removeprefix("sqlite:///").split("?", 1)[0]
        if not db or db == ":memory:":
            return None
        db_path = Path(unquote(db)).resolve()
        return db_path.with_name(db_path.name + ".registry.lock")
    parts = urlsplit(uri)
    if parts.scheme == "file":
        root = Path(unquote(parts.path)).resolve()
    elif parts.scheme == "" and uri and uri not in ("databricks", "databricks-uc", "uc"):
        root = Path(uri).resolve()
    else:
        return None
    return root.with_name(root.name + ".registry.lock")


def _event_from_tags(tags: dict[str, str]) -> dict:
    return {"at": tags["at"], "action": tags["action"], "version": int(tags["version"]),
            "previous": int(tags["previous"]) if tags.get("previous") else None, "user": tags.get(MLFLOW_USER) or tags.get("user", ""),
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
        "lineage": {"git_commit": tracking.git_commit(tags)} | {k: tags.get(k, "") for k in ("git_dirty", "data_hash", "params_hash")},
        "promotion": promotion, "description": mv.description or "", "archived": tags.get(ARCHIVED_TAG),
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


def _refuse_archived(name: str, mv: ModelVersion) -> None:
    if mv.tags.get(ARCHIVED_TAG):
        raise RegistryError(f"{name} v{mv.version}: its artifacts were archived to {mv.tags[ARCHIVED_TAG]} by `aivoice "
                            f"gc`; `aivoice restore {mv.version}` puts them back")


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
    _refuse_archived(name, mv)
    folder = version_cache_folder(client.tracking_uri, name, int(mv.version), mv.source)
    ckpt = mv.tags.get("checkpoint")
    uri = f"models:/{name}/{mv.version}" + (f"/artifacts/{ckpt}" if ckpt else "")
    return _cached_download(client, uri, folder.relative_to(tracking.cache_dir(client.tracking_uri)))


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
        atomic.copy_file(resolved.checkpoint_path, path)
    return resolved


def _same_bytes(a: Path, b: Path) -> bool:
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    return a.stat().st_size == b.stat().st_size and digest(a) == digest(b)


def describe_version(version: int | str, name: str = DEFAULT_NAME) -> dict:
    """One version as `list_versions` describes it (aliases, validation, latest promotion or rollback)."""
    client = tracking.configure()
    mv = _version(client, name, int(version))
    return _describe(mv, sorted(alias for alias, v in aliases(name).items() if v == int(mv.version)))
