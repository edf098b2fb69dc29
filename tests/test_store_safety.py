"""The store under races, growing files, kills and hostile corpora: real processes, real files."""
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline import atomic
from pipeline.config import load_params
from pipeline.io.store import ClipInfo, ingest, read_manifest

ROOT = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _clips(folder: Path, n: int, speech_like, seed: int, sr: int = 16000, seconds: float = 1.0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"clip{seed}_{i}.wav"
        sf.write(p, speech_like(seconds, sr, seed=seed * 100 + i), sr)
        paths.append(p)
    return paths


def _params(tmp_path: Path, **overrides):
    return load_params("/nonexistent", overrides={"ingest.store": str(tmp_path / "store"),
                                                  "ingest.quarantine": str(tmp_path / "quarantine"), **overrides})


def _store_consistent(store: Path) -> list[dict]:
    """Every manifest row's file exists and hashes to its sha256; every audio file has one row."""
    rows = read_manifest(store)
    for r in rows:
        assert _sha(store / r["path"]) == r["sha256"], f"{r['path']}: stored bytes differ from the manifest's hash"
    files = sorted(p.relative_to(store).as_posix() for p in (store / "audio").rglob("*") if p.is_file())
    assert files == sorted(r["path"] for r in rows), f"audio files and manifest rows disagree: {files}"
    assert len({r["sha256"] for r in rows}) == len(rows), "no clip twice"
    return rows


INGEST_SCRIPT = """
import sys, time
from pathlib import Path
from pipeline.config import load_params
from pipeline.io.store import ClipInfo, ingest
store, quarantine, go, *files = sys.argv[1:]
params = load_params("/nonexistent", overrides={"ingest.store": store, "ingest.quarantine": quarantine})
Path(go + f".ready-{files[0].replace('/', '_')}").touch()
while not Path(go).exists():
    time.sleep(0.01)
report = ingest([(Path(f), ClipInfo(label="ai", generator="g")) for f in files], Path(store), Path(quarantine),
                params.audio, params.ingest)
print(len(report.added), time.time())
"""


def test_two_concurrent_ingests_keep_every_row(tmp_path, speech_like):
    # given two real processes, each with its own files, released at the same moment
    a = _clips(tmp_path / "a", 15, speech_like, seed=1, seconds=4.0)   # long enough for the two runs to overlap
    b = _clips(tmp_path / "b", 15, speech_like, seed=2, seconds=4.0)
    store, go = tmp_path / "store", tmp_path / "go"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", INGEST_SCRIPT, str(store), str(tmp_path / "q"), str(go),
                               *map(str, files)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for files in (a, b)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < 2 and time.time() < deadline:   # both imported, waiting
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    # then the manifest holds all thirty clips, each file matching its row
    rows = _store_consistent(store)
    assert sorted(r["original_name"] for r in rows) == sorted(p.name for p in a + b), \
        f"both ingests' rows survive: {[r['original_name'] for r in rows]} {outs}"


def test_a_file_still_being_written_is_never_stored_under_a_wrong_hash(tmp_path, speech_like, monkeypatch):
    # given a WAV file another writer appends to while ingest copies it (the interleaving made deterministic:
    # a thread's writes may all land before or after the copy on a loaded machine)
    growing = tmp_path / "in" / "growing.wav"
    growing.parent.mkdir()
    sf.write(growing, speech_like(20.0, 16000, seed=3), 16000)
    real_copy = atomic.copy_hashing

    def copy_while_written(src, dst):
        out = real_copy(src, dst)
        with Path(src).open("ab") as f:   # the writer's next block lands after the copy was read
            f.write(os.urandom(2048))
        return out

    monkeypatch.setattr(atomic, "copy_hashing", copy_while_written)
    params = _params(tmp_path)
    report = ingest([(growing, ClipInfo(label="ai", generator="g"))], Path(params.ingest.store),
                    Path(params.ingest.quarantine), params.audio, params.ingest)
    # then whatever was kept (store or quarantine) hashes to the name it was kept under
    _store_consistent(Path(params.ingest.store))
    for p in Path(params.ingest.quarantine).glob("*") if Path(params.ingest.quarantine).is_dir() else []:
        assert _sha(p) == p.stem, f"{p.name}: quarantined bytes differ from their name"
    assert report.rejected and "changed while it was copied" in report.rejected[0]["reason"], \
        f"a file that changed during the copy is refused, saying why: {report.to_dict()}"
    assert not report.added, "it is not stored"


def test_hostile_corpus_is_refused_file_by_file_and_the_batch_goes_on(tmp_path, speech_like):
    # given a corpus whose manifest names an absolute path, a `..` path and a symlink out of the corpus
    outside = _clips(tmp_path / "outside", 1, speech_like, seed=4)[0]
    corpus = tmp_path / "corpus"
    good = _clips(corpus / "clips", 2, speech_like, seed=5)
    (corpus / "clips" / "link.wav").symlink_to(outside)
    (corpus / "clips" / "inner.wav").symlink_to(good[0])     # a symlink that stays inside is fine
    rows = [("clips/" + good[0].name, "human"), ("clips/" + good[1].name, "ai"), (str(outside), "ai"),
            ("../outside/" + outside.name, "ai"), ("clips/../../outside/" + outside.name, "ai"), ("clips/link.wav", "ai")]
    with (corpus / "MANIFEST.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label")] + rows)
    before = {p: _sha(p) for p in [outside, *good]}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps({"ingest": {"store": str(tmp_path / "store"), "quarantine": str(tmp_path / "q"),
                                                  "report": str(tmp_path / "ingest.json")}}))
    # when it is ingested with the CLI
    out = subprocess.run([sys.executable, "-m", "pipeline.apps.cli", "--params", str(params_file), "ingest",
                          "--corpus", str(corpus)], capture_output=True, text=True, timeout=240,
                         env=os.environ | {"PYTHONPATH": str(ROOT)})
    # then the two good files are stored, each hostile row is refused with a one-line reason naming it
    report = json.loads((tmp_path / "ingest.json").read_text())
    assert report["n_added"] == 2, out.stdout + out.stderr
    reasons = {r["file"]: r["reason"] for r in report["rejected"]}
    assert len(reasons) == 4, reasons
    assert any(str(outside) in f and "absolute" in why for f, why in reasons.items()), reasons
    assert sum(".." in f and "'..'" in why for f, why in reasons.items()) == 2, reasons
    assert any(f.endswith("link.wav") and "outside" in why for f, why in reasons.items()), reasons
    assert all("\n" not in why for why in reasons.values()), "one-line reasons"
    assert out.returncode == 1 and "rejected" in out.stdout, "the CLI lists the refusals and exits 1"
    # and nothing from outside the corpus was read into the store or quarantine
    kept = [p for p in tmp_path.joinpath("store").rglob("*.wav")] + list(tmp_path.joinpath("q").glob("*"))
    assert before[outside] not in {_sha(p) for p in kept}, "the outside file was not copied anywhere"
    assert {p: _sha(p) for p in before} == before, "user files unchanged"


