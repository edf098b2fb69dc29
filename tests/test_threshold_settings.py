"""A calibrated threshold carries the scoring settings it was calibrated with; scoring under others is refused."""
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml

from pipeline.apps import cli
from pipeline.config import load_params, params_hash
from pipeline.core.model import load_checkpoint, new_model, save_checkpoint
from pipeline.core.scoring import scoring_settings, threshold_mismatch


@pytest.fixture
def calibrated_checkpoint(tmp_path):
    params = load_params("/nonexistent")
    torch.manual_seed(0)
    model = new_model(["en"], params.audio, params.features, base_width=8, dropout=0.0)
    return save_checkpoint(model, tmp_path / "calibrated.pt", threshold=0.7, params_hash=params_hash(params),
                           threshold_scoring=scoring_settings(params))


def _params_file(tmp_path: Path, **detect) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"detect": detect} if detect else {}))
    return path


def test_the_settings_travel_in_the_checkpoint_and_a_change_is_named(calibrated_checkpoint):
    meta = load_checkpoint(calibrated_checkpoint).meta
    assert meta.threshold_scoring == {"hop_s": 1.5, "aggregate": "mean", "silent_window_db": 0.0, "segment_s": 3.0}
    assert threshold_mismatch(meta, load_params("/nonexistent")) is None
    changed = load_params("/nonexistent", overrides={"detect.hop_s": 0.5, "detect.aggregate": "max"})
    why = threshold_mismatch(meta, changed)
    assert "detect.hop_s 0.5 (calibrated with 1.5)" in why and "detect.aggregate 'max'" in why, why


def test_detect_refuses_other_scoring_settings_unless_forced_or_given_a_threshold(tmp_path, calibrated_checkpoint,
                                                                                speech_like, caplog):
    clip = tmp_path / "clip.wav"
    sf.write(clip, speech_like(4.0, 16000, seed=1), 16000)
    base = ["detect", str(clip), "--model", str(calibrated_checkpoint), "--device", "cpu", "--format", "json"]
    # same settings: scored
    assert cli.main(["--params", str(_params_file(tmp_path))] + base) == 0
    # another hop: refused, naming the setting
    other = str(_params_file(tmp_path, hop_s=0.5))
    caplog.clear()
    assert cli.main(["--params", other] + base) == 2
    assert "detect.hop_s 0.5 (calibrated with 1.5)" in caplog.text, caplog.text
    # --force: scored with a warning; an explicit --threshold needs no calibration
    caplog.clear()
    assert cli.main(["--params", other] + base + ["--force"]) == 0
    assert "--force" in caplog.text and "calibrated with other scoring settings" in caplog.text
    assert cli.main(["--params", other] + base + ["--threshold", "0.5"]) == 0


def test_the_registry_tags_the_threshold_with_its_settings(mlflow_store, calibrated_checkpoint):
    from mlflow import MlflowClient

    from pipeline.io import registry

    version = registry.register(calibrated_checkpoint, name="m", base=True)
    tags = MlflowClient().get_model_version("m", str(version)).tags
    settings = scoring_settings(load_params("/nonexistent"))
    assert tags["threshold_scoring"] == ",".join(f"{k}={v}" for k, v in sorted(settings.items())), tags
    assert len(tags["threshold_scoring"]) <= 64, "a short, machine-readable tag"


def test_serve_says_when_its_settings_differ_from_the_thresholds(mlflow_store, calibrated_checkpoint, caplog):
    # given a champion whose threshold was calibrated at hop 1.5 s, mean aggregation
    from fastapi.testclient import TestClient

    from pipeline.apps.serve import create_app
    from pipeline.io import registry

    registry.register(calibrated_checkpoint, gates_passed=True)
    for params, expected in ((load_params("/nonexistent"), None),
                             (load_params("/nonexistent", overrides={"detect.aggregate": "max"}), "detect.aggregate")):
        # when the service runs with the same settings, then with another aggregation
        with caplog.at_level("WARNING"), TestClient(create_app(params)) as client:
            reported = client.get("/model").json()["threshold_mismatch"]
        # then /model and the log say so only for the changed one (the service keeps serving)
        assert (reported is None) if expected is None else (expected in reported), reported
    assert any("calibrated with other scoring settings" in r.message for r in caplog.records), "logged once"
