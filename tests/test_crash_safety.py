"""Fault injection: the retrain pipeline's stages run as real processes (`dvc repro --single-item`, as the
retrain flow runs them, and `aivoice promote`), SIGKILLed at named points ($AIVOICE_FAULT,
pipeline/faults.py) at stage boundaries and inside ingest, finetune, validate and promote, then re-run.
After each re-run: the store's manifest matches its files, no orphan or duplicate registry version, no
half-moved alias, the champion is always a base or a validated version, no MLflow run left RUNNING, and the
user's files in data/incoming are unchanged. KILL_POINTS lists what is tried (docs/architecture.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_flows import BIN, MODEL, RELAXED_GATES, make_project

# (where it runs, $AIVOICE_FAULT): every one is killed with SIGKILL, then the step runs again
KILL_POINTS = [
    ("ingest", "ingest.copied@2"), ("ingest", "ingest.renamed@2"), ("ingest", "ingest.manifest"), ("ingest", "ingest.done"),
    ("twins", "twins.done"), ("augment", "augment.done"),
    ("finetune", "finetune.trained"), ("finetune", "finetune.done"),
    ("validate", "registry.registered"), ("validate", "validate.registered"), ("validate", "validate.done"),
    ("promote", "registry.journal"), ("promote", "registry.previous"), ("promote", "registry.champion"),
]


def _env(fault: str | None = None) -> dict:
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("AIVOICE_FAULT", None)
    return env | ({"AIVOICE_FAULT": fault} if fault else {})


def _step(step: str, root: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    if step == "promote":
        cmd = [sys.executable, "-m", "pipeline.apps.cli", "promote", "2", "--reason", "crash test"]
    else:
        cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", step]
    return subprocess.run(cmd, cwd=root, env=_env(fault), capture_output=True, text=True, timeout=400)


def _fingerprint(folder: Path) -> dict:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check(root: Path, incoming_before: dict) -> dict:
    """The invariants after a re-run; returns the aliases."""
    from mlflow import MlflowClient

    from pipeline.io import registry
    from pipeline.io.store import read_manifest

    store = root / "data" / "store"
    rows = read_manifest(store)
    for r in rows:
        assert hashlib.sha256((store / r["path"]).read_bytes()).hexdigest() == r["sha256"], r["path"]
    files = sorted(p.relative_to(store).as_posix() for p in (store / "audio").rglob("*") if p.is_file())
    assert files == sorted(r["path"] for r in rows), "store: every audio file has its row and no more"
    assert len({r["sha256"] for r in rows}) == len(rows), "store: no clip twice"
    assert _fingerprint(root / "data" / "incoming") == incoming_before, "the user's incoming files are unchanged"
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{MODEL}'")
    shas = [mv.tags.get(registry.CHECKPOINT_SHA_TAG) for mv in versions]
    assert len(shas) == len(set(shas)), f"no duplicate version: {[(mv.version, mv.tags) for mv in versions]}"
    assert all(mv.tags.get("validation_status") for mv in versions), "every version carries its validation status"
    model = client.get_registered_model(MODEL)
    assert registry.PENDING_TAG not in (model.tags or {}), "no half-done alias move is left pending"
    aliases = {a: int(v) for a, v in model.aliases.items()}
    champion = client.get_model_version(MODEL, str(aliases["champion"]))
    assert str(champion.version) == "1" or champion.tags["validation_status"] == "passed", \
        f"champion is the base or a validated version: {champion.tags}"
    assert aliases.get("previous-champion") != aliases["champion"], f"no half-moved alias: {aliases}"
    exps = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(exps, "attributes.status = 'RUNNING'")
    assert not running, f"no MLflow run left RUNNING: {[r.info.run_id for r in running]}"
    return aliases


@pytest.mark.integration
def test_retrain_survives_sigkill_at_every_kill_point(tmp_path, monkeypatch, small_corpus, mlflow_store, tiny_checkpoint):
    from mlflow import MlflowClient

    from pipeline.io import registry

    root = make_project(tmp_path / "project", small_corpus, gates=RELAXED_GATES)
    monkeypatch.chdir(root)
    assert registry.register(tiny_checkpoint(seed=1), name=MODEL, base=True) == 1
    registry.export_champion("models/production.pt", MODEL)
    incoming = _fingerprint(root / "data" / "incoming")
    tried = []
    for stage in ("ingest", "twins", "augment", "finetune", "validate", "promote"):
        for where, fault in KILL_POINTS:
            if where != stage:
                continue
            killed = _step(stage, root, fault)
            out = killed.stdout + killed.stderr
            # DVC reports a SIGKILLed stage as -9 or as 137 (128 + 9), depending on how it spawned the shell
            assert killed.returncode != 0 and (killed.returncode in (-9, 137) or re.search(r"exited with (-9|137)\b", out)), \
                f"{fault}: the process was killed there:\n{out[-3000:]}"
            tried.append(fault)
            if fault == "finetune.trained":   # the kill left the fine-tuning run open
                client = MlflowClient()
                exp = client.get_experiment_by_name(MODEL).experiment_id
                orphaned = [r.info.run_id for r in client.search_runs([exp], "attributes.status = 'RUNNING'")]
                assert len(orphaned) == 1, "a SIGKILL leaves the MLflow run RUNNING"
        again = _step(stage, root)
        assert again.returncode == 0, f"re-run of {stage} after kills:\n{(again.stdout + again.stderr)[-3000:]}"
        aliases = _check(root, incoming)
        if stage == "finetune":
            assert MlflowClient().get_run(orphaned[0]).info.status == "KILLED", "the re-run marked the orphaned run KILLED"
    assert tried == [fault for _, fault in KILL_POINTS], "every kill point was reached"
    # then the candidate was registered once, judged once, and promoted once
    versions = registry.list_versions(MODEL)
    assert [v["version"] for v in versions] == [1, 2], f"one candidate version, no duplicate: {versions}"
    verdict = json.loads((root / "reports" / "verdict.json").read_text())
    assert verdict["model_version"] == 2 and verdict["tries_on_gate_data"] == 1, verdict
    assert aliases == {"champion": 2, "previous-champion": 1}, aliases
    promotions = [e for e in registry.history(MODEL) if e["action"] == "promote" and e["version"] == 2]
    assert len(promotions) == 1, f"one promotion event: {promotions}"
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, env=_env(), capture_output=True, text=True)
    assert "up to date" in status.stdout, f"dvc.lock matches the outputs:\n{status.stdout[-2000:]}"


OPEN_RUN = """
from pipeline.config import load_params
from pipeline.faults import fault_point
from pipeline.io import tracking
with tracking.training_run(load_params("/nonexistent"), "finetune") as run:
    print(run.info.run_id, flush=True)
    fault_point("test.open_run")
