"""`dvc repro` in a real DVC + git repository: the five stages run, and a second repro is a no-op."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.apps.cli import main as aivoice
from pipeline.config import load_params
from pipeline.io import registry
from pipeline.stages.bootstrap import run as run_bootstrap

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


def _run(cmd, cwd):
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture
def dvc_project(tmp_path, monkeypatch, small_corpus, mlflow_store):
    """A fresh project repo: git + dvc init, the project's dvc.yaml, small params, a seeded store and a base model."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")   # as a clone has it (DVC refuses an ignored dvc.lock)
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    overrides = {"model": {"base_width": 8}, "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 8},
                 "finetune": {"epochs": 5, "replay_per_class": 24}, "augment": {"copies": 4},
                 "twins": {"vocoders": ["griffinlim", "codec2", "istft"], "neural_steps": 3, "neural_batch_size": 2}}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "data" / "incoming").mkdir(parents=True)
    (tmp_path / "data" / "incoming" / ".gitkeep").touch()
    _run(["git", "init", "-q"], tmp_path)
    _run(["dvc", "init", "-q"], tmp_path)
    assert aivoice(["ingest", "--corpus", str(small_corpus.root)]) == 0, "the starting corpus is ingested"
    p = load_params()
    run_bootstrap(p, "data/store", out="models/production.pt", report="reports/bootstrap.json")
    return tmp_path


def test_dvc_repro_runs_all_stages_then_is_a_no_op(dvc_project, small_corpus):
    # given two clips of a new generator dropped into the incoming folder
    incoming = dvc_project / "data" / "incoming" / "ai" / "piper-joe"
    incoming.mkdir(parents=True)
    for clip in sorted(small_corpus.new_generator_dir.glob("*.wav"))[:2]:
        shutil.copy(clip, incoming / clip.name)
    # when the pipeline is reproduced
    out = _run(["dvc", "repro"], dvc_project)
    # then every stage ran and left its outputs
    for stage in ("ingest", "twins", "augment", "finetune", "validate"):
        assert f"Running stage '{stage}'" in out, f"stage {stage} ran:\n{out[-2000:]}"
    verdict = json.loads((dvc_project / "reports" / "verdict.json").read_text())
    assert set(verdict["gates"]) >= {"new_generator_recall", "human_fpr", "earlier_ai_recall_vs_production_at_1pct_fpr"}, verdict
    assert len(verdict["before_after"]) == 2, "each new sample's score under old and new model"
    metrics = json.loads((dvc_project / "reports" / "metrics.json").read_text())
    assert {"candidate", "production"} <= set(metrics), "both models judged on the same data"
    assert (dvc_project / "reports" / "plots" / "roc_candidate.csv").exists(), "ROC data for dvc plots"
    assert (dvc_project / "dvc.lock").exists(), "dvc.lock records what the run produced"
    assert verdict["model_version"] == 2, "the validated candidate is registered as a new version"
    versions = {v["version"]: v for v in registry.list_versions()}
    assert versions[2]["validation_status"] == verdict["status"].replace(" ", "-"), versions[2]
    twins = (dvc_project / "data" / "twins" / "MANIFEST.csv").read_text()
    assert "twin-griffinlim" in twins and "twin-istft" in twins, "the twins stage made signal and neural twins"
    assert "champion" in versions[1]["aliases"], "validation never moves champion"
    # and a second repro changes nothing
    again = _run(["dvc", "repro"], dvc_project)
    assert "Running stage" not in again, f"second repro must be a no-op:\n{again}"
    shown = _run(["dvc", "metrics", "show"], dvc_project)
    assert "candidate" in shown, "dvc metrics show reads the validation metrics"
    # and, once committed, an experiment with one finetune param changed re-runs only finetune and validate
    _run(["git", "add", "-A"], dvc_project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "pipeline run"], dvc_project)
    exp = _run(["dvc", "exp", "run", "-S", "finetune.lr=0.0005"], dvc_project)
    assert "Running stage 'finetune'" in exp and "Running stage 'augment'" not in exp, exp[-2000:]
