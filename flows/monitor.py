"""The `monitor` flow: score production traffic with the champion, watch the score distribution,
and queue the clips the model is least sure about for a person to label.

    resolve champion -> load its validation scores (reference) -> score traffic -> drift
        -> log to MLflow (<model>-monitoring, one run per flow run) -> review queue -> report

- Day of a clip: the nearest folder named YYYY-MM-DD above it (traffic/2024-05-01/x.wav), else the
  file's modification date (UTC). Per-day metrics use step = days since 1970-01-01, so runs line up.
- Drift: PSI (default) or the KS statistic of today's scores against the champion's validation scores
  (human and AI), read from the JSON artifact `reference_artifact` of the MLflow run that registered
  the champion (or, for a bootstrapped model, the `val_scores` of its bootstrap_report.json); without
  either the report says "no reference". A flag means the score distribution moved
  - a new generator, a new channel or a changed human/AI mix - and is a prompt to look at the queue.
- Review queue: the `review_count` clips closest to the threshold are COPIED (originals are only read)
  into <review_dir>/<time>-<run>/ with MANIFEST.csv. A person fills `label` (human|ai) and, for AI,
  `generator`, deletes rows they cannot decide, then runs `aivoice ingest --corpus <that folder>`.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tempfile
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from mlflow.entities import Metric, Param
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from flows.common import TRACKING_RETRIES
from pipeline import atomic
from pipeline.core import drift
from pipeline.io import registry, tracking
from pipeline.core.audio import find_audio
from pipeline.config import Params, apply_threads, load_params
from pipeline.apps.detect import AI_GENERATED, detect_files
from pipeline.core.model import load_checkpoint
from pipeline.core.scoring import Scorer, threshold_mismatch

REVIEW_MANIFEST = "MANIFEST.csv"   # the name `aivoice ingest --corpus <folder>` reads
REVIEW_COLUMNS = ("path", "ai_score", "threshold", "suggested_label", "label", "generator", "original_path", "day",
                  "model_version")
_DAY_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_EPOCH = date(1970, 1, 1)


class MonitorParams(BaseModel):
    """What a run of `monitor` needs; a form in the Prefect UI."""

    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(..., min_length=1, description="production traffic: audio files or folders (recursive)")
    params_file: str = Field("params.yaml", description="settings file")
    model: str = Field("champion", description="registry alias, version or models:/ URI to score with")
    drift_metric: Literal["psi", "ks"] = Field("psi", description="psi: population stability index; ks: KS statistic")
    drift_threshold: float = Field(0.2, gt=0, description="flag drift when the metric exceeds this (PSI > 0.2: large shift)")
    bins: int = Field(10, ge=2, le=100, description="histogram bins on [0, 1]")
    min_clips: int = Field(20, ge=1, description="with fewer scored clips, drift is not judged")
    review_dir: str = Field("data/review", description="where review batches are written")
    review_count: int = Field(20, ge=0, description="clips closest to the threshold to queue for labelling")
    suggest_labels: bool = Field(False, description="pre-fill suggested_label with the model's verdict (off: blind review)")
    reference_artifact: str = Field("validation_scores.json", description="champion run artifact with validation scores")
    device: str = Field("cpu", description="inference device: cpu, cuda or auto")


@task(name="resolve-model", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def resolve_model(ref: str, model_name: str) -> dict:
    """The registry version behind `ref`, its local checkpoint (cached download) and its MLflow run."""
    resolved = registry.resolve(ref, model_name)
    run_id = None
    if resolved.version is not None:
        run_id = tracking.configure().get_model_version(model_name, str(resolved.version)).run_id
    get_run_logger().info("scoring with %s v%s (%s)", model_name, resolved.version, ref)
    return {"version": resolved.version, "alias": resolved.alias, "checkpoint": str(resolved.checkpoint_path),
            "run_id": run_id}


BOOTSTRAP_REPORT = "bootstrap_report.json"   # logged by pipeline.stages.bootstrap; has val_scores


@task(name="load-reference", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def load_reference(run_id: str | None, artifact: str) -> list[float] | None:
    """Validation scores logged with the model's run: `artifact`, else a bootstrap run's report; None if neither."""
    logger = get_run_logger()
    if run_id is None:
        logger.warning("no reference: the model is not a registry version with a run")
        return None
    client = tracking.configure()
    for name in dict.fromkeys((artifact, BOOTSTRAP_REPORT)):
        folder = str(Path(name).parent) if Path(name).parent != Path(".") else None
        if name not in {f.path for f in client.list_artifacts(run_id, folder)}:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            scores = reference_scores(json.loads(Path(client.download_artifacts(run_id, name, tmp)).read_text()))
        if scores:
            logger.info("reference: %d validation scores from %s of run %s", len(scores), name, run_id)
            return scores
    logger.warning("no reference: run %s has neither %s nor %s with scores", run_id, artifact, BOOTSTRAP_REPORT)
    return None


def reference_scores(data) -> list[float]:
    """AI scores from a reference artifact: {"scores": [...]}, a bootstrap report ({"val_scores": [{"ai_score"}]}),
    or a plain list of numbers or of {"ai_score": ...} rows; [] when it holds none."""
    if isinstance(data, dict):
        data = data.get("scores", data.get("val_scores", []))
    if not isinstance(data, list):
        return []
    return [float(x["ai_score"] if isinstance(x, dict) else x) for x in data
            if not isinstance(x, dict) or x.get("ai_score") is not None]


@task(name="score-traffic", cache_policy=NO_CACHE)
def score_traffic(paths: list[str], checkpoint: str, params: Params, device: str) -> dict:
    """AI score of every clip (streamed; an undecodable file is an error row, the rest go on)."""
    files = find_audio(paths)
    if not files:
        raise FileNotFoundError(f"no audio files in {', '.join(paths)}")
    model = load_checkpoint(checkpoint, params.audio)
    threshold = model.meta.threshold
    mismatch = threshold_mismatch(model.meta, params)
    if mismatch:
        get_run_logger().warning("the model's threshold was calibrated with other scoring settings: %s; its "
                                 "false-positive rate does not hold here", mismatch)
    scorer = Scorer(model, params.audio, device)
    rows = [{"path": d.path, "ai_score": d.ai_score, "ai": d.label == AI_GENERATED, "error": d.error,
             "day": clip_day(Path(d.path)).isoformat()} for d in detect_files(files, scorer, params, threshold)]
    get_run_logger().info("scored %d clip(s), %d error(s)", sum(r["error"] is None for r in rows),
                          sum(r["error"] is not None for r in rows))
    return {"threshold": threshold, "rows": rows}


def clip_day(path: Path) -> date:
    """The nearest YYYY-MM-DD folder above the clip, else its modification date (UTC)."""
    for part in reversed(path.parent.parts):
        if _DAY_FOLDER.match(part):
            try:
                return date.fromisoformat(part)
            except ValueError:
                continue
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).date()


def summarize(rows: list[dict], reference: list[float] | None, opts: MonitorParams) -> dict:
    """AI rate and score histogram, overall and per day, and the drift verdict."""
    scored = [r for r in rows if r["error"] is None]
    scores = [r["ai_score"] for r in scored]
    per_day = []
    for day in sorted({r["day"] for r in scored}):
        s = [r for r in scored if r["day"] == day]
        per_day.append({"day": day, "n": len(s), "ai_rate": round(float(np.mean([r["ai"] for r in s])), 4),
                        "mean_score": round(float(np.mean([r["ai_score"] for r in s])), 4),
                        "histogram": drift.histogram([r["ai_score"] for r in s], opts.bins)[0]})
    counts, edges = drift.histogram(scores, opts.bins)
    return {"n_clips": len(rows), "n_scored": len(scored), "n_errors": len(rows) - len(scored),
            "ai_rate": round(float(np.mean([r["ai"] for r in scored])), 4) if scored else None,
            "histogram": {"edges": edges, "counts": counts}, "per_day": per_day,
            "drift": drift.judge(scores, reference, opts.drift_metric, opts.drift_threshold, opts.min_clips, opts.bins)}


@task(name="log-to-mlflow", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def log_to_mlflow(summary: dict, rows: list[dict], model: dict, model_name: str, opts: MonitorParams,
                  run_id: str | None) -> str:
    """One run per flow run in `<model>-monitoring` (a retry reuses it): overall metrics, per-day metrics
    at step = day index, the histogram as metric `score_hist_share` at step = bin, JSON and table artifacts."""
    client = tracking.configure()
    exp = tracking.experiment_id(client, f"{model_name}-monitoring")
    found = client.search_runs([exp], filter_string=f"tags.prefect_flow_run_id = '{run_id}'") if run_id else []
    tags = {"model_version": str(model["version"]), "model_ref": opts.model, "drift_status": summary["drift"]["status"]}
    tags |= {"prefect_flow_run_id": run_id} if run_id else {}
    run = found[0] if found else client.create_run(exp, run_name=f"monitor {date.today().isoformat()}", tags=tags)
    rid = run.info.run_id
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    d = summary["drift"]
    overall = {"n_clips": summary["n_clips"], "n_scored": summary["n_scored"], "n_errors": summary["n_errors"],
               "ai_rate": summary["ai_rate"], "drift_psi": d["psi"], "drift_ks": d["ks"],
               "drift_flag": None if d["flagged"] is None else float(d["flagged"]), "review_queued": summary["review"]["n"]}
    metrics = [Metric(k, float(v), now, 0) for k, v in overall.items() if v is not None]
    total = max(summary["n_scored"], 1)
    metrics += [Metric("score_hist_share", c / total, now, i) for i, c in enumerate(summary["histogram"]["counts"])]
    for day in summary["per_day"]:
        when = date.fromisoformat(day["day"])
        ts, step = int(datetime(when.year, when.month, when.day, tzinfo=timezone.utc).timestamp() * 1000), (when - _EPOCH).days
        metrics += [Metric("daily_ai_rate", float(day["ai_rate"]), ts, step), Metric("daily_n_clips", float(day["n"]), ts, step),
                    Metric("daily_mean_score", float(day["mean_score"]), ts, step)]
    params = [Param(k, str(v)) for k, v in {"drift_metric": opts.drift_metric, "drift_threshold": opts.drift_threshold,
                                             "bins": opts.bins, "model_version": model["version"]}.items()]
    for i in range(0, len(metrics), 1000):   # MLflow's batch limit
        client.log_batch(rid, metrics=metrics[i:i + 1000], params=params if i == 0 else [])  # same values on a retry
    client.set_tag(rid, "drift_status", d["status"])
    client.log_dict(rid, {k: summary[k] for k in ("histogram", "per_day", "drift")}, "score_histogram.json")
    client.log_table(rid, _scores_frame(rows), "scores.json")
    client.set_terminated(rid)
    get_run_logger().info("MLflow run %s in %s-monitoring", rid, model_name)
    return rid


def _scores_frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows, columns=["path", "day", "ai_score", "ai", "error"])


@task(name="queue-for-review", cache_policy=NO_CACHE)
def queue_for_review(rows: list[dict], threshold: float, model_version: int | None, opts: MonitorParams,
                     run_id: str | None) -> dict:
    """Copy the least certain clips into a new review folder with a MANIFEST.csv to fill in."""
    scored = [r for r in rows if r["error"] is None]
    picked = [scored[i] for i in drift.least_certain([r["ai_score"] for r in scored], threshold, opts.review_count)]
    if not picked:
        return {"folder": None, "csv": None, "n": 0}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(opts.review_dir) / f"{stamp}-{(run_id or 'local')[:8]}"
    folder.mkdir(parents=True, exist_ok=False)
    entries = []
    for rank, r in enumerate(picked):
        src = Path(r["path"])
        copy = folder / f"{rank:03d}_{src.name}"
        shutil.copyfile(src, copy)          # the original is only read
        suggested = ("ai" if r["ai"] else "human") if opts.suggest_labels else ""
        entries.append({"path": copy.name, "ai_score": r["ai_score"], "threshold": round(threshold, 6),
                        "suggested_label": suggested, "label": "", "generator": "", "original_path": str(src.resolve()),
                        "day": r["day"], "model_version": "" if model_version is None else model_version})
    manifest = folder / REVIEW_MANIFEST
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=REVIEW_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(entries)
    atomic.write_text(manifest, buf.getvalue())
    atomic.write_text(folder / "README.txt",
        "Clips the detector was least sure about (closest to its threshold), copied from production traffic.\n"
        "1. Listen; fill `label` with human or ai (and `generator` for AI, if known); delete rows you cannot decide.\n"
        f"2. aivoice ingest --corpus {folder}\n"
        "   (rows without a label are refused, naming the line)\n")
    get_run_logger().info("queued %d clip(s) for review in %s", len(entries), folder)
    return {"folder": str(folder), "csv": str(manifest), "n": len(entries)}


@flow(name="monitor")
def monitor(params: MonitorParams) -> dict:
    """Score traffic with the champion, log its distribution and drift to MLflow, queue clips for review."""
    cfg = load_params(params.params_file)
    apply_threads(cfg)                      # compute.threads: the traffic is scored in this process
    name = cfg.registry.model_name
    run_id = flow_run.get_id()
    model = resolve_model(params.model, name)
    reference = load_reference(model["run_id"], params.reference_artifact)
    scored = score_traffic(params.paths, model["checkpoint"], cfg, params.device)
    summary = summarize(scored["rows"], reference, params)
    summary["review"] = queue_for_review(scored["rows"], scored["threshold"], model["version"], params, run_id)
    summary |= {"flow_run_id": run_id, "model_name": name, "model_version": model["version"],
                "threshold": scored["threshold"]}
    summary["mlflow_run_id"] = log_to_mlflow(summary, scored["rows"], model, name, params, run_id)
    _publish(summary)
    return summary


def _publish(s: dict) -> None:
    d = s["drift"]
    value = "n/a" if d["value"] is None else f"{d['value']:.4f} ({d['metric']}, flag above {d['threshold']})"
    lines = [f"# Monitoring {s['model_name']} v{s['model_version']}: {d['status'].upper()}", "",
             f"- clips: {s['n_clips']} ({s['n_scored']} scored, {s['n_errors']} errors); AI rate {s['ai_rate']}",
             f"- drift vs the model's validation scores: {value}; PSI {d['psi']}, KS {d['ks']}, "
             f"{d['n_reference']} reference scores",
             f"- review queue: {s['review']['n']} clip(s) in `{s['review']['folder']}`; fill `label` in MANIFEST.csv, "
             f"then `aivoice ingest --corpus <folder>`",
             f"- MLflow run `{s['mlflow_run_id']}` in `{s['model_name']}-monitoring` (tag prefect_flow_run_id)",
             "", "| day | clips | AI rate | mean score |", "|---|---|---|---|"]
    lines += [f"| {p['day']} | {p['n']} | {p['ai_rate']} | {p['mean_score']} |" for p in s["per_day"]]
    create_markdown_artifact(markdown="\n".join(lines), key="monitor-report", description=f"monitor: {d['status']}")
    if s["per_day"]:
        create_table_artifact(table=[{k: v for k, v in p.items() if k != "histogram"} for p in s["per_day"]],
                              key="monitor-per-day", description="AI rate per day")


def run_monitor(paths: list[str], params_file: str = "params.yaml", **options) -> dict:
    """Run `monitor` once, here (for the CLI); `options` are MonitorParams fields (review_count, ...)."""
    return monitor(MonitorParams(paths=[str(p) for p in paths], params_file=params_file, **options))
