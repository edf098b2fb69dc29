"""A real `mlflow server` (sqlite backend, webhooks on) and a real `aivoice serve` process that receives its
webhooks: the stack the registry-guard tests (UI promotions, concurrent promote/rollback) run against."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pipeline.apps import process_group
from pipeline.io import alias_guard

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, ok=lambda r: r.status_code == 200) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if ok(httpx.get(url, timeout=2)):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} not ready after {timeout_s} s: {log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM to the process's group (started by process_group.start), then SIGKILL after 15 s."""
    process_group.stop(proc, grace_s=15)


@contextmanager
def mlflow_server(folder: Path, hook_url: str, secret: str) -> Iterator[str]:
    """`mlflow server` on a free port, allowed to deliver webhooks to `hook_url`; yields its URI."""
    port = free_port()
    env = os.environ | alias_guard.server_env(hook_url, secret) | {"MLFLOW_WEBHOOK_CACHE_TTL": "1"}
    log = folder / "mlflow-server.log"
    with open(log, "wb") as out:
        proc = process_group.start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                                    "--artifacts-destination", str(folder / "server-artifacts"), "--host", "127.0.0.1",
                                    "--port", str(port), "--workers", "1"], stdout=out, stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{uri}/health", proc, log, 90)
        yield uri
    finally:
        stop_process(proc)


@contextmanager
def aivoice_serve(folder: Path, tracking_uri: str, secret: str, port: int, *, ui_promotion: str = "revert",
                  max_concurrent: int = 4) -> Iterator[Path]:
    """`aivoice serve` on `port` with the webhook secret, following `tracking_uri`'s champion; yields its log
    file once it serves a champion (register one first)."""
    params = folder / "params.yaml"
    params.write_text(f"registry:\n  ui_promotion: {ui_promotion}\nserve:\n  port: {port}\n  refresh_s: 0.5\n"
                      f"  max_concurrent: {max_concurrent}\ncompute:\n  threads: 1\n")
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, alias_guard.SECRET_ENV: secret, "PYTHONPATH": str(ROOT),
                        "AIVOICE_CACHE_DIR": str(folder / "serve-cache"), "OMP_NUM_THREADS": "1"}
    log = folder / "serve.log"
    with open(log, "wb") as out:
        proc = process_group.start([str(BIN / "aivoice"), "--params", str(params), "serve"], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=folder)
    try:
        _wait(f"http://127.0.0.1:{port}/health", proc, log, 120)
        yield log
    finally:
        stop_process(proc)


def move_alias_like_the_ui(tracking_uri: str, name: str, alias: str, version: int | None) -> None:
    """The REST calls the MLflow UI makes: POST (set) or DELETE registered-models/alias."""
    url = f"{tracking_uri}/api/2.0/mlflow/registered-models/alias"
    if version is None:
        r = httpx.request("DELETE", url, json={"name": name, "alias": alias}, timeout=30)
    else:
        r = httpx.post(url, json={"name": name, "alias": alias, "version": str(version)}, timeout=30)
    assert r.status_code == 200, f"{r.status_code} {r.text}"


def wait_for(condition, timeout_s: float = 45, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"{what} not reached after {timeout_s} s")
