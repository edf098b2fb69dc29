"""The registry through the command line: import registers v1 as champion, detect serves @champion,
promotion is gated, rollback restores the previous version's scores."""
import json

import pytest
import soundfile as sf

from pipeline.io import registry
from pipeline.apps.cli import main


@pytest.fixture
def clip(tmp_path, speech_like):
    path = tmp_path / "clip.wav"
    sf.write(path, speech_like(3.5, 16000, seed=7), 16000)
    return path


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  base_width: 8\n")
    return path


def _detect(capsys, params_file, clip, *extra):
    assert main(["--params", str(params_file), "detect", str(clip), "--format", "json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_registry_round_trip(mlflow_store, tiny_checkpoint, params_file, clip, capsys, caplog, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    base, other = tiny_checkpoint(seed=1), tiny_checkpoint(seed=2)
    # given an imported checkpoint: it becomes v1 and champion
    assert main(["--params", str(params_file), "import-checkpoint", str(base), "--out", str(tmp_path / "v1.pt")]) == 0
    assert "registered ai-voice-detector v1" in capsys.readouterr().out
    imported = registry.model_version(1)
    assert imported.description.startswith(f"Base model imported from {base.name}") and "tensors mapped" in \
        imported.description, f"the import reads as one line in the registry: {imported.description!r}"
    assert imported.tags["source"] == "import" and imported.tags["imported_from"] == base.name, imported.tags
    v1 = _detect(capsys, params_file, clip)
    assert v1["model"] == "ai-voice-detector v1 (@champion)", f"detect names the version it served: {v1['model']}"
    # when a second version that failed validation is registered, promotion is refused without --force
    registry.register(other, gates_passed=False, tags={"failed_gates": "human_fpr"})
    assert main(["--params", str(params_file), "promote", "2", "--reason", "try"]) == 2, "a failing version is refused"
    assert "refusing to promote ai-voice-detector v2" in caplog.text and "human_fpr" in caplog.text, "names the gates"
    assert main(["--params", str(params_file), "promote", "2", "--force", "--reason", "hotfix approved"]) == 0
    assert "champion -> v2" in capsys.readouterr().out, "the move is reported"
    v2 = _detect(capsys, params_file, clip)
    assert v2["model"] == "ai-voice-detector v2 (@champion)" and v2["ai_score"] != v1["ai_score"], "champion moved"
    # then a rollback restores v1's predictions exactly
    assert main(["--params", str(params_file), "rollback", "--reason", "bad release"]) == 0
    assert "champion -> v1" in capsys.readouterr().out, "the rollback is reported"
    back = _detect(capsys, params_file, clip)
    assert back["model"] == "ai-voice-detector v1 (@champion)" and back["windows"] == v1["windows"], "exact rollback"
    # and the history lists both moves
    assert main(["--params", str(params_file), "models"]) == 0
    out = capsys.readouterr().out
    assert "[forced]" in out and "hotfix approved" in out and "rollback" in out, out


def test_cli_gc_archives_a_refused_candidate_and_restore_brings_it_back(mlflow_store, tiny_checkpoint, clip, capsys,
                                                                        caplog, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  base_width: 8\nstorage:\n  keep_candidates: 0\n")
    # given a champion and a refused candidate
    registry.register(tiny_checkpoint(seed=1), base=True)
    registry.register(tiny_checkpoint(seed=2), gates_passed=False, tags={"failed_gates": "human_fpr"})
    # when `aivoice gc` runs with the project's storage settings
    assert main(["--params", str(params), "gc", "--no-dvc"]) == 0
    out = capsys.readouterr().out
    # then it says what it archived, `aivoice models` shows where, and scoring with v2 says how to get it back
    assert "archived  v2 (refused candidate)" in out and "archive/ai-voice-detector-v2.tar.gz" in out, out
    assert main(["--params", str(params), "models"]) == 0
    assert "archived: " in capsys.readouterr().out
    assert main(["--params", str(params), "detect", str(clip), "--model", "2"]) == 2
    assert "aivoice restore 2" in caplog.text
    # and after `aivoice restore 2` it scores again
    assert main(["--params", str(params), "restore", "2"]) == 0
    assert "restored ai-voice-detector v2" in capsys.readouterr().out
    assert _detect(capsys, params, clip, "--model", "2")["model"].startswith("ai-voice-detector v2")
