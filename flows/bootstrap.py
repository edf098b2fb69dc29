"""The `bootstrap` flow: vocoded twins of the corpus's humans, then a base model trained on both and registered.

    twins (pipeline.stages.twins) -> train-and-register (pipeline.stages.bootstrap) -> aliases

The first registered version becomes `champion`, which the `retrain` flow then fine-tunes. Training
and registering happen in one stage function (pipeline.stages.bootstrap.run), so the task has no
retries: a retry would retrain from scratch, and bootstrap refuses to overwrite its checkpoint. The
twins task adds only the twins that are missing, so a re-run after a failure resumes it.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from flows.common import TRACKING_RETRIES, in_repo, project_env, scoped_env
from pipeline.io import registry
from pipeline.config import Params, apply_threads, load_params
from pipeline.stages import bootstrap as bootstrap_stage
from pipeline.stages import twins as twins_stage


class BootstrapParams(BaseModel):
    """What a run of `bootstrap` needs; a form in the Prefect UI. Paths are relative to `repo`."""

    model_config = ConfigDict(extra="forbid")

    corpus: str = Field(..., description="folder with MANIFEST.csv, or human/ and ai/ subfolders (e.g. data/store)")
    params_file: str = Field("params.yaml", description="settings file")
    repo: str = Field(".", description="project root")
    out: str | None = Field(None, description="checkpoint to write (default: train.out); never overwritten")
    report: str | None = Field(None, description="JSON report (default: train.report)")
    twins: bool = Field(True, description="make the vocoded twins (twins.vocoders) into train.twins first")


@task(name="twins", cache_policy=NO_CACHE)
def make_twins(corpus: str, params: Params, out: str) -> dict:
    """pipeline.stages.twins.run: resynthesise the corpus's human training clips (only the missing twins)."""
    result = twins_stage.run(params, corpus, out)
    get_run_logger().info("twins: %d added, %d already there, %d failed (%s)", result["added"], result["existing"],
                          result["failed"], result["report"])
    return result


@task(name="train-and-register", cache_policy=NO_CACHE)
def train_and_register(corpus: str, params: Params, out: str, report: str, twins: str) -> dict:
    """pipeline.stages.bootstrap.run: train, track in MLflow (tagged with the flow run), register."""
    result = bootstrap_stage.run(params, corpus, out, report, twins)
    get_run_logger().info("registered %s v%s from MLflow run %s", params.registry.model_name,
                          result["model_version"], result["mlflow_run_id"])
    return result


@task(name="aliases", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def aliases_of(version: int, model_name: str) -> list[str]:
    """The aliases that now point at `version` (champion when it was the first)."""
    return sorted(a for a, v in registry.aliases(model_name).items() if v == version)


@flow(name="bootstrap")
def bootstrap(params: BootstrapParams) -> dict:
    """Train a base model from scratch on a corpus and register it (champion if it is the first)."""
    repo = Path(params.repo).resolve()
    cfg = load_params(repo / params.params_file)
    apply_threads(cfg)                               # compute.threads: training runs in this process
    run_id = flow_run.get_id()
    out = in_repo(repo, params.out or cfg.train.out)
    report = in_repo(repo, params.report or cfg.train.report)
    corpus = str(in_repo(repo, params.corpus))
    twins = str(in_repo(repo, cfg.train.twins)) if cfg.train.twins else ""
    with scoped_env(project_env(repo, run_id)):      # the MLflow run gets tag prefect_flow_run_id
        if params.twins and twins and cfg.twins.vocoders:
            make_twins(corpus, cfg, twins)
        result = train_and_register(corpus, cfg, str(out), str(report), twins)
        aliases = aliases_of(result["model_version"], cfg.registry.model_name)
    overall = result["validation"]["overall"]
    summary = {"flow_run_id": run_id, "model_name": cfg.registry.model_name, "model_version": result["model_version"],
               "aliases": aliases, "mlflow_run_id": result["mlflow_run_id"], "checkpoint": result["checkpoint"],
               "data_hash": result["data_hash"], "n_train": result["n_train"], "n_twins": result["n_twins"],
               "n_val": result["n_val"], "threshold": result["calibration"]["threshold"], "split_by": result["split_by"],
               "validation": {k: overall[k] for k in ("eer", "auc", "accuracy", "fpr", "fnr") if k in overall}}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in summary["validation"].items())
    create_markdown_artifact(
        key="bootstrap-report", description=f"bootstrap: v{summary['model_version']}",
        markdown=f"# Bootstrap: {summary['model_name']} v{summary['model_version']} "
                 f"({', '.join(summary['aliases']) or 'no alias'})\n\n"
                 f"- MLflow run `{summary['mlflow_run_id']}` (tag prefect_flow_run_id = `{run_id}`)\n"
                 f"- checkpoint `{summary['checkpoint']}`, data {summary['data_hash']}; "
                 f"{summary['n_train']} training clips ({summary['n_twins']} vocoded twins) / {summary['n_val']} "
                 f"validation clips (whole {result['split_by']}s held out); calibrated threshold "
                 f"{summary['threshold']:.3f}\n\n"
                 f"| validation | value |\n|---|---|\n{rows}\n")
    return summary


def run_bootstrap(corpus: str, params_file: str = "params.yaml", *, out: str | None = None,
                  report: str | None = None, repo: str = ".", twins: bool = True) -> dict:
    """Run `bootstrap` once, here (for the CLI); returns its summary."""
    return bootstrap(BootstrapParams(corpus=corpus, params_file=params_file, repo=repo, out=out, report=report,
                                     twins=twins))
