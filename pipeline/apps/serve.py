"""HTTP detection service for the registry's `champion`, following the alias without a restart.

FastAPI rather than `mlflow models serve`: MLflow's scoring server serves one fixed model URI (a moved
alias needs a restart) and takes JSON/CSV frames, not audio uploads; here uploads go through the same
streaming `detect_files` path as the CLI, and a new champion is swapped in while requests keep flowing.
GET / is a scoring page (plain HTML/JS/CSS shipped in pipeline/apps/page, no build step) over the same API.

Limits (serve.*): every request body is cut off past `max_upload_mb` as it arrives, whether or not it
declares a Content-Length, so a chunked upload is never spooled whole; an upload longer than
`max_duration_s` is refused from its header before decoding (and while decoding, for headers that lie);
at most `max_concurrent` /detect requests run at once and the next gets 503 with Retry-After at once,
rather than waiting in a queue; a request body not complete `request_timeout_s` after the request began
gets 408 and its slot back (a client sending 1 byte/s cannot hold a slot for ever).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from pipeline.io import alias_guard, registry
from pipeline.config import Params
from pipeline.apps.detect import detect_files
from pipeline.core.scoring import Scorer, threshold_mismatch

log = logging.getLogger(__name__)
_MULTIPART_SLACK = 64 * 1024  # multipart framing around the file, allowed on top of the size limit
PAGE_DIR = Path(__file__).with_name("page")  # the scoring page's static files (package data)
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Served:
    """One loaded model; requests take a reference once, so a swap never mixes two versions in a request."""

    scorer: Scorer
    resolved: registry.Resolved
    threshold: float
    loaded_at: str
    promotion: dict | None = None   # the version's latest promotion or rollback: at, by, reason, action
    threshold_mismatch: str | None = None   # scoring settings other than those the threshold was calibrated with


class Champion:
    """Holds the served model; `refresh()` reloads only when `champion` points at another version."""

    def __init__(self, params: Params, model_name: str, device: str) -> None:
        self.params, self.model_name, self.device = params, model_name, device
        self.current: Served | None = None
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Check the alias (one registry call); on a change build the new scorer fully, then swap it in."""
        with self._lock:
            version = registry.aliases(self.model_name).get(registry.CHAMPION)
            if version is None or (self.current is not None and self.current.resolved.version == version):
                return False
            model, resolved = registry.load_model(version, self.params, name=self.model_name)  # by number: no race
            scorer = Scorer(model, self.params.audio, self.device, channels_last=True)
            promotion = registry.describe_version(version, self.model_name)["promotion"]
            mismatch = threshold_mismatch(model.meta, self.params)
            self.current = Served(scorer, replace(resolved, alias=registry.CHAMPION), model.meta.threshold,
                                  datetime.now(timezone.utc).isoformat(timespec="seconds"), promotion, mismatch)
        log.info("serving %s v%d (%s)", self.model_name, version, resolved.checkpoint_path)
        if mismatch:   # the service keeps serving (refusing would take it down), but says so where it is read
            log.warning("v%d's threshold was calibrated with other scoring settings: %s; its false-positive rate "
                        "does not hold under these (GET /model: threshold_mismatch)", version, mismatch)
        return True


class Refresher(threading.Thread):
    """Calls `champion.refresh()` every `every_s` seconds and whenever `wake()` is called."""

    def __init__(self, champion: Champion, every_s: float) -> None:
        super().__init__(name="champion-refresh", daemon=True)
        self.champion, self.every_s = champion, every_s
        self._woken, self._stopping = threading.Event(), threading.Event()

    def wake(self) -> None:
        self._woken.set()

    def stop(self) -> None:
        self._stopping.set()
        self._woken.set()
        self.join(timeout=10)

    def run(self) -> None:
        while not self._stopping.is_set():
            self._woken.wait(self.every_s)
            self._woken.clear()
            if not self._stopping.is_set():
                _refresh_logged(self.champion)


def _refresh_logged(champion: Champion) -> None:
    try:
        champion.refresh()
    except Exception as exc:  # keep serving the current model whatever the registry or the checkpoint did
        log.warning("champion refresh failed, still serving the current model: %s", exc)


