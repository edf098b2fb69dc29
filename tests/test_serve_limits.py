"""The service's input limits (serve.max_upload_mb, max_duration_s, max_concurrent) over real HTTP:
uvicorn on a local port in front of the real app and a real MLflow registry store."""
from __future__ import annotations

import http.client
import io
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import soundfile as sf
import uvicorn

from pipeline.io import registry
from pipeline.config import ParamsError, load_params
from pipeline.apps.serve import create_app

PARAMS = load_params("/nonexistent")
BOUNDARY = "aivoice-test-boundary"


@contextmanager
def live_service(**limits) -> Iterator[int]:
    """The service with these limits, served by uvicorn on a free local port; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(PARAMS, **limits), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def champion_v1(mlflow_store, tiny_checkpoint) -> int:
    return registry.register(tiny_checkpoint(seed=1), gates_passed=True)


def wav(speech_like, seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, speech_like(seconds, PARAMS.audio.sample_rate), PARAMS.audio.sample_rate, format="WAV")
    return buf.getvalue()


def multipart(data: bytes, filename: str = "clip.wav") -> tuple[bytes, bytes]:
    """(head, tail) of a multipart/form-data body with one file field `file` around `data`."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data, f"\r\n--{BOUNDARY}--\r\n".encode()


def post(port: int, data: bytes, filename: str = "clip.wav") -> tuple[int, dict, dict]:
    """A plain multipart POST /detect with a Content-Length; (status, json, headers)."""
    head, tail = multipart(data, filename)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/detect", body=head + tail,
                 headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read()), dict(r.getheaders())
    conn.close()
    return out


