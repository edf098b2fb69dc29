"""What every flow shares: which errors are worth a retry, the retry policy of tasks that talk to
the tracking server, and the environment a flow run gives to the pipeline code it calls.

Retries are for transient faults only (the server or the network hiccuped): a connection refused or
reset, a timeout, HTTP 429/5xx from the MLflow server, a locked sqlite store. Everything else - bad
params, a failed gate, a missing champion, a DVC stage that exited non-zero - fails the same way on
every attempt, so it fails at once.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.exceptions import MlflowException, RestException
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task, exponential_backoff

from pipeline.io import tracking

# MLflow error codes a server answers with when trying again later can succeed (HTTP 429, 503, 504)
TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED",
                             "RESOURCE_EXHAUSTED"})
# an HTTP 500 is transient too, but INTERNAL_ERROR is also MlflowException's default code for local,
# deterministic errors: count it only when a server said it (RestException) or an HTTP call failed
SERVER_ONLY_CODES = frozenset({"INTERNAL_ERROR"})
_HTTP_FAILURE = "API request to"   # MLflow's message for an HTTP call that failed or got a non-JSON 5xx
_SQLITE_LOCKED = "database is locked"


def is_transient(exc: BaseException | None) -> bool:
    """True when `exc`, or an exception it was raised from, is a fault that may pass on its own."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)):    # refused, reset, aborted, timed out
            return True
        if _is_requests_transient(exc):
            return True
        if isinstance(exc, MlflowException):
            code = exc.error_code
            if code in TRANSIENT_CODES:
                return True
            if code in SERVER_ONLY_CODES and (isinstance(exc, RestException) or str(exc.message).startswith(_HTTP_FAILURE)):
                return True
        if _SQLITE_LOCKED in str(exc):                          # sqlite store written by another process
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_requests_transient(exc: BaseException) -> bool:
    try:
        import requests
    except ImportError:  # pragma: no cover - mlflow depends on requests
        return False
    return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))


def retry_if_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect `retry_condition_fn`: retry the task only when it failed with a transient fault."""
    return is_transient(state.result(raise_on_failure=False))


# tasks that call the tracking server / registry: 3 retries after ~2, 4, 8 s (plus up to 50 % jitter)
TRACKING_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                        retry_jitter_factor=0.5, retry_condition_fn=retry_if_transient)


@contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them.

    Pipeline code reads its settings from the environment (the MLflow store, the flow run id for
    lineage tags); a flow sets them here instead of changing the caller's process for good."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def project_env(repo: Path, flow_run_id: str | None) -> dict[str, str]:
    """The environment a flow run gives to pipeline code, in-process and in DVC's stage processes:
    the flow run id (stages tag their MLflow runs with it) and, when $MLFLOW_TRACKING_URI is not set,
    the project's own local store, so that in-process registry calls and the stages, which run in
    `repo`, use one store whatever the caller's working directory."""
    env = {tracking.FLOW_RUN_ENV: flow_run_id} if flow_run_id else {}
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(repo / tracking.DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"
    return env


def in_repo(repo: Path, path: str | Path) -> Path:
    """A path from params.yaml (relative to the project root) as seen from this process."""
    path = Path(path)
    return path if path.is_absolute() else repo / path
