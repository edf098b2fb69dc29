"""The production path, for real: `prefect server start`, a process work pool with two `prefect worker
start` processes, deployments made by flows.deploy from a project's source, runs triggered through the API,
and what they leave in the store and the registry. Every process is stopped, whatever happens.

One server serves the module (it takes ~20 s to start); each test starts its own two workers, with the
test's MLflow store in their environment."""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from flows.retrain import STAGES
from pipeline.apps import process_group
from procs import parent
from test_flows import MODEL, RELAXED_GATES, REPO, make_project

BIN = Path(sys.executable).parent
POOL = "aivoice-test-pool"
CRASH_AFTER_S = 60     # the crash automation's window here: 2 heartbeats (production: 90 s, 3 beats)
pytestmark = pytest.mark.integration

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A child in its own process group (so stopping it stops what it started), output to `log`."""
    with log.open("w") as out:
        return process_group.start(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left of it after 20 s."""
    process_group.stop(proc, grace_s=20)


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def _python(code: str, cwd: Path, env: dict, timeout: float) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"python -c failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real Prefect server on a free port with its own PREFECT_HOME (sqlite), the crash automation
    in place; yields the environment that points clients, workers and flow runs at it."""
    tmp_path = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",   # expired concurrency leases freed within 5 s
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
        _python(f"from flows.deploy import ensure_crash_automation; print(ensure_crash_automation({CRASH_AFTER_S}))",
                REPO, env, timeout=120)
        yield env
    finally:
        _stop(server)


@pytest.fixture
def team_env(prefect_server, mlflow_store):
    """The server's environment plus this test's MLflow store: what the workers and their flow runs see."""
    return prefect_server | {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "AIVOICE_ARTIFACT_ROOT", "AIVOICE_CACHE_DIR")}


@contextmanager
def workers(cwd: Path, env: dict, logs: Path, n: int = 2):
    """`n` process workers of POOL (named worker-1..n); yields {name: (Popen, log path)}; stops them after."""
    logs.mkdir(parents=True, exist_ok=True)
    started = {}
    try:
        for i in range(1, n + 1):
            log = logs / f"worker-{i}.log"
            started[f"worker-{i}"] = (_start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                                              "--name", f"worker-{i}"], cwd, env, log), log)
        yield started
    finally:
        for proc, _ in started.values():
            _stop(proc)


def _client(env: dict):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(env["PREFECT_API_URL"])


def _flow_run(env: dict, flow_run_id: str):
    with _client(env) as client:
        return client.read_flow_run(flow_run_id)


def _wait_state(env: dict, flow_run_id: str, until, timeout: float, what: str, logs: dict):
    deadline = time.monotonic() + timeout
    while True:
        fr = _flow_run(env, flow_run_id)
        if until(fr):
            return fr
        assert time.monotonic() < deadline, \
            f"flow run {flow_run_id} not {what} within {timeout:.0f} s (state {fr.state}); logs:\n" + \
            "\n".join(f"--- {name}\n{_tail(log, 3000)}" for name, (_, log) in logs.items())
        time.sleep(1)


def _trigger(env: dict, cwd: Path, deployment: str) -> str:
    return _python(f"from prefect.deployments import run_deployment; print(run_deployment({deployment!r}, timeout=0).id)",
                   cwd, env, timeout=120)


def _ran_on(logs: dict, flow_run_id: str) -> list[str]:
    """The workers that took this flow run: they logged its submission and no aborted submission (both
    workers may try; the server lets one move it to Pending)."""
    took = []
    for name, (_, log) in logs.items():
        text = _tail(log, 10**7)
        if f"submitting flow run '{flow_run_id}'" in text and f"Aborted submission of flow run '{flow_run_id}'" not in text:
            took.append(name)
    return took


def _task_states(env: dict, flow_run_id: str) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client(env) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {tr.name.rsplit("-", 1)[0]: tr.state.type.value for tr in runs if tr.state}


def _flow_run_processes(flow_run_id: str) -> list[int]:
    """Pids of the processes that run this flow run (the worker's child, found by its PREFECT__FLOW_RUN_ID)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def _guarded_sections(env: dict, flow_run_id: str) -> tuple[float, float]:
    """(start, end) of the run's store-limit section, from the times of its "holding" and "released" log lines."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs, deadline = [], time.monotonic() + 60
    with _client(env) as client:
        while True:   # a run's last log lines reach the server in batches, possibly after its final state
            while page := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), offset=len(logs)):
                logs += page
            held = [lg.timestamp.timestamp() for lg in logs if lg.message.startswith("holding aivoice-retrain-")]
            released = [lg.timestamp.timestamp() for lg in logs if lg.message.startswith("released aivoice-retrain-")]
            if len(released) >= len(held) >= 1 or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert len(held) == 1 and len(released) == 1, f"one guarded section per run: {[lg.message for lg in logs][-30:]}"
    return held[0], released[0]


def _assert_store_matches_manifest(store: Path) -> None:
    """Every manifest row's file exists with its sha256, every stored file is in the manifest, no half-written manifest."""
    with (store / "MANIFEST.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, "the store has rows"
    for row in rows:
        assert hashlib.sha256((store / row["path"]).read_bytes()).hexdigest() == row["sha256"], f"stored bytes: {row}"
    files = {str(p.relative_to(store)) for p in (store / "audio").rglob("*") if p.is_file()}
    assert files == {r["path"] for r in rows}, f"files not in the manifest: {files - {r['path'] for r in rows}}"
    assert not list(store.glob("*.tmp")), "no half-written manifest is left"


def test_monitor_deployment_runs_on_one_of_two_workers(tmp_path, small_corpus, tiny_checkpoint, team_env):
    from pipeline.io import registry

    # given a project with a champion and a day of traffic
    project = tmp_path / "project"
    for package in ("pipeline", "flows"):
        shutil.copytree(REPO / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    traffic = project / "traffic" / "2024-05-01"
    traffic.mkdir(parents=True)
    for clip in sorted(small_corpus.human_holdout_dir.glob("*.wav"))[:3]:
        shutil.copy(clip, traffic / clip.name)
    assert registry.register(tiny_checkpoint(seed=4), name=MODEL, base=True) == 1, "the first base is champion"
    # when the monitor flow is deployed to the process pool from the project's source
    _python(f"from flows.deploy import deploy_monitor; print(deploy_monitor(['traffic'], name='traffic', work_pool={POOL!r}, "
            f"review_count=2, review_dir={str(tmp_path / 'review')!r}))", project, team_env, timeout=120)
    # and two workers serve the pool, and a run is triggered through the API
    with workers(project, team_env, tmp_path / "logs") as logs:
        run_id = _trigger(team_env, project, "monitor/traffic")
        # then the run completes, on exactly one of the workers
        fr = _wait_state(team_env, run_id, lambda fr: fr.state.is_final(), 180, "finished", logs)
        assert fr.state.is_completed(), f"monitor run {fr.state}:\n" + _tail(logs["worker-1"][1]) + _tail(logs["worker-2"][1])
        assert len(_ran_on(logs, run_id)) == 1, f"one worker took the run: {_ran_on(logs, run_id)}"
    assert fr.work_pool_name == POOL and "aivoice" in fr.tags, f"run of the pool, tagged: {fr.work_pool_name} {fr.tags}"
    # and it did its work: the review queue holds the two least certain clips
    queued = list((tmp_path / "review").glob("*/MANIFEST.csv"))
    assert len(queued) == 1 and len(queued[0].read_text().splitlines()) == 3, f"a 2-clip review queue: {queued}"


def test_retrain_survives_a_killed_worker_and_two_retrains_never_overlap(tmp_path, small_corpus, tiny_checkpoint,
                                                                          team_env):
    from flows.store_limit import limit_name
    from pipeline.io import registry, tracking

    env = team_env
    # given a project with new samples waiting, a champion in the registry, and manual promotion (so that
    # the champion, hence models/production.pt, stays put and later runs have nothing new to train)
    project = make_project(tmp_path / "project", small_corpus, gates=RELAXED_GATES, promotion="manual")
    assert registry.register(tiny_checkpoint(seed=2), name=MODEL, base=True) == 1, "the first base is champion"
    # when `retrain` is deployed from the project's source on a nightly cron in the process pool
    deployment_id = _python(
        "from flows.deploy import schedule; "
        f"print(schedule('0 3 * * *', name='nightly', work_pool={POOL!r}, repo='.', paused=True))",
        project, env, timeout=120)
    assert len(deployment_id) == 36, f"a deployment id: {deployment_id}"
    with workers(project, env, tmp_path / "logs") as logs:
        # and a run starts its first stage on one of two workers
        killed = _trigger(env, project, "retrain/nightly")
        _wait_state(env, killed, lambda fr: any(_task_states(env, killed).get(s) == "RUNNING" for s in STAGES),
                    240, "inside a stage", logs)
        # and that worker and the flow run's process are SIGKILLed (the host is lost)
        pids = _flow_run_processes(killed)
        takers = [name for name, (proc, _) in logs.items() if any(parent(pid) == proc.pid for pid in pids)]
        assert len(takers) == 1, f"the flow run's process is a child of one worker: {pids} {takers}"
        taker = takers[0]
        assert _ran_on(logs, killed) == [taker], f"its log says it took the run: {_ran_on(logs, killed)}"
        worker = logs[taker][0]
        os.killpg(worker.pid, signal.SIGKILL)
        for pid in pids:   # the flow run's process leads its own session; DVC's children are in it
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        worker.wait(timeout=10)
        killed_at = time.monotonic()
        # then the server marks the run CRASHED once its heartbeats stop
        fr = _wait_state(env, killed, lambda fr: fr.state.is_final(), CRASH_AFTER_S + 90, "CRASHED", logs)
        assert fr.state.is_crashed() and "no heartbeat" in (fr.state.message or ""), f"crashed by the automation: {fr.state}"
        crash_s = time.monotonic() - killed_at
        # when the run is started again, the surviving worker completes it
        rerun = _trigger(env, project, "retrain/nightly")
        fr = _wait_state(env, rerun, lambda fr: fr.state.is_final(), 420, "finished", logs)
        assert fr.state.is_completed(), f"the re-run completes: {fr.state}; logs:\n{_tail(logs['worker-1'][1], 6000)}" \
                                        f"\n{_tail(logs['worker-2'][1], 6000)}"
        assert _ran_on(logs, rerun) and taker not in _ran_on(logs, rerun), "the surviving worker ran it"

        # then the store matches its manifest, DVC agrees with dvc.lock, and the registry moved once, completely
        _assert_store_matches_manifest(project / "data" / "store")
        status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, env=env, capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0 and "up to date" in status.stdout, f"dvc status after the re-run:\n{status.stdout}{status.stderr}"
        assert [v["version"] for v in registry.list_versions(MODEL)] == [1, 2], \
            f"the killed run registered nothing, the re-run one version: {registry.list_versions(MODEL)}"
        assert registry.aliases(MODEL) == {"champion": 1, "challenger": 2}, f"v2 waits as challenger: {registry.aliases(MODEL)}"
        model = tracking.configure().get_registered_model(MODEL)
        assert registry.PENDING_TAG not in (model.tags or {}), f"no alias move left half-done: {model.tags}"
        run_id = tracking.configure().get_model_version(MODEL, "2").run_id
        assert tracking.configure().get_run(run_id).data.tags.get("prefect_flow_run_id") == rerun, \
            "the MLflow run names the re-run"

        # given a second deployment of the same checkout (the deployment's own limit does not cover it)
        _python("from flows.deploy import schedule; "
                f"print(schedule('0 4 * * *', name='adhoc', work_pool={POOL!r}, repo='.', paused=True))",
                project, env, timeout=120)
        with workers(project, env, tmp_path / "logs2", n=1) as more:   # two live workers again
            logs = {**logs, **{f"more-{k}": v for k, v in more.items()}}
            # when both deployments are triggered at once
            pair = [_trigger(env, project, "retrain/nightly"), _trigger(env, project, "retrain/adhoc")]
            done = [_wait_state(env, r, lambda fr: fr.state.is_final(), 300, "finished", logs) for r in pair]
            # (read while the workers run: a run's process sends its last log lines after its final state,
            # and stopping the workers would stop it)
            sections = sorted(_guarded_sections(env, r) for r in pair)
    # then both complete, on two workers, and their guarded sections do not overlap: one waited for the other
    assert all(fr.state.is_completed() for fr in done), f"both retrains complete: {[fr.state for fr in done]}"
    (s1, e1), (s2, e2) = sections
    assert e1 <= s2, f"the sections overlap: [{s1:.1f}, {e1:.1f}] and [{s2:.1f}, {e2:.1f}]"
    with _client(env) as client:
        limit = client.read_global_concurrency_limit_by_name(limit_name(project / "data" / "store"))
    assert limit.limit == 1 and limit.active_slots == 0, f"one slot, free again: {limit}"
    assert [v["version"] for v in registry.list_versions(MODEL)] == [1, 2], "nothing new: no new version"
    assert registry.aliases(MODEL) == {"champion": 1, "challenger": 2}, "nothing new: nothing moved"
    print(f"crash detected {crash_s:.0f} s after the kill; sections [{s1:.1f}, {e1:.1f}] [{s2:.1f}, {e2:.1f}]")
