"""MLflow plumbing shared by training, the registry and serving.

Store: $MLFLOW_TRACKING_URI when set, else the local sqlite store `mlruns/mlflow.db`. For a sqlite
store, artifacts go to `artifacts/` beside the database (so `mlruns/artifacts` by default) unless
$AIVOICE_ARTIFACT_ROOT names another folder; a tracking server decides its own artifact root.
Downloaded checkpoints are cached in `.cache/` beside a sqlite store ($AIVOICE_CACHE_DIR overrides).

A checkpoint is logged as an MLflow 3 LoggedModel: a pyfunc (`DetectorPyfunc`, logged as models-from-code
through `pyfunc_model.py`, not pickled) carrying the checkpoint file as its one artifact. Loading it needs
this package installed, never the network.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from pydantic import BaseModel

from pipeline.atomic import pid_alive
from pipeline.config import AudioConfig, FeatureConfig, Params, params_hash
from pipeline.core.model import ModelMeta, load_checkpoint
from pipeline.io.local_registry import DEFAULT_STORE_DIR, cache_dir, default_uri  # noqa: F401 (re-exported)
from pipeline.io.local_registry import sqlite_path as _sqlite_path

log = logging.getLogger(__name__)

ARTIFACT_ROOT_ENV = "AIVOICE_ARTIFACT_ROOT"
CHECKPOINT_ARTIFACT = "checkpoint"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # models-from-code: MLflow runs it on load
_PYFUNC_REQUIREMENTS = ("torch", "torchaudio", "numpy", "soundfile", "soxr", "pandas", "pydantic", "pyyaml", "tqdm", "mlflow")


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the local `sqlite:///<abs>/mlruns/mlflow.db`; a new sqlite store is created here."""
    uri = default_uri()
    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        _create_sqlite_store(uri, db)
    return uri


def configure() -> MlflowClient:
    """Point MLflow's fluent API at `tracking_uri()` and return a client for it (the registry follows
    the tracking store unless $MLFLOW_REGISTRY_URI says otherwise)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def artifact_root(uri: str) -> Path | None:
    """Artifact root of a sqlite store: $AIVOICE_ARTIFACT_ROOT, else `artifacts/` beside the db. None for a server."""
    db = _sqlite_path(uri)
    if db is None:
        return None
    env = os.environ.get(ARTIFACT_ROOT_ENV)
    return Path(env).resolve() if env else db.parent / "artifacts"


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of experiment `name`, created (with its artifacts under the store's artifact root) when missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = artifact_root(client.tracking_uri)
    location = (root / name).as_uri() if root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # created concurrently by another process
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _create_sqlite_store(uri: str, db: Path) -> None:
    """Create the database so that even the Default experiment keeps its artifacts under our root."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    root = artifact_root(uri)
    root.mkdir(parents=True, exist_ok=True)
    SqlAlchemyStore(uri, root.as_uri())


FLOW_RUN_ENV = "AIVOICE_FLOW_RUN_ID"


@contextmanager
def training_run(params: Params, run_name: str, *, run_id: str | None = None, data_hash: str = "") -> Iterator:
    """Start (or, given run_id, resume) an MLflow run in the registry's experiment. A new run gets the
    flattened params, lineage tags and, when a Prefect flow runs it, the flow run id ($AIVOICE_FLOW_RUN_ID)."""
    client = configure()
    exp = experiment_id(client, params.registry.experiment)
    end_dead_runs(client, [exp])
    with mlflow.start_run(run_id=run_id, experiment_id=exp, run_name=None if run_id else run_name) as run:
        mlflow.set_tags(owner_tags())
        if run_id is None:
            mlflow.log_params(flatten_params(params))
            tags = lineage_tags(params_hash=params_hash(params), data_hash=data_hash) | {"stage": run_name}
            if flow_run := os.environ.get(FLOW_RUN_ENV):
                tags["prefect_flow_run_id"] = flow_run
            mlflow.set_tags(tags)
        yield run


HOST_TAG, PID_TAG = "aivoice.host", "aivoice.pid"


