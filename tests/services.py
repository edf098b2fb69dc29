"""Start the project's team services (scripts/services.sh) for integration tests, in a throw-away state
folder, and stop them whatever happens. The folder is made under /tmp, not pytest's tmp_path: as root,
PostgreSQL runs as the `postgres` user, which cannot enter pytest's private (0700) folders."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "services.sh"


def postgres_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return str(Path(found[-1]).parent) if found else (str(Path(shutil.which("pg_ctl")).parent) if shutil.which("pg_ctl") else None)


def require_postgres() -> None:
    if postgres_bin() is None:
        pytest.skip("PostgreSQL binaries not found (Debian package postgresql, `make system-deps`): "
                    "the PostgreSQL-backed services cannot start here")


@contextmanager
def services(which: str, **env: str) -> Iterator[dict[str, str]]:
    """Run `scripts/services.sh start` with AIVOICE_SERVICES=which; yields the variables it wrote to its
    env file (MLFLOW_TRACKING_URI, PREFECT_API_URL, AIVOICE_SERVICES_DIR) and stops everything after."""
    require_postgres()
    state = Path(tempfile.mkdtemp(prefix="aivoice-services-"))
    state.chmod(0o755)
    full = os.environ | {"AIVOICE_SERVICES_DIR": str(state), "AIVOICE_SERVICES": which,
                         "AIVOICE_BIN": str(Path(sys.executable).parent), "PG_BIN": postgres_bin()} | env
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], env=full, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"services.sh start failed:\n{proc.stdout}\n{proc.stderr}"
        values = {}
        for line in (state / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            values[key] = value
        yield values | {"_state": str(state)}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=full, capture_output=True, text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
