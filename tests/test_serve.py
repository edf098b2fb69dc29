"""The detection service, against a real app and a real MLflow registry store."""
from __future__ import annotations

import io
import threading
import time

import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from pipeline.io import registry
from pipeline.config import load_params
from pipeline.apps.serve import create_app

PARAMS = load_params("/nonexistent")


@pytest.fixture
def wav_bytes(speech_like) -> bytes:
    """A 2 s synthetic speech-like WAV at the model's rate."""
    buf = io.BytesIO()
    sf.write(buf, speech_like(2.0, PARAMS.audio.sample_rate), PARAMS.audio.sample_rate, format="WAV")
    return buf.getvalue()


@pytest.fixture
def champion_v1(mlflow_store, tiny_checkpoint) -> int:
    """A registry whose champion is its first version."""
    return registry.register(tiny_checkpoint(seed=1), gates_passed=True)


def detect(client: TestClient, data: bytes, filename: str = "clip.wav"):
    return client.post("/detect", files={"file": (filename, data, "application/octet-stream")})


def test_health_and_model_describe_the_champion(champion_v1):
    # given a service over a registry with a champion
    with TestClient(create_app(PARAMS)) as client:
        # when health and model are asked for
        health, model = client.get("/health"), client.get("/model")
    # then both report the champion's version, alias, threshold and local checkpoint
    assert health.status_code == 200 and health.json()["version"] == champion_v1, f"/health: {health.text}"
    body = model.json()
    assert (body["version"], body["alias"], body["threshold"]) == (champion_v1, "champion", 0.5), f"/model: {body}"
    assert body["checkpoint"].endswith(".pt") and body["name"] == registry.DEFAULT_NAME, f"/model: {body}"


def test_health_is_503_without_a_champion(mlflow_store):
    # given an empty registry, when the service starts, then it is up but unhealthy and refuses detection
    with TestClient(create_app(PARAMS)) as client:
        health, model = client.get("/health"), client.get("/model")
    assert health.status_code == 503 and health.json()["status"] == "no model", f"/health: {health.text}"
    assert model.status_code == 503 and "no champion" in model.json()["detail"], f"/model: {model.text}"


def test_detect_scores_an_uploaded_wav(champion_v1, wav_bytes):
    # given a service with a champion, when a WAV is uploaded
    with TestClient(create_app(PARAMS)) as client:
        response = detect(client, wav_bytes)
    # then the verdict comes back with the model version that produced it
    assert response.status_code == 200, f"/detect failed: {response.text}"
    body = response.json()
    assert 0 <= body["ai_score"] <= 1 and body["label"] in ("AI_GENERATED", "HUMAN"), f"verdict: {body}"
    assert body["path"] == "clip.wav" and body["error"] is None, f"verdict: {body}"
    assert body["model_version"] == champion_v1 and body["model_alias"] == "champion", f"verdict: {body}"
    assert len(body["windows"]) == 1, f"a 2 s clip is one 3 s window: {body['windows']}"
    assert body["window_starts"] == [0.0] and body["duration_s"] == pytest.approx(2.0), f"timeline: {body}"


def test_detect_gives_each_window_its_start(champion_v1, speech_like):
    # given a 7.3 s clip (windows of 3 s every 1.5 s), when uploaded
    buf = io.BytesIO()
    sf.write(buf, speech_like(7.3, PARAMS.audio.sample_rate), PARAMS.audio.sample_rate, format="FLAC")
    with TestClient(create_app(PARAMS)) as client:
        body = detect(client, buf.getvalue(), "long.flac").json()
    # then each window score comes with its start: every hop, and one flush with the end
    assert body["window_starts"] == [0.0, 1.5, 3.0, 4.3], f"starts: {body['window_starts']}"
    assert len(body["windows"]) == 4 and body["duration_s"] == pytest.approx(7.3), f"timeline: {body}"


def test_page_and_model_give_the_champion_its_promotion(champion_v1):
    # given a service whose champion was made champion at registration
    with TestClient(create_app(PARAMS, max_duration_s=90.0)) as client:
        page, script, model = client.get("/"), client.get("/static/page.js"), client.get("/model").json()
    # then / is the scoring page, its script is served, and /model says when the champion was promoted
    assert page.status_code == 200 and "text/html" in page.headers["content-type"], f"/: {page.status_code}"
    assert 'id="timeline"' in page.text and "/static/page.js" in page.text, "the page's canvas and script"
    assert script.status_code == 200 and "/detect" in script.text, f"/static/page.js: {script.status_code}"
    assert model["promotion"]["action"] == "promote" and model["promotion"]["at"], f"/model: {model}"
    assert model["limits"] == {"max_upload_mb": 50.0, "max_duration_s": 90.0, "max_concurrent": 4,
                               "request_timeout_s": 30.0}, f"/model: {model}"


def test_oversized_uploads_get_413(champion_v1):
    # given a 0.01 MB limit (10 KiB)
    with TestClient(create_app(PARAMS, max_upload_mb=0.01)) as client:
        # when a body far over the limit arrives, then it is refused from its Content-Length
        far = detect(client, b"\0" * 200_000)
        # when a file just over the limit arrives (body within the multipart slack), then it is refused while copied
        near = detect(client, b"\0" * 20_000)
    for response in (far, near):
        assert response.status_code == 413 and "too large" in response.json()["detail"], f"{response.text}"


def test_non_audio_upload_gets_a_clear_422(champion_v1):
    # given a service, when a text file is uploaded as audio
    with TestClient(create_app(PARAMS)) as client:
        response = detect(client, b"this is not audio at all\n" * 40, filename="notes.txt")
    # then it is a 422 whose message names the upload and the reason
    assert response.status_code == 422, f"expected 422: {response.status_code} {response.text}"
    detail = response.json()["detail"]
    assert detail.startswith("notes.txt: ") and "audio" in detail, f"error message: {detail}"
    assert "aivoice-upload" not in detail and "/tmp" not in detail, f"a server-side path leaked: {detail}"


def test_champion_switch_without_failed_requests(mlflow_store, tiny_checkpoint, wav_bytes):
    # given v1 champion and v2 challenger, and a service re-checking the alias every 0.5 s
    v1 = registry.register(tiny_checkpoint(seed=1), gates_passed=True)
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=True)
    results: list[tuple[int, int | None]] = []
    stop = threading.Event()
    with TestClient(create_app(PARAMS, refresh_s=0.5)) as client:
        def fire() -> None:
            while not stop.is_set():
                r = detect(client, wav_bytes)
                results.append((r.status_code, r.json().get("model_version")))

        firing = threading.Thread(target=fire)
        firing.start()
        try:
            while len(results) < 2:
                time.sleep(0.05)
            # when the champion alias moves to v2 while requests keep coming
            registry.promote(reason="switch test")
            deadline = time.monotonic() + 10
            while client.get("/model").json()["version"] != v2 and time.monotonic() < deadline:
                time.sleep(0.1)
            switched_after = len(results)
            while len(results) < switched_after + 2:
                time.sleep(0.05)
        finally:
            stop.set()
            firing.join(timeout=30)
        model = client.get("/model").json()
    # then no request failed, versions only went v1 -> v2, and both /model and /detect now report v2
    assert all(status == 200 for status, _ in results), f"failed requests during the switch: {results}"
    versions = [v for _, v in results]
    assert versions[0] == v1 and versions[-1] == v2, f"expected v1 first and v2 last: {versions}"
    assert versions == sorted(versions), f"served versions must not go back and forth: {versions}"
    assert model["version"] == v2 and model["alias"] == "champion", f"/model after the switch: {model}"
