"""The DVC remote: `aivoice remote add` with a local-path remote and an SSH remote (a real sshd on a free
port, its host key and authorized_keys in a temp folder), `aivoice remote push`, and a git clone on
another path that `aivoice remote pull`s the same store, byte for byte."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_flows import RELAXED_GATES, make_project

pytestmark = pytest.mark.integration
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _aivoice(args: list[str], cwd: Path) -> str:
    return _run([sys.executable, "-m", "pipeline.apps.cli", *args], cwd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path):
    """sshd on 127.0.0.1:<free port> accepting one temp key for the current user; yields (port, user, keyfile)."""
    if not Path(SSHD).is_file():
        pytest.skip("sshd not installed (Debian package openssh-server, `make system-deps`)")
    folder = tmp_path / "sshd"
    folder.mkdir()
    for kind in ("host", "client"):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / kind)], folder)
    (folder / "authorized_keys").write_text((folder / "client.pub").read_text())
    (folder / "authorized_keys").chmod(0o600)
    Path("/run/sshd").mkdir(exist_ok=True)     # privilege separation folder sshd expects
    port = _free_port()
    config = folder / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
                      "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                      f"StrictModes no\nUsePAM no\nPidFile {folder / 'sshd.pid'}\nSubsystem sftp internal-sftp\n")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"sshd exited: {proc.stdout.read().decode()[-2000:]}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "sshd did not listen within 20 s"
            time.sleep(0.2)
        import getpass
        yield port, getpass.getuser(), folder / "client"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_push_then_a_clone_pulls_the_same_store(kind, tmp_path, small_corpus, request):
    # given a project whose ingest stage ran through DVC, committed to git
    project = make_project(tmp_path / "project", small_corpus, gates=RELAXED_GATES)
    _run([sys.executable, "-m", "dvc", "repro", "--single-item", "ingest"], project)
    # when a remote is added by one command and the store is pushed
    remote_dir = tmp_path / "remote"
    if kind == "local":
        _aivoice(["remote", "add", "origin", str(remote_dir)], project)
    else:
        port, user, key = request.getfixturevalue("sshd")
        _aivoice(["remote", "add", "origin", f"ssh://127.0.0.1:{port}{remote_dir}", "--user", user, "--keyfile", str(key)],
                 project)
    assert "origin" in _aivoice(["remote", "list"], project) and "(default)" in _aivoice(["remote", "list"], project)
    assert "config.local" not in _run(["git", "status", "--porcelain", "--ignored=no"], project), "credentials stay local"
    _aivoice(["remote", "push"], project)
    assert any(remote_dir.rglob("*")), "the remote holds the pushed objects"
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ingest"], project)
    # and the project is cloned on another path (the clone gets the remote from .dvc/config)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    if kind == "ssh":   # the key is this machine's setting, not the project's: set again in the clone
        _aivoice(["remote", "add", "origin", f"ssh://127.0.0.1:{port}{remote_dir}", "--user", user, "--keyfile", str(key)],
                 clone)
    assert not (clone / "data" / "store").exists()
    _aivoice(["remote", "pull"], clone)
    # then the clone's store is byte for byte the project's, and DVC sees it up to date with dvc.lock
    assert _hashes(clone / "data" / "store") == _hashes(project / "data" / "store")
    assert len(_hashes(clone / "data" / "store")) > 20
    # (the store is dvc.lock's output: the clone's lock names the same directory hash the project pushed)
    outs = {o["path"]: o["md5"] for o in yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["ingest"]["outs"]
            if "md5" in o}
    assert outs["data/store"].endswith(".dir") and outs == {
        o["path"]: o["md5"] for o in yaml.safe_load((project / "dvc.lock").read_text())["stages"]["ingest"]["outs"] if "md5" in o}


def test_remote_add_outside_a_dvc_project_says_so(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.apps.cli", "remote", "add", "origin", str(tmp_path / "r")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "not a DVC project" in proc.stderr, proc.stderr


def test_a_clone_that_pulls_reproduces_the_same_candidate(tmp_path, small_corpus, mlflow_store, tiny_checkpoint):
    from pipeline.io import registry

    # given a project that ran the stages up to finetune against the team's registry (a shared store), pushed
    project = make_project(tmp_path / "project", small_corpus, gates=RELAXED_GATES)
    registry.register(tiny_checkpoint(seed=1), base=True)
    _aivoice(["export-champion"], project)
    _run([sys.executable, "-m", "dvc", "repro", "finetune"], project)
    _aivoice(["remote", "add", "origin", str(tmp_path / "remote")], project)
    _aivoice(["remote", "push"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "finetune"], project)
    candidate = hashlib.sha256((project / "models" / "candidate.pt").read_bytes()).hexdigest()
    # when a clone on another path pulls, exports the same champion and runs the finetune stage again
    clone = tmp_path / "elsewhere" / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    _aivoice(["remote", "pull"], clone)
    _aivoice(["export-champion"], clone)
    (clone / "models" / "candidate.pt").unlink()
    _run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "finetune"], clone)
    # then the stage saw the same inputs (store, twins, augmented copies, champion, code, params: dvc.lock's
    # deps), and the candidate it trained is the same bytes under the same hash
    assert hashlib.sha256((clone / "models" / "candidate.pt").read_bytes()).hexdigest() == candidate
    lock = lambda root: yaml.safe_load((root / "dvc.lock").read_text())["stages"]["finetune"]
    assert lock(clone)["deps"] == lock(project)["deps"] and lock(clone)["params"] == lock(project)["params"]
    model_out = lambda root: [o for o in lock(root)["outs"] if o["path"] == "models/candidate.pt"]
    assert model_out(clone) == model_out(project) and model_out(clone)[0]["md5"], "the report holds timings; the model not"
