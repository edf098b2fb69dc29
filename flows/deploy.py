"""Deployments: `retrain` on a cron schedule, run by a worker of a process work pool.

The deployment points at this project folder (flow.from_source with a local path): the worker runs
each flow run as a child process in that folder, with the worker's environment (venv, $MLFLOW_TRACKING_URI).
docs/orchestration.md walks through server, pool, worker and the move to Docker or Kubernetes pools.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from flows.retrain import DEFAULT_REASON, RetrainParams, retrain

ENTRYPOINT = "flows/retrain.py:retrain"
DEFAULT_POOL = "aivoice-process"
DEFAULT_DEPLOYMENT = "scheduled"


def ensure_work_pool(name: str = DEFAULT_POOL, pool_type: str = "process") -> bool:
    """Create work pool `name` of `pool_type` unless it exists (with that type); True when created."""
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = _default_template(pool_type)
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
            return True
    if pool.type != pool_type:
        raise ValueError(f"work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}")
    return False


def _default_template(pool_type: str) -> dict:
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    return {}   # other types: the server fills in its registered default (needs the worker package installed)


def schedule(cron: str, *, name: str = DEFAULT_DEPLOYMENT, work_pool: str = DEFAULT_POOL, repo: str = ".",
             params_file: str = "params.yaml", promote: Literal["auto", "manual"] | None = None,
             reason: str = DEFAULT_REASON, timezone: str = "UTC", paused: bool = False) -> str:
    """Create or update deployment `retrain/<name>`: `retrain` of the project at `repo` on `cron` (in
    `timezone`), in process work pool `work_pool` (created if missing). One run at a time: the DVC
    pipeline of one checkout cannot run twice at once. Returns the deployment id.

    Start the worker that runs it with `prefect worker start --pool <work_pool>` from the project's venv."""
    ensure_work_pool(work_pool)
    source = Path(repo).resolve()
    if not (source / ENTRYPOINT.split(":")[0]).is_file():
        raise FileNotFoundError(f"{source}: no {ENTRYPOINT.split(':')[0]}; `repo` must be the project root")
    defaults = RetrainParams(params_file=params_file, repo=".", promote=promote, reason=reason)  # "." = the checkout
    deployment_id = flow.from_source(source=str(source), entrypoint=ENTRYPOINT).deploy(
        name=name, work_pool_name=work_pool, schedules=[Cron(cron, timezone=timezone)], paused=paused,
        parameters={"params": defaults.model_dump()}, concurrency_limit=1, build=False, push=False,
        tags=["aivoice", "retrain"], description=f"retrain {source} on '{cron}' ({timezone})", print_next_steps=False)
    return str(deployment_id)


def serve(cron: str, *, name: str = "served", params_file: str = "params.yaml",
          promote: Literal["auto", "manual"] | None = None) -> None:
    """No work pool, no worker: this process holds the schedule and runs each flow run as a child
    process until stopped (Ctrl-C pauses the schedule). For one machine; `schedule` is the path to scale."""
    params = RetrainParams(params_file=params_file, promote=promote)
    retrain.serve(name=name, cron=cron, parameters={"params": params.model_dump()})
