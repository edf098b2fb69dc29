"""The `gc` flow: `aivoice gc` on a schedule (flows/deploy.py:deploy_gc), so local copies do not pile up.

Keeps every registry version, every aliased model and the `keep` newest unaliased versions' local
checkpoint copies; moves older refused candidates' MLflow artifacts into storage.archive_dir; with a DVC
repository, `dvc gc -w -f` (pipeline/io/retention.py). Publishes what it
freed as a Prefect markdown artifact.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline.config import load_params
from pipeline.io.retention import collect_garbage


@flow(name="gc", log_prints=False)
def gc(repo: str = ".", keep: int | None = None, params_file: str = "params.yaml", dvc: bool = True) -> dict:
    """Collect the garbage retention allows in the project at `repo` (its params give the model name and,
    unless `keep` is given, storage.keep_candidates)."""
    params = load_params(Path(repo) / params_file)
    keep = params.storage.keep_candidates if keep is None else keep
    archive = params.storage.archive_dir
    archive = None if archive is None else Path(repo) / archive
    result = collect_garbage(params.registry.model_name, keep, repo if dvc else None, archive_dir=archive)
    dvc_freed = (result["dvc"] or {}).get("freed_bytes") or 0
    freed = result["cache_freed_bytes"] + dvc_freed
    get_run_logger().info("gc: %d versions, kept local copies of %s, removed %d, freed %.1f MB",
                          result["versions"], result["kept"], len(result["removed"]), freed / 1e6)
    create_markdown_artifact(key="gc-report", description="what gc kept and freed", markdown="\n".join([
        f"# gc of {params.registry.model_name}", "",
        f"- versions in the registry (all kept): {result['versions']}",
        f"- local checkpoint copies kept: {', '.join(f'v{v}' for v in result['kept']) or 'none'}",
        f"- removed: {len(result['removed'])} folder(s), {result['cache_freed_bytes'] / 1e6:.1f} MB",
        "- refused candidates archived: " + (", ".join(f"v{a['version']}" for a in result["archived"]) or "none"),
        "- DVC cache: " + (f"{dvc_freed / 1e6:.1f} MB freed (dvc gc -w -f)" if result["dvc"] else "not run"),
    ]))
    return result | {"freed_bytes": freed}