def create_app(params: Params, model_name: str = registry.DEFAULT_NAME, refresh_s: float = 5.0,
               max_upload_mb: float = 50.0, device: str = "cpu", max_duration_s: float = 600.0,
               max_concurrent: int = 4, request_timeout_s: float = 30.0, webhook_secret: str | None = None,
               ui_promotion: str = "revert") -> FastAPI:
    """The service: GET / (scoring page), POST /detect (one audio file, multipart field `file`),
    GET /health, GET /model, POST /hooks/mlflow (MLflow's alias webhook, signed with `webhook_secret`;
    refused with 403 when the service has none)."""
    champion = Champion(params, model_name, device)
    refresher = Refresher(champion, refresh_s)
    max_bytes = int(max_upload_mb * 2**20)
    limits = {"max_upload_mb": max_upload_mb, "max_duration_s": max_duration_s, "max_concurrent": max_concurrent,
              "request_timeout_s": request_timeout_s}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _refresh_logged(champion)
        refresher.start()
        yield
        refresher.stop()

    app = FastAPI(title="ai-voice-detector", lifespan=lifespan)
    app.state.champion = champion
    app.add_middleware(RequestLimits, max_body=max_bytes + _MULTIPART_SLACK, max_upload_mb=max_upload_mb,
                       max_concurrent=max_concurrent, bounded=("/detect",), request_timeout_s=request_timeout_s)
    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")

    @app.exception_handler(BodyRefused)
    async def refused(request, exc: BodyRefused) -> JSONResponse:  # close: the rest of the body is not read
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers={"Connection": "close"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    def health() -> JSONResponse:
        served = champion.current
        if served is None:
            return JSONResponse({"status": "no model", "model": model_name}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_name, "version": served.resolved.version})

    @app.get("/model")
    def model() -> dict:
        served = _served(champion)
        return {"name": model_name, "version": served.resolved.version, "alias": served.resolved.alias,
                "threshold": served.threshold, "checkpoint": str(served.resolved.checkpoint_path),
                "loaded_at": served.loaded_at, "promotion": served.promotion, "limits": limits,
                "threshold_mismatch": served.threshold_mismatch}

    guard_lock = threading.Lock()   # one reconcile at a time in this process (the registry lock spans processes)

    @app.post("/hooks/mlflow")
    async def mlflow_hook(request: Request) -> dict:
        """An alias moved in the registry: a champion move made outside aivoice passes the guard (alias_guard)."""
        body = await request.body()
        if webhook_secret is None:
            raise HTTPException(403, f"no webhook secret configured (${alias_guard.SECRET_ENV} or "
                                     f"${alias_guard.SECRET_FILE_ENV}): MLflow webhooks are refused")
        if not alias_guard.signature_ok(webhook_secret, body, request.headers):
            log.warning("MLflow webhook refused: bad or missing signature (from %s)", request.client)
            raise HTTPException(401, "bad or missing X-MLflow-Signature")
        try:
            payload = json.loads(body)
            entity, data = payload["entity"], payload["data"]
        except (ValueError, KeyError, TypeError):
            raise HTTPException(400, "not an MLflow webhook payload") from None
        if entity != "model_version_alias" or data.get("name") != model_name or data.get("alias") != registry.CHAMPION:
            return {"action": "ignored"}

        def run() -> dict:
            with guard_lock:
                return alias_guard.reconcile(model_name, ui_promotion)

        try:
            done = await run_in_threadpool(run)
        except registry.RegistryError as exc:   # e.g. champion moved again meanwhile: 503, MLflow delivers again
            log.warning("MLflow webhook: %s", exc)
            raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None
        refresher.wake()
        return done

    @app.post("/detect")
    def detect(file: UploadFile = File(...)) -> dict:  # sync: scoring is CPU-bound and runs in the threadpool
        served = _served(champion)
        name = file.filename or "upload"
        with tempfile.TemporaryDirectory(prefix="aivoice-upload-") as tmp:
            path = Path(tmp) / f"upload{_suffix(name)}"
            _save_upload(file, path, max_bytes, max_upload_mb)
            found = next(detect_files([path], served.scorer, params, served.threshold,
                                      model_name=f"{model_name}/{served.resolved.version}",
                                      max_duration_s=max_duration_s))
        refresher.wake()
        if found.error:  # libsndfile's messages quote the file: name the upload, never the temporary path
            raise HTTPException(422, f"{name}: {found.error.replace(str(path), name)}")
        return asdict(found) | {"path": name, "model_version": served.resolved.version, "model_alias": served.resolved.alias}

    return app


