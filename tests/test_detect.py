"""`aivoice detect` on real and broken files: every good file scored, every bad one named, exit codes."""
import csv
import io
import json

import numpy as np
import pytest
import soundfile as sf

from pipeline.apps.cli import main


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  base_width: 8\n")
    return path


@pytest.fixture
def batch(tmp_path, speech_like):
    """Two good files (one long, in a subfolder) and three bad ones."""
    good = tmp_path / "in" / "sub"
    good.mkdir(parents=True)
    sf.write(good / "long.flac", speech_like(7.3, 16000), 16000)
    sf.write(tmp_path / "in" / "short.wav", speech_like(1.2, 8000, seed=1), 8000)
    (tmp_path / "in" / "empty.wav").write_bytes(b"")
    (tmp_path / "in" / "text.wav").write_text("not audio")
    sf.write(tmp_path / "in" / "silence.wav", np.zeros(16000, np.float32), 16000)
    return tmp_path / "in"


def test_detect_json_scores_good_files_and_names_bad_ones(batch, model_path, params_file, capsys):
    # when a folder with good and broken files is scored
    code = main(["--params", str(params_file), "detect", str(batch), "--model", str(model_path), "--format", "json"])
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    # then every file gets a line, good ones a score, bad ones a reason, and the exit code says some failed
    assert code == 1, "exit code 1 when any file failed"
    assert set(rows) == {"long.flac", "short.wav", "empty.wav", "text.wav", "silence.wav"}, f"one line per file: {rows}"
    for name in ("long.flac", "short.wav"):
        r = rows[name]
        assert r["error"] is None and 0 <= r["ai_score"] <= 1, f"{name} scored: {r}"
        assert r["label"] in ("AI_GENERATED", "HUMAN") and r["threshold"] == 0.5, f"{name} has a verdict: {r}"
    assert len(rows["long.flac"]["windows"]) == 4, "7.3 s: windows at 0, 1.5, 3.0 s and one flush with the end"
    assert rows["long.flac"]["ai_score"] == pytest.approx(np.mean(rows["long.flac"]["windows"]), abs=1e-5), "mean aggregate"
    assert "empty" in rows["empty.wav"]["error"] and "not a readable audio file" in rows["text.wav"]["error"]
    assert "silent" in rows["silence.wav"]["error"], "silence is reported, not scored"


def test_detect_threshold_override_csv_and_all_good_exit_zero(batch, model_path, params_file, capsys):
    good = batch / "sub" / "long.flac"
    code = main(["--params", str(params_file), "detect", str(good), "--model", str(model_path), "--format", "csv",
                 "--threshold", "0.0"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert code == 0, "exit code 0 when every file was scored"
    assert rows[0]["label"] == "AI_GENERATED" and float(rows[0]["threshold"]) == 0.0, "--threshold overrides the model's"


def test_batched_scores_equal_one_file_at_a_time(batch, model_path, params_file, capsys):
    main(["--params", str(params_file), "detect", str(batch), "--model", str(model_path), "--format", "json"])
    together = {r["path"]: r["ai_score"] for r in map(json.loads, capsys.readouterr().out.splitlines()) if not r["error"]}
    for path, score in together.items():
        main(["--params", str(params_file), "detect", path, "--model", str(model_path), "--format", "json"])
        alone = json.loads(capsys.readouterr().out)["ai_score"]
        assert alone == pytest.approx(score, abs=1e-5), f"{path}: batching across files must not change scores"


def test_gain_and_resampling_do_not_change_the_score(tmp_path, speech_like, model_path, params_file, capsys):
    x = speech_like(4.0, 24000, seed=3)
    sf.write(tmp_path / "a.wav", x, 24000, subtype="FLOAT")
    sf.write(tmp_path / "b.wav", 0.25 * x, 24000, subtype="FLOAT")
    main(["--params", str(params_file), "detect", str(tmp_path / "a.wav"), str(tmp_path / "b.wav"),
          "--model", str(model_path), "--format", "json"])
    a, b = (json.loads(line)["ai_score"] for line in capsys.readouterr().out.splitlines())
    assert a == pytest.approx(b, abs=1e-3), "log-mel mean removal makes scores gain-invariant"


def test_missing_model_is_a_clear_error(batch, params_file, tmp_path):
    assert main(["--params", str(params_file), "detect", str(batch), "--model", str(tmp_path / "nope.pt")]) == 2


@pytest.mark.integration
def test_decoding_workers_give_the_same_results(small_corpus, tmp_path, model_path, params_file, capsys, caplog):
    # given real clips of every kind of the small corpus (wav/flac/mp3/ogg as built), a silent and a broken file
    clips = sorted(p for p in small_corpus.root.rglob("*") if p.suffix in {".wav", ".flac", ".mp3", ".ogg"})[::3][:24]
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, clip in enumerate(clips):
        (folder / f"{i:02d}_{clip.name}").write_bytes(clip.read_bytes())
    sf.write(folder / "10_silence.wav", np.zeros(48000, np.float32), 16000)
    (folder / "11_broken.wav").write_text("not audio")
    caplog.set_level("INFO", logger="aivoice")
    out = {}
    for workers in ("0", "2"):
        caplog.clear()
        code = main(["--params", str(params_file), "detect", str(folder), "--model", str(model_path), "--format", "json",
                     "--workers", workers])
        out[workers] = capsys.readouterr().out
        assert code == 1, "the broken and the silent file fail, the rest are scored"
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 2 and any("11_broken.wav: not a readable audio file" in e for e in errors), errors
    assert "2 decoding worker(s)" in caplog.text, "the second run used the workers"
    rows = [json.loads(line) for line in out["2"].splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in sorted(folder.iterdir())], "file order kept"
    assert sum(1 for r in rows if r["error"] is None) == len(clips), "every real clip scored"
    assert out["0"] == out["2"], "identical output, scores to the last digit, with and without workers"