"""


def test_a_run_left_running_by_a_killed_process_is_marked_killed_by_the_next(mlflow_store, tmp_path):
    from mlflow import MlflowClient

    from pipeline.config import load_params
    from pipeline.io import tracking

    # given a process SIGKILLed while its MLflow run was open
    killed = subprocess.run([sys.executable, "-c", OPEN_RUN], env=_env("test.open_run"), capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    orphan = killed.stdout.split()[0]
    client = MlflowClient()
    assert client.get_run(orphan).info.status == "RUNNING"
    # when the next run starts
    with tracking.training_run(load_params("/nonexistent"), "finetune") as run:
        assert client.get_run(orphan).info.status == "KILLED", "the orphaned run is marked KILLED"
        assert run.info.status == "RUNNING", "the live run is left alone"
    assert "died" in client.get_run(orphan).data.tags["killed_reason"]


def test_registering_the_same_checkpoint_again_reuses_its_version(mlflow_store, tiny_checkpoint):
    from pipeline.io import registry

    # given a candidate registered, as a validate stage killed before writing its verdict leaves it
    assert registry.register(tiny_checkpoint(seed=1), name="m", base=True) == 1
    candidate = tiny_checkpoint(seed=2)
    assert registry.register(candidate, name="m", gates_passed=False) == 2
    # when the re-run registers the same bytes, now judged passed
    assert registry.register(candidate, name="m", gates_passed=True) == 2, "no duplicate version"
    versions = registry.list_versions("m")
    assert [v["version"] for v in versions] == [1, 2] and versions[1]["validation_status"] == "passed", versions
    assert registry.aliases("m") == {"champion": 1, "challenger": 2}
    assert registry.count_versions("validation_status", "passed", "m", exclude_checkpoint=candidate) == 0
