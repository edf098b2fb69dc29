"""HTTP detection service for the registry's `champion`, following the alias without a restart.

FastAPI rather than `mlflow models serve`: MLflow's scoring server serves one fixed model URI (a moved
alias needs a restart) and takes JSON/CSV frames, not audio uploads; here uploads go through the same
streaming `detect_files` path as the CLI, and a new champion is swapped in while requests keep flowing.
"""
from __future__ import annotations

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
from fastapi.responses import JSONResponse

from pipeline.io import registry
from pipeline.config import Params
from pipeline.apps.detect import detect_files
from pipeline.core.scoring import Scorer

log = logging.getLogger(__name__)
_MULTIPART_SLACK = 64 * 1024  # multipart framing around the file, allowed on top of the size limit


@dataclass(frozen=True)
class Served:
    """One loaded model; requests take a reference once, so a swap never mixes two versions in a request."""

    scorer: Scorer
    resolved: registry.Resolved
    threshold: float
    loaded_at: str


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
            scorer = Scorer(model, self.params.audio, self.device)
            self.current = Served(scorer, replace(resolved, alias=registry.CHAMPION), model.meta.threshold,
                                  datetime.now(timezone.utc).isoformat(timespec="seconds"))
        log.info("serving %s v%d (%s)", self.model_name, version, resolved.checkpoint_path)
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
               max_upload_mb: float = 50.0, device: str = "cpu") -> FastAPI:
    """The service: POST /detect (one audio file, multipart field `file`), GET /health, GET /model."""
    champion = Champion(params, model_name, device)
    refresher = Refresher(champion, refresh_s)
    max_bytes = int(max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _refresh_logged(champion)
        refresher.start()
        yield
        refresher.stop()

    app = FastAPI(title="ai-voice-detector", lifespan=lifespan)
    app.state.champion = champion

    @app.middleware("http")
    async def limit_upload(request: Request, call_next):
        declared = request.headers.get("content-length")
        if request.url.path == "/detect" and declared and declared.isdigit() and int(declared) > max_bytes + _MULTIPART_SLACK:
            return JSONResponse({"detail": f"upload too large (limit {max_upload_mb:g} MB)"}, status_code=413)
        return await call_next(request)

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
                "loaded_at": served.loaded_at}

    @app.post("/detect")
    def detect(file: UploadFile = File(...)) -> dict:  # sync: scoring is CPU-bound and runs in the threadpool
        served = _served(champion)
        name = file.filename or "upload"
        with tempfile.TemporaryDirectory(prefix="aivoice-upload-") as tmp:
            path = Path(tmp) / f"upload{_suffix(name)}"
            _save_upload(file, path, max_bytes, max_upload_mb)
            found = next(detect_files([path], served.scorer, params, served.threshold,
                                      model_name=f"{model_name}/{served.resolved.version}"))
        refresher.wake()
        if found.error:
            raise HTTPException(422, f"{name}: {found.error}")
        return asdict(found) | {"path": name, "model_version": served.resolved.version, "model_alias": served.resolved.alias}

    return app


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
          refresh_s: float = 5.0, max_upload_mb: float = 50.0, device: str = "cpu") -> None:
    """Run the service with uvicorn until interrupted (keyword names match ServeConfig's fields)."""
    import uvicorn

    uvicorn.run(create_app(params, model_name, refresh_s, max_upload_mb, device), host=host, port=port, log_level="info")
