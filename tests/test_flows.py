"""Prefect flows on real audio, a real MLflow store and a real DVC + git project.

Risks covered: a failed gate promotes nothing; a passing candidate moves champion (auto) or waits as
challenger (manual); a transient registry fault is retried and a deterministic one is not; a re-run
with nothing new is a no-op that never promotes twice; monitoring flags drift, queues the least
certain clips without touching the originals, and the queue goes back in through `aivoice ingest`.
The suite shares one Prefect test backend (prefect_test_harness); each test has its own MLflow store.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
import yaml
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from pipeline.core import drift
from flows.common import is_transient
from pipeline.config import ParamsError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "ai-voice-detector"
TINY = {"model": {"base_width": 8}, "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 8},
        "finetune": {"epochs": 3, "replay_per_class": 8}, "augment": {"copies": 2},
        "twins": {"vocoders": ["griffinlim"]}}
# every gate as strict as the config allows: a tiny CPU model cannot be perfect on real speech
STRICT_GATES = {"min_new_recall": 1.0, "max_human_fpr": 0.0, "max_recall_drop": 0.0, "max_eer_increase": 0.0,
                "min_calibration_humans": 1}   # enough evidence by rule, so the gates themselves decide
RELAXED_GATES = {"min_new_recall": 0.0, "max_human_fpr": 1.0, "max_recall_drop": 1.0, "max_eer_increase": 1.0,
                 "min_calibration_humans": 1, "pessimistic": [], "max_tries_per_split": 0}


# --- helpers shared with test_prefect_server ---

def _run(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


def make_project(root: Path, corpus, *, gates: dict, promotion: str = "manual") -> Path:
    """A fresh project: dvc.yaml, pipeline/, flows/, tiny params, git + dvc init, the corpus ingested
    into the store, and two clips of a new generator waiting in data/incoming."""
    from pipeline.apps.cli import main as aivoice

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")   # as a clone has it (DVC refuses an ignored dvc.lock)
    for package in ("pipeline", "flows"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["validate"]["gates"].update(gates)
    params["registry"]["promotion"] = promotion
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    with contextlib.chdir(root):
        assert aivoice(["ingest", "--corpus", str(corpus.root)]) == 0, "the starting corpus is ingested"
    incoming = root / "data" / "incoming" / "ai" / "piper-joe"
    incoming.mkdir(parents=True)
    for clip in sorted(corpus.new_generator_dir.glob("*.wav"))[:2]:
        shutil.copy(clip, incoming / clip.name)
    return root


def run_tags(run_id: str) -> dict:
    from pipeline.io import tracking

    return tracking.configure().get_run(run_id).data.tags


# --- fast tests: which errors are transient, the drift statistics ---

@pytest.mark.parametrize("exc", [
    ConnectionRefusedError("refused"),
    TimeoutError("timed out"),
    MlflowException("try later", error_code=TEMPORARILY_UNAVAILABLE),
    RestException({"error_code": "INTERNAL_ERROR", "message": "server fell over"}),
    RestException({"error_code": "503", "message": "bad gateway"}),
    MlflowException("API request to http://mlflow:5000/api/2.0/mlflow/runs/get failed with exception Max retries"),
])
def test_transient_faults_are_retried(exc):
    assert is_transient(exc), f"{exc!r} is a transient fault: the task should retry it"


def test_transient_cause_counts_through_a_wrapper():
    # given a library that wraps a refused connection in its own error
    try:
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as inner:
            raise RuntimeError("registry call failed") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert is_transient(wrapped), "a transient cause anywhere in the chain makes the fault transient"


@pytest.mark.parametrize("exc", [
    MlflowException("bad alias", error_code=INVALID_PARAMETER_VALUE),
    MlflowException("local bug with the default error code"),
    ParamsError("params.yaml: validate.gates.min_new_recall: too big"),
    ValueError("refusing to promote v3: validation_status=failed"),
    RuntimeError("dvc repro finetune failed (exit 2)"),
])
def test_deterministic_faults_are_not_retried(exc):
    assert not is_transient(exc), f"{exc!r} fails the same way every time: no retry"


def test_psi_and_ks_are_zero_for_the_same_scores_and_large_for_a_shift():
    same = [0.1, 0.2, 0.3, 0.8, 0.9]
    assert drift.psi(same, same) == pytest.approx(0.0), "identical distributions have PSI 0"
    assert drift.ks_statistic(same, same) == pytest.approx(0.0), "identical distributions have KS 0"
    assert drift.psi([0.05] * 50, [0.95] * 50) > 1.0, "all mass moved across the range is a large PSI"
    assert drift.ks_statistic([0.05] * 50, [0.95] * 50) == pytest.approx(1.0), "disjoint samples have KS 1"


def test_drift_verdict_needs_a_reference_and_enough_clips_then_flags_a_shift():
    low, high = [0.05] * 40, [0.95] * 40
    assert drift.judge(high, None, "psi", 0.2, min_clips=20)["status"] == "no reference"
    few = drift.judge(high[:5], low, "psi", 0.2, min_clips=20)
    assert few["flagged"] is None and few["status"].startswith("too few clips"), few
    moved = drift.judge(high, low, "ks", 0.2, min_clips=20)
    assert moved["flagged"] and moved["value"] == pytest.approx(1.0) and moved["status"] == "drift", moved
    assert drift.judge(low, low, "psi", 0.2, min_clips=20)["status"] == "no drift"


def test_reference_scores_are_read_from_either_artifact_shape():
    from flows.monitor import reference_scores

    assert reference_scores({"scores": [0.1, 0.9], "labels": ["human", "ai"]}) == [0.1, 0.9], "validation_scores.json"
    assert reference_scores({"val_scores": [{"ai_score": 0.2, "label": "human"}, {"ai_score": None}]}) == [0.2], \
        "a bootstrap report's per-clip scores"
    assert reference_scores({"validation": {}}) == [], "an artifact without scores is no reference"


def test_least_certain_picks_scores_closest_to_the_threshold():
    assert drift.least_certain([0.9, 0.48, 0.1, 0.55, 0.5], threshold=0.5, k=3) == [4, 1, 3], \
        "closest to the threshold first"
    assert drift.histogram([0.0, 0.5, 1.0], bins=2)[0] == [1, 2], "1.0 falls in the last bin"


# --- integration: real flows on the shared Prefect test backend ---

@pytest.fixture(scope="session")
def prefect_backend(tmp_path_factory):
    """One Prefect test server for the session, with its own PREFECT_HOME and a generous start timeout."""
    from prefect.settings import (PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings)
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(updates={PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False,
                                     PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        with prefect_test_harness(server_startup_timeout=180):
            yield


def task_runs(flow_run_id) -> dict:
    """{task name: task run} of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {tr.name.rsplit("-", 1)[0]: tr for tr in found}