def open_chunked(port: int) -> http.client.HTTPConnection:
    """A POST /detect whose headers are sent, with Transfer-Encoding: chunked and no Content-Length."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/detect")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    return conn


def send_chunk(conn: http.client.HTTPConnection, data: bytes) -> None:
    conn.send(b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n")


def test_chunked_upload_is_refused_once_past_the_limit(champion_v1):
    # given a 1 MB limit, when a chunked upload (no Content-Length) of up to 96 MB is streamed in 64 KiB chunks
    chunk, total = b"\0" * 65536, 96 * 2**20
    with live_service(max_upload_mb=1.0) as port:
        conn = open_chunked(port)
        head, tail = multipart(b"")
        send_chunk(conn, head)
        sent, answered = len(head), False
        try:
            while sent < total and not answered:
                send_chunk(conn, chunk)
                sent += len(chunk)
                answered = bool(select.select([conn.sock], [], [], 0)[0])
            if not answered:
                send_chunk(conn, tail)
                send_chunk(conn, b"")
        except (BrokenPipeError, ConnectionResetError):
            pass   # the service answered and closed: what it said is read below
        response = conn.getresponse()
        status, body = response.status, json.loads(response.read())
        conn.close()
    # then it is a 413 that came while the body was still arriving: it was not spooled whole first
    # (the margin is what loopback socket buffers hold before the service reads them)
    assert status == 413 and "too large (limit 1 MB)" in body["detail"], f"{status} {body}"
    assert sent < 24 * 2**20, f"413 came only after {sent / 2**20:.0f} MB of a 96 MB chunked body"


def test_upload_longer_than_max_duration_is_refused(champion_v1, speech_like):
    # given a 5 s cap, when an 8 s clip and a 4 s clip are uploaded
    with live_service(max_duration_s=5.0) as port:
        long_status, long_body, _ = post(port, wav(speech_like, 8.0), "long.wav")
        short_status, short_body, _ = post(port, wav(speech_like, 4.0), "short.wav")
    # then the long one is a 422 naming the upload and both durations; the short one is scored
    assert long_status == 422, f"{long_status} {long_body}"
    assert long_body["detail"] == "long.wav: too long: 8.0 s (maximum 5 s)", long_body
    assert short_status == 200 and short_body["duration_s"] == pytest.approx(4.0), f"{short_status} {short_body}"


def test_requests_past_max_concurrent_get_503_at_once(champion_v1, speech_like):
    clip = wav(speech_like, 2.0)
    with live_service(max_concurrent=1) as port:
        # given one upload in progress (headers and half its body sent, the rest held back)
        held = open_chunked(port)
        head, tail = multipart(clip)
        send_chunk(held, head[: len(head) // 2])
        # when another upload comes, then it is refused at once with 503 and Retry-After, not queued
        started = time.monotonic()
        deadline = started + 10
        while (refused := post(port, clip))[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.1)   # the held request may not have reached the service yet
        status, body, headers = refused
        assert status == 503 and "busy" in body["detail"] and "max_concurrent" in body["detail"], f"{status} {body}"
        assert headers.get("retry-after") == "1", f"headers of the 503: {headers}"
        health = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        health.request("GET", "/health")
        assert health.getresponse().status == 200, "/health is not bounded"
        # when the held upload completes, then it is scored, and the slot is free again
        send_chunk(held, head[len(head) // 2:] + tail)
        send_chunk(held, b"")
        finished = held.getresponse()
        assert finished.status == 200, f"held upload: {finished.status} {finished.read()!r}"
        assert post(port, clip)[0] == 200, "after the held upload finished, a new one must be served"


def test_slow_client_gets_408_after_the_request_timeout_and_frees_its_slot(champion_v1, speech_like):
    clip = wav(speech_like, 2.0)
    with live_service(max_concurrent=1, request_timeout_s=2.0) as port:
        # given a client on a raw socket that sends its headers, then the body at 1 byte/s (slowloris)
        head, tail = multipart(clip)
        body = head + tail
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        # (the clock starts before the headers go: the service starts its own when it has them, which on a
        # busy host can be before this thread runs again; it once read 1.997 s here)
        started, sent, answer = time.monotonic(), 0, b""
        sock.sendall((f"POST /detect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                      f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode())
        while time.monotonic() - started < 20 and not select.select([sock], [], [], 1.0)[0]:
            if time.monotonic() - started < 1.5:   # stop short of the deadline: a byte still unread when
                sock.sendall(body[sent:sent + 1])    # the service closes makes Linux reset, not end, the stream
                sent += 1
        elapsed = time.monotonic() - started
        try:
            while chunk := sock.recv(65536):   # the headers and the body may come in separate reads
                answer += chunk
        except ConnectionResetError:   # a reset after the answer (see above) ends the stream as well as a FIN
            pass
        sock.close()
        # then the service answers 408 once the timeout passed, having taken a few bytes of the body
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), f"after {elapsed:.1f} s and {sent} bytes: {answer[:300]!r}"
        assert b"serve.request_timeout_s" in rest and 2.0 <= elapsed < 6.0, f"{elapsed:.1f} s: {rest[-300:]!r}"
        # and the concurrency slot it held is free: the next upload is scored, not refused with 503
        assert post(port, clip)[0] == 200, "the slow client's slot was not released"


@pytest.mark.parametrize("key, bad", [("max_upload_mb", 0), ("max_duration_s", -1), ("max_concurrent", 0),
                                      ("max_concurrent", 1.5), ("request_timeout_s", 0)])
def test_bad_limits_fail_at_load_time_naming_the_key(tmp_path, key, bad):
    # given a params file with a limit that would refuse everything (or is not a count)
    path = tmp_path / "params.yaml"
    path.write_text(f"serve:\n  {key}: {bad}\n")
    # then loading it fails naming the key, and the shipped params.yaml sets all three
    with pytest.raises(ParamsError, match=rf"serve\.{key}"):
        load_params(path)
    shipped = load_params(Path(__file__).resolve().parents[1] / "params.yaml").serve
    assert (shipped.max_upload_mb, shipped.max_duration_s, shipped.max_concurrent) == (50.0, 600.0, 4)
