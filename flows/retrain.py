"""The `retrain` flow: a new candidate from new samples, judged against the champion, promoted or not.

    export_champion -> [dvc pull] -> ingest -> twins -> augment -> finetune -> validate -> [dvc push] -> promote -> report

- export_champion writes the registry's champion to `finetune.base_model` (models/production.pt), so
  the DVC pipeline always fine-tunes and judges against what production serves.
- Each stage runs THROUGH DVC (`dvc repro --single-item <stage>`): dvc.lock stays the record of what
  produced what, and a stage whose inputs did not change is skipped. The validate stage registers the
  candidate (challenger if its gates passed) and writes reports/verdict.json.
- With a default DVC remote (`aivoice remote add`), the outputs dvc.lock records that this checkout
  lacks are pulled before the stages (what is here is never overwritten) and everything the stages produced is pushed after them,
  before anything is promoted: a promoted candidate's data and weights are on the remote.
- Everything after reading params.yaml holds the store's slot of a Prefect global concurrency limit
  (flows.store_limit): two retrains of one store never overlap, whichever deployment or person started them.
- promote reads the verdict: passed + auto -> the challenger becomes champion; passed + manual -> it
  stays challenger for a person to promote; failed -> nothing moves. The report says which and why.

Only export_champion and promote talk to the tracking server from this process: they retry transient
faults (flows.common). A bad params.yaml, a failed gate or a stage that exits non-zero fails at once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from flows.common import TRACKING_RETRIES, in_repo, project_env, scoped_env
from flows.store_limit import one_retrain_per_store
from pipeline.io import dvc_remote, registry
from pipeline.config import apply_threads, load_params

STAGES = ("ingest", "twins", "augment", "finetune", "validate")   # twins: for newly ingested humans (incremental)
DEFAULT_REASON = "retrain flow: candidate passed every validation gate"
SUMMARY_METRICS = ("eer", "auc", "fpr", "recall", "new_recall", "language_accuracy", "speakers_accuracy", "threshold",
                   "n_test", "n_new")


class RetrainParams(BaseModel):
    """What a run of `retrain` needs; a form in the Prefect UI."""

    model_config = ConfigDict(extra="forbid")

    params_file: str = Field("params.yaml", description="settings file, relative to the project root")
    repo: str = Field(".", description="project root: dvc.yaml, params.yaml and the .dvc folder")
    promote: Literal["auto", "manual"] | None = Field(
        None, description="auto: promote a candidate that passed; manual: leave it challenger; empty: registry.promotion")
    reason: str = Field(DEFAULT_REASON, description="recorded with the promotion")
    store_wait_s: float | None = Field(
        7200, ge=0, description="how long to wait while another retrain holds the store (empty: for ever)")


class StageError(RuntimeError):
    """A DVC stage exited non-zero (deterministic: not retried)."""


class RetrainError(RuntimeError):
    """The pipeline's outputs do not say what the flow needs (deterministic: not retried)."""


