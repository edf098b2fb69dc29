"""Promotions made in the MLflow UI pass the same guard as `aivoice promote`.

People move the `champion` alias in the MLflow UI. MLflow (3.3+, SQL-backed servers) calls a webhook on
every alias change (`model_version_alias.created` / `.deleted`); `aivoice serve` answers it at
POST /hooks/mlflow, checks MLflow's HMAC signature, and runs `reconcile` here:

- the champion that the promotion history expects is the version of its latest event (`aivoice promote`
  and `rollback` log the event before they move the alias, under the registry lock, which reconcile takes
  too); a champion that differs was moved by someone else;
- a move to a version that passed its gates against the champion it replaced (or back to a version a
  guarded move made champion before: a rollback) is recorded as a `ui-promote` / `ui-rollback` event,
  the version gets the promotion tags and `previous-champion` the replaced version, as if `aivoice` had
  made it;
- a move to a version that has not passed (failed, insufficient evidence, no verdict, or validated
  against another champion) follows `registry.ui_promotion`: `warn` records it as above, marked forced,
  with the reason; `revert` puts the expected champion back in one journalled `revert` event that names
  the version and why, and leaves `previous-champion` where it was (the rollback target stays a
  validated version); a deleted champion alias is put back the same way (`warn`: logged only).

The secret is shared by the webhook registration and the service: $AIVOICE_WEBHOOK_SECRET, or the file
named by $AIVOICE_WEBHOOK_SECRET_FILE; never params.yaml (which is versioned).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.tracking import MlflowClient

from pipeline.io import registry, tracking
from pipeline.io.registry import BASE_VERSION_TAG, CHAMPION, PREVIOUS

SECRET_ENV, SECRET_FILE_ENV = "AIVOICE_WEBHOOK_SECRET", "AIVOICE_WEBHOOK_SECRET_FILE"
WEBHOOK_NAME = "aivoice-champion-guard"
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "x-mlflow-signature", "x-mlflow-timestamp", "x-mlflow-delivery-id"
MAX_SKEW_S = 300          # a delivery signed longer ago than this is refused (replay)
UI_USER = "mlflow-ui"
GUARDED = ("promote", "rollback", "revert")   # events whose version had passed the guard
log = logging.getLogger(__name__)


def webhook_secret() -> str | None:
    """The shared secret from $AIVOICE_WEBHOOK_SECRET or the file $AIVOICE_WEBHOOK_SECRET_FILE; None when unset."""
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    path = os.environ.get(SECRET_FILE_ENV)
    if path:
        secret = Path(path).read_text().strip()
        if not secret:
            raise registry.RegistryError(f"{path}: the webhook secret file is empty")
        return secret
    return None


def signature_ok(secret: str, body: bytes, headers: Mapping[str, str], now: float | None = None) -> bool:
    """MLflow's webhook signature: `v1,` + base64 HMAC-SHA256 of `<delivery id>.<timestamp>.<body>`, the
    timestamp within MAX_SKEW_S of now."""
    delivery, stamp, given = (headers.get(h, "") for h in (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not (delivery and stamp.isdigit() and given.startswith("v1,")):
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > MAX_SKEW_S:
        return False
    signed = delivery.encode() + b"." + stamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(given.removeprefix("v1,").encode(), expected.encode())


def server_env(url: str, secret: str) -> dict[str, str]:
    """Environment for an `mlflow server`/`mlflow ui` that delivers to `url`: a stable key for the secrets it
    stores (MLflow draws a random one per process otherwise, so a restart could not sign any more), and,
    for an http:// or private address (the service on this host), MLflow's permission to call it."""
    key = base64.urlsafe_b64encode(hashlib.sha256(b"aivoice-webhook-key:" + secret.encode()).digest()).decode()
    env = {"MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": os.environ.get("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY") or key}
    if urlsplit(url).scheme == "http":
        env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] = "http,https"
    if _private_host(urlsplit(url).hostname or ""):
        env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] = "true"
    return env


