"""The registry on the team services: an `mlflow server` whose tracking and registry store is PostgreSQL
(started by scripts/services.sh, artifacts proxied by the server). Registry operations, the remote lease
lock and two processes promoting / rolling back at the same moment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import mlflow
import pytest

from pipeline.io import registry
from pipeline.io.registry import CHAMPION, PREVIOUS, RegistryError
from services import ROOT, postgres_bin, services

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg_services():
    with services("postgres mlflow") as env:
        yield env


@pytest.fixture
def pg_registry(pg_services, monkeypatch, tmp_path):
    """MLFLOW_TRACKING_URI -> the PostgreSQL-backed server; yields a model name no other test uses."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pg_services["MLFLOW_TRACKING_URI"])
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("AIVOICE_ARTIFACT_ROOT", raising=False)
    monkeypatch.setenv("AIVOICE_CACHE_DIR", str(tmp_path / "cache"))
    yield f"detector-{uuid.uuid4().hex[:8]}"
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _psql(env: dict, sql: str) -> str:
    port = (Path(env["_state"]) / "postgres.port").read_text().strip()
    out = subprocess.run([f"{postgres_bin()}/psql", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-d", "mlflow",
                          "-tAc", sql], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _assert_chain_consistent(name: str) -> list[dict]:
    """Every event starts from the champion the previous one left; the aliases are the last event's."""
    events = registry.history(name)
    champion = None
    for event in events:
        assert event["previous"] == champion, f"event {event} did not start from champion {champion}: {events}"
        champion = event["version"]
    aliases = registry.aliases(name)
    assert aliases.get(CHAMPION) == champion, f"aliases {aliases} vs events {events}"
    assert aliases.get(PREVIOUS) == events[-1]["previous"], f"aliases {aliases} vs events {events}"
    model = registry.tracking.configure().get_registered_model(name)
    assert registry.PENDING_TAG not in (model.tags or {}), "no move left half-done"
    return events


def test_register_promote_rollback_on_the_postgres_backed_server(pg_services, pg_registry, tiny_checkpoint):
    name = pg_registry
    ckpt1, ckpt2 = tiny_checkpoint(seed=1), tiny_checkpoint(seed=2)
    # given a base and a passed candidate registered through the server
    v1 = registry.register(ckpt1, base=True, name=name)
    v2 = registry.register(ckpt2, gates_passed=True, name=name)
    assert registry.aliases(name) == {CHAMPION: v1, "challenger": v2}
    # when the candidate is promoted, then rolled back
    registry.promote(reason="pg test", name=name)
    assert registry.resolve(CHAMPION, name).checkpoint_path.read_bytes() == ckpt2.read_bytes()
    registry.rollback(reason="pg rollback", name=name)
    # then aliases, history and weights follow, and the versions really live in PostgreSQL
    assert registry.aliases(name) == {CHAMPION: v1, PREVIOUS: v2}
    assert [e["action"] for e in _assert_chain_consistent(name)] == ["promote", "promote", "rollback"]
    assert registry.resolve(CHAMPION, name).checkpoint_path.read_bytes() == ckpt1.read_bytes()
    assert _psql(pg_services, f"SELECT count(*) FROM model_versions WHERE name = '{name}'") == "2"
    assert _psql(pg_services, f"SELECT version FROM registered_model_aliases WHERE name = '{name}' AND alias = 'champion'") == str(v1)
    assert _psql(pg_services, f"SELECT count(*) FROM registered_models WHERE name = '{registry.REMOTE_LOCK_MODEL}'") == "0", \
        "the lease lock is released after each move"


def test_alias_moves_wait_for_the_remote_lease_lock(pg_registry, tiny_checkpoint, monkeypatch):
    name = pg_registry
    client = registry.tracking.configure()
    v1 = registry.register(tiny_checkpoint(seed=1), base=True, name=name)
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=True, name=name)
    # given another process holding the registry's lease lock
    client.create_registered_model(registry.REMOTE_LOCK_MODEL, tags={"owner": "other-host:1", "expires": f"{time.time() + 600}"})
    try:
        # when a promotion runs, then it waits while the lock is held ...
        done = {}
        worker = threading.Thread(target=lambda: done.update(event=registry.promote(v2, reason="release", name=name)))
        worker.start()
        time.sleep(1.5)
        assert worker.is_alive() and registry.aliases(name)[CHAMPION] == v1, "promote must wait for the lock"
        # ... and a rollback gives up with a clear error after the lock timeout
        with pytest.raises(RegistryError, match="registry lock .* still held"):
            with registry._registry_lock(client, timeout_s=0.5):
                pass
    finally:
        client.delete_registered_model(registry.REMOTE_LOCK_MODEL)
    # and once the lock is released the promotion completes
    worker.join(timeout=30)
    assert done["event"]["version"] == v2 and registry.aliases(name)[CHAMPION] == v2
    # and a lock whose lease expired (its holder crashed) is broken
    client.create_registered_model(registry.REMOTE_LOCK_MODEL, tags={"owner": "crashed:1", "expires": f"{time.time() - 1}"})
    assert registry.rollback(reason="after a crash", name=name)["version"] == v1
    _assert_chain_consistent(name)


_RACER = """
import json, os, sys, time
from pathlib import Path
from pipeline.io import registry
go, op, arg, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
registry.aliases(name)                                  # imports and connection done before the start line
Path(f"{go}.ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.002)
try:
    event = registry.promote(int(arg), reason="race", name=name) if op == "promote" else registry.rollback(reason="race", name=name)
    print(json.dumps({"ok": event["version"]}))
except registry.PromotionError as exc:
    print(json.dumps({"refused": str(exc)}))
"""


def _race(tmp_path: Path, name: str, ops: list[tuple[str, str]]) -> list[dict]:
    """Start one process per (op, arg), release them at the same instant, return what each printed."""
    go = tmp_path / f"go-{uuid.uuid4().hex[:6]}"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(go), op, arg, name], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for op, arg in ops]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob(f"{go.name}.ready-*"))) < len(procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_promoting_at_once_end_consistent(pg_registry, tiny_checkpoint, tmp_path):
    name = pg_registry
    # given champion v1 and two candidates that both passed against it
    v1 = registry.register(tiny_checkpoint(seed=1), base=True, name=name)
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=True, name=name)
    v3 = registry.register(tiny_checkpoint(seed=3), gates_passed=True, name=name)
    # when two processes promote them at the same instant
    results = _race(tmp_path, name, [("promote", str(v2)), ("promote", str(v3))])
    # then exactly one wins; the other is refused, since champion moved from the version it was judged against
    winners = [r["ok"] for r in results if "ok" in r]
    assert len(winners) == 1, f"exactly one promotion may win: {results}"
    assert any("validated against" in r.get("refused", "") or "moved" in r.get("refused", "") for r in results), results
    events = _assert_chain_consistent(name)
    aliases = registry.aliases(name)   # v3, registered last, was challenger: it stays so when v2 won
    expected = {CHAMPION: winners[0], PREVIOUS: v1} | ({"challenger": v3} if winners[0] == v2 else {})
    assert aliases == expected and len(events) == 2, f"{aliases} {events}"
    # when a promotion and a rollback race, then whichever goes first, the chain of events stays consistent
    v4 = registry.register(tiny_checkpoint(seed=4), gates_passed=True, name=name)
    results = _race(tmp_path, name, [("promote", str(v4)), ("rollback", "")])
    assert any("ok" in r for r in results), results
    _assert_chain_consistent(name)