def artifacts(flow_run_id) -> dict:
    """{key: artifact} attached to one flow run."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {a.key: a for a in client.read_artifacts() if str(a.flow_run_id) == str(flow_run_id)}


@pytest.fixture
def project(tmp_path, monkeypatch, small_corpus, mlflow_store, tiny_checkpoint, prefect_backend):
    """Factory: project(gates, promotion, champion) -> a project folder (now the working directory) whose
    registry holds v1 as champion: trained by the bootstrap flow ("bootstrap") or a tiny untrained model
    registered directly ("tiny", seconds instead of a training run)."""
    from flows.bootstrap import run_bootstrap
    from flows.monitor import load_reference
    from pipeline.io import registry

    def make(gates: dict, promotion: str = "manual", champion: str = "tiny") -> Path:
        root = make_project(tmp_path / "project", small_corpus, gates=gates, promotion=promotion)
        monkeypatch.chdir(root)
        if champion == "tiny":
            assert registry.register(tiny_checkpoint(seed=1), name=MODEL, base=True) == 1, "the first base is champion"
            return root
        boot = run_bootstrap("data/store")
        assert boot["model_version"] == 1 and boot["aliases"] == ["champion"], f"first model is champion: {boot}"
        assert run_tags(boot["mlflow_run_id"]).get("prefect_flow_run_id") == boot["flow_run_id"], \
            "the bootstrap MLflow run is tagged with its Prefect flow run"
        assert "bootstrap-report" in artifacts(boot["flow_run_id"]), "bootstrap publishes a report artifact"
        reference = load_reference(boot["mlflow_run_id"], "validation_scores.json")
        assert reference is not None and len(reference) == boot["n_val"], \
            "a bootstrapped champion's validation scores are the monitor's drift reference"
        return root

    return make


@pytest.mark.integration
def test_retrain_with_a_failed_gate_promotes_nothing(project):
    from flows.retrain import RetrainParams, retrain
    from pipeline.io import registry

    # given a champion trained by the bootstrap flow, gates no tiny model can pass, and promotion auto
    project(STRICT_GATES, champion="bootstrap")
    # when the retrain flow runs
    state = retrain(RetrainParams(promote="auto"), return_state=True)
    # then the flow completes with a failed verdict, and nothing moved in the registry
    assert state.is_completed(), f"a failed gate is a verdict, not a flow failure: {state}"
    summary = state.result()
    assert summary["passed"] is False and summary["reasons"], f"the verdict fails and says why: {summary}"
    assert summary["promotion"]["action"] == "rejected", f"no promotion after a failed gate: {summary['promotion']}"
    assert all(summary["stages"].values()), f"every stage ran on the new samples: {summary['stages']}"
    assert registry.aliases(MODEL) == {"champion": 1}, "champion unchanged, no challenger for a failed candidate"
    latest = registry.list_versions(MODEL)[-1]
    assert latest["version"] == summary["model_version"] == 2 and latest["validation_status"] == "failed", \
        f"the candidate is registered as a failed version: {latest}"
    # and the report says why, linked both ways with MLflow
    flow_run_id = state.state_details.flow_run_id
    arts = artifacts(flow_run_id)
    report = arts["retrain-report"].data
    assert "FAILED" in report and "rejected" in report, f"the report gives the verdict and the decision:\n{report}"
    for reason in summary["reasons"]:
        assert reason in report, f"the report names the failed gate {reason!r}"
    assert summary["mlflow_run_id"] in report and "v2" in report, "the report names the MLflow run and the version"
    assert "retrain-per-generator" in arts, "per-generator metrics are a table artifact"
    link = arts["retrain-model-report"].data
    assert f"/{summary['mlflow_run_id']}/artifacts/report/report.html" in link, f"links the version's report: {link}"
    assert "report.html" in report, "the markdown report links it too"
    assert run_tags(summary["mlflow_run_id"]).get("prefect_flow_run_id") == str(flow_run_id), \
        "the candidate's MLflow run is tagged with the flow run that made it"
    # and a re-run with nothing new skips every stage and registers nothing
    again = retrain(RetrainParams(promote="auto"))
    assert not any(again["stages"].values()), f"DVC skips unchanged stages: {again['stages']}"
    assert again["promotion"]["action"] == "rejected" and len(registry.list_versions(MODEL)) == 2, \
        "no new version, still no promotion"


@pytest.mark.integration
def test_retrain_manual_then_auto_promotion_survives_a_transient_registry_fault(project, monkeypatch):
    from flows.retrain import RetrainParams, promote, retrain
    from pipeline.io import registry

    # given relaxed gates and manual promotion in params.yaml
    project(RELAXED_GATES, promotion="manual")
    # when the retrain flow runs with its promote parameter left empty (params decide: manual)
    first = retrain(RetrainParams())
    # then the candidate passed and waits as challenger for a person
    assert first["passed"], f"relaxed gates pass: {first['reasons']}"
    assert first["promotion"]["action"] == "awaiting-approval", f"manual mode: {first['promotion']}"
    assert registry.aliases(MODEL) == {"champion": 1, "challenger": 2}, f"challenger set: {registry.aliases(MODEL)}"

    # given a registry write that fails once with a dropped connection, then works
    real, calls = registry.promote, []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionResetError("connection reset by the tracking server")
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "promote", flaky)
    # when the flow runs again with promotion auto
    state = retrain(RetrainParams(promote="auto", reason="approved"), return_state=True)
    # then the promote task ran twice, the flow completed, and the challenger became champion once
    assert state.is_completed(), f"the flow recovers from a transient fault: {state}"
    runs = task_runs(state.state_details.flow_run_id)
    assert len(calls) == 2, f"registry.promote was called twice, got {len(calls)}"
    assert runs["promote"].run_count == 2, f"the promote task ran twice: {runs['promote'].run_count}"
    assert runs["export-champion"].run_count == 1, "tasks that did not fail are not retried"
    summary = state.result()
    assert not any(summary["stages"].values()), f"nothing new: DVC skipped every stage {summary['stages']}"
    assert summary["promotion"]["action"] == "promoted", f"auto promotion of the challenger: {summary['promotion']}"
    assert registry.aliases(MODEL) == {"champion": 2, "previous-champion": 1}, \
        f"champion moved, challenger cleared: {registry.aliases(MODEL)}"
    events = [e for e in registry.history(MODEL) if e["action"] == "promote" and e["version"] == 2]
    assert len(events) == 1 and summary["flow_run_id"] in events[0]["reason"], f"one promotion, naming the run: {events}"
    # and acting on the same verdict again promotes nothing
    verdict = json.loads(Path("reports/verdict.json").read_text())
    assert promote(verdict, "auto", "again", MODEL)["action"] == "already-champion", "promotion is idempotent"
    assert registry.aliases(MODEL)["champion"] == 2, "champion unchanged"


@pytest.mark.integration
def test_retrain_does_not_retry_a_deterministic_fault(tmp_path, monkeypatch, mlflow_store, prefect_backend):
    from flows.retrain import RetrainParams, retrain
    from pipeline.io import registry

    # given a registry with no champion (a deterministic failure: retrying cannot help)
    calls = []

    def no_champion(*args, **kwargs):
        calls.append(args)
        raise registry.RegistryError(f"{MODEL}: no alias 'champion' in the registry")

    monkeypatch.setattr(registry, "export_champion", no_champion)
    (tmp_path / "params.yaml").write_text("registry:\n  promotion: auto\n")
    # when the flow runs
    state = retrain(RetrainParams(repo=str(tmp_path)), return_state=True)
    # then it fails at once, after one attempt, before any stage
    assert state.is_failed(), f"no champion fails the flow: {state}"
    runs = task_runs(state.state_details.flow_run_id)
    assert len(calls) == 1 and runs["export-champion"].run_count == 1, "a deterministic fault is not retried"
    assert "ingest" not in runs, "no stage ran"


@pytest.mark.integration
def test_retrain_refuses_bad_params_before_any_work(tmp_path, mlflow_store, prefect_backend):
    from flows.retrain import RetrainParams, retrain

    (tmp_path / "params.yaml").write_text("validate:\n  gates:\n    min_new_recall: 1.5\n")
    state = retrain(RetrainParams(repo=str(tmp_path)), return_state=True)
    assert state.is_failed(), "a bad params.yaml fails the flow"
    assert "min_new_recall" in str(state.result(raise_on_failure=False)), "the error names the key"
    assert task_runs(state.state_details.flow_run_id) == {}, "no task ran"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.integration
def test_monitor_flags_drift_queues_uncertain_clips_and_logs_to_mlflow(tmp_path, monkeypatch, small_corpus,
                                                                        mlflow_store, tiny_checkpoint, prefect_backend):
    from flows.monitor import REVIEW_COLUMNS, run_monitor
    from pipeline.io import registry, tracking
    from pipeline.apps.cli import main as aivoice

    monkeypatch.chdir(tmp_path)
    # given a champion and two days of production traffic
    assert registry.register(tiny_checkpoint(seed=3), name=MODEL, base=True) == 1, "the first base is champion"
    traffic = tmp_path / "traffic"
    clips = sorted(small_corpus.human_holdout_dir.glob("*.wav"))[:4] + sorted(small_corpus.new_generator_dir.glob("*.wav"))[:3]
    for i, clip in enumerate(clips):
        day = traffic / ("2024-05-01" if i % 2 else "2024-05-02")
        day.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, day / clip.name)
    originals = {p: (_sha(p), p.stat().st_mtime_ns) for p in traffic.rglob("*.wav")}
    options = dict(min_clips=5, review_count=3, review_dir=str(tmp_path / "review"))
    # when the monitor runs before the champion has reference scores
    first = run_monitor([str(traffic)], **options)
    # then it scores everything, says there is no reference, and queues the least certain clips
    assert first["n_scored"] == len(clips), f"every clip scored: {first}"
    assert first["drift"]["status"] == "no reference" and first["drift"]["flagged"] is None, first["drift"]
    review = Path(first["review"]["folder"])
    with (review / "MANIFEST.csv").open(newline="") as f:
        queued = list(csv.DictReader(f))
    assert tuple(queued[0]) == REVIEW_COLUMNS and len(queued) == 3, f"a 3-row review CSV: {queued}"
    assert all(r["label"] == "" and r["suggested_label"] == "" for r in queued), "labels are left to a person"
    for r in queued:
        assert _sha(review / r["path"]) == _sha(Path(r["original_path"])), "the queue holds exact copies"
    distances = sorted(abs(s["ai_score"] - first["threshold"]) for s in _scores(first["mlflow_run_id"]))
    assert [abs(float(r["ai_score"]) - first["threshold"]) for r in queued] == pytest.approx(distances[:3], abs=1e-5), \
        "the queued clips are the ones closest to the threshold"
    assert {p: (_sha(p), p.stat().st_mtime_ns) for p in traffic.rglob("*.wav")} == originals, "originals untouched"

    # given reference scores on the champion's run, far from today's scores
    run_id = tracking.configure().get_model_version(MODEL, "1").run_id
    shifted = 0.98 if first["histogram"]["counts"][0] == first["n_scored"] else 0.02   # a bin today's scores leave
    tracking.configure().log_dict(run_id, {"scores": [shifted] * 40}, "validation_scores.json")
    # when the monitor runs again
    second = run_monitor([str(traffic)], **options)
    # then drift is flagged
    d = second["drift"]
    assert d["status"] == "drift" and d["flagged"] is True and d["value"] > d["threshold"], f"drift flagged: {d}"
    assert d["n_reference"] == 40, "the reference came from the champion's run"
    # and MLflow has one run per flow run, with per-day metrics stepped by day and the histogram
    client = tracking.configure()
    exp = client.get_experiment_by_name(f"{MODEL}-monitoring")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2, f"one MLflow run per flow run, got {len(runs)}"
    run = client.get_run(second["mlflow_run_id"])
    assert run.data.tags["prefect_flow_run_id"] == second["flow_run_id"], "the MLflow run names its flow run"
    assert run.data.tags["drift_status"] == "drift" and run.data.metrics["drift_flag"] == 1.0, run.data.metrics
    daily = client.get_metric_history(run.info.run_id, "daily_ai_rate")
    assert sorted(m.step for m in daily) == [(date(2024, 5, d) - date(1970, 1, 1)).days for d in (1, 2)], \
        "one AI-rate point per day, step = days since 1970-01-01"
    assert len(client.get_metric_history(run.info.run_id, "score_hist_share")) == 10, "a 10-bin histogram"
    arts = artifacts(second["flow_run_id"])
    assert {"monitor-report", "monitor-per-day"} <= set(arts), f"report and per-day table artifacts: {set(arts)}"
    assert "DRIFT" in arts["monitor-report"].data and second["mlflow_run_id"] in arts["monitor-report"].data, \
        "the report gives the drift status and the MLflow run"

    # and when a person labels the queue, `aivoice ingest --corpus` takes it into the store
    with (review / "MANIFEST.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    new_generator = {c.name for c in small_corpus.new_generator_dir.glob("*.wav")}
    for r in rows:
        is_ai = Path(r["original_path"]).name in new_generator
        r["label"], r["generator"] = ("ai", "piper-joe") if is_ai else ("human", "human")
    with (review / "MANIFEST.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REVIEW_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    assert aivoice(["ingest", "--corpus", str(review)]) == 0, "the labelled review batch is ingested"
    stored = json.loads((tmp_path / "reports" / "ingest.json").read_text())
    assert stored["n_added"] == 3, f"the three reviewed clips are in the store: {stored['n_added']}"


def _scores(mlflow_run_id: str) -> list[dict]:
    from pipeline.io import tracking

    client = tracking.configure()
    with contextlib.ExitStack() as stack:
        import tempfile

        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        table = json.loads(Path(client.download_artifacts(mlflow_run_id, "scores.json", tmp)).read_text())
    cols = table["columns"]
    return [dict(zip(cols, row)) for row in table["data"] if row[cols.index("error")] is None]


@pytest.mark.integration
def test_gc_flow_keeps_aliased_and_newest_copies_and_reports_what_it_freed(tmp_path, monkeypatch, mlflow_store,
                                                                           tiny_checkpoint, prefect_backend):
    from flows.retention import gc
    from pipeline.config import load_params
    from pipeline.io import registry, tracking

    # given: a base champion and two later candidates that failed, each checkpoint downloaded once
    monkeypatch.chdir(tmp_path)
    v1 = registry.register(tiny_checkpoint(seed=1), name=MODEL, base=True)
    v2 = registry.register(tiny_checkpoint(seed=2), name=MODEL, gates_passed=False)
    v3 = registry.register(tiny_checkpoint(seed=3), name=MODEL, gates_passed=False)
    for v in (v1, v2, v3):
        registry.load_model(v, load_params("/nonexistent"), name=MODEL)
    cache = tracking.cache_dir(tracking.configure().tracking_uri) / MODEL
    assert len(list(cache.glob("v*-*"))) == 3, "three local copies"
    # when: the gc flow runs keeping one unaliased version
    state = gc(repo=str(tmp_path), keep=1, dvc=False, return_state=True)
    result = state.result()
    # then: the champion's and the newest candidate's copies stay, v2's goes; every version stays registered
    left = sorted(p.name.split("-")[0] for p in cache.glob("v*-*"))
    assert left == [f"v{v1}", f"v{v3}"] and len(result["removed"]) == 1 and result["freed_bytes"] > 0, result
    assert [v["version"] for v in registry.list_versions(MODEL)] == [v1, v2, v3] or \
        sorted(v["version"] for v in registry.list_versions(MODEL)) == [v1, v2, v3], "no version is deleted"
    assert [a["version"] for a in result["archived"]] == [v2], "the refused v2 beyond keep is archived"
    assert (tmp_path / "archive" / f"{MODEL}-v{v2}.tar.gz").is_file()
    assert "gc-report" in artifacts(state.state_details.flow_run_id), "what was freed is a Prefect artifact"