def owner_tags() -> dict[str, str]:
    """The process that holds a run open, so that a later process can tell the run was orphaned by a kill."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def end_dead_runs(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """Mark KILLED the RUNNING runs of these experiments whose owning process (this host, tagged pid) is
    gone: a SIGKILL or an OOM kill leaves a run RUNNING forever otherwise. Returns their ids."""
    host, ended = socket.gethostname(), []
    for run in client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) == host and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            client.set_tag(run.info.run_id, "killed_reason", f"process {pid} on {host} died while the run was open")
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
            log.warning("MLflow run %s was left RUNNING by process %s, which is gone: marked KILLED", run.info.run_id, pid)
    return ended


def log_history(history: list[dict]) -> None:
    """Per-epoch metrics of a training loop (every numeric key except `epoch`), stepped by epoch."""
    for row in history:
        mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch" and v == v}, step=int(row["epoch"]))


def flatten_params(params: BaseModel) -> dict[str, str]:
    """{"section.key": str(value)} for MLflow params; values over MLflow's length limit are truncated."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            text = json.dumps(value) if isinstance(value, list) else str(value)
            flat[prefix] = text[:MAX_PARAM_VAL_LENGTH]

    walk("", params.model_dump(mode="json"))
    return flat


def lineage_tags(*, params_hash: str = "", data_hash: str = "", repo: str | Path = ".") -> dict[str, str]:
    """MLflow's own `mlflow.source.git.commit` (the UI shows it; left out outside git or before the first
    commit, as MLflow does), git_dirty ("unknown" outside git), params_hash, data_hash.

    Set explicitly because MLflow derives its commit from the entry script's folder, which for the
    `aivoice` console script is the virtualenv, not this repository."""
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return ({MLFLOW_GIT_COMMIT: commit} if commit else {}) | {"git_dirty": dirty, "params_hash": params_hash,
                                                              "data_hash": data_hash}


def git_commit(tags: dict[str, str]) -> str:
    """The commit a run or version was made from: MLflow's tag, or `git_commit` (before MLflow's tag was
    used); "unknown" when neither is there."""
    return tags.get(MLFLOW_GIT_COMMIT) or tags.get("git_commit") or "unknown"


def _git(repo: str | Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def params_from_meta(meta: ModelMeta) -> Params:
    """Settings a checkpoint was trained with (audio, features); other sections at their defaults."""
    def pick(section: type[BaseModel], values: dict) -> BaseModel:
        return section.model_validate({k: v for k, v in values.items() if k in section.model_fields})

    return Params(audio=pick(AudioConfig, meta.audio), features=pick(FeatureConfig, meta.features))


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc over a checkpoint. Input: DataFrame with `audio_path` (files) or `audio` (float lists at the
    model's sample rate). Output: DataFrame with ai_score, label and error (None when scored)."""

    def load_context(self, context) -> None:
        from pipeline.core.scoring import Scorer

        model = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.params = params_from_meta(model.meta)
        self.threshold = model.meta.threshold
        self.scorer = Scorer(model, self.params.audio, "cpu", channels_last=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from pipeline.apps.detect import AI_GENERATED, HUMAN, detect_files
        from pipeline.core.scoring import score_arrays

        if "audio_path" in model_input.columns:
            found = detect_files([Path(p) for p in model_input["audio_path"]], self.scorer, self.params, self.threshold)
            rows = [{"ai_score": d.ai_score, "label": d.label, "error": d.error} for d in found]
        else:
            clips = [np.asarray(a, np.float32) for a in model_input["audio"]]
            scores = score_arrays(self.scorer, clips, self.params.audio, self.params.detect)
            rows = [{"ai_score": s.ai_score, "label": AI_GENERATED if s.ai_score >= self.threshold else HUMAN, "error": None}
                    for s in scores]
        return pd.DataFrame(rows, columns=["ai_score", "label", "error"])


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "audio_path", required=False), ColSpec(Array("double"), "audio", required=False)]),
    outputs=Schema([ColSpec("double", "ai_score"), ColSpec("string", "label"), ColSpec("string", "error", required=False)]),
)


def log_checkpoint_model(ckpt_path: str | Path, name: str = "model") -> str:
    """Log a checkpoint as a pyfunc LoggedModel (in the active run, if any); returns its `models:/<model_id>` URI."""
    example = pd.DataFrame({"audio": [np.sin(np.arange(1200, dtype=np.float32) * 0.1).round(4).tolist()]})
    info = mlflow.pyfunc.log_model(
        name=name, python_model=str(PYFUNC_CODE), artifacts={CHECKPOINT_ARTIFACT: str(ckpt_path)},
        signature=SIGNATURE, input_example=example, pip_requirements=_pinned_requirements(),
    )
    return info.model_uri


def _pinned_requirements() -> list[str]:
    """Installed versions of what the pyfunc imports (given explicitly: inferring them costs seconds)."""
    return [f"{pkg}=={importlib.metadata.version(pkg)}" for pkg in _PYFUNC_REQUIREMENTS]