def register_webhook(url: str, secret: str, tracking_uri: str | None = None) -> str:
    """Create (or update: the same name is reused) the webhook that sends alias changes to `url`, signed
    with `secret`, through the MLflow server at `tracking_uri` (default: the tracking URI). Returns its id."""
    client = MlflowClient(tracking_uri=tracking_uri or tracking.tracking_uri())
    found = [hook for hook in _all_webhooks(client) if hook.name == WEBHOOK_NAME]
    description = "aivoice: champion moves made outside `aivoice promote/rollback` pass its guard (aivoice serve)"
    if found:
        hook = client.update_webhook(found[0].webhook_id, url=url, events=list(EVENTS), secret=secret,
                                     status="ACTIVE", description=description)
        for extra in found[1:]:
            client.delete_webhook(extra.webhook_id)
    else:
        hook = client.create_webhook(WEBHOOK_NAME, url, list(EVENTS), description=description, secret=secret)
    return hook.webhook_id


def reconcile(name: str = registry.DEFAULT_NAME, mode: str = "revert") -> dict:
    """Bring an unguarded champion move into the history (see the module docstring); returns what was done:
    {"action": "none" | "ui-promote" | "ui-rollback" | "revert" | "warn", ...}."""
    client = tracking.configure()
    with registry._registry_lock(client):
        return reconcile_locked(client, name, registry._complete_pending(client, name), mode)


def reconcile_locked(client: MlflowClient, name: str, current: dict[str, int], mode: str) -> dict:
    """`reconcile` with the registry lock held and `current` the aliases after any journalled move was
    completed; promote and rollback run it too, so that no decision takes an unguarded champion as given."""
    events = registry.history(name)
    expected = events[-1]["version"] if events else None
    champion = current.get(CHAMPION)
    if champion == expected:
        return {"action": "none", "champion": champion}
    if champion is None:   # the alias was deleted
        why = f"the {CHAMPION} alias of {name} was deleted outside aivoice (v{expected} expected)"
        if mode == "revert":
            event = registry._new_event("revert", expected, None, reason=f"{why}; put back (registry.ui_promotion "
                                        f"= revert)", user=UI_USER, forced=False)
            return {"action": "revert"} | registry._move(client, name, event, fresh=False)
        log.warning("%s (registry.ui_promotion = warn: left unset, the service keeps serving v%s)", why, expected)
        return {"action": "warn", "champion": None, "reason": why}
    tags = registry._version(client, name, champion).tags
    was_champion = any(e["version"] == champion and e["action"] in GUARDED for e in events)
    problem = None if was_champion else _not_passed(tags, expected)
    if problem and mode == "revert" and expected is not None:
        reason = (f"v{champion} was made {CHAMPION} outside aivoice (MLflow UI) but {problem}; v{expected} put back "
                  f"(registry.ui_promotion = revert)")
        event = registry._new_event("revert", expected, champion, reason=reason, user=UI_USER, forced=False)
        event["previous_alias"] = current.get(PREVIOUS)
        log.warning("%s: %s", name, reason)
        return {"action": "revert"} | registry._move(client, name, event)
    action = "ui-rollback" if was_champion else "ui-promote"
    reason = f"v{champion} made {CHAMPION} outside aivoice (MLflow UI)"
    if problem:
        reason += f"; {problem} (registry.ui_promotion = {mode}: kept)"
        log.warning("%s: %s", name, reason)
    event = registry._new_event(action, champion, expected, reason=reason, user=UI_USER, forced=bool(problem))
    return {"action": action} | registry._move(client, name, event, fresh=False)


def _not_passed(tags: Mapping[str, str], expected: int | None) -> str | None:
    """Why a version may not become champion (None: it may): its gates, or a stale baseline."""
    status = tags.get("validation_status", "none")
    if status != "passed":
        return f"it has not passed its gates (validation_status={status}, failed gates: " \
               f"{tags.get('failed_gates') or 'not recorded'})"
    base = tags.get(BASE_VERSION_TAG, "")
    if base.isdigit() and int(base) != expected:
        return f"it was validated against v{base}, not v{expected}"
    return None


def _all_webhooks(client: MlflowClient) -> list:
    hooks, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        hooks.extend(page)
        token = page.token
        if not token:
            return hooks


def _private_host(host: str) -> bool:
    import ipaddress
    import socket

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return any(not ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses)
