"""Champion moves made outside aivoice (the MLflow UI's REST calls) pass the promotion guard through the
webhook that a real `mlflow server` delivers to a real `aivoice serve`."""
from __future__ import annotations

import json
import subprocess
import time
import uuid

import httpx
import pytest

from guard_stack import BIN, ROOT, aivoice_serve, free_port, mlflow_server, move_alias_like_the_ui, wait_for
from pipeline.io import alias_guard, registry, tracking
from pipeline.io.registry import CHALLENGER, CHAMPION, PREVIOUS

NAME = registry.DEFAULT_NAME


@pytest.fixture
def server_env(monkeypatch, tmp_path):
    def use(uri: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("AIVOICE_ARTIFACT_ROOT", raising=False)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        monkeypatch.setenv("AIVOICE_CACHE_DIR", str(tmp_path / "cache"))
    yield use
    import mlflow
    mlflow.set_tracking_uri(None)


def register_webhook(uri: str, url: str, secret: str) -> None:
    """`aivoice webhook register`, as the documented server set-up runs it."""
    out = subprocess.run([str(BIN / "aivoice"), "webhook", "register", "--url", url, "--tracking-uri", uri],
                         env={**__import__("os").environ, alias_guard.SECRET_ENV: secret, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def last_event() -> dict:
    events = registry.history()
    return events[-1] if events else {}


def settled(action: str, reason: str = "") -> dict | None:
    """The latest event, once it is `action` (with `reason` in its reason) and its alias moves are done."""
    event = last_event()
    done = event.get("action") == action and reason in event.get("reason", "")
    return event if done and registry._state(tracking.configure(), NAME)[1] is None else None


def test_signature_check_follows_mlflow_scheme():
    body, secret = b'{"entity": "model_version_alias"}', "k"
    import base64, hashlib, hmac
    now = int(time.time())
    good = "v1," + base64.b64encode(hmac.new(b"k", f"d1.{now}.".encode() + body, hashlib.sha256).digest()).decode()
    headers = {"x-mlflow-delivery-id": "d1", "x-mlflow-timestamp": str(now), "x-mlflow-signature": good}
    assert alias_guard.signature_ok(secret, body, headers)
    assert not alias_guard.signature_ok("other", body, headers), "another secret"
    assert not alias_guard.signature_ok(secret, body + b" ", headers), "a changed body"
    assert not alias_guard.signature_ok(secret, body, headers | {"x-mlflow-delivery-id": "d2"}), "another delivery id"
    assert not alias_guard.signature_ok(secret, body, headers, now=now + 3600), "a replay an hour later"
    assert not alias_guard.signature_ok(secret, body, {}), "no headers"


@pytest.mark.integration
def test_champion_moves_in_the_mlflow_ui_pass_the_guard(tmp_path, server_env, tiny_checkpoint):
    secret, port = uuid.uuid4().hex, free_port()
    hook = f"http://127.0.0.1:{port}/hooks/mlflow"
    with mlflow_server(tmp_path, hook, secret) as uri:
        server_env(uri)
        # given a webhook registered with the wrong secret, a base champion v1, a failed v2 and a passed v3
        register_webhook(uri, hook, "not-" + secret)
        v1 = registry.register(tiny_checkpoint(seed=1), base=True)
        v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=False, tags={"failed_gates": "human_fpr"})
        v3 = registry.register(tiny_checkpoint(seed=3), gates_passed=True)
        with aivoice_serve(tmp_path, uri, secret, port) as serve_log:
            # when deliveries come forged, unsigned, or signed with the wrong secret (MLflow's own delivery)
            body = json.dumps({"entity": "model_version_alias", "action": "created",
                               "data": {"name": NAME, "alias": CHAMPION, "version": str(v2)}}).encode()
            forged = httpx.post(hook, content=body, timeout=30, headers={
                "x-mlflow-signature": "v1,AAAA", "x-mlflow-timestamp": str(int(time.time())), "x-mlflow-delivery-id": "x"})
            unsigned = httpx.post(hook, content=body, timeout=30)
            assert forged.status_code == 401 and unsigned.status_code == 401, f"{forged.text} {unsigned.text}"
            before = registry.history()
            move_alias_like_the_ui(uri, NAME, CHAMPION, v2)
            wait_for(lambda: serve_log.read_text().count("MLflow webhook refused") >= 3, what="MLflow's delivery refused")
            time.sleep(1.0)
            # then nothing changes: the unvalidated v2 stays where the UI put it, no event is recorded
            assert registry.history() == before and registry.aliases()[CHAMPION] == v2, registry.history()

            # given the webhook registered with the service's secret (aivoice webhook register)
            register_webhook(uri, hook, secret)
            time.sleep(1.5)   # the server caches its webhook list for MLFLOW_WEBHOOK_CACHE_TTL (1 s here)
            # when the UI makes the failed v2 champion, then v1 is put back and the revert names v2 and why
            move_alias_like_the_ui(uri, NAME, CHAMPION, v2)
            event = wait_for(lambda: settled("revert"), what="revert of v2")
            assert event["version"] == v1 and event["previous"] == v2, event
            assert f"v{v2} was made champion" in event["reason"] and "validation_status=failed" in event["reason"], event
            assert registry.aliases() == {CHAMPION: v1, CHALLENGER: v3}, registry.aliases()

            # when the UI promotes the validated v3, then it is recorded and previous-champion is v1
            move_alias_like_the_ui(uri, NAME, CHAMPION, v3)
            event = wait_for(lambda: settled("ui-promote"), what="ui-promote")
            assert (event["version"], event["previous"], event["forced"]) == (v3, v1, False), event
            assert registry.aliases() == {CHAMPION: v3, PREVIOUS: v1}, registry.aliases()
            info = registry.describe_version(v3)["promotion"]
            assert info["action"] == "ui-promote" and info["by"] == alias_guard.UI_USER, info
            served = wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/model", timeout=10).json()["version"] == v3,
                              what="the service following v3")
            assert served

            # when the UI rolls back to v1, then it is a ui-rollback and previous-champion is v3
            move_alias_like_the_ui(uri, NAME, CHAMPION, v1)
            event = wait_for(lambda: settled("ui-rollback"), what="ui-rollback")
            assert registry.aliases() == {CHAMPION: v1, PREVIOUS: v3}, registry.aliases()
            # and `aivoice rollback` then goes back to v3, as after a guarded move
            assert registry.rollback(reason="after a UI rollback")["version"] == v3

            # when the UI deletes the champion alias, then it is put back; previous-champion is left alone
            move_alias_like_the_ui(uri, NAME, CHAMPION, None)
            event = wait_for(lambda: settled("revert", "deleted"), what="alias put back")
            assert registry.aliases() == {CHAMPION: v3, PREVIOUS: v1}, registry.aliases()
            actions = [e["action"] for e in registry.history()]
            assert actions == ["promote", "revert", "ui-promote", "ui-rollback", "rollback", "revert"], actions


@pytest.mark.integration
def test_warn_mode_keeps_an_unvalidated_ui_promotion_marked_forced(tmp_path, server_env, tiny_checkpoint):
    secret, port = uuid.uuid4().hex, free_port()
    hook = f"http://127.0.0.1:{port}/hooks/mlflow"
    with mlflow_server(tmp_path, hook, secret) as uri:
        server_env(uri)
        register_webhook(uri, hook, secret)
        v1 = registry.register(tiny_checkpoint(seed=1), base=True)
        v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=False)
        with aivoice_serve(tmp_path, uri, secret, port, ui_promotion="warn"):
            # when the UI makes the failed v2 champion under registry.ui_promotion = warn
            move_alias_like_the_ui(uri, NAME, CHAMPION, v2)
            event = wait_for(lambda: settled("ui-promote"), what="ui-promote")
        # then it stays, recorded as forced with the reason, and previous-champion is v1
        assert event["forced"] and "has not passed its gates" in event["reason"], event
        assert registry.aliases() == {CHAMPION: v2, PREVIOUS: v1}, registry.aliases()


