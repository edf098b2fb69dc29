"""Where the local tracking store and its checkpoint cache live, and a read-only fast path into it.

Importing MLflow costs ~1.5 s of every `aivoice detect`. When the registry is the local sqlite store and
the version an alias or number names was downloaded before, `cached_checkpoint` answers from the database
(one read-only query) and the cache folder, without MLflow. It returns None whenever it cannot be sure -
another store, a registry URI or workspace of its own, a version not cached, archived or deleted, a
schema it does not know - and the caller goes through MLflow (pipeline.io.registry.resolve), which gives
the same answer and fills the cache for next time.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
from pathlib import Path

DEFAULT_STORE_DIR = Path("mlruns")
CACHE_DIR_ENV = "AIVOICE_CACHE_DIR"


def default_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the local `sqlite:///<abs>/mlruns/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def cache_dir(uri: str) -> Path:
    """Cache for downloaded checkpoints: $AIVOICE_CACHE_DIR, else `.cache/` beside a sqlite store, else a temp folder."""
    if env := os.environ.get(CACHE_DIR_ENV):
        return Path(env).resolve()
    db = sqlite_path(uri)
    return db.parent / ".cache" if db is not None else Path(tempfile.gettempdir()) / "aivoice-model-cache"


def version_cache_folder(uri: str, name: str, version: int, source: str) -> Path:
    """The folder a version's checkpoint is downloaded into once (versions are immutable)."""
    key = hashlib.sha256(f"{uri}|{source}".encode()).hexdigest()[:12]
    return cache_dir(uri) / name / f"v{version}-{key}"


def cached_checkpoint(selector: int | str, name: str) -> tuple[int, Path] | None:
    """(version, checkpoint path) for an alias or version number of `name` in the local sqlite registry,
    when that version's checkpoint is already in the cache; else None (ask MLflow)."""
    uri = default_uri()
    db = sqlite_path(uri)
    registry_uri = os.environ.get("MLFLOW_REGISTRY_URI")
    if db is None or not db.is_file() or (registry_uri and registry_uri != uri) or os.environ.get("MLFLOW_WORKSPACE"):
        return None
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            if isinstance(selector, str):
                row = con.execute("SELECT version FROM registered_model_aliases WHERE workspace = 'default' AND "
                                  "name = ? AND alias = ?", (name, selector)).fetchone()
                if row is None:
                    return None
                selector = int(row[0])
            row = con.execute("SELECT source FROM model_versions WHERE workspace = 'default' AND name = ? AND "
                              "version = ? AND current_stage != 'Deleted_Internal'", (name, int(selector))).fetchone()
            archived = con.execute("SELECT 1 FROM model_version_tags WHERE workspace = 'default' AND name = ? AND "
                                   "version = ? AND key = 'archived'", (name, int(selector))).fetchone()
        finally:
            con.close()
    except sqlite3.Error:   # locked for longer than the timeout, or a schema this code does not know
        return None
    if row is None or archived is not None:
        return None
    folder = version_cache_folder(uri, name, int(selector), row[0])
    found = list(folder.iterdir()) if folder.is_dir() else []
    return (int(selector), found[0]) if len(found) == 1 and found[0].is_file() else None
