"""Disk guard (storage.min_free_gb) on a real small filesystem, and retention (`aivoice gc`)."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from pipeline.config import load_params
from pipeline.io.store import ClipInfo, ingest, read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs mounted at tmp_path/disk (needs root; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave_mb: float) -> None:
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, int(free - leave_mb * 1e6)))


@pytest.mark.parametrize("stage", ["ingest", "twins", "augment", "finetune", "bootstrap"])
def test_stages_refuse_to_start_on_a_nearly_full_disk(small_disk, tmp_path, stage):
    # given a project whose outputs live on a disk with 3 MB free, and min_free_gb 0.01 (10 MB)
    _fill(small_disk, leave_mb=3)
    out = str(small_disk / "out")
    params = {"storage": {"min_free_gb": 0.01}, "ingest": {"store": out}, "twins": {"out": out},
              "augment_stage": {"out": out}, "finetune": {"out": out + "/c.pt"}, "train": {"out": out + "/b.pt"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    extra = ["--corpus", str(tmp_path)] if stage == "bootstrap" else []
    # when the stage starts
    run = subprocess.run([sys.executable, "-m", f"pipeline.stages.{stage}", "--params", "params.yaml", *extra],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    # then it refuses at once with one line naming the need and what is free, and writes nothing
    assert run.returncode != 0, run.stdout
    line = [ln for ln in run.stderr.splitlines() if "storage.min_free_gb" in ln]
    assert line and "GB free" in line[0] and "0.01 GB" in line[0], run.stderr[-2000:]
    assert not (small_disk / "out").exists(), "nothing written"


def test_ingest_onto_a_full_disk_rejects_the_file_and_keeps_the_store_consistent(small_disk, tmp_path, speech_like):
    # given a store on a disk with 1 MB free and a 3 MB clip (the guard off)
    store = small_disk / "store"
    params = load_params("/nonexistent", overrides={"ingest.store": str(store), "ingest.quarantine": str(small_disk / "q"),
                                                    "storage.min_free_gb": 0})
    small, big = tmp_path / "small.wav", tmp_path / "big.wav"
    sf.write(small, speech_like(1.0, 16000, seed=1), 16000)
    sf.write(big, speech_like(90.0, 16000, seed=2), 16000)
    _fill(small_disk, leave_mb=1.0)
    # when both are ingested
    report = ingest([(big, ClipInfo(label="ai", generator="g")), (small, ClipInfo(label="ai", generator="g"))],
                    store, small_disk / "q", params.audio, params.ingest)
    # then the big one is refused naming the full disk, the small one is stored, and no partial file is left
    assert [r["reason"] for r in report.rejected] == ["not copied (No space left on device)"], report.to_dict()
    assert len(report.added) == 1
    rows = read_manifest(store)
    assert [r["original_name"] for r in rows] == ["small.wav"]
    assert sorted(p.name for p in store.rglob("*") if p.is_file()) == sorted(["MANIFEST.csv", Path(rows[0]["path"]).name])


def test_gc_keeps_aliased_and_newest_versions_and_never_deletes_a_registry_version(mlflow_store, tiny_checkpoint,
                                                                                 tmp_path, monkeypatch):
    from pipeline.io import registry, tracking
    from pipeline.io.retention import collect_garbage

    # given v1 champion, v2-v4 failed candidates, v5 challenger, each checkpoint downloaded into the local cache
    assert registry.register(tiny_checkpoint(seed=1), name="m", base=True) == 1
    for seed in (2, 3, 4):
        registry.register(tiny_checkpoint(seed=seed), name="m", gates_passed=False)
    assert registry.register(tiny_checkpoint(seed=5), name="m", gates_passed=True) == 5
    for v in range(1, 6):
        registry.resolve(v, "m")
    cache = tracking.cache_dir(mlflow_store) / "m"
    assert len(list(cache.glob("v*-*"))) == 5
    # when gc keeps one unaliased version
    result = collect_garbage("m", keep=1, repo=None)
    # then v1 (champion), v5 (challenger) and v4 (newest unaliased) keep their files; v2 and v3 lose theirs
    left = sorted(int(p.name[1:].split("-")[0]) for p in cache.glob("v*-*"))
    assert left == [1, 4, 5] and result["kept"] == [1, 4, 5], result
    assert result["cache_freed_bytes"] > 0
    # and every registry version is still there and loads (re-downloaded from its MLflow artifact)
    assert [v["version"] for v in registry.list_versions("m")] == [1, 2, 3, 4, 5]
    assert registry.resolve(2, "m").checkpoint_path.is_file()
    assert registry.aliases("m") == {"champion": 1, "challenger": 5}


def test_gc_runs_dvc_gc_on_the_workspace(tmp_path, monkeypatch, mlflow_store):
    from pipeline.io.retention import collect_garbage

    # given a DVC repository whose tracked file changed once (the old version is only in the cache)
    repo = tmp_path / "repo"
    repo.mkdir()
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    run = lambda *cmd: subprocess.run(cmd, cwd=repo, check=True, capture_output=True, env=env)
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    (repo / "data.bin").write_bytes(os.urandom(200_000))
    run(sys.executable, "-m", "dvc", "add", "-q", "data.bin")
    (repo / "data.bin").unlink()
    (repo / "data.bin").write_bytes(os.urandom(100_000))
    run(sys.executable, "-m", "dvc", "add", "-q", "data.bin")
    # when gc runs
    result = collect_garbage("m", keep=5, repo=repo)
    # then the unused 200 KB object went, the workspace's file is intact
    assert result["dvc"]["ran"] and result["dvc"]["freed_bytes"] >= 200_000, result
    assert (repo / "data.bin").stat().st_size == 100_000
    assert subprocess.run([sys.executable, "-m", "dvc", "status", "-q"], cwd=repo, env=env).returncode == 0


def test_gc_archives_refused_candidates_and_restore_puts_them_back(mlflow_store, tiny_checkpoint, tmp_path):
    import hashlib
    import tarfile

    import mlflow
    from mlflow import MlflowClient

    from pipeline.io import registry
    from pipeline.io.archive import ArchiveError, restore_version
    from pipeline.io.retention import collect_garbage

    # given v1 base champion, v2 and v3 refused (v2's run holds its verdict), v4 challenger
    assert registry.register(tiny_checkpoint(seed=1), name="m", base=True) == 1
    with mlflow.start_run() as run:
        mlflow.log_text('{"status": "failed"}', "verdict.json")
    v2_ckpt = tiny_checkpoint(seed=2)
    assert registry.register(v2_ckpt, run_id=run.info.run_id, name="m", gates_passed=False) == 2
    registry.register(tiny_checkpoint(seed=3), name="m", status="insufficient evidence")
    assert registry.register(tiny_checkpoint(seed=4), name="m", gates_passed=True) == 4
    client = MlflowClient()
    model_id = client.get_model_version("m", "2").source.removeprefix("models:/")
    model_dir = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    assert model_dir.is_dir()
    # when gc keeps one unaliased version and archives the refused ones beyond it
    result = collect_garbage("m", keep=1, repo=None, archive_dir=tmp_path / "archive")
    # then only v2 is archived: one tarball holding its model (the checkpoint's bytes) and its run's verdict
    assert [a["version"] for a in result["archived"]] == [2], result
    tarball = tmp_path / "archive" / "m-v2.tar.gz"
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        ckpt = next(n for n in names if n.startswith("model/") and n.endswith(".pt"))
        assert hashlib.sha256(tar.extractfile(ckpt).read()).hexdigest() == hashlib.sha256(v2_ckpt.read_bytes()).hexdigest()
        assert "run/verdict.json" in names and "ARCHIVE.json" in names, names
    # and its MLflow artifacts are gone, the version and its tags stay, loading and promoting say why not
    assert not model_dir.exists() and client.list_artifacts(run.info.run_id) == []
    assert [v["version"] for v in registry.list_versions("m")] == [1, 2, 3, 4]
    assert registry.list_versions("m")[1]["archived"] == str(tarball)
    with pytest.raises(registry.RegistryError, match=r"archived to .*m-v2.tar.gz.*aivoice restore 2"):
        registry.resolve(2, "m")
    with pytest.raises(registry.RegistryError, match="archived"):
        registry.promote(2, reason="try", force=True, name="m")
    assert registry.resolve(3, "m").checkpoint_path.is_file() and registry.resolve(4, "m").checkpoint_path.is_file()
    # and a second gc archives nothing more
    assert collect_garbage("m", keep=1, repo=None, archive_dir=tmp_path / "archive")["archived"] == []

    # when the tarball was damaged, restore refuses and changes nothing
    good = tarball.read_bytes()
    tarball.write_bytes(good[:-100])
    with pytest.raises(ArchiveError, match="sha256"):
        restore_version("m", 2)
    assert registry.list_versions("m")[1]["archived"]
    # when it is intact again, restore puts both back and the version loads the same bytes
    tarball.write_bytes(good)
    restore_version("m", 2)
    assert registry.list_versions("m")[1]["archived"] is None
    got = registry.resolve(2, "m").checkpoint_path
    assert hashlib.sha256(got.read_bytes()).hexdigest() == client.get_model_version("m", "2").tags["checkpoint_sha256"]
    assert client.download_artifacts(run.info.run_id, "verdict.json", str(tmp_path / "dl"))
    # and registering the same bytes again after a later gc (a re-run of the same candidate) brings it back
    collect_garbage("m", keep=1, repo=None, archive_dir=tmp_path / "archive")
    assert registry.list_versions("m")[1]["archived"]
    assert registry.register(v2_ckpt, name="m", gates_passed=False) == 2, "one version per checkpoint's bytes"
    assert registry.list_versions("m")[1]["archived"] is None and registry.resolve(2, "m").checkpoint_path.is_file()


def test_gc_interrupted_after_tagging_finishes_the_archive_on_the_next_run(mlflow_store, tiny_checkpoint, tmp_path,
                                                                           monkeypatch):
    from mlflow import MlflowClient

    from pipeline.io import archive, registry
    from pipeline.io.retention import collect_garbage

    # given a refused candidate, and a gc that dies after writing and tagging the archive, before deleting
    registry.register(tiny_checkpoint(seed=1), name="m", base=True)
    registry.register(tiny_checkpoint(seed=2), name="m", gates_passed=False)
    real_delete = archive._delete_artifacts

    def killed(*_):
        raise SystemExit("killed")
    monkeypatch.setattr(archive, "_delete_artifacts", killed)
    with pytest.raises(SystemExit):
        collect_garbage("m", keep=0, repo=None, archive_dir=tmp_path / "archive")
    mv = MlflowClient().get_model_version("m", "2")
    assert mv.tags.get("archived") and archive.leftovers(MlflowClient(), mv), "tagged, artifacts still in MLflow"
    # when the next gc runs
    monkeypatch.setattr(archive, "_delete_artifacts", real_delete)
    result = collect_garbage("m", keep=0, repo=None, archive_dir=tmp_path / "archive")
    # then it checks the tarball and deletes what was left; a third gc has nothing to do
    assert [a.get("repeated") for a in result["archived"]] == [True]
    assert not archive.leftovers(MlflowClient(), MlflowClient().get_model_version("m", "2"))
    assert collect_garbage("m", keep=0, repo=None, archive_dir=tmp_path / "archive")["archived"] == []