class BodyRefused(HTTPException):
    """Raised from `receive` when the body is cut off; an HTTPException, so FastAPI answers with it."""


class BodyTooLarge(BodyRefused):
    """The body passed the size cap (413)."""


class BodyTimedOut(BodyRefused):
    """The body was not complete within the request timeout (408)."""


class RequestLimits:
    """ASGI middleware: counts each request body as it arrives and stops reading it past `max_body`
    (a declared Content-Length over it is refused before reading), and lets at most `max_concurrent`
    requests to the `bounded` paths run at once (the next ones get 503 + Retry-After immediately), and
    answers 408 when the body has not fully arrived `request_timeout_s` after the request began."""

    def __init__(self, app, *, max_body: int, max_upload_mb: float, max_concurrent: int,
                 bounded: tuple[str, ...], request_timeout_s: float = 30.0) -> None:
        self.app, self.max_body, self.max_concurrent, self.bounded = app, max_body, max_concurrent, bounded
        self.too_large = f"upload too large (limit {max_upload_mb:g} MB)"
        self.request_timeout_s = request_timeout_s
        self.timed_out = (f"request body not received within {request_timeout_s:g} s "
                          f"(serve.request_timeout_s); send it faster or in one go")
        self.active = 0   # only touched on the event loop

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            await _reply(send, 413, self.too_large)
            return
        bounded = scope["path"] in self.bounded
        if bounded and self.active >= self.max_concurrent:
            await _reply(send, 503, f"busy: {self.active} requests in progress (serve.max_concurrent = "
                                    f"{self.max_concurrent}); retry in {RETRY_AFTER_S} s",
                         [(b"retry-after", str(RETRY_AFTER_S).encode())])
            return
        received, started, complete = 0, False, False
        deadline = asyncio.get_running_loop().time() + self.request_timeout_s

        async def capped_receive():
            nonlocal received, complete
            if complete:   # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise BodyTimedOut(408, self.timed_out) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(413, self.too_large)
                complete = not message.get("more_body", False)
            return message

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.active += bounded
        try:
            await self.app(scope, capped_receive, watched_send)
        except BodyRefused as exc:   # raised outside a route's error handling: answer here if nothing was sent
            if not started:
                await _reply(send, exc.status_code, exc.detail)
        finally:
            self.active -= bounded


async def _reply(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def _served(champion: Champion) -> Served:
    served = champion.current
    if served is None:
        raise HTTPException(503, f"no {registry.CHAMPION} model of {champion.model_name} is loaded yet")
    return served


def _suffix(filename: str) -> str:
    """The upload's extension when it looks like one (libsndfile mostly sniffs the content anyway)."""
    suffix = Path(filename).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""


def _save_upload(file: UploadFile, path: Path, max_bytes: int, max_upload_mb: float) -> None:
    """Copy the upload to `path`; 413 once it exceeds the limit (also for uploads without a Content-Length)."""
    written = 0
    with open(path, "wb") as out:
        while chunk := file.file.read(1 << 20):
            written += len(chunk)
            if written > max_bytes:
                raise HTTPException(413, f"upload too large (limit {max_upload_mb:g} MB)")
            out.write(chunk)


def serve(params: Params, host: str = "127.0.0.1", port: int = 8000, *, model_name: str = registry.DEFAULT_NAME,
          refresh_s: float = 5.0, max_upload_mb: float = 50.0, device: str = "cpu", max_duration_s: float = 600.0,
          max_concurrent: int = 4, request_timeout_s: float = 30.0) -> None:
    """Run the service with uvicorn until interrupted (keyword names match ServeConfig's fields); the
    webhook secret comes from the environment (alias_guard.webhook_secret)."""
    import uvicorn

    app = create_app(params, model_name, refresh_s, max_upload_mb, device, max_duration_s, max_concurrent,
                     request_timeout_s, alias_guard.webhook_secret(), params.registry.ui_promotion)
    uvicorn.run(app, host=host, port=port, log_level="info")