def _replay_previous(events: list[dict]) -> int | None:
    """previous-champion as the history says it must be: each move sets it to the replaced champion,
    except a revert of an unguarded move, which leaves it where it was."""
    previous = None
    for e in events:
        if e["action"] != "revert" and e["previous"] is not None and e["previous"] != e["version"]:
            previous = e["previous"]
    return previous


@pytest.mark.integration
def test_concurrent_promotions_rollbacks_and_ui_moves_while_serving(tmp_path, server_env, tiny_checkpoint, speech_like):
    import io
    import os
    import sys
    import threading

    import soundfile as sf

    workers, ops, ui_moves = 4, 5, 3   # about 20 operations: CI time (the 4 x 8 run is in the README)
    secret, port = uuid.uuid4().hex, free_port()
    hook = f"http://127.0.0.1:{port}/hooks/mlflow"
    buf = io.BytesIO()
    sf.write(buf, speech_like(1.0, 24000), 24000, format="WAV")
    clip = buf.getvalue()
    with mlflow_server(tmp_path, hook, secret) as uri:
        server_env(uri)
        register_webhook(uri, hook, secret)
        # given a base champion v1, four versions validated against it (v2-v5) and a failed one (v6)
        v1 = registry.register(tiny_checkpoint(seed=1), base=True)
        validated = [v1] + [registry.register(tiny_checkpoint(seed=s), gates_passed=True, base_version=v1)
                             for s in (2, 3, 4, 5)]
        failed = registry.register(tiny_checkpoint(seed=6), gates_passed=False)
        with aivoice_serve(tmp_path, uri, secret, port):
            # when 4 processes promote and roll back at random, the UI makes the failed version champion
            # now and then, and 2 clients keep scoring with /detect throughout
            env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
            procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "guard_worker.py"), str(seed), str(ops),
                                       str(tmp_path / f"worker-{seed}.json"), ",".join(map(str, validated[1:] + [failed]))],
                                      env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"worker-{seed}.log", "wb"))
                     for seed in range(workers)]
            statuses: list[int] = []
            stop = threading.Event()

            def client() -> None:
                with httpx.Client(timeout=60) as http:
                    while not stop.is_set():
                        try:
                            r = http.post(f"http://127.0.0.1:{port}/detect", files={"file": ("clip.wav", clip)})
                            statuses.append(r.status_code)
                        except httpx.TransportError:
                            statuses.append(0)

            clients = [threading.Thread(target=client) for _ in range(2)]
            for c in clients:
                c.start()
            for _ in range(ui_moves):
                time.sleep(2.0)
                move_alias_like_the_ui(uri, NAME, CHAMPION, failed)
            for p in procs:
                assert p.wait(timeout=600) == 0, (tmp_path / f"worker-{procs.index(p)}.log").read_text()[-2000:]
            # the last UI move may still be on its way: wait until the champion is a recorded, settled one
            wait_for(lambda: registry.aliases().get(CHAMPION) != failed
                     and registry._state(tracking.configure(), NAME)[1] is None
                     and registry.aliases().get(CHAMPION) == last_event().get("version"), what="a settled champion")
            time.sleep(2.0)
            stop.set()
            for c in clients:
                c.join(timeout=120)
            final, events = registry.aliases(), registry.history()
            served = wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/model", timeout=10).json()["version"]
                              == final[CHAMPION], what="the service following the final champion")
    results = [r for seed in range(workers) for r in json.loads((tmp_path / f"worker-{seed}.json").read_text())]
    # then the history is one chain of validated champions, and the aliases are where it says
    for before, e in zip(events, events[1:]):
        if e["action"] == "revert":
            assert e["version"] == before["version"] and e["previous"] == failed, (before, e)
        else:
            assert e["previous"] == before["version"], f"broken chain: {before} -> {e}"
    assert all(e["version"] in validated for e in events), [e for e in events if e["version"] not in validated]
    assert final[CHAMPION] == events[-1]["version"] and final.get(PREVIOUS) == _replay_previous(events), (final, events)
    reverts = sum(e["action"] == "revert" for e in events)
    done = sum(r["result"] == "done" for r in results)
    refused = sum(r["result"] == "refused" for r in results)
    errors = [r for r in results if r["result"] == "error"]
    print(f"\nconcurrency: {len(results)} operations by {workers} processes ({done} done, {refused} refused, "
          f"{len(errors)} errors), {ui_moves} UI moves to failed v{failed}; {len(statuses)} /detect requests, "
          f"{sum(s != 200 for s in statuses)} failed; {len(events)} events, {reverts} reverts")
    assert served and not errors, errors
    assert statuses and all(s == 200 for s in statuses), f"failed requests: {[s for s in statuses if s != 200]}"
    assert done > 0, "no operation went through"