@task(name="export-champion", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def export_champion(path: str, model_name: str) -> dict:
    """The champion's checkpoint -> finetune.base_model (rewritten only when the champion changed)."""
    resolved = registry.export_champion(path, model_name)
    get_run_logger().info("champion %s v%s -> %s", model_name, resolved.version, path)
    return {"version": resolved.version, "path": path}


def _dvc_stage(stage: str, repo: str) -> dict:
    """Run one stage through DVC in a child process and stream its output into the task's log.

    Why a `dvc repro` process rather than `dvc.repo.Repo(repo).reproduce(...)` in this one:
    - the stage must see this flow run's id ($AIVOICE_FLOW_RUN_ID) and the venv's `python` on PATH;
      a child gets them from its own environment, while the in-process API runs the stage command
      with this process's environment, which we would have to mutate (global, shared by threads);
    - `dvc.repo.Repo` is not DVC's public API (only `dvc.api` is) and keeps process-wide state
      (repo lock, logging, chdir-relative config) across calls;
    - a stage that crashes or runs out of memory takes down its process, not the flow, and the exit
      code is an unambiguous, deterministic failure.
    `sys.executable -m dvc` is the DVC installed beside this interpreter, found without PATH."""
    logger = get_run_logger()
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1"}
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    tail: deque[str] = deque(maxlen=40)
    ran = False
    with subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                ran = ran or f"Running stage '{stage}'" in line
                logger.info("%s", line)
    if proc.returncode != 0:
        raise StageError(f"dvc repro {stage} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    logger.info("stage %s %s", stage, "ran" if ran else "unchanged: skipped by DVC")
    return {"stage": stage, "ran": ran}


@task(name="dvc-pull", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def dvc_pull(repo: str, remote: str) -> None:
    """Outputs dvc.lock records but this checkout lacks (a new worker, a fresh clone), from the remote;
    what is here is never overwritten."""
    pulled = dvc_remote.pull_missing(repo, remote)
    get_run_logger().info("pulled %s from DVC remote %s", ", ".join(pulled) or "nothing (all outputs present)", remote)


@task(name="dvc-push", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def dvc_push(repo: str, remote: str) -> None:
    """Store, twins, copies and candidate to the remote, so another checkout can `dvc pull` them."""
    dvc_remote.push(repo, remote)
    get_run_logger().info("pushed to DVC remote %s", remote)


# one task per stage, so each shows up (and can be inspected) on its own in the UI
STAGE_TASKS = {name: task(_dvc_stage, name=name, cache_policy=NO_CACHE) for name in STAGES}


@task(name="promote", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def promote(verdict: dict, mode: str, reason: str, model_name: str) -> dict:
    """Act on the verdict; idempotent, so a retry or a re-run never promotes twice or undoes a rollback.

    Only the version the verdict names, and only while it is still the challenger, is promoted."""
    logger = get_run_logger()
    version = verdict.get("model_version")
    if version is None:
        raise RetrainError("reports/verdict.json has no model_version: the validate stage did not register the candidate")
    if not verdict["passed"]:
        why = "insufficient evidence: " if verdict.get("status") == "insufficient evidence" else "failed gates: "
        decision = {"action": "rejected", "why": why + "; ".join(verdict["reasons"])}
    else:
        registry.complete_pending(model_name)   # a promotion interrupted on an earlier try is finished first
        current = registry.aliases(model_name)
        if current.get(registry.CHAMPION) == version:
            decision = {"action": "already-champion", "why": f"v{version} is already {registry.CHAMPION}"}
        elif current.get(registry.CHALLENGER) != version:
            decision = {"action": "none", "why": f"v{version} is no longer {registry.CHALLENGER} "
                        f"(now: {current.get(registry.CHALLENGER, 'none')}); it was replaced or rolled back since"}
        elif mode == "manual":
            decision = {"action": "awaiting-approval",
                        "why": f"promotion is manual: v{version} stays {registry.CHALLENGER}; "
                               f"`aivoice promote {version} --reason ...` or the MLflow UI makes it champion"}
        else:
            event = registry.promote(version, reason=reason, name=model_name)
            decision = {"action": "promoted", "previous": event["previous"],
                        "why": f"all gates passed; v{version} is {registry.CHAMPION}, v{event['previous']} is {registry.PREVIOUS}"}
    decision |= {"version": version, "mode": mode}
    logger.info("promotion: %s (%s)", decision["action"], decision["why"])
    return decision


@task(name="report", cache_policy=NO_CACHE)
def publish_report(summary: dict, verdict: dict, metrics: dict, tables: dict) -> None:
    """A link artifact to the version's model report (logged to its MLflow run), a markdown artifact (verdict,
    promotion, links, gates, metrics, before/after) and a table artifact (per-generator metrics of the
    candidate), all attached to this flow run."""
    if link := _report_link(summary["tracking_uri"], verdict.get("report")):
        create_link_artifact(link=link, link_text=f"model report of v{summary['model_version']}", key="retrain-model-report",
                             description=f"v{summary['model_version']}: report.html in its MLflow run's artifacts (report/)")
    create_markdown_artifact(markdown=_markdown(summary, verdict, metrics), key="retrain-report",
                             description=f"retrain: v{summary['model_version']} {summary['promotion']['action']}")
    per_gen = (tables.get("candidate") or {}).get("per_generator") or {}
    rows = [{"generator": gen} | {k: _round(v) for k, v in m.items()} for gen, m in sorted(per_gen.items())]
    if rows:
        create_table_artifact(table=rows, key="retrain-per-generator",
                              description=f"candidate v{summary['model_version']}: metrics per generator (AI clips vs all humans)")


@flow(name="retrain")
def retrain(params: RetrainParams = RetrainParams()) -> dict:
    """Retrain on new samples through DVC, validate against the champion, promote by the verdict."""
    logger = get_run_logger()
    repo = Path(params.repo).resolve()
    cfg = load_params(repo / params.params_file)       # a bad params file fails here, before any work
    apply_threads(cfg)                                   # compute.threads here; each DVC stage sets its own
    mode = params.promote or cfg.registry.promotion
    run_id = flow_run.get_id()
    name = cfg.registry.model_name
    logger.info("retrain %s in %s (promotion: %s)", name, repo, mode)
    with one_retrain_per_store(in_repo(repo, cfg.ingest.store), params.store_wait_s) as held, \
            scoped_env(project_env(repo, run_id)):       # stages tag their MLflow runs with this flow run
        champion = export_champion(str(in_repo(repo, cfg.finetune.base_model)), name)
        remote = dvc_remote.default(repo)
        if remote:
            dvc_pull(str(repo), remote)
        stages = {stage: STAGE_TASKS[stage](stage, str(repo))["ran"] for stage in STAGES}
        if remote:
            dvc_push(str(repo), remote)
        verdict = _read_json(in_repo(repo, cfg.validation.verdict))
        metrics = _read_json(in_repo(repo, cfg.validation.metrics))
        tables = _read_json(in_repo(repo, cfg.validation.tables))
        decision = promote(verdict, mode, f"{params.reason} (Prefect flow run {run_id})", name)
        summary = {
            "flow_run_id": run_id, "model_name": name, "champion_before": champion["version"], "stages": stages,
            "passed": verdict["passed"], "status": verdict.get("status", "passed" if verdict["passed"] else "failed"),
            "reasons": verdict["reasons"], "model_version": verdict.get("model_version"),
            "mlflow_run_id": verdict.get("mlflow_run_id"), "tracking_uri": _without_credentials(os.environ.get("MLFLOW_TRACKING_URI", "")),
            "promotion": decision, "verdict_is_fresh": stages["validate"], "dvc_remote": remote,
        }
        publish_report(summary, verdict, metrics, tables)
        summary["store_limit"] = held | {"done_at": time.time()}   # the guarded section, for audits and tests
    return summary


def run_retrain(params_file: str = "params.yaml", promote: Literal["auto", "manual"] | None = None, *,
                reason: str = DEFAULT_REASON, repo: str = ".") -> dict:
    """Run `retrain` once, here (for the CLI); returns its summary, raises what failed it."""
    return retrain(RetrainParams(params_file=params_file, repo=repo, promote=promote, reason=reason))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RetrainError(f"{path}: missing; the validate stage writes it")
    return json.loads(path.read_text())


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def _markdown(s: dict, verdict: dict, metrics: dict) -> str:
    p = s["promotion"]
    head = f"# Retrain of {s['model_name']}: candidate v{s['model_version']} {s['status'].upper()}"
    lines = [head, "", f"**Promotion ({p['mode']}): {p['action']}** - {p['why']}", ""]
    if not s["verdict_is_fresh"]:
        lines += ["_The validate stage was skipped (inputs unchanged): this verdict is from an earlier run._", ""]
    run_link = _mlflow_run_link(s["tracking_uri"], s["mlflow_run_id"])
    report = _report_link(s["tracking_uri"], verdict.get("report"))
    lines += [
        f"- Prefect flow run: `{s['flow_run_id']}` (tagged `prefect_flow_run_id` on the MLflow run)",
        f"- MLflow run: {run_link}; registered version: v{s['model_version']}",
        f"- model report: [report.html]({report}) (`aivoice report {s['model_version']}` rebuilds it)" if report
        else "- model report: none (the verdict predates reports)",
        f"- champion before this run: v{s['champion_before']}",
        "- stages: " + ", ".join(f"{k} {'ran' if ran else 'skipped'}" for k, ran in s["stages"].items()),
        f"- recipe: {verdict.get('recipe')}; evidence: {verdict.get('evidence')}; candidates judged on this gate data: "
        f"{verdict.get('tries_on_gate_data')}",
        "", "## Gates", "", "| gate | value | estimate (95 % interval, count) | rule | passed |", "|---|---|---|---|---|",
    ]
    for gate, g in verdict.get("gates", {}).items():
        est = f"{g['estimate']} ({g['interval'][0]}-{g['interval'][1]}, {g['count']})" if "estimate" in g else ""
        lines.append(f"| {gate} | {g['value']} | {est} | {g['rule']} | {'yes' if g['passed'] else '**NO**'} |")
    if s["reasons"]:
        lines += ["", "Why it did not pass:", *[f"- {r}" for r in s["reasons"]]]
    points = verdict.get("operating_points") or {}
    if points:
        lines += ["", "## Both models at the same human false-positive rate (test humans)", "",
                  "| human FPR | candidate: new generator (held out) | champion: new generator | candidate: earlier AI | "
                  "champion: earlier AI |", "|---|---|---|---|---|"]
        for c, p in zip(points["candidate"], points["production"]):
            lines.append(f"| {c['human_fpr']:.0%} | {_round(c['new_recall'])} | {_round(p['new_recall'])} | "
                         f"{_round(c['earlier_ai_recall'])} | {_round(p['earlier_ai_recall'])} |")
    cand, prod = metrics.get("candidate", {}), metrics.get("production", {})
    lines += ["", "## Candidate vs champion (same held-out data)", "", "| metric | candidate | champion |", "|---|---|---|"]
    lines += [f"| {k} | {_round(cand.get(k))} | {_round(prod.get(k))} |" for k in SUMMARY_METRICS if k in cand]
    lines += ["", "## Before / after on the new samples", "",
              "| file | generator | champion | candidate | candidate trained on it | candidate (held out) |",
              "|---|---|---|---|---|---|"]
    for r in verdict.get("before_after", []):
        lines.append(f"| {r['file']} | {r['generator']} | {r['production']} | {r['candidate']} | "
                     f"{'yes' if r['trained_on_it'] else 'no (test split)'} | {r['candidate_held_out']} |")
    lines += ["", f"New-generator recall measured {verdict.get('lofo_method', 'n/a')}; calibrated threshold {verdict.get('threshold')}."]
    return "\n".join(lines)


def _without_credentials(uri: str) -> str:
    """A tracking URI safe to show in an artifact: user:password@ removed."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
    return uri


def _report_link(uri: str, report: dict | None) -> str | None:
    """The report in the MLflow UI when a tracking server is used, else its artifact file."""
    if not report:
        return None
    if uri.startswith(("http://", "https://")):
        return (f"{uri.rstrip('/')}/#/experiments/{report['experiment_id']}/runs/{report['mlflow_run_id']}"
                "/artifactPath/report/report.html")
    return report["artifact_uri"]


def _mlflow_run_link(uri: str, run_id: str | None) -> str:
    if not run_id:
        return "none"
    if uri.startswith(("http://", "https://")):
        return f"[`{run_id}`]({uri.rstrip('/')}/#/runs/{run_id})"
    return f"`{run_id}` (store {uri or 'mlruns/'}; `aivoice ui` to browse)"
