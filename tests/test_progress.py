"""Progress bars on stderr (pipeline.progress): on a terminal only, forced off or on by AIVOICE_PROGRESS;
and `aivoice detect --format hf`, Hugging Face's audio-classification output."""
import io
import json

import numpy as np
import pytest
import soundfile as sf

from pipeline.apps.cli import main
from pipeline.progress import PROGRESS_ENV, enabled, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  base_width: 8\n")
    return path


def test_bars_follow_the_terminal_and_the_setting(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    # stderr a pipe or file: no bar; a terminal: a bar
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not enabled(), "no bar when stderr is not a terminal"
    list(progress(range(3), desc="quiet"))
    assert "quiet" not in __import__("sys").stderr.getvalue(), "a disabled bar writes nothing"
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    assert enabled(), "a bar on a terminal"
    list(progress(range(3), desc="shown", leave=True))
    assert "shown" in term.getvalue() and "3/3" in term.getvalue(), f"the bar went to stderr: {term.getvalue()!r}"
    # forced off on a terminal, by our setting or by tqdm's
    for env, value in ((PROGRESS_ENV, "0"), (PROGRESS_ENV, "off"), ("TQDM_DISABLE", "1")):
        monkeypatch.setenv(env, value)
        assert not enabled(), f"{env}={value} turns bars off"
        monkeypatch.delenv(env)
    # forced on without a terminal
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert enabled(), f"{PROGRESS_ENV}=1 forces bars on"


def test_long_detect_run_shows_seconds_of_audio_on_stderr_only(tmp_path, speech_like, model_path, params_file,
                                                               capsys, monkeypatch):
    # given a 61 s file and a broken one, bars forced on (capsys's stderr is no terminal)
    sf.write(tmp_path / "long.wav", speech_like(61.0, 8000, seed=2), 8000)
    (tmp_path / "broken.wav").write_text("not audio")
    monkeypatch.setenv(PROGRESS_ENV, "1")
    # when scored
    code = main(["--params", str(params_file), "detect", str(tmp_path / "long.wav"), str(tmp_path / "broken.wav"),
                 "--model", str(model_path), "--format", "json"])
    out, err = capsys.readouterr()
    # then stdout holds only the results, stderr the bar counting the audio up to its full length
    assert code == 1 and [json.loads(line)["path"].endswith(n) for line, n in zip(out.splitlines(), ("long.wav", "broken.wav"))] == [True, True], out
    assert "detect" in err and "61/61 s audio" in err, f"the bar reaches 61 s of audio: {err[-400:]!r}"
    # and a short run shows none
    main(["--params", str(params_file), "detect", str(tmp_path / "broken.wav"), "--model", str(model_path)])
    assert "s audio" not in capsys.readouterr().err, "no bar for a short run"


def test_detect_hf_format_gives_both_labels_per_file(tmp_path, speech_like, model_path, params_file, capsys):
    # given two good files and a broken one
    sf.write(tmp_path / "a.wav", speech_like(2.0, 16000, seed=1), 16000)
    sf.write(tmp_path / "b.wav", speech_like(3.0, 24000, seed=5), 24000)
    (tmp_path / "c.wav").write_bytes(b"")
    main(["--params", str(params_file), "detect", str(tmp_path), "--model", str(model_path), "--format", "json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # when scored with --format hf
    code = main(["--params", str(params_file), "detect", str(tmp_path), "--model", str(model_path), "--format", "hf"])
    hf = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # then one Hugging Face list per file, in the same order: both labels, scores summing to 1, highest first
    assert code == 1 and len(hf) == len(rows) == 3, f"one line per file: {hf}"
    for row, result in zip(rows[:2], hf[:2]):
        assert {r["label"] for r in result} == {"AI_GENERATED", "HUMAN"}, f"both labels: {result}"
        assert set(result[0]) == {"label", "score"}, f"HF's keys only: {result[0]}"
        assert result[0]["score"] >= result[1]["score"], f"sorted by score, descending: {result}"
        assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-6), f"probabilities sum to 1: {result}"
        by_label = {r["label"]: r["score"] for r in result}
        assert by_label["AI_GENERATED"] == pytest.approx(row["ai_score"], abs=1e-9), f"{row['path']}: {result} vs {row}"
    assert hf[2] == [], "a file that could not be scored gives an empty list (its error goes to stderr)"
    assert np.isfinite([r["score"] for result in hf for r in result]).all()


def test_ingest_shows_a_bar_when_forced_and_none_when_off(tmp_path, speech_like, tiny_params, capsys, monkeypatch):
    from pipeline.io.store import ClipInfo, ingest

    # given three files to ingest, bars forced on
    files = []
    for i in range(3):
        files.append(tmp_path / f"in{i}.wav")
        sf.write(files[-1], speech_like(1.0, 16000, seed=i), 16000)
    monkeypatch.setenv(PROGRESS_ENV, "1")
    # when ingested
    report = ingest([(f, ClipInfo(label="human", generator="human")) for f in files], tmp_path / "store",
                    tmp_path / "quarantine", tiny_params.audio, tiny_params.ingest)
    # then the bar counted the files on stderr
    assert len(report.added) == 3, report
    assert "ingest" in capsys.readouterr().err, "an ingest bar on stderr"
    # and with AIVOICE_PROGRESS=0 nothing is drawn
    monkeypatch.setenv(PROGRESS_ENV, "0")
    ingest([(f, ClipInfo(label="human", generator="human")) for f in files], tmp_path / "store2",
           tmp_path / "quarantine2", tiny_params.audio, tiny_params.ingest)
    assert capsys.readouterr().err == "", "AIVOICE_PROGRESS=0: stderr stays empty"
