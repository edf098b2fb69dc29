"""A DVC remote for the store and the models: where a team's checkouts and workers share the audio.

`aivoice remote add NAME URL` configures it (the default remote, in `.dvc/config`, so it is committed
and every clone gets it; credentials go to `.dvc/config.local`, which git ignores). The retrain flow
pulls before its stages and pushes after them when a default remote is configured, so a worker on
another machine starts from the store the last run left, and a clone can `dvc pull` what produced a
candidate. URLs: a local or mounted path, `ssh://user@host[:port]/path` (needs the `team` extra,
dvc-ssh), or any other scheme DVC knows. DVC runs as a child process (`python -m dvc`): only its
command line is its public interface.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class RemoteError(RuntimeError):
    """A DVC remote command failed; the message carries DVC's own last lines."""


def _dvc(repo: Path, *args: str, timeout: float = 3600) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                          timeout=timeout, env=_env())
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RemoteError(f"dvc {' '.join(args)} in {repo} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def _env() -> dict:
    import os

    return os.environ | {"DVC_NO_ANALYTICS": "1", "COLUMNS": "100000"}   # DVC wraps its tables at the terminal width


def add(name: str, url: str, repo: str | Path = ".", *, default: bool = True, keyfile: str | None = None,
        user: str | None = None) -> None:
    """Add (or re-point) remote `name` at `url`; the default remote unless default=False. `keyfile` and
    `user` (SSH) are stored in .dvc/config.local: they belong to this machine, not to the project."""
    repo = Path(repo)
    if not (repo / ".dvc").is_dir():
        raise RemoteError(f"{repo.resolve()}: not a DVC project (no .dvc folder); run it in the project root")
    if "://" not in url:   # a path: absolute, so that it means the same from every stage's working folder
        url = str(Path(url).expanduser().resolve())
    _dvc(repo, "remote", "add", "--force", *(["--default"] if default else []), name, url)
    for key, value in (("keyfile", keyfile), ("user", user)):
        if value:
            _dvc(repo, "remote", "modify", "--local", name, key, value)


def remotes(repo: str | Path = ".") -> dict[str, str]:
    """{name: url} of the configured remotes."""
    out = _dvc(Path(repo), "remote", "list")
    return {parts[0]: parts[1] for parts in (line.split() for line in out.splitlines()) if len(parts) >= 2}


def default(repo: str | Path = ".") -> str | None:
    """The default remote's name, or None when there is none."""
    out = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=repo, capture_output=True, text=True,
                         env=_env())
    name = out.stdout.strip()
    return name if out.returncode == 0 and name else None


def push(repo: str | Path = ".", remote: str | None = None) -> str:
    """Send every cached output of dvc.lock (store, twins, copies, candidate) to the remote."""
    return _dvc(Path(repo), "push", *(["-r", remote] if remote else []))


def pull(repo: str | Path = ".", remote: str | None = None, *, allow_missing: bool = False) -> str:
    """Fetch and check out the outputs dvc.lock records. allow_missing: outputs the remote does not hold
    yet (a first run) are skipped instead of failing."""
    return _dvc(Path(repo), "pull", *(["-r", remote] if remote else []), *(["--allow-missing"] if allow_missing else []))


def missing_outputs(repo: str | Path = ".") -> list[str]:
    """Cached outputs dvc.lock records that are absent from the workspace (a fresh clone, a new worker)."""
    import yaml

    lock = Path(repo) / "dvc.lock"
    if not lock.is_file():
        return []
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    paths = {out["path"] for stage in stages.values() for out in stage.get("outs", []) if "md5" in out}
    return sorted(p for p in paths if not (Path(repo) / p).exists())


def pull_missing(repo: str | Path = ".", remote: str | None = None) -> list[str]:
    """Pull only the outputs missing here: what the workspace holds (e.g. clips ingested since the last
    run) is never overwritten by an older version from the remote. Returns the paths pulled."""
    missing = missing_outputs(repo)
    if missing:
        _dvc(Path(repo), "pull", "--allow-missing", *(["-r", remote] if remote else []), *missing)
    return missing
