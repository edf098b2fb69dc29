"""Child servers started in a process group of their own and stopped as a group.

`mlflow server` and `mlflow ui` (MLflow 3) start uvicorn and seven huey job consumers. A SIGTERM to the
mlflow process alone ends it and leaves the consumers running, reparented (MLflow 3.17: seven processes
of about 76 MB each, still alive 30 s later); a SIGTERM to the group ends them all within seconds.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time


def start(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """Popen `cmd` as the leader of a new session, so `stop` reaches everything it starts."""
    return subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # a member we may not signal is still a member
        return True
    return True


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> int:
    """SIGTERM the whole group (also when its leader has already exited: its children may not have),
    SIGKILL what is left after `grace_s`; returns the leader's exit status."""
    deadline = time.monotonic() + grace_s
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait()