def test_quarantine_is_capped_and_the_batch_goes_on(tmp_path, speech_like):
    bad = []
    for i in range(3):
        p = tmp_path / "in" / f"bad{i}.wav"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"RIFF" + os.urandom(6000))
        bad.append(p)
    good = _clips(tmp_path / "in", 1, speech_like, seed=6)
    params = _params(tmp_path, **{"ingest.quarantine_max_mb": 0.013})   # room for two 6 KB files
    report = ingest([(p, ClipInfo(label="ai", generator="g")) for p in bad + good], Path(params.ingest.store),
                    Path(params.ingest.quarantine), params.audio, params.ingest)
    assert len(report.added) == 1 and len(report.rejected) == 3, report.to_dict()
    kept = [r for r in report.rejected if r["quarantined_as"]]
    assert len(kept) == 2, f"two copies fit under the cap: {report.rejected}"
    dropped = [r for r in report.rejected if not r["quarantined_as"]]
    assert "not quarantined" in dropped[0]["reason"] and "quarantine_max_mb" in dropped[0]["reason"], dropped
    assert sum(p.stat().st_size for p in Path(params.ingest.quarantine).glob("*")) <= 13000


@pytest.mark.parametrize("point", ["ingest.copied@2", "ingest.renamed@2", "ingest.manifest"])
def test_ingest_killed_at_any_point_leaves_a_consistent_store_after_the_rerun(tmp_path, speech_like, point):
    # given files ingested by a process killed (SIGKILL) at `point` on its second file
    files = _clips(tmp_path / "in", 3, speech_like, seed=7)
    store, go = tmp_path / "store", tmp_path / "go"
    go.touch()
    cmd = [sys.executable, "-c", INGEST_SCRIPT, str(store), str(tmp_path / "q"), str(go), *map(str, files)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(cmd, env=env | {"AIVOICE_FAULT": point}, capture_output=True, timeout=240)
    assert killed.returncode == -9, f"the fault point {point} was reached: {killed.stderr[-500:]}"
    # when the same ingest runs again
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    # then the store holds each file once, every file has its row, and no temporary file is left
    rows = _store_consistent(store)
    assert sorted(r["original_name"] for r in rows) == sorted(p.name for p in files)
    assert not [p for p in store.rglob(".*") if p.is_file()], "no temporary file left behind"
