"""The production path, for real: `prefect server start`, a process work pool, the `retrain` deployment
made by flows.deploy.schedule from the project's source, `prefect worker start`, a run triggered through
the API (run_deployment), and the registry outcome. Every process is stopped, whatever happens."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from test_flows import MODEL, RELAXED_GATES, make_project

BIN = Path(sys.executable).parent
POOL = "aivoice-test-pool"
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A child in its own process group (so stopping it stops what it started), output to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it has not exited within 20 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def _python(code: str, cwd: Path, env: dict, timeout: float) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"python -c failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect server on a free port with its own PREFECT_HOME (sqlite); yields the environment
    that points clients, workers and flow runs at it."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
    }
    log = tmp_path / "server.log"
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    tmp_path, env, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"prefect server exited ({server.returncode}):\n{_tail(log)}"
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prefect server not healthy within 90 s:\n{_tail(log)}"
            time.sleep(1)
        yield env
    finally:
        _stop(server)


def test_scheduled_deployment_runs_retrain_on_a_worker(tmp_path, small_corpus, mlflow_store, tiny_checkpoint,
                                                        prefect_server, monkeypatch):
    from pipeline.io import registry, tracking

    env = prefect_server | {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "AIVOICE_ARTIFACT_ROOT", "AIVOICE_CACHE_DIR")}
    # given a project with new samples waiting, a champion in the registry, and auto promotion
    project = make_project(tmp_path / "project", small_corpus, gates=RELAXED_GATES, promotion="auto")
    assert registry.register(tiny_checkpoint(seed=2), name=MODEL, base=True) == 1, "the first base is champion"
    # when `retrain` is deployed from the project's source on a nightly cron in a process pool
    deployment_id = _python(
        "from flows.deploy import schedule; "
        f"print(schedule('0 3 * * *', name='nightly', work_pool={POOL!r}, repo='.', paused=True))",
        project, env, timeout=120)
    assert len(deployment_id) == 36, f"a deployment id: {deployment_id}"
    # and a worker serves the pool
    worker_log = tmp_path / "worker.log"
    worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"], project, env, worker_log)
    try:
        # and a run is triggered through the API
        started = time.monotonic()
        result = json.loads(_python(
            "import json; from prefect.deployments import run_deployment; "
            "fr = run_deployment('retrain/nightly', timeout=300, poll_interval=2); "
            "print(json.dumps({'id': str(fr.id), 'state': fr.state.type.value, 'message': fr.state.message}))",
            project, env, timeout=330))
        # then the flow run completed on the worker
        assert result["state"] == "COMPLETED", \
            f"flow run {result} after {time.monotonic() - started:.0f} s; worker log:\n{_tail(worker_log, 6000)}"
    finally:
        _stop(worker)
    # and the registry holds the new version, promoted, its MLflow run tagged with the flow run
    versions = registry.list_versions(MODEL)
    assert [v["version"] for v in versions] == [1, 2], f"a new version was registered: {versions}"
    assert registry.aliases(MODEL) == {"champion": 2, "previous-champion": 1}, \
        f"auto promotion moved champion: {registry.aliases(MODEL)}"
    run_id = tracking.configure().get_model_version(MODEL, "2").run_id
    tags = tracking.configure().get_run(run_id).data.tags
    assert tags.get("prefect_flow_run_id") == result["id"], f"the MLflow run names its flow run: {tags}"
    assert (project / "dvc.lock").is_file(), "the run went through DVC: dvc.lock records it"
