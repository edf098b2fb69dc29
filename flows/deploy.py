"""Deployments: `retrain` on a cron schedule and `monitor`, run by the workers of a process work pool.

Made from Python (flow.from_source(<project folder>, entrypoint).deploy(work_pool_name=...)), not a
prefect.yaml: the parameters are the flows' own pydantic models, validated here, and the CLI
(`aivoice schedule`), scripts/services.sh and the tests share one code path. The worker runs each flow
run as a child process in that folder, with the worker's environment (venv, $MLFLOW_TRACKING_URI).

A flow run whose worker (or whole host) dies can no longer report its end: the deployments make their
runs send heartbeats (HEARTBEAT_S) and `ensure_crash_automation` adds the server automation Prefect
documents for this ("detect zombie flows"), which marks a run CRASHED when its heartbeats stop.
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

from flows.monitor import MonitorParams
from flows.retrain import DEFAULT_REASON, RetrainParams, retrain

ENTRYPOINT = "flows/retrain.py:retrain"
MONITOR_ENTRYPOINT = "flows/monitor.py:monitor"
GC_ENTRYPOINT = "flows/retention.py:gc"
TAG = "aivoice"                 # on every deployment, hence every flow run the crash automation watches
HEARTBEAT_S = 30                # a flow run's heartbeat period (Prefect's minimum)
CRASH_AFTER_S = 90              # no heartbeat for this long: the run is marked CRASHED (Prefect's example: 3 beats)
CRASH_AUTOMATION = "aivoice: crash flow runs whose heartbeats stopped"
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
    defaults = RetrainParams(params_file=params_file, repo=".", promote=promote, reason=reason)  # "." = the checkout
    return _deploy(ENTRYPOINT, repo, name=name, work_pool=work_pool, schedules=[Cron(cron, timezone=timezone)],
                   paused=paused, parameters={"params": defaults.model_dump()}, concurrency_limit=1, tags=["retrain"],
                   description=f"retrain %s on '{cron}' ({timezone})")


def deploy_monitor(paths: list[str], *, name: str = "traffic", work_pool: str = DEFAULT_POOL, repo: str = ".",
                   cron: str | None = None, timezone: str = "UTC", **options) -> str:
    """Create or update deployment `monitor/<name>`: the monitor flow of the project at `repo` on the traffic
    in `paths` (relative to the project root or absolute), on `cron` or only when triggered, in process work
    pool `work_pool`. `options` are MonitorParams fields (review_count, drift_threshold, ...). Returns its id."""
    params = MonitorParams(paths=[str(p) for p in paths], **options)
    return _deploy(MONITOR_ENTRYPOINT, repo, name=name, work_pool=work_pool, paused=False,
                   schedules=[Cron(cron, timezone=timezone)] if cron else [], parameters={"params": params.model_dump()},
                   concurrency_limit=None, tags=["monitor"], description="monitor traffic of %s" + (f" on '{cron}'" if cron else ""))


def deploy_gc(cron: str, *, name: str = "retention", work_pool: str = DEFAULT_POOL, repo: str = ".",
              timezone: str = "UTC", keep: int | None = None) -> str:
    """Create or update deployment `gc/<name>`: the gc flow (flows/retention.py) of the project at `repo` on
    `cron`, in process work pool `work_pool`. Returns its id."""
    return _deploy(GC_ENTRYPOINT, repo, name=name, work_pool=work_pool, paused=False,
                   schedules=[Cron(cron, timezone=timezone)], parameters={"repo": str(Path(repo).resolve()), "keep": keep},
                   concurrency_limit=1, tags=["gc"], description=f"gc of %s on '{cron}' ({timezone})")


def _deploy(entrypoint: str, repo: str, *, name: str, work_pool: str, tags: list[str], description: str,
            **options) -> str:
    """flow.from_source(<repo>, entrypoint).deploy(...) into process pool `work_pool` (made if missing), with
    heartbeats on and the crash automation in place. `description` has a %s for the project folder."""
    ensure_work_pool(work_pool)
    ensure_crash_automation()
    source = Path(repo).resolve()
    if not (source / entrypoint.split(":")[0]).is_file():
        raise FileNotFoundError(f"{source}: no {entrypoint.split(':')[0]}; `repo` must be the project root")
    deployment_id = flow.from_source(source=str(source), entrypoint=entrypoint).deploy(
        name=name, work_pool_name=work_pool, build=False, push=False, tags=[TAG, *tags],
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}},
        description=description % source, print_next_steps=False, **options)
    return str(deployment_id)


def ensure_crash_automation(within_s: float = CRASH_AFTER_S) -> bool:
    """The automation of Prefect's "detect zombie flows" guide, limited to flow runs tagged `aivoice`: a run
    that sent a heartbeat and then, for `within_s`, neither another one nor a final state, is marked CRASHED
    (its worker or host died with it). Created unless one with this name exists; True when created.
    `within_s` must exceed HEARTBEAT_S with room for a late beat on a busy host."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if within_s <= HEARTBEAT_S:
        raise ValueError(f"within_s={within_s} must exceed the heartbeat period {HEARTBEAT_S} s")
    try:
        Automation.read(name=CRASH_AUTOMATION)
        return False
    except ValueError:   # Automation.read's answer for "no automation with that name"
        pass
    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    Automation(
        name=CRASH_AUTOMATION,
        description=f"a flow run tagged {TAG} without a heartbeat for {within_s:g} s lost its process: mark it CRASHED",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ends},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s:g} s: its worker or host died")],
    ).create()
    return True


def serve(cron: str, *, name: str = "served", params_file: str = "params.yaml",
          promote: Literal["auto", "manual"] | None = None) -> None:
    """No work pool, no worker: this process holds the schedule and runs each flow run as a child
    process until stopped (Ctrl-C pauses the schedule). For one machine; `schedule` is the path to scale."""
    params = RetrainParams(params_file=params_file, promote=promote)
    retrain.serve(name=name, cron=cron, parameters={"params": params.model_dump()})
