"""`aivoice detect --output FILE`: results appended and flushed per file, and a killed run resumed
without scoring any file twice or touching the lines already written."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.apps.cli import main
from pipeline.apps.detect import Detection, write_results
from pipeline.apps.detect_resume import OutputFileError, done_paths

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  base_width: 8\ndetect:\n  workers: 0\n")
    return path


@pytest.fixture
def clips(small_corpus, tmp_path):
    """40 real clips (copies of a few of the small corpus's, every format it has) and one broken file."""
    real = sorted(p for p in small_corpus.root.rglob("*") if p.suffix in {".wav", ".flac", ".mp3", ".ogg"})[::5][:8]
    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(40):
        src = real[i % len(real)]
        (folder / f"{i:03d}{src.suffix}").write_bytes(src.read_bytes())
    (folder / "020_broken.wav").write_text("not audio")
    return folder


def _detect(params_file, model_path, folder, out, fmt="json"):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pipeline.apps.cli", "--params", str(params_file), "detect", str(folder),
           "--model", str(model_path), "--format", fmt, "--output", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.integration
def test_a_killed_run_resumes_with_every_file_exactly_once(clips, model_path, params_file, tmp_path):
    out = tmp_path / "results.jsonl"
    # given a run killed (SIGKILL) after it wrote a few files' lines
    proc = _detect(params_file, model_path, clips, out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    before = out.read_bytes()
    complete = before[:before.rfind(b"\n") + 1]
    n_before = complete.count(b"\n")
    assert 5 <= n_before < 41, f"the kill landed part-way ({n_before} of 41 lines)"
    # when the same command runs again
    proc = _detect(params_file, model_path, clips, out)
    _, err = proc.communicate(timeout=300)
    # then it says how many it skipped, the earlier lines are unchanged, and every file is there exactly once
    assert proc.returncode == 1, f"the broken file fails: {err}"
    assert f"{n_before} file(s) already there, skipped; {41 - n_before} to score" in err, err
    after = out.read_bytes()
    assert after.startswith(complete), "the lines written before the kill are kept as they were"
    rows = [json.loads(line) for line in after.splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in clips.iterdir()), "every file exactly once"
    assert sum(r["error"] is not None for r in rows) == 1 and all(r["ai_score"] is not None for r in rows if not r["error"])
    # and a third run finds nothing left to score
    proc = _detect(params_file, model_path, clips, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "41 file(s) already there, skipped; 0 to score" in err, err
    assert out.read_bytes() == after, "nothing appended"


def test_csv_output_resumes_and_drops_a_cut_line(batch_dir, model_path, params_file, capsys, caplog):
    out = batch_dir.parent / "results.csv"
    names = sorted(p.name for p in batch_dir.iterdir())
    # given a csv results file from a run that scored the first file and was cut mid-way through the second line
    assert main(["--params", str(params_file), "detect", str(batch_dir / names[0]), "--model", str(model_path),
                 "--format", "csv", "--output", str(out)]) == 0
    first = out.read_bytes()
    out.write_bytes(first + str(batch_dir / names[1]).encode() + b",0.5")
    # when the folder is scored into the same file
    code = main(["--params", str(params_file), "detect", str(batch_dir), "--model", str(model_path), "--format", "csv",
                 "--output", str(out)])
    # then the cut line is dropped, the first file skipped, the others appended once, without a second header
    assert code == 0 and capsys.readouterr().out == "", "results go to the file, not stdout"
    lines = out.read_text().splitlines()
    assert out.read_bytes().startswith(first) and lines[0].startswith("path,") and sum(l.startswith("path,") for l in lines) == 1
    assert sorted(l.split(",")[0] for l in lines[1:]) == sorted(str(batch_dir / n) for n in names)
    assert "1 file(s) already there, skipped; 2 to score" in caplog.text and "incomplete last line" in caplog.text


def test_a_foreign_output_file_is_refused_and_left_alone(tmp_path, batch_dir, model_path, params_file, caplog):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nnot results\n")
    code = main(["--params", str(params_file), "detect", str(batch_dir), "--model", str(model_path), "--format", "json",
                 "--output", str(notes)])
    assert code == 2 and f"{notes}:1: not a json line" in caplog.text
    assert notes.read_text() == "my notes\nnot results\n", "the user's file is not touched"
    with pytest.raises(OutputFileError, match="needs --format json or csv"):
        done_paths(tmp_path / "x.txt", "table")


def test_write_results_keeps_only_the_failures():
    import io

    def many():
        for i in range(1000):
            yield Detection(path=f"f{i}.wav", ai_score=0.1, label="HUMAN", threshold=0.5, windows=[0.1] * 100,
                            language="en", speakers="one") if i % 100 else Detection(path=f"f{i}.wav", error="broken")

    failed = write_results(many(), "json", io.StringIO())
    assert [d.path for d in failed] == [f"f{i}.wav" for i in range(0, 1000, 100)], "only the 10 failures are kept"


@pytest.fixture
def batch_dir(tmp_path, speech_like):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        sf.write(folder / f"{i}.wav", speech_like(2.0, 16000, seed=i), 16000)
    return folder


def test_a_run_of_many_files_counts_files_without_reading_every_header_first(batch_dir, model_path, params_file,
                                                                              capsys, monkeypatch):
    import pipeline.apps.detect as detect

    # given more files than the header pass allows (lowered to 2 here), bars forced on
    monkeypatch.setattr(detect, "HEADER_SCAN_MAX_FILES", 2)
    monkeypatch.setenv("AIVOICE_PROGRESS", "1")
    read = []
    real = detect._header_seconds
    monkeypatch.setattr(detect, "_header_seconds", lambda p: read.append(p) or real(p))
    # when they are scored
    code = main(["--params", str(params_file), "detect", str(batch_dir), "--model", str(model_path), "--format", "json"])
    err = capsys.readouterr().err
    # then the bar counts files and no header was read before scoring
    assert code == 0 and "/3 [" in err and "file/s" in err and "s audio" not in err, err[-400:]
    assert read == [], "no header pass"
