"""`aivoice ui`: the MLflow UI it starts, and everything that UI starts, ends when the command ends.

MLflow 3's UI runs uvicorn and seven huey job consumers; before the UI ran in a process group of its own,
a SIGTERM to `aivoice ui` left all of them running."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from guard_stack import BIN, free_port
from procs import running
from pipeline.io import alias_guard

pytestmark = pytest.mark.integration


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _as_at_a_terminal() -> None:
    """SIGINT back to its default in the child: a job that a non-interactive shell started with `&` (a CI
    runner, nohup) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("how, secret", [(signal.SIGTERM, "s3cret"), (signal.SIGINT, None)],
                         ids=["sigterm-with-webhook", "ctrl-c-without"])
def test_ui_ends_with_every_process_it_started(tmp_path, how, secret):
    # given `aivoice ui` serving a sqlite tracking store (with a webhook secret: it registers the webhook)
    port = free_port()
    (tmp_path / "params.yaml").write_text("compute:\n  threads: 1\n")
    env = {k: v for k, v in os.environ.items() if k not in (alias_guard.SECRET_ENV, alias_guard.SECRET_FILE_ENV)}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    env |= {alias_guard.SECRET_ENV: secret} if secret else {}
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BIN / "aivoice"), "ui", "--port", str(port)], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_as_at_a_terminal)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"aivoice ui exited with {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the UI was not up with its job consumers in 120 s: {log.read_text()[-2000:]}"
            try:
                healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                healthy = False
            started = _descendants(proc.pid)
            webhook = secret is None or "champion moves in the UI go to" in log.read_text()
            if healthy and webhook and len(started) >= 4:   # mlflow, uvicorn and job consumers
                break
            time.sleep(0.5)
        # when the command is stopped (SIGTERM from a service manager, or Ctrl-C at its terminal)
        proc.send_signal(how)
        status = proc.wait(timeout=60)
        # then nothing it started is left running
        deadline = time.monotonic() + 20
        while (left := {p for p in started if running(p)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"{len(left)} of {len(started)} processes left running: " + subprocess.run(
            ["ps", "-o", "pid,args", "-p", ",".join(map(str, left))], capture_output=True, text=True).stdout
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        assert status == 128 + how, f"exit status {status}: {log.read_text()[-2000:]}"
    finally:
        for pid in started | {proc.pid}:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
