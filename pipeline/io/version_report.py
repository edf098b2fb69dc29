"""A registered version's report, from what its MLflow run holds.

validate logs verdict.json, metrics.json, tables.json and held_out_scores.json (every held-out score of
candidate and production, with labels, sources and generators) to the candidate's run. From those and
the version's lineage (registry and run tags) `write` rebuilds the report anywhere (`aivoice report`),
and `publish` builds it once more for validate and logs it to the run under `report/`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.io import tracking
from pipeline.io.archive import ARCHIVED_TAG
from pipeline.io.registry import DEFAULT_NAME, RegistryError, model_version
from pipeline.training.report import build_report

SCORES_ARTIFACT = "held_out_scores.json"
INPUTS = {"verdict": "verdict.json", "metrics": "metrics.json", "tables": "tables.json", "scores": SCORES_ARTIFACT}
REPORT_DIR = "report"


def lineage(client: MlflowClient, name: str, version: int) -> dict:
    """Where a version came from: its run, the champion it was judged against, data and params hashes, code."""
    mv = model_version(int(version), name)
    tags = mv.tags
    run = client.get_run(mv.run_id) if mv.run_id else None
    rtags = run.data.tags if run else {}
    return {
        "model": name, "version": int(mv.version), "mlflow_run_id": mv.run_id,
        "experiment_id": run.info.experiment_id if run else None, "source": tags.get("source"),
        "base_version": tags.get("base_version"), "recipe": tags.get("recipe"),
        "data_hash": tags.get("data_hash"), "base_model_data_hash": rtags.get("base_model_data_hash"),
        "gate_data": tags.get("gate_data"), "params_hash": tags.get("params_hash"),
        "git_commit": tracking.git_commit(tags | rtags), "git_dirty": tags.get("git_dirty"),
        "prefect_flow_run_id": rtags.get("prefect_flow_run_id"), "checkpoint": tags.get("checkpoint"),
    }


def collect(version: int, name: str = DEFAULT_NAME, into: Path | None = None) -> dict:
    """The report's inputs for `version`, downloaded from its run (into a temporary folder unless `into`)."""
    client = tracking.configure()
    lin = lineage(client, name, version)
    run_id = lin["mlflow_run_id"]
    found = {a.path for a in client.list_artifacts(run_id)} if run_id else set()
    missing = [a for a in INPUTS.values() if a not in found]
    if missing:
        archived = model_version(int(version), name).tags.get(ARCHIVED_TAG)
        what = "a base model (bootstrap or import-checkpoint) is not judged by validate" \
            if lin["source"] in ("bootstrap", "import") else \
            f"archived to {archived} by `aivoice gc`; `aivoice restore {version}` puts them back" if archived else \
            "validate logs them"
        raise RegistryError(f"{name} v{version}: its run {run_id} has no {', '.join(missing)} ({what})")
    with tempfile.TemporaryDirectory() as tmp:
        data = {}
        for key, artifact in INPUTS.items():
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp,
                                                       tracking_uri=client.tracking_uri)
            data[key] = json.loads(Path(path).read_text())
            if into is not None:
                into.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, into / artifact)
    description = model_version(int(version), name).description or ""
    return data | {"lineage": lin, "description": description}


def write(version: int, out: Path, name: str = DEFAULT_NAME) -> dict[str, Path]:
    """Rebuild the report of `version` from its run's artifacts: out/report.html and out/plots/*.png."""
    return build_report(collect(version, name), out / "report.html", out / "plots")


def publish(version: int, html_path: Path, plots_dir: Path, name: str = DEFAULT_NAME) -> dict:
    """Build the report of a just-validated version, log it to its run under report/ (report.html and
    plots/), and copy the page to html_path and the PNGs into plots_dir. Returns where it lies."""
    client = tracking.configure()
    with tempfile.TemporaryDirectory() as tmp:
        built = build_report(collect(version, name), Path(tmp) / "report.html", Path(tmp) / "plots")
        lin = lineage(client, name, version)
        try:
            client.log_artifacts(lin["mlflow_run_id"], tmp, REPORT_DIR)
        except MlflowException as exc:
            raise RegistryError(f"{name} v{version}: could not log the report to run {lin['mlflow_run_id']}: {exc}") from exc
        html_path.parent.mkdir(parents=True, exist_ok=True)
        plots_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built["html"], html_path)
        for key in ("det", "sources"):
            shutil.copyfile(built[key], plots_dir / built[key].name)
    run = client.get_run(lin["mlflow_run_id"])
    return {"html": str(html_path), "plots": [str(plots_dir / built[k].name) for k in ("det", "sources")],
            "artifact_uri": f"{run.info.artifact_uri.rstrip('/')}/{REPORT_DIR}/report.html",
            "mlflow_run_id": lin["mlflow_run_id"], "experiment_id": lin["experiment_id"]}
