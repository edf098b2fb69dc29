"""process_group: a child server and everything it started end together (aivoice ui, the tests' servers)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from pipeline.apps import process_group
from procs import running


def _gone_soon(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(pid)


def test_stop_ends_a_child_that_outlived_its_leader():
    # given a leader that started a background child and exited (as mlflow does on a lone SIGTERM)
    proc = process_group.start(["sh", "-c", "sleep 300 & echo $!"], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.wait(timeout=10)
    try:
        assert running(child)
        # when the group is stopped
        process_group.stop(proc, grace_s=5)
        # then the child is gone too
        assert _gone_soon(child)
    finally:
        if running(child):
            os.kill(child, signal.SIGKILL)


def test_stop_kills_a_group_that_ignores_sigterm_after_the_grace():
    # given a leader and child that both ignore SIGTERM
    proc = process_group.start(["sh", "-c", "trap '' TERM; sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        started = time.monotonic()
        # when stopped with a 1 s grace
        status = process_group.stop(proc, grace_s=1)
        # then both are killed once the grace has passed
        assert status == -signal.SIGKILL
        assert 1 <= time.monotonic() - started < 10
        assert _gone_soon(child)
    finally:
        if running(child):
            os.kill(child, signal.SIGKILL)
