"""Pipeline stages: each module has `run(params) -> outputs` (called by Prefect tasks and tests)
and `main(argv=None) -> int` (called by `dvc repro` as `python -m pipeline.stages.<name>`)."""
